"""Ray Train classifier training: strategies, learning above chance, fault injection, resume, restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from breakhis_ray.config import TrainConfig, load_config
from breakhis_ray.errors import BreakhisError

REPO = Path(__file__).resolve().parents[1]


def _cfg(tiny_breakhis, tmp_path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", [
        f"data.shards={tiny_breakhis['prepared']}",
        f"run.storage_path={tmp_path / 'runs'}",
        "data.image_size=[48,72]",
        "train.epochs=2",
        "train.batch_size=16",
        *overrides,
    ])


def _history(summary: dict) -> list[dict]:
    return json.loads((Path(summary["run_dir"]) / "history.json").read_text())


def test_strategy_plan_covers_the_papers_four_strategies_and_warmup(tmp_path):
    from breakhis_ray.train import strategy_plan

    base = {"data": {"shards": str(tmp_path)}, "model": {"weights": "some.pth"}}

    def plan(strategy, **train):
        return strategy_plan(TrainConfig.model_validate({**base, "train": {"strategy": strategy, **train}}))

    assert plan("scratch") == (False, 0, False)
    assert plan("frozen") == (True, None, False)
    assert plan("finetune") == (True, 0, False)
    assert plan("finetune_aug") == (True, 0, True)
    assert plan("warmup_finetune", warmup_epochs=3) == (True, 3, True)
    no_weights = TrainConfig.model_validate({"data": {"shards": str(tmp_path)}, "train": {"strategy": "frozen"}})
    assert strategy_plan(no_weights)[0] is False  # nothing to load: the backbone starts random


# ------------------------------------------------------------------------------- the loop (no Ray)
def _tiny_learner(**kw):
    import torch

    from breakhis_ray.train import classifier, loop

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return loop.Learner(model, torch.nn.CrossEntropyLoss(), optimizer, None, torch.device("cpu"),
                        classifier.batch_stats, classifier.ZERO_SUMS, **kw)


def _batches(n: int, size: int = 3):
    import torch

    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


def test_build_optimizer_follows_the_optimiser_section():
    import torch

    from breakhis_ray.config import OptimConfig, SegOptimConfig
    from breakhis_ray.train.loop import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    for name, cls in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]:
        optimizer, _ = build_optimizer(SegOptimConfig(optimizer=name, lr=0.01), params)
        assert type(optimizer) is cls and optimizer.param_groups[0]["lr"] == 0.01
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}, {"params": params}]
    optimizer, scheduler = build_optimizer(OptimConfig(lr=1.0, scheduler="step", step_size=2), groups)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 1.0]  # a group's own lr wins
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.1])
    _, constant = build_optimizer(OptimConfig(scheduler="none"), params)
    assert isinstance(constant, torch.optim.lr_scheduler.LambdaLR)


def test_epoch_sums_keep_counts_exact_and_stop_at_max_steps():
    learner = _tiny_learner(max_steps=2)
    from breakhis_ray.train.loop import evaluate, train_one_epoch

    train = train_one_epoch(learner, _batches(5))
    assert train["seen"] == 6 and isinstance(train["seen"], int)  # two steps of three
    assert train["tp"] + train["tn"] + train["fp"] + train["fn"] == 6 and train["seconds"] > 0
    val = evaluate(learner, _batches(4))
    assert val["seen"] == 12 and val["correct"] == val["tp"] + val["tn"]
    assert evaluate(learner, []) == dict(learner.zero)  # ranks without validation add zeros


def test_evaluate_runs_the_bare_module_inside_a_wrapper():
    import torch

    from breakhis_ray.train.loop import evaluate

    class Wrapper(torch.nn.Module):  # stands in for DDP: its own forward would wait on other ranks
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            raise AssertionError("evaluate must not call the wrapper")

    learner = _tiny_learner()
    bare = evaluate(learner, _batches(2))
    learner.model = Wrapper(learner.model)
    assert evaluate(learner, _batches(2)) == bare


def test_rng_state_round_trip_restores_every_generator():
    import random

    import numpy as np
    import torch

    from breakhis_ray.train.loop import rng_state, seed_everything, set_rng_state

    seed_everything(3)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_classifier_epoch_metrics_from_summed_counts():
    from breakhis_ray.train.classifier import epoch_metrics

    train = {"loss_sum": 4.0, "correct": 6, "seen": 8, "seconds": 2.0}
    val = {"loss_sum": 2.0, "tp": 3, "tn": 4, "fp": 0, "fn": 3, "seen": 10}
    m = epoch_metrics(train, val, world_size=2)
    assert m["train_loss"] == 0.5 and m["train_accuracy"] == 0.75 and m["val_accuracy"] == 0.7
    assert m["val_balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["val_f1"] == pytest.approx(6 / 9) and m["train_images_per_s"] == 8.0


def test_the_loop_imports_no_ray():
    import subprocess
    import sys

    code = ("import sys, breakhis_ray.train.loop; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------- Ray Train
def test_warmup_freezes_then_unfreezes_backbone(tiny_breakhis, tmp_path):
    from breakhis_ray.train import run_train

    summary = run_train(_cfg(tiny_breakhis, tmp_path, "scaling.num_workers=0", "train.strategy=warmup_finetune",
                             "train.warmup_epochs=1", "model.weights=null", "run.name=warmup"))
    history = _history(summary)
    assert [h["backbone_frozen"] for h in history] == [True, False]
    assert summary["epochs_completed"] == 2


def test_two_worker_ddp_run_learns_above_chance_and_checkpoint_is_self_describing(tiny_breakhis, tmp_path):
    from breakhis_ray.checkpoint import load_model
    from breakhis_ray.train import run_train

    cfg = _cfg(tiny_breakhis, tmp_path, "scaling.num_workers=2", "train.epochs=12", "train.lr=0.002",
               "run.name=ddp")
    summary = run_train(cfg)
    history = _history(summary)
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert history[0]["val_images"] == _val_images(tiny_breakhis)  # both ranks' shards counted once
    # Above chance on a patient-disjoint validation split (~18 patients): balanced accuracy, whose chance
    # level is 0.5 whatever the class ratio, must clearly beat it at the best epoch.
    best = max(h["val_balanced_accuracy"] for h in history)
    assert best >= 0.62, history
    model, meta = load_model(summary["best_checkpoint"])
    assert meta["model_args"]["name"] == "tiny_cnn"
    assert meta["preprocessing"]["size"] == [48, 72]
    assert meta["labels"] == ["benign", "malignant"]


def _val_images(tiny_breakhis) -> int:
    from breakhis_ray.data.shards import read_shards

    rows = read_shards(str(tiny_breakhis["prepared"]), columns=["split", "augmentation"])
    return int(((rows["split"] == "val") & rows["augmentation"].isna()).sum())


@pytest.mark.parametrize("mode,workers", [("exception", 1), ("kill", 2)])
def test_injected_failure_resumes_from_last_checkpoint_and_finishes_all_epochs(tiny_breakhis, tmp_path, mode,
                                                                              workers):
    from breakhis_ray.train import run_train

    cfg = _cfg(tiny_breakhis, tmp_path, f"scaling.num_workers={workers}", "train.epochs=3",
               f"run.name=fail-{mode}", "run.max_failures=2",
               "run.inject_failure.epoch=1", f"run.inject_failure.mode={mode}",
               f"run.inject_failure.rank={1 if workers == 2 else 0}")
    summary = run_train(cfg)
    history = _history(summary)
    assert [h["epoch"] for h in history] == [1, 2, 3]  # no epoch repeated, none skipped
    marker = Path(summary["run_dir"]) / ".injected-failure-epoch1"
    assert marker.exists()
    # epoch 1 ran before the failure; epochs 2-3 ran after one restore from the epoch-1 checkpoint
    assert [h["resumes"] for h in history] == [0, 1, 1]


def test_restarting_a_finished_run_continues_instead_of_starting_over(tiny_breakhis, tmp_path):
    from breakhis_ray.train import run_train
    from breakhis_ray.train.loop import lr_factor

    cfg = _cfg(tiny_breakhis, tmp_path, "scaling.num_workers=1", "train.epochs=2", "run.name=restart")
    first = run_train(cfg)
    checkpoints = sorted(p.name for p in Path(first["run_dir"]).glob("checkpoint_*"))
    second = run_train(cfg)
    assert _history(second) == _history(first)  # nothing retrained
    assert sorted(p.name for p in Path(first["run_dir"]).glob("checkpoint_*")) == checkpoints
    # Asking for more epochs on the same run picks up at epoch 3, on the 3-epoch schedule: the cosine rate of
    # epoch index 2 of 3, not the end (0) of the 2-epoch schedule the checkpoint was trained on.
    longer = cfg.train.model_copy(update={"epochs": 3})
    more = run_train(cfg.model_copy(update={"train": longer}))
    assert [h["epoch"] for h in _history(more)] == [1, 2, 3]
    assert [h["resumes"] for h in _history(more)] == [0, 0, 1]  # epoch 3 ran after a restore
    head_lr = [h["lr"] for h in _history(more)]
    assert head_lr == pytest.approx([cfg.train.lr * lr_factor(cfg.train, 0), cfg.train.lr * lr_factor(cfg.train, 1),
                                     cfg.train.lr * lr_factor(longer, 2)])
    assert head_lr[2] == pytest.approx(cfg.train.lr * 0.25) and head_lr[1] == pytest.approx(cfg.train.lr * 0.5)


def test_early_stopping_stops_when_metric_stalls(tiny_breakhis, tmp_path):
    from breakhis_ray.train import run_train

    # val_images never changes, so it stalls from epoch 2 on: patience 2 stops after epoch 3 of 6.
    summary = run_train(_cfg(tiny_breakhis, tmp_path, "scaling.num_workers=0", "train.epochs=6",
                             "train.early_stopping_patience=2", "run.name=early",
                             "run.checkpoint_metric=val_images", "run.checkpoint_mode=max"))
    history = _history(summary)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["early_stopped"] for h in history] == [False, False, True]


def test_missing_shards_is_a_one_line_error(tmp_path):
    from breakhis_ray.cli import main

    rc = main(["train", "--config", str(REPO / "jobs/configs/train_tiny.yaml"),
               f"data.shards={tmp_path / 'nothing'}", f"run.storage_path={tmp_path / 'runs'}"])
    assert rc == 2


def test_bad_train_config_key_fails_before_any_work(capsys):
    from breakhis_ray.cli import main

    rc = main(["train", "--config", str(REPO / "jobs/configs/train_tiny.yaml"), "train.lrr=0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.lrr" in err[0]


def test_training_failure_without_retries_raises_clear_error(tiny_breakhis, tmp_path):
    from breakhis_ray.train import run_train

    cfg = _cfg(tiny_breakhis, tmp_path, "scaling.num_workers=1", "train.epochs=2", "run.name=nofail",
               "run.max_failures=0", "run.inject_failure.epoch=0")
    with pytest.raises(BreakhisError, match="failed"):
        run_train(cfg)


@pytest.mark.parametrize("mode,channels", [("channel", 4), ("emphasis", 3)])
def test_segmentation_guided_training_runs_end_to_end(tiny_breakhis, tmp_path, mode, channels):
    from breakhis_ray.checkpoint import load_config_dict, load_model
    from breakhis_ray.train import run_train

    summary = run_train(_cfg(tiny_breakhis, tmp_path, "scaling.num_workers=1", "train.epochs=1",
                             f"run.name=guided-{mode}", "guidance.method=threshold", f"guidance.mode={mode}",
                             f"model.in_channels={channels}"))
    model, meta = load_model(summary["latest_checkpoint"])
    assert meta["model_args"]["in_channels"] == channels
    assert load_config_dict(summary["latest_checkpoint"])["guidance"]["method"] == "threshold"


def test_guidance_channel_mismatch_is_a_config_error(tiny_breakhis, tmp_path):
    from breakhis_ray.errors import ConfigError
    from breakhis_ray.train import run_train

    with pytest.raises(ConfigError, match="4th channel"):
        run_train(_cfg(tiny_breakhis, tmp_path, "guidance.method=threshold", "guidance.mode=channel"))
