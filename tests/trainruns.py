"""Helpers of the determinism and resume tests: the demo's training config at test size, and bit-for-bit
comparison of what a run leaves behind (weights, optimiser state, history)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: history fields that measure wall-clock time: the only ones identical runs may differ in
TIMING = ("train_images_per_s",)


def tiny_cfg(tiny_breakhis: dict, storage: Path, *overrides: str):
    """``jobs/configs/train_tiny.yaml`` at test size: 48x72 images, batch 16, two workers, two epochs."""
    from breakhis_ray.config import TrainConfig, load_config

    return load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", [
        f"data.shards={tiny_breakhis['prepared']}",
        f"run.storage_path={storage}",
        "data.image_size=[48,72]",
        "train.epochs=2",
        "train.batch_size=16",
        "scaling.num_workers=2",
        *overrides,
    ])


def history(summary: dict) -> list[dict]:
    return json.loads((Path(summary["run_dir"]) / "history.json").read_text())


def without(rows: list[dict], keys) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in keys} for row in rows]


def final_state(summary: dict) -> tuple[dict, dict]:
    """``(model state_dict, optimizer state_dict)`` of a run's latest checkpoint."""
    from breakhis_ray.checkpoint import load_state_dict, load_train_state

    latest = summary["latest_checkpoint"]
    return load_state_dict(latest), load_train_state(latest)["optimizer"]


def epoch_checkpoints(summary: dict) -> dict[int, str]:
    """``{epochs done: checkpoint directory}`` of the epoch-end checkpoints still in the run's folder."""
    from breakhis_ray.checkpoint import read_meta

    out = {}
    for meta in Path(summary["run_dir"]).glob("checkpoint_*/meta.json"):
        metrics = read_meta(str(meta.parent)).get("metrics") or {}
        if not metrics.get("step"):
            out[int(metrics["epoch"])] = str(meta.parent)
    return out


def assert_same_tensors(a, b, where: str = "") -> None:
    """Recursively equal: tensors bit for bit (``torch.equal``, same dtype), everything else with ``==``."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
