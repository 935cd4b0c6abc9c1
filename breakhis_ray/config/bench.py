"""Config of the benchmarks (``breakhis-ray bench``): ingest, training step, batch inference and synthetic
generation, each a section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from breakhis_ray.config.base import StrictModel, parse_hw, wh_size
from breakhis_ray.config.common import DECODE_BACKENDS, RayConfig


class BenchIngestSection(StrictModel):
    """Ingest: Ray Data over Parquet shards vs a torch ``DataLoader`` over the loose PNGs vs PIL decode."""

    enabled: bool = True
    n_images: int = Field(default=480, ge=8, description="about this many synthetic 700x460 images")
    source: Literal["synthetic", "random"] = Field(default="synthetic", description="synthetic BreakHis tiles "
                                                   "(run_synth + prepare), or smooth random PNGs (faster to make)")
    size: int = Field(default=224, ge=8, description="square side every image is resized to")
    batch_size: int = Field(default=32, ge=1)
    workers: int | None = Field(default=None, ge=0, description="DataLoader workers; null: the cores")
    decode_num_cpus: float | None = Field(default=None, gt=0.0, description="as DataConfig.decode_num_cpus "
                                          "(null: the one rule, a whole core per task here)")
    decode_batch_size: int = Field(default=32, ge=1, description="as DataConfig (what training uses)")
    backend: Literal[DECODE_BACKENDS] = Field(
        default="auto", description="decoder of the Ray Data side and of dataloader_fast (as decode.backend)")
    repeats: int = Field(default=2, ge=1, description="rounds of every pass; the fastest pass counts")


class BenchTrainSection(StrictModel):
    """Training step: Ray Train ``TorchTrainer`` (1 worker) vs a plain PyTorch loop; ``scale_workers`` vs 1."""

    enabled: bool = True
    models: list[str] = Field(default=["tiny_cnn", "resnet18"], min_length=1,
                              description="create_model names, random init; the first gives the headline ratio")
    image_size: int = Field(default=96, ge=8)
    batch_size: int = Field(default=32, ge=1)
    warmup_steps: int = Field(default=5, ge=0, description="steps not timed (allocator, caches, prefetch)")
    warmup_s: float = Field(default=5.0, ge=0.0, description="Ray Train sides warm up at least this long (in steps "
                            "of the plain loop's step time): Ray Train's helper actors start during the first seconds")
    steps: int = Field(default=30, ge=1, description="timed steps per side")
    torch_threads: int = Field(default=1, ge=1, description="torch threads of the plain loop and of each worker")
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    scale_workers: int = Field(default=2, ge=0, description="also run this many workers against 1 (0 or 1: skip)")
    use_gpu: bool | None = Field(default=None, description="null: when torch sees a CUDA device")


class BenchInferenceSection(StrictModel):
    """Batch inference: pipeline vs the raw model on pre-decoded tensors; peak memory at N vs ``scale`` x N."""

    enabled: bool = True
    n_images: int = Field(default=256, ge=2, description="N of the classifier mode: runs of N and scale x N "
                          "images; the marginal rate between them is the steady rate, so the two runs must "
                          "differ by many seconds (docs/BENCHMARKS.md, third round)")
    unet_n_images: int | None = Field(default=40, ge=2, description="N of the U-Net + classifier mode and of the "
                                      "explain pass (a batch takes seconds there); null: n_images")
    scale: int = Field(default=10, ge=2)
    image_size: tuple[int, int] = Field(default=(460, 700), description="(H, W) of the synthetic PNG tiles")
    classifier: str = "tiny_cnn"
    input_size: int = Field(default=224, ge=8)
    segment_size: int = Field(default=256, ge=32, description="U-Net input side (multiple of 32)")
    batch_size: int = Field(default=16, ge=1)
    num_cpus: float | None = Field(default=None, gt=0.0, description="CPUs per Predictor actor; null: as "
                                   "InferConfig (planned by plan_stages)")
    num_gpus: float | None = Field(default=None, ge=0.0, description="GPUs per actor; null: 1 with CUDA, else 0")
    concurrency: int | None = Field(default=None, ge=1, description="Predictor actors; null: as InferConfig")
    decode_placement: Literal["auto", "actors", "tasks"] = Field(default="auto", description="as InferConfig")
    decode_num_cpus: float | None = Field(default=None, gt=0.0, description="as InferConfig (null: sized from "
                                          "the cores by plan_stages)")
    decode_batch_size: int | None = Field(default=None, ge=1, description="as InferConfig (null: planned)")
    forward_sweep: list[int] = Field(default=[1, 2, 4, 8, 16, 32], description="forward batch sizes of the "
                                     "classifier sweep ([]: none)")
    profile: bool = Field(default=True, description="cProfile one raw Predictor pass per mode and one more "
                          "classifier pipeline pass at scale x N for Ray Data's per-operator statistics")
    explain: bool = Field(default=True, description="also measure the classifier with --explain gradcam (raw "
                          "Predictor and pipeline at scale x N): img/s with and without, and their ratio")
    repeats: int = Field(default=2, ge=1, description="rounds of the N and scale x N pipeline runs per mode; the "
                         "round with the highest marginal rate counts (as ingest's fastest pass)")

    _image_size = field_validator("image_size", mode="before")(lambda cls, v: parse_hw(v))

    @field_validator("segment_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"segment_size must be a multiple of 32, got {value}")
        return value


class BenchSynthSection(StrictModel):
    """Synthetic generation: ``run_synth`` with Ray tasks vs the same task function in one process."""

    enabled: bool = True
    fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    patients: int | None = Field(default=24, ge=2, le=82)
    size: tuple[int, int] = (700, 460)
    masks: bool = True
    task_cpus: float = Field(default=0.5, gt=0.0)

    _size = field_validator("size", mode="before")(lambda cls, v: wh_size(v))


class BenchGpuSection(StrictModel):
    """The one-shot GPU check (``breakhis-ray bench --gpu``, ``make gpu-check``; :mod:`breakhis_ray.bench.gpu`):
    training steps with bf16 autocast, U-Net + classifier through the real ``infer`` pipeline, JPEG decode on
    CPU vs GPU. Without a GPU, :data:`GPU_SMOKE` sizes replace those not given explicitly (a CPU smoke run)."""

    enabled: bool = Field(default=False, description="run the GPU check instead of the four sections")
    device: Literal["auto", "cpu"] = Field(default="auto", description="cpu: the smoke run even with a GPU")
    models: list[str] = Field(default=["vgg16_bn", "resnet50"], min_length=1, description="trained, random init")
    image_size: int = Field(default=224, ge=8)
    batch_size: int = Field(default=64, ge=1)
    warmup_steps: int = Field(default=10, ge=0)
    steps: int = Field(default=40, ge=1)
    torch_threads: int = Field(default=4, ge=1, description="torch CPU threads of the training process")
    infer_classifier: str = "vgg16_bn"
    infer_images: int = Field(default=1024, ge=2)
    infer_batch_size: int = Field(default=64, ge=1)
    segment_size: int = Field(default=256, ge=32, description="U-Net input side (multiple of 32)")
    jpeg_images: int = Field(default=512, ge=1, description="images of the synthetic JPEG shards decoded")

    @field_validator("segment_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"segment_size must be a multiple of 32, got {value}")
        return value


#: Sizes of the GPU check's smoke run on a machine without CUDA (explicit values still win).
GPU_SMOKE: dict[str, Any] = {
    "models": ["tiny_cnn"], "image_size": 32, "batch_size": 4, "warmup_steps": 1, "steps": 2, "torch_threads": 1,
    "infer_classifier": "tiny_cnn", "infer_images": 8, "infer_batch_size": 4, "segment_size": 64, "jpeg_images": 8,
}


#: What ``quick: true`` changes; any value given explicitly (YAML, flag, override) still wins.
BENCH_QUICK: dict[str, dict[str, Any]] = {
    "ingest": {"n_images": 240},
    "train": {"models": ["tiny_cnn"], "steps": 25},
    "inference": {"n_images": 128, "unet_n_images": 16},
    "synth": {"fraction": 0.15, "patients": 8},
}


class BenchConfig(StrictModel):
    """``breakhis-ray bench``: ingest, training step, batch inference and synthetic generation, measured side
    by side in one run; prints a table of ratios and writes ``json_out`` with a profile beside it."""

    quick: bool = Field(default=False, description="smaller sizes (BENCH_QUICK): about 5 minutes on 2 CPU cores")
    json_out: str = Field(default="runs/bench/bench.json",
                          description="results JSON (relative: to the working directory); <stem>.profile.txt "
                          "(table + profile) is written beside it")
    workdir: str | None = Field(default=None, description="scratch data; null: a temporary folder, removed after")
    seed: int = 0
    ray_worker_niceness: int | None = Field(
        default=0, ge=0, le=19, description="niceness of the workers of a local Ray the bench starts. Ray's "
        "default (15) yields CPU to every other process, which on a shared machine slows only the Ray side of "
        "each ratio (the baselines run at 0 in the driver); null: Ray's default")
    ingest: BenchIngestSection = BenchIngestSection()
    train: BenchTrainSection = BenchTrainSection()
    inference: BenchInferenceSection = BenchInferenceSection()
    synth: BenchSynthSection = BenchSynthSection()
    gpu: BenchGpuSection = BenchGpuSection()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _quick_sizes(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("quick"):
            return data
        data = dict(data)
        for section, sizes in BENCH_QUICK.items():
            given = data.get(section) or {}
            if isinstance(given, dict):
                data[section] = {**sizes, **given}
        return data
