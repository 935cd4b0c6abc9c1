"""Exact resume: a worker killed mid-epoch, restored from a mid-epoch checkpoint, ends where an uninterrupted
run ends (weights and optimiser state bit for bit on CPU); the learning-rate schedule follows the epoch and
the configured number of epochs, so an extended run continues on its new schedule.

The loop-level tests run in milliseconds without Ray; the Ray test compares against the session's
``uninterrupted_run`` (tests/conftest.py), shared with tests/test_determinism.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainruns import TIMING, assert_same_tensors, final_state, history, tiny_cfg, without


# ------------------------------------------------------------------------------- the loop (no Ray)
def _learner():
    import torch

    from breakhis_ray.train import classifier, loop
    from breakhis_ray.config import OptimConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    optimizer, scheduler = loop.build_optimizer(OptimConfig(lr=0.05, epochs=3), model.parameters())
    return loop.Learner(model, torch.nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"),
                        classifier.batch_stats, classifier.ZERO_SUMS)


def _batches(n: int = 6, size: int = 5):
    import torch

    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


def test_an_epoch_resumed_mid_way_ends_as_the_uninterrupted_epoch():
    import copy

    from breakhis_ray.train.loop import load_scheduler_state, rng_state, seed_everything, set_rng_state, train_one_epoch

    seed_everything(3)
    straight, saved = _learner(), {}

    def snapshot(steps, totals):  # what a mid-epoch checkpoint holds after step 2
        if steps == 2:
            saved.update(model=copy.deepcopy(straight.model.state_dict()), rng=rng_state(), totals=dict(totals),
                         optimizer=copy.deepcopy(straight.optimizer.state_dict()),
                         scheduler=straight.scheduler.state_dict())

    seed_everything(3)
    full = train_one_epoch(straight, _batches(), on_step=snapshot)

    resumed = _learner()  # a new process: fresh objects, other RNG state
    seed_everything(99)
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    load_scheduler_state(resumed.scheduler, saved["scheduler"])
    set_rng_state(saved["rng"])
    seen = []
    rest = train_one_epoch(resumed, _batches(), skip=2, totals=saved["totals"], on_step=lambda s, t: seen.append(s))
    assert seen == [3, 4, 5, 6]  # steps keep counting from the epoch's start
    assert_same_tensors(straight.model.state_dict(), resumed.model.state_dict())
    assert_same_tensors(straight.optimizer.state_dict(), resumed.optimizer.state_dict())
    assert without([full], ["seconds"]) == without([rest], ["seconds"])
    # without the optimiser's state (Adam's moments) the same batches end elsewhere
    bare = _learner()
    bare.model.load_state_dict(saved["model"])
    set_rng_state(saved["rng"])
    train_one_epoch(bare, _batches(), skip=2)
    with pytest.raises(AssertionError):
        assert_same_tensors(straight.model.state_dict(), bare.model.state_dict())


def test_learning_rate_is_a_function_of_the_epoch_and_the_configured_epochs():
    import torch

    from breakhis_ray.config import OptimConfig
    from breakhis_ray.train.loop import build_optimizer, load_scheduler_state, lr_factor, set_epoch_lr

    def fresh(epochs: int, scheduler: str = "cosine"):
        return build_optimizer(OptimConfig(lr=0.1, epochs=epochs, scheduler=scheduler, step_size=2),
                               [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01},
                                {"params": [torch.nn.Parameter(torch.zeros(1))]}])

    optimizer, scheduler = fresh(2)
    assert [set_epoch_lr(scheduler, e) for e in range(2)] == pytest.approx([0.1, 0.05])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.05])  # each group its own base
    # A finished 2-epoch run extended to 4 epochs: epochs 2 and 3 train at the 4-epoch schedule's rates.
    _, longer = fresh(4)
    load_scheduler_state(longer, scheduler.state_dict())
    assert [set_epoch_lr(longer, e) for e in (2, 3)] == pytest.approx([0.1 * lr_factor(OptimConfig(epochs=4), e)
                                                                       for e in (2, 3)])
    assert set_epoch_lr(longer, 2) == pytest.approx(0.05) and set_epoch_lr(longer, 3) == pytest.approx(0.1 * 0.1464466)
    assert lr_factor(OptimConfig(epochs=2), 5) == 0.0  # past its end a cosine schedule stays at 0
    assert [lr_factor(OptimConfig(scheduler="step", step_size=2), e) for e in range(5)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01])
    # a checkpoint of an earlier version (CosineAnnealingLR state) still loads: counters only
    old_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(old_opt, T_max=2)
    old_opt.step()
    old.step()
    _, new = fresh(4)
    load_scheduler_state(new, {**old.state_dict(), "base_lrs": [0.01, 0.1]})
    assert new.last_epoch == 1 and set_epoch_lr(new, 1) == pytest.approx(0.1 * lr_factor(OptimConfig(epochs=4), 1))


# ------------------------------------------------------------------------------------------ Ray Train
@pytest.mark.timeout(1800)
def test_worker_killed_mid_epoch_resumes_to_the_uninterrupted_weights_and_optimizer(tiny_breakhis,
                                                                                  uninterrupted_run):
    """Rank 1 is SIGKILLed right after step 3 of epoch 2 (0-based epoch 1); checkpoints every 2 steps, so the
    restarted workers resume 2 steps into that epoch and must replay step 3 exactly (data order, augmentation,
    dropout RNG of each rank, Adam's moments, partial sums)."""
    from breakhis_ray.train import run_train

    killed = run_train(tiny_cfg(tiny_breakhis, uninterrupted_run["storage"], "run.name=killed",
                                "run.checkpoint_every_steps=2", "run.max_failures=1",
                                "run.inject_failure.epoch=1", "run.inject_failure.step=3",
                                "run.inject_failure.rank=1", "run.inject_failure.mode=kill"))
    assert (Path(killed["run_dir"]) / ".injected-failure-epoch1-step3").exists()
    runs = history(killed)
    # epoch 2 ran after one restore, which started it 2 steps in: from the mid-epoch checkpoint, not from
    # the epoch-1 checkpoint (that would replay steps 1-2 with other RNG draws)
    assert [(h["epoch"], h["resumes"], h["start_step"]) for h in runs] == [(1, 0, 0), (2, 1, 2)]
    weights, optimizer = final_state(killed)
    reference_weights, reference_optimizer = final_state(uninterrupted_run)
    assert_same_tensors(reference_weights, weights, "weights")
    assert_same_tensors(reference_optimizer, optimizer, "optimizer")
    assert without(runs, (*TIMING, "resumes", "start_step")) == \
        without(history(uninterrupted_run), (*TIMING, "resumes", "start_step"))
