"""Synthetic-generation benchmark: :func:`breakhis_ray.data.synthetic.run_synth` with Ray tasks vs one process.

Both sides render the same tiles (same seed, patients and fraction) with the same task function
(:func:`~breakhis_ray.data.synthetic.generate_group`, one call per patient and magnification) and write
them to local disk; the Ray side runs one task per group at ``task_cpus`` CPUs each. The time is
``run_synth``'s own generation time (dsfold files and the samples grid are off). A small unmeasured Ray
run just before the Ray side starts and warms the worker processes (imports; Ray soon stops idle workers
beyond one per core), so the ratio compares steady generation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from breakhis_ray.config import BenchSynthSection


def run_synth_benchmark(section: "BenchSynthSection", *, seed: int = 0,
                        workdir: str | None = None) -> dict[str, Any]:
    """images/s of the single-process and the Ray run, and ``ratio_ray_vs_single`` (sizes from ``section``)."""
    from breakhis_ray.config import RayConfig, SynthConfig
    from breakhis_ray.data.synthetic import run_synth
    from breakhis_ray.ray_utils import cpu_count, ensure_ray

    fraction, patients, size = section.fraction, section.patients, tuple(section.size)
    masks, task_cpus = section.masks, section.task_cpus

    ensure_ray(RayConfig(num_cpus=cpu_count()))
    own_tmp = tempfile.TemporaryDirectory(prefix="breakhis-bench-synth-") if workdir is None else None
    work = Path(own_tmp.name if own_tmp else workdir)

    def config(name: str, **changes) -> SynthConfig:
        values = {"out": str(work / name), "fraction": fraction, "patients": patients, "size": size,
                  "seed": seed, "masks": masks, "folds_files": False, "grid": False, "task_cpus": task_cpus}
        return SynthConfig(**{**values, **changes})

    try:
        single = run_synth(config("single"), use_ray=False)
        run_synth(config("warmup", patients=2, fraction=1e-4))  # right before: Ray reaps idle workers
        ray_run = run_synth(config("ray"))
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    return {
        "images": single["images"],
        "patients": single["patients"],
        "size": list(size),
        "masks": masks,
        "task_cpus": task_cpus,
        "cores": cpu_count(),
        "seconds": {"single": single["seconds"], "ray": ray_run["seconds"]},
        "images_per_s": {"single": single["images_per_second"], "ray": ray_run["images_per_second"]},
        "ratio_ray_vs_single": round(ray_run["images_per_second"] / single["images_per_second"], 3),
    }
