"""One-shot GPU check (``breakhis-ray bench --gpu``, ``make gpu-check``): what one GPU machine does with this
project, in one JSON, in a few minutes.

* ``train``: training steps of each model in ``gpu.models`` (default VGG16-BN and ResNet-50, random init) with
  bf16 autocast through the project's own ``train_one_epoch`` (the plain side of :mod:`.train`): img/s, step
  time, GPU utilisation and peak GPU memory;
* ``inference``: U-Net (resnet18) + ``gpu.infer_classifier`` (default VGG16-BN) through the real ``infer``
  pipeline (:func:`breakhis_ray.inference.run_infer`: CPU decode tasks, one Predictor actor on the GPU) over
  synthetic 700x460 PNGs: img/s, GPU utilisation, peak GPU memory, and the raw Predictor on pre-decoded
  batches beside it;
* ``decode``: JPEG shards (``prepare image_format=jpeg`` of a synthetic BreakHis) decoded on the CPU (the one
  decoder, one core, times the cores) and with ``torchvision.io.decode_jpeg`` on the CPU and on CUDA (batched).

GPU utilisation is NVML's "percent of time a kernel ran" on device 0 (what ``torch.cuda.utilization`` reads),
sampled every 0.2 s while a part runs through ``pynvml`` (``nvidia-ml-py``), with the device's used memory;
``null`` without a GPU. It covers every process on the device, so the Predictor actor of ``infer`` counts.
Without a GPU the same code runs a smoke version on the CPU (:data:`~breakhis_ray.config.GPU_SMOKE` sizes,
``device: cpu``, no utilisation): the tests run it, so the GPU machine only has to run what was run here.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from breakhis_ray.config import BenchConfig, BenchGpuSection

log = logging.getLogger(__name__)


class GpuSampler:
    """Context manager sampling GPU utilisation (percent) and used memory (MiB) of one device every
    ``interval`` seconds through NVML; ``result()`` gives mean/max, or ``None`` values without NVML."""

    def __init__(self, device: int = 0, interval: float = 0.2):
        self.device, self.interval = device, interval
        self.util: list[float] = []
        self.memory: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = None

    def _open(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.device)
        except Exception:  # noqa: BLE001 - no NVML here (no GPU, no driver, package missing): report null
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        if self._nvml is None:
            return
        nvml, handle = self._nvml
        try:
            self.util.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            self.memory.append(nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        except Exception:  # noqa: BLE001 - a failed sample is skipped
            pass

    def __enter__(self) -> "GpuSampler":
        self._nvml = self._open()
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self) -> dict[str, Any]:
        if not self.util:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None, "gpu_memory_used_max_mib": None}
        return {"gpu_util_mean_pct": round(float(np.mean(self.util)), 1), "gpu_util_max_pct": max(self.util),
                "gpu_memory_used_max_mib": round(max(self.memory), 1)}


def _timed(func: Callable[[], Any], cuda: bool) -> tuple[Any, float, dict[str, Any]]:
    """``(result, seconds, GPU samples)`` of ``func()``; on CUDA also the peak memory torch allocated here."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as sampler:
        start = time.perf_counter()
        out = func()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    gpu = sampler.result()
    if cuda:
        gpu["torch_peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out, seconds, gpu


# ------------------------------------------------------------------------------------------------ parts
def train_steps(section: "BenchGpuSection", use_gpu: bool, seed: int) -> dict[str, Any]:
    """Training steps of every model in ``section.models`` (bf16 autocast on CUDA), one process."""
    from breakhis_ray.bench.train import plain_loop, step_job

    out = {}
    for model in section.models:
        job = step_job(model, section.image_size, section.batch_size, section.warmup_steps, section.steps,
                       section.torch_threads, use_gpu=use_gpu, workers=1, cpus_per_worker=1.0)
        stats, seconds, gpu = _timed(lambda: plain_loop(job, seed), use_gpu)
        out[model] = {**{k: round(v, 2) for k, v in stats.items()}, **gpu, "wall_s": round(seconds, 1),
                      "bf16_autocast": bool(use_gpu and job.train.train.amp)}
        log.info("gpu check: train %s: %.1f img/s", model, stats["images_per_s"])
    return out


def inference(section: "BenchGpuSection", work: Path, use_gpu: bool) -> dict[str, Any]:
    """U-Net + classifier through ``run_infer`` (one Predictor actor, 1 GPU when there is one) and the raw
    Predictor on pre-decoded batches in this process."""
    from breakhis_ray.bench.inference import pipeline_run, raw_baselines, write_checkpoints, write_images

    paths = write_images(work / "images", section.infer_images, (460, 700))
    write_images(work / "images_warmup", min(section.infer_images, section.infer_batch_size), (460, 700))
    clf, unet = write_checkpoints(work, section.infer_classifier, section.image_size, section.segment_size)
    values = {"input": str(work / "images"), "classifier": clf, "segmenter": unet,
              "batch_size": section.infer_batch_size, "num_gpus": 1.0 if use_gpu else 0.0,
              "device": "cuda" if use_gpu else "cpu", "num_cpus": 1.0, "decode_num_cpus": 1.0,
              "chunk_size": max(8, section.infer_images // 4)}
    # one unmeasured run first: worker pool, CUDA context, cuDNN autotuning
    pipeline_run({**values, "input": str(work / "images_warmup"), "out": str(work / "out-warmup")}, 0.5)
    run, _, gpu = _timed(lambda: pipeline_run({**values, "out": str(work / "out")}, 0.5), False)
    encoded = [Path(p).read_bytes() for p in paths[: min(len(paths), 4 * section.infer_batch_size)]]
    raw = raw_baselines(clf, unet, encoded, section.infer_batch_size, section.torch_threads)
    log.info("gpu check: U-Net + %s pipeline %.1f img/s", section.infer_classifier, run["images_per_s"])
    return {"classifier": section.infer_classifier, "segmenter": "unet_resnet18", "images": run["images"],
            "pipeline_images_per_s": run["images_per_s"], "pipeline_seconds": run["seconds"],
            "raw_predictor_images_per_s": raw["raw_predictor_images_per_s"],
            "pipeline_vs_raw_predictor": round(run["images_per_s"] / raw["raw_predictor_images_per_s"], 3),
            "peak_rss_mb": run["peak_rss_mb"], **gpu}


def _jpeg_shard_images(work: Path, count: int, seed: int) -> list[bytes]:
    """Encoded images of JPEG shards: a synthetic BreakHis prepared with ``image_format=jpeg``."""
    import pyarrow.parquet as pq

    from breakhis_ray import storage
    from breakhis_ray.bench.ingest import synth_options
    from breakhis_ray.config import PrepareConfig, SynthConfig
    from breakhis_ray.data.shards import run_prepare
    from breakhis_ray.data.synthetic import run_synth

    tree, prepared = work / "synthetic", work / "prepared_jpeg"
    sizes = synth_options(count, seed) if count >= 64 else {"patients": 2, "fraction": 1e-4}  # smoke: 8 tiles
    run_synth(SynthConfig(out=str(tree), seed=seed, masks=False, folds_files=False, grid=False, **sizes))
    # Only the encoded JPEG bytes are measured, so the split is irrelevant; an image split with 2 folds also
    # serves the 2-patient smoke cohort.
    split = {"mode": "image", "folds": 2} if count < 64 else {}
    run_prepare(PrepareConfig(root=str(tree), out=str(prepared), image_format="jpeg", quality=95, split=split))
    images: list[bytes] = []
    for part in storage.list_files(str(prepared / "shards"), suffixes=[".parquet"]):
        images += pq.read_table(part, columns=["image"]).column("image").to_pylist()
    return images[:count]


def decode_cpu_vs_gpu(section: "BenchGpuSection", work: Path, use_gpu: bool, cores: int, seed: int) -> dict:
    """JPEG shard images decoded by the one decoder on one CPU core, by torchvision on the CPU (one thread) and
    with ``torchvision.io.decode_jpeg(device="cuda")`` in batches."""
    import torch
    from torchvision.io import decode_jpeg

    from breakhis_ray.data.decode import decode_rgb

    images = _jpeg_shard_images(work, section.jpeg_images, seed)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
    out: dict[str, Any] = {"images": len(images), "mean_bytes": round(float(np.mean([len(b) for b in images])))}
    for b in images[:4]:
        decode_rgb(b)
    start = time.perf_counter()
    for b in images:
        decode_rgb(b)
    out["cpu_pil_1core_images_per_s"] = round(len(images) / (time.perf_counter() - start), 1)
    out["cpu_pil_all_cores_images_per_s"] = round(out["cpu_pil_1core_images_per_s"] * cores, 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        decode_jpeg(tensors)
        out["cpu_torchvision_1core_images_per_s"] = round(len(images) / (time.perf_counter() - start), 1)
    finally:
        torch.set_num_threads(previous)
    if use_gpu:
        batch = section.infer_batch_size
        decode_jpeg(tensors[:batch], device="cuda")  # warm-up (nvjpeg handles)

        def on_gpu():
            for i in range(0, len(tensors), batch):
                decode_jpeg(tensors[i:i + batch], device="cuda")

        _, seconds, gpu = _timed(on_gpu, True)
        out["gpu_nvjpeg_images_per_s"] = round(len(images) / seconds, 1)
        out["gpu_vs_cpu_all_cores"] = round(out["gpu_nvjpeg_images_per_s"] / out["cpu_pil_all_cores_images_per_s"], 2)
        out.update(gpu)
    else:
        out["gpu_nvjpeg_images_per_s"] = None
    log.info("gpu check: JPEG decode 1 core %.1f img/s, GPU %s img/s", out["cpu_pil_1core_images_per_s"],
             out["gpu_nvjpeg_images_per_s"])
    return out


# ------------------------------------------------------------------------------------------------ driver
def check_sizes(section: "BenchGpuSection", use_gpu: bool) -> "BenchGpuSection":
    """The sizes the check runs with: ``section`` on a GPU; without one, :data:`~breakhis_ray.config.GPU_SMOKE`
    in place of every size not given explicitly."""
    from breakhis_ray.config import GPU_SMOKE

    if use_gpu:
        return section
    return section.model_copy(update={k: v for k, v in GPU_SMOKE.items() if k not in section.model_fields_set})


def run_gpu_check(cfg: "BenchConfig", work: Path) -> dict[str, Any]:
    """Every part of the check (see the module docstring); on a machine without CUDA, the smoke sizes of
    :data:`~breakhis_ray.config.GPU_SMOKE` replace the sizes not given explicitly."""
    import torch

    from breakhis_ray.bench.machine import machine_info
    from breakhis_ray.ray_utils import cpu_count

    use_gpu = torch.cuda.is_available() and cfg.gpu.device != "cpu"
    section = check_sizes(cfg.gpu, use_gpu)
    results: dict[str, Any] = {"device": "cuda" if use_gpu else "cpu", "smoke": not use_gpu,
                               "machine": machine_info(), "sizes": section.model_dump(mode="json"), "seconds": {}}
    parts = (("train", lambda: train_steps(section, use_gpu, cfg.seed)),
             ("inference", lambda: inference(section, work / "inference", use_gpu)),
             ("decode", lambda: decode_cpu_vs_gpu(section, work / "decode", use_gpu, cpu_count(), cfg.seed)))
    for name, part in parts:
        start = time.perf_counter()
        results[name] = part()
        results["seconds"][name] = round(time.perf_counter() - start, 1)
    return results


def format_gpu_table(results: dict[str, Any]) -> str:
    """The check's numbers, one line each."""
    from breakhis_ray.bench.machine import describe

    def util(entry: dict) -> str:
        mean = entry.get("gpu_util_mean_pct")
        memory = entry.get("torch_peak_memory_mib") or entry.get("gpu_memory_used_max_mib")
        return (f", GPU util {mean:.0f}% mean" if mean is not None else ", GPU util n/a") + (
            f", peak {memory:.0f} MiB" if memory is not None else "")

    lines = [f"breakhis-ray bench --gpu ({'smoke on CPU' if results['smoke'] else 'CUDA'}), "
             f"{results['machine']['date']}: {describe(results['machine'])}"]
    for model, e in results["train"].items():
        lines.append(f"  train {model}: {e['images_per_s']:.1f} img/s, step {e['step_ms']:.1f} ms"
                     f"{' (bf16 autocast)' if e['bf16_autocast'] else ''}{util(e)}")
    e = results["inference"]
    lines.append(f"  infer U-Net + {e['classifier']} (pipeline): {e['pipeline_images_per_s']:.1f} img/s vs raw Predictor "
                 f"{e['raw_predictor_images_per_s']:.1f} ({e['pipeline_vs_raw_predictor']:.2f}x){util(e)}")
    d = results["decode"]
    gpu = d["gpu_nvjpeg_images_per_s"]
    lines.append(f"  JPEG shard decode: CPU {d['cpu_pil_1core_images_per_s']:.1f} img/s per core "
                 f"({d['cpu_pil_all_cores_images_per_s']:.1f} on all cores), torchvision CPU "
                 f"{d['cpu_torchvision_1core_images_per_s']:.1f}, CUDA " + ("n/a" if gpu is None else f"{gpu:.1f}"))
    lines.append(f"  wall {results['wall_s']:.0f} s")
    return "\n".join(lines)
