"""``breakhis-ray experiments``: the papers' tables as one Ray Tune grid over Ray Train runs.

Tables (``ExperimentsConfig.tables``): VGG paper Tab. 3 (losses), Fig. 4 (training strategies), Tab. 4
(accuracy per magnification) and CancerNet Table 1 (CNNs with and without segmentation guidance); Tab. 1/2
(images per class and magnification before/after enhancement) come from the prepared data. Every table runs
under each split protocol (patient-disjoint and image-level side by side, so the leakage gap shows) and fold.

Stages (each recorded under ``<out>/state/``; a re-run with the same settings keeps it)::

    synthetic tree (optional) -> manifest -> splits per protocol -> prepared shards per protocol and fold
      -> U-Net (only for ``segmentation: unet`` without a given checkpoint)
      -> plan: table cells -> trials (cells with the same resolved TrainConfig share one trial)
      -> Ray Tune: one trial per pending trial id; the trial's driver calls ``run_train`` (a TorchTrainer with
         ``scaling.num_workers`` workers), then scores the checkpoint on its fold's test split in a Ray task
         and writes ``<out>/trials/<trial id>.json`` atomically
      -> rows (one per table cell) -> grid.json / grid.csv / tables.md / distribution.json / report.yaml

Every trial's TrainConfig is resolved and validated before any data stage or Ray work starts, so a typo in a
table's overrides fails at once.

Ray Tune and Ray Train V2: ``tune.Tuner`` grid-searches the pending trial ids (their specs shared through
``tune.with_parameters``). The trial function only launches the trainer and waits, so it holds
``trial_cpus``; the Train workers get ``scaling``'s resources in their own placement group. Ray Train's
in-process mode (``num_workers=0``) refuses to run inside a Tune function and keeps no checkpoint, so grids
need at least one worker. The scoring task is scheduled outside the trial's placement group (its resources,
``scoring.num_cpus``/``num_gpus``, are its own). ``max_concurrent_trials`` is lowered when the trials' held
CPUs would leave none for their Ray Data tasks (which would hang the Train workers).

Resume: a trial id is a digest of the protocol, the fold and the resolved training config (without
run names, storage paths and resources). Finished trials are those with a record; a killed grid, re-run with
the same ``out``, trains only the trials without one (a trial that died mid-training resumes from its last
checkpoint, since its run directory is the same).

Layout: :mod:`.plan` (cells, trial ids, trial specs; pure), :mod:`.stages` (data stages kept per ``out``),
:mod:`.trial` (the Tune trainable: train, score, record), :mod:`.tuning` (Ray Tune and its concurrency),
:mod:`.results` (rows, ``tables.md``, output files), :mod:`.grid` (the driver). The papers' table keys and
published numbers live in :mod:`breakhis_ray.papers`.
"""


from __future__ import annotations

from breakhis_ray.experiments.grid import run_experiments
from breakhis_ray.experiments.plan import Cell, GridInputs, plan_trials, prepared_uri, trial_id_for
from breakhis_ray.experiments.results import fold_stats, format_tables, grid_rows, write_outputs
from breakhis_ray.experiments.stages import prepare_inputs
from breakhis_ray.experiments.trial import read_test_split, run_trial, score_checkpoint
from breakhis_ray.experiments.tuning import concurrency, run_tune

__all__ = ["Cell", "GridInputs", "concurrency", "fold_stats", "format_tables", "grid_rows", "plan_trials",
           "prepare_inputs", "prepared_uri", "read_test_split", "run_experiments", "run_trial", "run_tune",
           "score_checkpoint", "trial_id_for", "write_outputs"]
