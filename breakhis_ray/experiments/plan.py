"""The grid's plan: table cells -> resolved TrainConfigs -> trials (cells with the same config share one).

Pure: reads the base train config file only, starts no Ray work, and validates every trial's TrainConfig so a
typo in a table's overrides fails before any data stage runs. Also where a grid's outputs live under ``out``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from breakhis_ray import storage
from breakhis_ray.config import (
    ExperimentsConfig,
    TrainConfig,
    TrialRunConfig,
    dump_config,
    load_config,
    validate_config,
)
from breakhis_ray.errors import ConfigError

STATE_DIR = "state"
TRIALS_DIR = "trials"
RUNS_DIR = "runs"
DATA_DIR = "data"
#: the test metrics a grid row carries (from the trial's scores)
METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "balanced_accuracy",
           "patient_recognition_rate", "patient_accuracy", "n_images", "n_patients")
#: identity-free parts of a TrainConfig: where a run is written and what it runs on
_NOT_IDENTITY = {"run": ("name", "storage_path"), "data": ("shards",)}
_NOT_IDENTITY_SECTIONS = ("scaling", "ray", "tracking")


@dataclass(frozen=True)
class Cell:
    """One row of one paper table: a setting under a protocol and fold, answered by ``trial_id``."""

    table: str
    protocol: str
    fold: int
    trial_id: str
    model: str
    loss: str
    strategy: str
    segmentation: str
    magnification: str  # "all", or the magnification the row is scored on
    weights: str


@dataclass
class GridInputs:
    """What the stages produced: the manifest, prepared shards per (protocol, fold), the U-Net if any."""

    manifest: str
    prepared: dict[tuple[str, int], str]
    unet_checkpoint: str | None = None
    prepare_summaries: dict[tuple[str, int], str] = field(default_factory=dict)


def absolute_paths(cfg: TrialRunConfig) -> dict:
    """``cfg`` dumped with its local paths made absolute (Ray Tune runs each trial in its own working
    directory): ``out``, ``root``, ``synthetic.out`` and ``base_train_config``; ``s3://`` URIs unchanged."""
    data = dump_config(cfg)
    data["out"] = storage.join(cfg.out)
    if cfg.root is not None and "://" not in cfg.root:
        data["root"] = storage.join(cfg.root)
    if cfg.synthetic is not None and "://" not in cfg.synthetic.out:
        data["synthetic"]["out"] = storage.join(cfg.synthetic.out)
    if "://" not in cfg.base_train_config:
        data["base_train_config"] = storage.join(cfg.base_train_config)
    return data


def _identity(train: TrainConfig, protocol: str, fold: int) -> dict:
    data = dump_config(train)
    for section in _NOT_IDENTITY_SECTIONS:
        data.pop(section, None)
    for section, keys in _NOT_IDENTITY.items():
        for key in keys:
            data[section].pop(key, None)
    return {"protocol": protocol, "fold": fold, "train": data}


def trial_id_for(train: TrainConfig, protocol: str, fold: int) -> str:
    """``<protocol>-f<fold>-<model>-<loss>-<strategy>-<guidance>-<mags>-<digest>``: readable and unique."""
    digest = hashlib.sha256(json.dumps(_identity(train, protocol, fold), sort_keys=True).encode()).hexdigest()
    mags = "all" if train.data.magnifications == "all" else "+".join(str(m) for m in train.data.magnifications)
    return "-".join([protocol, f"f{fold}", train.model.name, train.loss.name, train.train.strategy,
                     train.guidance.method, mags, digest[:10]])


def _table_cells(cfg: ExperimentsConfig, table: str, unet: str | None) -> list[tuple[list[str], list[str]]]:
    """``[(cell overrides, magnifications the rows are scored on or ["all"])]`` for one table."""
    if table == "vgg_tab3":
        return [([f"loss.name={loss}"], ["all"]) for loss in cfg.vgg_tab3.losses]
    if table == "vgg_fig4":
        return [([f"train.strategy={s}"], ["all"]) for s in cfg.vgg_fig4.strategies]
    if table == "vgg_tab4":
        mags = cfg.vgg_tab4.magnifications
        if cfg.vgg_tab4.mode == "shared":
            return [([], [str(m) for m in mags])]
        return [([f"data.magnifications=[{m}]"], [str(m)]) for m in mags]
    section = cfg.cancernet_tab1
    cells = []
    for model in section.models:
        for seg in section.segmentations:
            overrides = [f"model.name={model}", f"guidance.method={seg}"]
            if seg != "none":
                overrides += [f"guidance.mode={section.guidance_mode}",
                              f"model.in_channels={4 if section.guidance_mode == 'channel' else 3}"]
            else:
                overrides.append("model.in_channels=3")
            if seg == "unet":
                if not unet:
                    raise ConfigError("cancernet_tab1: segmentation 'unet' needs a U-Net checkpoint "
                                      "(segmenter.checkpoint, or one trained by the grid)")
                overrides.append(f"guidance.unet_checkpoint={unet}")
            cells.append((overrides, ["all"]))
    return cells


def _table_overrides(cfg: ExperimentsConfig, table: str) -> list[str]:
    return list(getattr(cfg, table).overrides)


def _resolve_train(cfg: ExperimentsConfig, table: str, overrides: list[str], prepared: str) -> TrainConfig:
    from breakhis_ray.models import CLASSIFIER_NAMES

    try:
        train = load_config(TrainConfig, cfg.base_train_config,
                            [*cfg.base_overrides, *_table_overrides(cfg, table), *overrides,
                             f"data.shards={prepared}"])
    except ConfigError as exc:
        raise ConfigError(f"{table}: {exc}") from None
    if train.model.name not in CLASSIFIER_NAMES:
        raise ConfigError(f"{table}: unknown model {train.model.name!r}; choose from {', '.join(CLASSIFIER_NAMES)}")
    return train


def finish_train(cfg: ExperimentsConfig, train: TrainConfig, trial_id: str) -> TrainConfig:
    """Run name, storage and resources of a trial (not part of its identity). ``cfg`` names ``out``,
    ``scaling`` and ``base_train_config`` (an :class:`ExperimentsConfig` or a ``CVConfig``)."""
    run = train.run.model_copy(update={"name": trial_id, "storage_path": storage.join(cfg.out, RUNS_DIR)})
    updated = validate_config(TrainConfig, {**dump_config(train), "run": dump_config(run),
                                            **({"scaling": dump_config(cfg.scaling)} if cfg.scaling else {})})
    if updated.scaling.num_workers < 1:
        raise ConfigError(f"{cfg.base_train_config}: scaling.num_workers must be >= 1 in a grid (set "
                          "scaling.num_workers in the experiments config): Ray Train's in-process mode does not "
                          "run inside a Ray Tune trial and persists no checkpoint to score")
    return updated


def plan_trials(cfg: ExperimentsConfig, inputs: GridInputs) -> tuple[list[Cell], list[dict]]:
    """Every table cell of the grid and the distinct trials behind them (as Tune trial specs).

    Pure: reads the base train config file only; validates every resolved TrainConfig before any Ray work.
    """
    cells: list[Cell] = []
    specs: dict[str, dict] = {}
    for table in cfg.tables:
        for overrides, scopes in _table_cells(cfg, table, inputs.unet_checkpoint):
            for protocol in cfg.protocols:
                for fold in cfg.folds:
                    prepared = inputs.prepared[(protocol, fold)]
                    train = _resolve_train(cfg, table, overrides, prepared)
                    trial_id = trial_id_for(train, protocol, fold)
                    if trial_id not in specs:
                        specs[trial_id] = trial_spec(cfg, finish_train(cfg, train, trial_id), trial_id, protocol,
                                                     fold, prepared)
                    for scope in scopes:
                        cells.append(Cell(
                            table=table, protocol=protocol, fold=fold, trial_id=trial_id,
                            model=train.model.name, loss=train.loss.name, strategy=train.train.strategy,
                            segmentation=train.guidance.method, magnification=scope,
                            weights=train.model.weights or "none"))
    return cells, list(specs.values())


def trial_spec(cfg: ExperimentsConfig, train: TrainConfig, trial_id: str, protocol: str, fold: int,
               prepared: str) -> dict:
    """What one Tune trial needs, JSON-safe (shared with the trials through ``tune.with_parameters``).
    ``cfg`` names ``out`` and ``scoring``."""
    mags = train.data.magnifications
    return {
        "trial_id": trial_id,
        "protocol": protocol,
        "fold": fold,
        "prepared": prepared,
        "record": record_uri(cfg.out, trial_id),
        "predictions": storage.join(cfg.out, TRIALS_DIR, f"{trial_id}.predictions.parquet"),
        "magnifications": None if mags == "all" else list(mags),
        "scoring": dump_config(cfg.scoring),
        "train": dump_config(train),
    }


def record_uri(out: str, trial_id: str) -> str:
    return storage.join(out, TRIALS_DIR, f"{trial_id}.json")



def prepared_uri(cfg: ExperimentsConfig, protocol: str, fold: int) -> str:
    """Where the shards of one protocol and fold are prepared."""
    return storage.join(cfg.out, DATA_DIR, protocol, f"fold{fold}")
