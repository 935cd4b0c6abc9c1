"""segment-eval building blocks without Ray: image/mask pairs through the one decoder, per-method summaries."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breakhis_ray.errors import DataError
from breakhis_ray.segmentation.evaluate import format_table, load_eval_pair, summarise_scores


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = np.zeros((20, 30), dtype=np.uint16)
    labels[2:6, 3:8] = 1
    labels[10:15, 20:26] = 300  # 16-bit instance ids survive decoding
    (tmp_path / "tile.png").write_bytes(_png(image))
    (tmp_path / "tile_nuclei.png").write_bytes(_png(labels))
    return tmp_path, image, labels


def test_load_eval_pair_native_and_resized(pair):
    tmp, image, labels = pair
    got_image, got_labels = load_eval_pair(str(tmp / "tile.png"), str(tmp / "tile_nuclei.png"), None)
    assert np.array_equal(got_image, image) and got_labels.dtype == np.int64
    assert np.array_equal(got_labels, labels.astype(np.int64))
    small_image, small_labels = load_eval_pair(str(tmp / "tile.png"), str(tmp / "tile_nuclei.png"), (10, 15))
    assert small_image.shape == (10, 15, 3) and small_labels.shape == (10, 15)
    assert set(np.unique(small_labels)) <= {0, 1, 300}  # nearest neighbour: no blended ids


def test_load_eval_pair_refuses_a_mask_of_another_size(pair):
    tmp, _, _ = pair
    (tmp / "other_nuclei.png").write_bytes(_png(np.zeros((8, 8), dtype=np.uint8)))
    with pytest.raises(DataError, match="8x8 but its image is 30x20"):
        load_eval_pair(str(tmp / "tile.png"), str(tmp / "other_nuclei.png"), None)


def test_summary_and_table():
    scores = pd.DataFrame({"path": ["a", "b", "a", "b"], "method": ["threshold", "threshold", "unet", "unet"],
                           "dice": [0.5, 0.7, 0.8, 1.0], "iou": [0.4, 0.6, 0.7, 0.9],
                           "count": [3.0, 5.0, 4.0, 4.0], "true_count": [4.0, 4.0, 4.0, 4.0]})
    summary = summarise_scores(scores, ["threshold", "unet"])
    assert summary["threshold"]["dice"] == pytest.approx(0.6) and summary["threshold"]["n"] == 2
    assert summary["threshold"]["dice_std"] == pytest.approx(0.1)
    assert summary["threshold"]["count_rel_error"] == pytest.approx(0.25) and summary["unet"]["count_rel_error"] == 0
    table = format_table(summary)
    assert table.splitlines()[0].split()[0] == "method" and "unet" in table
