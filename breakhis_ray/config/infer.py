"""Config of batch inference (``breakhis-ray infer``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from breakhis_ray.config.base import StrictModel, parse_hw_or_none
from breakhis_ray.config.common import DecodeSection, RayConfig, lift_max_pixels


class ExplainSection(StrictModel):
    """Class-activation maps beside every prediction (``infer --explain gradcam``).

    ``method``: ``gradcam`` or ``gradcam++`` (null: off). Each ok row gets an overlay PNG and a raw map PNG at
    its input image's size under ``<out>/heatmaps/`` and their URI in ``heatmap_uri``. ``target_layer``: a
    module path of the classifier (null: the family's default, see :mod:`breakhis_ray.explain.gradcam`).
    """

    method: Literal["gradcam", "gradcam++"] | None = None
    target_layer: str | None = Field(default=None, description="module path, e.g. layer4 or features.29; "
                                     "null: the model family's default")

    @field_validator("method", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("none", "off", "") else value


class InferConfig(StrictModel):
    """``breakhis-ray infer``: Ray Data batch inference, one Parquet row per input image.

    Stages: listing (one recursive call) -> one actor pool (``batch_size``, ``concurrency``, ``num_cpus``,
    ``num_gpus``) running segmentation + classifier, which reads and decodes its own inputs or takes them from
    CPU decode tasks (``decode_placement``, ``decode_*``).
    Work is cut into deterministic chunks of ``chunk_size`` inputs, each written atomically as
    ``<out>/predictions/part-<chunk>.parquet``; a re-run with the same ``out`` skips finished chunks.
    The former top-level ``max_pixels`` key is still accepted and means ``decode.max_pixels`` (read back as
    ``cfg.max_pixels``).
    """

    input: str = Field(description="image tree (local or s3://), prepare output / Parquet shards, or a manifest")
    out: str = Field(description="output URI: predictions/, config.yaml, versions.json, summary.json")
    classifier: str = Field(description="classifier checkpoint directory (local or s3://)")
    segmenter: str | None = Field(default=None, description="U-Net checkpoint directory, 'threshold', "
                                  "'watershed' or null (no nuclear features)")
    segmenter_options: dict[str, Any] = Field(default_factory=dict,
                                              description="keyword options for create_segmenter")
    segment_size: tuple[int, int] | None = Field(
        default=None, description="(H, W) or 'WxH' the segmenter sees; null: the U-Net checkpoint's size, "
        "else the classifier's")
    input_format: Literal["auto", "images", "shards", "manifest"] = "auto"
    extensions: list[str] = Field(default=[".png", ".jpg", ".jpeg", ".tif", ".tiff"],
                                  description="image file suffixes taken from a tree (case-insensitive)")
    include_augmented: bool = Field(default=False, description="shards: also predict offline-augmented copies")
    decode: DecodeSection = Field(default_factory=DecodeSection, description="larger images than "
                                  "decode.max_pixels become error rows (checked from the header before decoding)")
    chunk_size: int = Field(default=1000, ge=1, description="inputs per output part (the unit of resume)")
    max_chunks: int | None = Field(default=None, ge=1, description="stop after writing this many parts")
    write_masks: bool = Field(default=False, description="write nuclei instance masks (uint16 PNG) under "
                              "<out>/masks/ and fill mask_uri")
    decode_placement: Literal["auto", "actors", "tasks"] = Field(
        default="auto", description="where images are read and decoded: 'actors' (in each Predictor actor, "
        "before its forward pass: no decoded pixels cross the object store, the fastest on CPU), 'tasks' "
        "(CPU Ray tasks beside the actors, the decode_* settings: keeps GPU actors fed), 'auto': actors when "
        "num_gpus is 0 and neither decode_num_cpus nor decode_concurrency is given, else tasks "
        "(docs/BENCHMARKS.md, seventh round)")
    # decode batches; CPU decode tasks (decode_placement=tasks)
    decode_batch_size: int | None = Field(
        default=None, ge=1, description="images per decode task, or per actor call with decode in the actors "
        "(read together, then decoded and predicted batch_size at a time); null: 32 per decode task (8% more "
        "img/s than 16 on 2 cores, docs/BENCHMARKS.md, sixth round), 128 per actor call (fewer, larger calls: "
        "Ray's cost per call is paid once for more images; seventh round)")
    decode_num_cpus: float | None = Field(default=None, gt=0.0, description="CPUs per decode task; null: sized "
                                          "from the cluster's cores, the CPUs the model actors leave split into "
                                          "ceil(free) tasks (2 cores, one 0.5-CPU actor: 2 tasks of 0.75; "
                                          "breakhis_ray.inference.plan.plan_stages)")
    decode_concurrency: int | None = Field(default=None, ge=1, description="max concurrent decode tasks; null: "
                                            "the planned task count on a local Ray this process starts (a "
                                            "fixed size), no cap on a joined cluster (an autoscaler may add "
                                            "nodes); plan_stages")
    decode_max_calls: int = Field(default=1000, ge=0, description="decode tasks per worker process before it "
                                  "is recycled; 0 = never (Ray may then fuse decoding into the model actors "
                                  "when both ask for the same resources)")
    io_threads: int = Field(default=8, ge=1, le=128, description="parallel reads inside one decode batch "
                             "(a decode task, or an actor call with decode in the actors)")
    # model stage (one actor per replica: segmenter + classifier fused)
    batch_size: int = Field(default=32, ge=1, description="images per model batch: a Predictor call beside "
                            "decode tasks; with decode in the actors, a call's images are decoded and predicted "
                            "this many at a time")
    concurrency: int | None = Field(default=None, ge=1, description="number of Predictor actors; null: one per "
                                    "num_cpus of the cluster with decode in the actors, 1 beside decode tasks")
    num_cpus: float | None = Field(default=None, gt=0.0, description="CPUs reserved per Predictor actor; null: 1 "
                                   "with decode in the actors (one core decodes and runs the model in turn), "
                                   "0.5 beside decode tasks")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per Predictor actor (fractions share one)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU")
    tta: bool = Field(default=False, description="test-time augmentation: average the class probabilities "
                      "over flips and quarter turns (8 views for square inputs, 4 otherwise; as many forward "
                      "passes)")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads per actor "
                                      "(null: max(1, round(num_cpus)), num_cpus as planned)")
    forward_batch_size: int | None = Field(default=None, ge=1, description="images per classifier forward pass "
                                           "inside a batch (null: 4 on CPU, where small batches stay in cache "
                                           "and run faster per image; the whole batch on GPU)")
    max_tasks_in_flight_per_actor: int | None = Field(
        default=None, ge=1, description="batches queued at each Predictor actor; null: 8 beside decode tasks, so "
        "an actor starts the next batch without waiting for the driver (Ray Data's default: 2; "
        "docs/BENCHMARKS.md, fourth round), 2 with decode in the actors, whose batches are paths: with 8 the "
        "first actor up took most of a short run's batches while the others idled (seventh round)")
    run_id: str | None = Field(default=None, description="null: a fresh id per run")
    explain: ExplainSection = Field(default_factory=ExplainSection, description="Grad-CAM heatmaps per "
                                    "prediction (--explain gradcam|gradcam++)")
    ray: RayConfig = RayConfig()

    _max_pixels = model_validator(mode="before")(lambda cls, data: lift_max_pixels(data))
    _segment_size = field_validator("segment_size", mode="before")(lambda cls, v: parse_hw_or_none(v))

    @model_validator(mode="after")
    def _no_decode_tasks_to_size(self) -> "InferConfig":
        if self.decode_placement == "actors":
            given = [k for k in ("decode_num_cpus", "decode_concurrency") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} size decode tasks, and decode_placement=actors runs "
                                 f"none: drop them or set decode_placement=tasks")
        return self

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("extensions must name at least one suffix")
        return [v.lower() if v.startswith(".") else "." + v.lower() for v in value]

    @property
    def max_pixels(self) -> int:
        """``decode.max_pixels`` (the decompression-bomb guard)."""
        return self.decode.max_pixels
