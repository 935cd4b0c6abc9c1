"""A Predictor that reads and decodes its own inputs: ``infer``'s model stage with ``decode_placement=actors``.

Each call takes a batch of work units (image paths, or shard row groups), runs the CPU stage of
:mod:`breakhis_ray.inference.decode_stage` on them in this process and hands the decoded batch to
:class:`~breakhis_ray.inference.predictor.Predictor`. Nothing but paths goes in and nothing but the prediction
table comes out, so no decoded pixels pass through Ray's object store and no decode task is scheduled
(docs/BENCHMARKS.md, seventh round).
With GPUs the separate decode tasks stay the better shape: there they run on CPU cores beside a busy GPU.
This module never imports Ray.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from breakhis_ray.inference.decode_stage import read_and_decode, read_and_decode_shards
from breakhis_ray.inference.predictor import Predictor


class DecodingPredictor(Predictor):
    """:class:`Predictor` whose ``__call__`` takes work units and decodes them first.

    ``units``: ``images`` (a batch with a ``path`` column and the chunk id, read with ``io_threads`` threads)
    or ``shards`` (one row group per unit); either is decoded and predicted ``batch_rows`` images at a time, and
    a call returns one table. ``decode``: the keyword arguments of the decode functions (``preprocessing``,
    ``segment_size``, ``max_pixels``, ``backend``). The other arguments are the Predictor's.
    """

    def __init__(self, classifier: str, segmenter: str | None = None, *, units: str, decode: dict[str, Any],
                 io_threads: int = 8, batch_rows: int = 32, **options: Any) -> None:
        if units not in ("images", "shards"):
            raise ValueError(f"units must be 'images' or 'shards', got {units!r}")
        super().__init__(classifier, segmenter, **options)
        self.units = units
        self.decode_kwargs = dict(decode)
        self.io_threads = int(io_threads)
        self.batch_rows = int(batch_rows)

    def decoded_batches(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The decode stage's batches for one batch of work units."""
        if self.units == "shards":
            yield from read_and_decode_shards(batch, rows_per_batch=self.batch_rows, **self.decode_kwargs)
            return
        for start in range(0, len(batch["path"]), self.batch_rows):
            part = {key: values[start:start + self.batch_rows] for key, values in batch.items()}
            yield read_and_decode(part, io_threads=self.io_threads, **self.decode_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """One table for the whole call: every output block costs the driver the same, whatever its rows."""
        tables = []
        for decoded in self.decoded_batches(batch):
            tables.append(super().__call__(decoded))
        return pa.concat_tables(tables)
