"""The Ray Data driver of ``infer``: work units -> Predictor actors (decoding their own inputs, or fed by CPU
decode tasks) -> chunk writer.

``breakhis-ray infer --input URI --out URI --classifier CKPT [--segmenter CKPT|threshold|watershed]``

1. **Listing** (driver, :mod:`~breakhis_ray.inference.plan`): one recursive listing of ``--input``, a
   deterministic order, chunks of ``chunk_size``.
2. **Decode** (:mod:`~breakhis_ray.inference.decode_stage`): read bytes through :mod:`breakhis_ray.storage`,
   decode with :mod:`breakhis_ray.data.decode` (the decoder ``prepare`` and training use, with its
   ``max_pixels`` guard) and prepare the model inputs; a bad input becomes an error row, nothing raises. Where
   it runs is ``decode_placement`` (:func:`~breakhis_ray.inference.plan.decode_placement`): in the model actors
   (:class:`~breakhis_ray.inference.decoding_predictor.DecodingPredictor`; the default on CPU) or in Ray tasks
   of ``decode_num_cpus`` each, sized from the cluster's cores by
   :func:`~breakhis_ray.inference.plan.plan_stages` (the default beside GPU actors).
3. **Model stage** (:class:`~breakhis_ray.inference.predictor.Predictor` actors: ``batch_size``,
   ``concurrency``, ``num_cpus``, ``num_gpus``, up to ``max_tasks_in_flight_per_actor`` batches queued at each):
   segmenter and classifier loaded once per actor, fused.
4. **Output** (driver, :mod:`~breakhis_ray.inference.writer`): one atomic Parquet part per complete chunk;
   a re-run processes only the missing chunks.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

from breakhis_ray import storage
from breakhis_ray.allocator import MODEL_PROCESS_ENV
from breakhis_ray.artifacts import write_json, write_provenance
from breakhis_ray.config import InferConfig
from breakhis_ray.inference.decode_stage import read_and_decode, read_and_decode_shards
from breakhis_ray.inference.decoding_predictor import DecodingPredictor
from breakhis_ray.inference.plan import InputPlan, StagePlan, plan_inputs, plan_stages
from breakhis_ray.inference.predictor import Predictor, new_run_id, resolve_sizes
from breakhis_ray.inference.schema import HEATMAPS_DIR, MASKS_DIR, PREDICTIONS_DIR
from breakhis_ray.inference.writer import ChunkWriter, check_or_write_plan, done_chunks, plan_record

log = logging.getLogger(__name__)


def cluster_stage_plan(cfg: InferConfig) -> StagePlan:
    """:func:`~breakhis_ray.inference.plan.plan_stages` with the CPUs of the connected Ray cluster (and whether
    this process started it: :func:`~breakhis_ray.ray_utils.fixed_size_cluster`)."""
    import ray

    from breakhis_ray.ray_utils import fixed_size_cluster

    return plan_stages(cfg, ray.cluster_resources().get("CPU"), fixed_size_cluster())


def _predictor_kwargs(cfg: InferConfig, segment_size, run_id: str, torch_threads: int) -> dict:
    return {
        "classifier": cfg.classifier,
        "segmenter": cfg.segmenter,
        "segmenter_options": dict(cfg.segmenter_options),
        "segment_size": list(segment_size) if segment_size else None,
        "device": cfg.device,
        "amp": cfg.amp,
        "tta": cfg.tta,
        "explain": cfg.explain.method,
        "explain_target_layer": cfg.explain.target_layer,
        "heatmap_dir": storage.join(cfg.out, HEATMAPS_DIR) if cfg.explain.method else None,
        "torch_threads": torch_threads,
        "forward_batch_size": cfg.forward_batch_size,
        "mask_dir": storage.join(cfg.out, MASKS_DIR) if cfg.write_masks and cfg.segmenter else None,
        "run_id": run_id,
    }


def model_stage_args(cfg: InferConfig, segment_size, run_id: str, stages: StagePlan,
                     decode: dict[str, Any] | None = None, units: str = "images",
                     call_images: int | None = None) -> dict[str, Any]:
    """The ``map_batches`` arguments of the Predictor stage: batch size, the actor pool, its resources. With
    ``decode`` (the decode functions' keyword arguments) the actors are
    :class:`~breakhis_ray.inference.decoding_predictor.DecodingPredictor` s that decode batches of ``units``
    themselves; a call then takes ``call_images`` images (default ``stages.decode_batch``), or one shard row
    group, and predicts them ``batch_size`` at a time."""
    import ray.data

    kwargs = _predictor_kwargs(cfg, segment_size, run_id, stages.torch_threads)
    call_images = call_images or stages.decode_batch
    batch_size = cfg.batch_size
    if decode is not None:
        kwargs.update(units=units, decode=decode, io_threads=cfg.io_threads, batch_rows=cfg.batch_size)
        batch_size = 1 if units == "shards" else call_images
    return {
        "batch_size": batch_size,
        "batch_format": "numpy",
        "fn_constructor_kwargs": kwargs,
        # batches queued at each actor: it starts the next one without waiting for the driver to dispatch it
        "compute": ray.data.ActorPoolStrategy(size=stages.actors,
                                              max_tasks_in_flight_per_actor=stages.tasks_in_flight),
        "num_cpus": stages.actor_cpus,
        "num_gpus": cfg.num_gpus or None,
        # model processes keep freed memory (breakhis_ray.allocator): no page faults on every batch
        "runtime_env": {"env_vars": dict(MODEL_PROCESS_ENV)},
    }


def build_dataset(cfg: InferConfig, plan: InputPlan, chunks: Sequence[int], preprocessing: dict,
                  segment_size, run_id: str, stages: StagePlan | None = None):
    """The Ray Data pipeline for ``chunks`` (``stages``: default :func:`cluster_stage_plan`).

    Decode in the actors: work units -> :class:`~breakhis_ray.inference.decoding_predictor.DecodingPredictor`
    actors. Decode in tasks: work units -> CPU decode tasks -> Predictor actors; with a cap on the decode
    tasks, Ray Data's per-operator resource reservation is off for this dataset: it budgeted the decode
    operator one 0.75-CPU task of the two planned on 2 cores (docs/BENCHMARKS.md)."""
    import ray.data

    stages = stages or cluster_stage_plan(cfg)
    units = plan.units(chunks)
    decode_kwargs = {"preprocessing": preprocessing, "segment_size": segment_size, "max_pixels": cfg.max_pixels,
                     "backend": cfg.decode.backend}
    unit_mode = "shards" if plan.mode == "shards" else "images"
    per_block = 1 if unit_mode == "shards" else stages.call_images(len(units))
    blocks = max(1, min(math.ceil(len(units) / per_block), 4096))
    ds = ray.data.from_arrow(units, override_num_blocks=blocks)
    if stages.placement == "actors":
        return ds.map_batches(DecodingPredictor, **model_stage_args(cfg, segment_size, run_id, stages,
                                                                    decode_kwargs, unit_mode, per_block))
    # Decode workers are recycled after decode_max_calls tasks (bounds allocator growth from images of
    # many sizes). Their remote args then differ from the actors', so Ray Data keeps decoding a separate
    # operator instead of fusing it into the model actors (it fuses only identical remote args).
    decode_remote: dict[str, Any] = {"num_cpus": stages.decode_num_cpus}
    if cfg.decode_max_calls:
        decode_remote["max_calls"] = cfg.decode_max_calls
    if stages.decode_concurrency:
        decode_remote["compute"] = ray.data.TaskPoolStrategy(size=stages.decode_concurrency)
    if unit_mode == "shards":
        ds = ds.map_batches(read_and_decode_shards, batch_size=1, batch_format="numpy",
                            fn_kwargs={**decode_kwargs, "rows_per_batch": stages.decode_batch}, **decode_remote)
    else:
        ds = ds.map_batches(read_and_decode, batch_size=stages.decode_batch, batch_format="numpy",
                            fn_kwargs={**decode_kwargs, "io_threads": cfg.io_threads}, **decode_remote)
    ds = ds.map_batches(Predictor, **model_stage_args(cfg, segment_size, run_id, stages))
    if stages.decode_concurrency:
        # the cap bounds the decode tasks; Ray Data's per-operator reservation would hold them below it
        ds.context.op_resource_reservation_enabled = False
    return ds


def run_infer(cfg: InferConfig) -> dict:
    """CLI stage: predict every input not yet in ``cfg.out``; return (and log) the run summary."""
    start = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    plan = plan_inputs(cfg)
    preprocessing, segment_size = resolve_sizes(cfg.classifier, cfg.segmenter, cfg.segment_size)
    pred_dir = storage.join(cfg.out, PREDICTIONS_DIR)
    storage.makedirs(pred_dir)
    resumed = check_or_write_plan(pred_dir, plan_record(plan, cfg))
    done = done_chunks(pred_dir, plan.n_chunks) if resumed else set()
    pending = [c for c in range(plan.n_chunks) if c not in done]
    if cfg.max_chunks is not None:
        pending = pending[: cfg.max_chunks]
    write_provenance(cfg.out, cfg)

    writer = ChunkWriter(plan, pred_dir, pending)
    stages = None
    if pending:
        from breakhis_ray.ray_utils import ensure_ray

        ensure_ray(cfg.ray)
        stages = cluster_stage_plan(cfg)
        if stages.placement == "actors":
            log.info("infer: %d Predictor actor(s) of %s CPU, each decoding its own batches (sized from %s)",
                     stages.actors, stages.actor_cpus, stages.sized_from)
        else:
            log.info("infer: decode tasks at %s CPU (%d beside the model actors' %s CPU, sized from %s; at most "
                     "%s at once)", stages.decode_num_cpus, stages.decode_tasks, stages.model_cpus,
                     stages.sized_from, stages.decode_concurrency or "what Ray Data's budget allows")
        ds = build_dataset(cfg, plan, pending, preprocessing, segment_size, run_id, stages)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
        missing = {c: m for c, m in writer.missing().items() if m}
        if missing:
            raise RuntimeError(f"inference lost rows: chunk -> missing rows {missing}")
    seconds = time.perf_counter() - start
    processed = writer.ok + writer.errors
    skipped = sum(plan.chunk_count(c) for c in done)
    remaining = plan.n_chunks - len(done) - writer.written
    summary = {
        "out": cfg.out,
        "predictions": pred_dir,
        "run_id": run_id,
        "mode": plan.mode,
        "total": len(plan.paths),
        "processed": processed,
        "ok": writer.ok,
        "error": writer.errors,
        "skipped_done": skipped,
        "chunks": plan.n_chunks,
        "chunks_written": writer.written,
        "chunks_skipped": len(done),
        "chunks_remaining": remaining,
        "complete": remaining == 0,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 2) if seconds > 0 else None,
        # how this run placed decode and sized its actors (null when nothing was left to do)
        "stages": stages.as_dict() if stages is not None else None,
    }
    write_json(storage.join(cfg.out, "summary.json"), summary)
    state = "complete" if remaining == 0 else f"INCOMPLETE: {remaining} chunk(s) left, re-run to finish"
    log.info("infer: total=%s ok=%s error=%s skipped_as_done=%s images/s=%s (%s) -> %s", summary["total"],
             writer.ok, writer.errors, skipped, summary["images_per_s"], state, pred_dir)
    return summary
