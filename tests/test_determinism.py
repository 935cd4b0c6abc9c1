"""Deterministic training: the same config, seed and worker count give bit-identical weights and history.

The whole path is exercised: Ray Data's ordered decode and cache, the seeded per-epoch block order and
augmentation (keyed by epoch and row path), Ray Train's split of the training set over two workers, per-rank
seeds (dropout), DDP's gradient averaging and the optimiser. The reference run is the session's
``uninterrupted_run`` (tests/conftest.py), shared with tests/test_resume.py.
"""

from __future__ import annotations

import pytest
from trainruns import TIMING, assert_same_tensors, epoch_checkpoints, final_state, history, tiny_cfg, without


@pytest.mark.timeout(1800)
def test_same_seed_and_workers_give_identical_weights_and_history(tiny_breakhis, uninterrupted_run):
    import torch

    from breakhis_ray.checkpoint import load_state_dict
    from breakhis_ray.train import run_train

    again = run_train(tiny_cfg(tiny_breakhis, uninterrupted_run["storage"], "run.name=again"))
    weights, optimizer = final_state(uninterrupted_run)
    assert_same_tensors(weights, final_state(again)[0], "weights")
    assert_same_tensors(optimizer, final_state(again)[1], "optimizer")
    assert without(history(uninterrupted_run), TIMING) == without(history(again), TIMING)
    # not vacuous: both epochs trained (the weights moved), with augmentation on (finetune_aug)
    assert [h["epoch"] for h in history(again)] == [1, 2]
    ends = epoch_checkpoints(again)
    one, two = load_state_dict(ends[1]), load_state_dict(ends[2])
    assert not all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.timeout(1800)
def test_another_data_seed_gives_other_batches(tiny_breakhis, uninterrupted_run):
    """The equality above is not a property of any two runs: another ``data.seed`` (block order and
    augmentation; same initial weights, same ``train.seed``) ends its first epoch elsewhere."""
    from breakhis_ray.checkpoint import load_state_dict
    from breakhis_ray.train import run_train

    other = run_train(tiny_cfg(tiny_breakhis, uninterrupted_run["storage"], "run.name=data-seed-1",
                               "train.epochs=1", "data.seed=1"))
    reference = load_state_dict(epoch_checkpoints(uninterrupted_run)[1])
    with pytest.raises(AssertionError):
        assert_same_tensors(reference, final_state(other)[0])


def test_deterministic_flag_turns_on_deterministic_kernels():
    import torch

    from breakhis_ray.train.loop import set_deterministic

    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        torch.backends.cudnn.deterministic = False
