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
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from breakhis_ray import storage
from breakhis_ray.config import (
    ExperimentsConfig,
    ManifestConfig,
    PrepareConfig,
    ReportConfig,
    SegTrainConfig,
    SplitConfig,
    TrainConfig,
    config_yaml,
    dump_config,
    load_config,
    validate_config,
)
from breakhis_ray.errors import BreakhisError, ConfigError, DataError

STATE_DIR = "state"
TRIALS_DIR = "trials"
RUNS_DIR = "runs"
DATA_DIR = "data"
METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "balanced_accuracy",
           "patient_recognition_rate", "patient_accuracy", "n_images", "n_patients")
#: identity-free parts of a TrainConfig: where a run is written and what it runs on
_NOT_IDENTITY = {"run": ("name", "storage_path"), "data": ("shards",)}
_NOT_IDENTITY_SECTIONS = ("scaling", "ray")


# ------------------------------------------------------------------------------------------ plan
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


def _finish_train(cfg: ExperimentsConfig, train: TrainConfig, trial_id: str) -> TrainConfig:
    """Run name, storage and resources of a trial (not part of its identity)."""
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
                        specs[trial_id] = _spec(cfg, _finish_train(cfg, train, trial_id), trial_id, protocol, fold,
                                                prepared)
                    for scope in scopes:
                        cells.append(Cell(
                            table=table, protocol=protocol, fold=fold, trial_id=trial_id,
                            model=train.model.name, loss=train.loss.name, strategy=train.train.strategy,
                            segmentation=train.guidance.method, magnification=scope,
                            weights=train.model.weights or "none"))
    return cells, list(specs.values())


def _spec(cfg: ExperimentsConfig, train: TrainConfig, trial_id: str, protocol: str, fold: int,
          prepared: str) -> dict:
    """What one Tune trial needs, JSON-safe (shared with the trials through ``tune.with_parameters``)."""
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


# ------------------------------------------------------------------------------------- the trial
def run_trial(config: dict, specs: dict[str, dict]) -> None:
    """Ray Tune function trainable: train one config with Ray Train, score it on its test split, record it.

    ``config["trial_id"]`` picks the trial's spec from ``specs`` (shared through ``tune.with_parameters``)."""
    from ray import tune

    from breakhis_ray.train import run_train

    spec = specs[config["trial_id"]]
    cfg = validate_config(TrainConfig, spec["train"])
    start = time.perf_counter()
    summary = run_train(cfg)
    trained = time.perf_counter()
    which = spec["scoring"]["checkpoint"]
    checkpoint = summary[f"{which}_checkpoint"] or summary["latest_checkpoint"]
    if not checkpoint:
        raise BreakhisError(f"trial {spec['trial_id']}: training reported no checkpoint to score")
    scores = _score_in_task(spec, checkpoint)
    record = {
        "trial_id": spec["trial_id"],
        "protocol": spec["protocol"],
        "fold": spec["fold"],
        "run_dir": summary["run_dir"],
        "history": storage.join(summary["run_dir"], "history.json"),
        "checkpoint": checkpoint,
        "epochs_completed": summary["epochs_completed"],
        "train_seconds": round(trained - start, 2),
        "score_seconds": round(time.perf_counter() - trained, 2),
        "predictions": spec["predictions"],
        "scores": scores,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json_atomic(spec["record"], record)
    overall = scores["overall"]
    tune.report({"trial_id": spec["trial_id"], **{k: overall.get(k) for k in METRICS},
                 "epochs_completed": summary["epochs_completed"]})


def _score_in_task(spec: dict, checkpoint: str) -> dict:
    """Score in a Ray task with the scoring resources, scheduled outside the trial's placement group."""
    import ray

    scoring = spec["scoring"]
    task = ray.remote(score_checkpoint).options(
        num_cpus=scoring["num_cpus"], num_gpus=scoring["num_gpus"] or None, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(checkpoint, spec["prepared"], spec["magnifications"], spec["predictions"],
                               scoring["batch_size"], scoring["num_cpus"]))


def read_test_split(prepared: str, magnifications: list[int] | None):
    """``path`` and encoded ``image`` of the original test images of a prepared fold (a pyarrow Table)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from breakhis_ray.data.shards import shard_uris

    files = shard_uris(prepared)
    if not files:
        raise DataError(f"no shards under {prepared}/shards")
    fs, _ = storage.resolve(files[0])
    dataset = pads.dataset([storage.resolve(u)[1] for u in files], filesystem=fs, format="parquet")
    wanted = (pc.field("split") == "test") & pc.field("augmentation").is_null()
    if magnifications:
        wanted = wanted & pc.field("magnification").isin(list(magnifications))
    return dataset.to_table(columns=["path", "image"], filter=wanted)


def score_checkpoint(checkpoint: str, prepared: str, magnifications: list[int] | None, predictions_uri: str,
                     batch_size: int = 32, num_cpus: float = 1.0) -> dict:
    """Predict the fold's test images with the checkpoint (its own preprocessing and guidance) and evaluate
    them with the BreakHis conventions; writes the predictions Parquet, returns JSON-safe metrics."""
    import pandas as pd
    import pyarrow as pa

    from breakhis_ray.data.manifest import read_manifest
    from breakhis_ray.evaluate import evaluate_predictions
    from breakhis_ray.inference import Predictor, table_bytes, write_atomic

    rows = read_test_split(prepared, magnifications)
    paths, images = rows.column("path").to_pylist(), rows.column("image").to_pylist()
    if not paths:
        raise DataError(f"{prepared}: the test split holds no image"
                        + (f" at magnification(s) {magnifications}" if magnifications else ""))
    predictor = Predictor.from_checkpoint(checkpoint, device="auto", torch_threads=max(1, round(num_cpus)))
    predictions = pa.concat_tables([predictor.predict_bytes(images[i:i + batch_size], paths[i:i + batch_size])
                                    for i in range(0, len(paths), batch_size)])
    write_atomic(predictions_uri, table_bytes(predictions))
    manifest = read_manifest(storage.join(prepared, "manifest.parquet"))
    result = evaluate_predictions(predictions.to_pandas(), manifest, eval_paths=pd.Series(paths))
    return json.loads(json.dumps({k: result[k] for k in ("overall", "per_magnification", "counts", "n_errors")},
                                 default=float))


def _write_json_atomic(uri: str, obj: Any) -> None:
    from breakhis_ray.inference import write_atomic

    write_atomic(uri, (json.dumps(obj, indent=2, default=str) + "\n").encode())


# ------------------------------------------------------------------------------------------ stages
def _stage(cfg: ExperimentsConfig, name: str, stage_cfg, run: Callable[[], Any],
           keep: Callable[[Any], dict]) -> dict:
    """Run a stage once per ``out``: its resolved config and ``keep(run())`` are kept in
    ``<out>/state/<name>.json``; a re-run with the same config returns the kept result."""
    settings = dump_config(stage_cfg)
    uri = storage.join(cfg.out, STATE_DIR, f"{name}.json")
    if storage.exists(uri):
        kept = json.loads(storage.read_text(uri))
        if kept.get("settings") == settings:
            print(f"experiments: {name}: kept from an earlier run", flush=True)
            return kept["result"]
        changed = sorted(k for k in set(settings) | set(kept.get("settings") or {})
                         if settings.get(k) != (kept.get("settings") or {}).get(k))
        raise ConfigError(f"{cfg.out} holds stage {name!r} made with other settings ({', '.join(changed)}): "
                          "use a new out, or the same settings to resume")
    result = keep(run())
    _write_json_atomic(uri, {"settings": settings, "result": result})
    return result


def _manifest_stage(cfg: ExperimentsConfig, root: str) -> str:
    if root.lower().endswith(".parquet"):
        return root
    from breakhis_ray.data.manifest import run_manifest

    mcfg = ManifestConfig(root=root, out=storage.join(cfg.out, DATA_DIR, "manifest.parquet"))
    _stage(cfg, "manifest", mcfg, lambda: run_manifest(mcfg), lambda _: {"manifest": mcfg.out})
    return mcfg.out


def _split_stage(cfg: ExperimentsConfig, manifest: str, protocol: str) -> str:
    from breakhis_ray.data.splits import run_split

    scfg = SplitConfig(**{**cfg.split.model_dump(), "mode": protocol}, manifest=manifest,
                       out=storage.join(cfg.out, DATA_DIR, protocol, "splits.parquet"))
    _stage(cfg, f"split-{protocol}", scfg, lambda: run_split(scfg), lambda _: {"splits": scfg.out})
    return scfg.out


def prepared_uri(cfg: ExperimentsConfig, protocol: str, fold: int) -> str:
    """Where the shards of one protocol and fold are prepared."""
    return storage.join(cfg.out, DATA_DIR, protocol, f"fold{fold}")


def _prepare_stage(cfg: ExperimentsConfig, manifest: str, splits: str, protocol: str, fold: int) -> str:
    from breakhis_ray.data.shards import run_prepare

    out = prepared_uri(cfg, protocol, fold)
    pcfg = load_config(PrepareConfig, None, cfg.prepare_overrides,
                       {"root": manifest, "out": out, "splits": splits, "fold": fold})
    _stage(cfg, f"prepare-{protocol}-fold{fold}", pcfg, lambda: run_prepare(pcfg), lambda _: {"prepared": out})
    return out


def _needs_unet(cfg: ExperimentsConfig) -> bool:
    return "cancernet_tab1" in cfg.tables and "unet" in cfg.cancernet_tab1.segmentations


def _segmenter_stage(cfg: ExperimentsConfig, root: str) -> str:
    if cfg.segmenter.checkpoint:
        return cfg.segmenter.checkpoint
    if root.lower().endswith(".parquet"):
        raise ConfigError("segmentation 'unet' needs segmenter.checkpoint, or a BreakHis tree as root to train "
                          "a U-Net on (ground-truth masks, or data.mask_source=threshold pseudo-labels)")
    from breakhis_ray.segmentation.train import run_train_segmenter

    seg = load_config(SegTrainConfig, cfg.segmenter.config,
                      [f"data.root={root}", f"run.storage_path={storage.join(cfg.out, 'segmenter')}",
                       *cfg.segmenter.overrides])
    kept = _stage(cfg, "segmenter", seg, lambda: run_train_segmenter(seg),
                  lambda s: {"checkpoint": s["best_checkpoint"] or s["latest_checkpoint"]})
    return kept["checkpoint"]


def _synthetic_stage(cfg: ExperimentsConfig) -> None:
    from breakhis_ray.data.synthetic import run_synth

    synth = cfg.synthetic
    _stage(cfg, "synthetic", synth, lambda: run_synth(synth), lambda _: {"out": synth.out})


def prepare_inputs(cfg: ExperimentsConfig) -> GridInputs:
    """Run (or keep) the data stages: synthetic tree, manifest, splits per protocol, shards per fold, U-Net."""
    if cfg.synthetic is not None:
        _synthetic_stage(cfg)
    root = cfg.tree_root
    manifest = _manifest_stage(cfg, root)
    inputs = GridInputs(manifest=manifest, prepared={})
    for protocol in cfg.protocols:
        splits = _split_stage(cfg, manifest, protocol)
        for fold in cfg.folds:
            out = _prepare_stage(cfg, manifest, splits, protocol, fold)
            inputs.prepared[(protocol, fold)] = out
            inputs.prepare_summaries[(protocol, fold)] = storage.join(out, "prepare.json")
    if _needs_unet(cfg):
        inputs.unet_checkpoint = _segmenter_stage(cfg, root)
    return inputs


# ------------------------------------------------------------------------------------------ tune
def _trial_name(trial) -> str:
    return trial.config["trial_id"]


def _error_line(error: BaseException) -> str:
    """The raised exception's own message: the last line of a (Ray-wrapped) error."""
    text = str(error).strip()
    return text.splitlines()[-1][:300] if text else type(error).__name__


def _trial_cpus(cfg: ExperimentsConfig, spec: dict) -> tuple[float, float]:
    """(CPUs a training trial holds: its driver + its Train workers; the largest single Ray Data or
    scoring task it starts)."""
    train = validate_config(TrainConfig, spec["train"])
    held = cfg.trial_cpus + train.scaling.num_workers * train.scaling.cpus_per_worker
    tasks = [train.data.decode_num_cpus, train.data.augment.num_cpus, cfg.scoring.num_cpus]
    if train.guidance.method != "none":
        tasks.append(train.guidance.num_cpus)
    return held, max(tasks)


def concurrency(cfg: ExperimentsConfig, specs: list[dict], cluster_cpus: float) -> int:
    """``max_concurrent_trials``, lowered so that trials holding their CPUs still leave room for one Ray Data
    or scoring task: Train workers whose input tasks cannot be scheduled wait forever."""
    held, task = (max(v) for v in zip(*(_trial_cpus(cfg, s) for s in specs)))
    fits = int((cluster_cpus - task) // held) if held > 0 else cfg.max_concurrent_trials
    return max(1, min(cfg.max_concurrent_trials, fits))


def run_tune(cfg: ExperimentsConfig, specs: list[dict]) -> list[tuple[str, str]]:
    """One Ray Tune trial per spec, ``max_concurrent_trials`` at a time; returns ``(trial id, error)`` pairs."""
    import ray
    from ray import tune

    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    n = concurrency(cfg, specs, cluster_cpus)
    if n < cfg.max_concurrent_trials:
        print(f"experiments: running {n} trial(s) at a time, not max_concurrent_trials="
              f"{cfg.max_concurrent_trials}: the cluster's {cluster_cpus:g} CPUs leave no room for the trials' "
              "Ray Data tasks beyond that", flush=True)

    fs, path = storage.resolve(storage.join(cfg.out, "tune"))
    name = f"grid-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    trainable = tune.with_parameters(run_trial, specs={s["trial_id"]: s for s in specs})
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": cfg.trial_cpus}),
        param_space={"trial_id": tune.grid_search([s["trial_id"] for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=n, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.trial_retries)),
    )
    results = tuner.fit()
    return [(r.config["trial_id"], _error_line(r.error)) for r in results if r.error]


# ------------------------------------------------------------------------------------------ rows
def finished_trials(out: str) -> set[str]:
    folder = storage.join(out, TRIALS_DIR)
    if not storage.exists(folder):
        return set()
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(folder, suffixes=[".json"])]
    return {n[:-len(".json")] for n in names if not n.startswith(".")}


def grid_rows(cfg: ExperimentsConfig, cells: list[Cell]) -> list[dict]:
    """One record per table cell whose trial has finished: settings, protocol, fold and test metrics."""
    records: dict[str, dict] = {}
    rows = []
    for cell in cells:
        if cell.trial_id not in records:
            uri = record_uri(cfg.out, cell.trial_id)
            if not storage.exists(uri):
                continue
            records[cell.trial_id] = json.loads(storage.read_text(uri))
        record = records[cell.trial_id]
        scores = record["scores"]
        metrics = scores["overall"] if cell.magnification == "all" else \
            scores["per_magnification"].get(cell.magnification, {})
        rows.append({**asdict(cell), **{k: metrics.get(k) for k in METRICS},
                     "epochs": record["epochs_completed"], "train_seconds": record["train_seconds"],
                     "run_dir": record["run_dir"], "history": record["history"],
                     "checkpoint": record["checkpoint"], "predictions": record["predictions"]})
    return rows


def _table_spec(name: str) -> tuple[str, list[str], list[str], bool]:
    """(title, key columns, metric columns, percent) of a table, from the report's published specs."""
    from breakhis_ray.report import PUBLISHED

    spec = PUBLISHED[name]
    keys = list(spec["keys"]) + ([spec["pivot"]] if spec.get("pivot") else [])
    metrics = list(spec["metrics"])
    if name in ("vgg_tab3", "vgg_fig4", "vgg_tab4") and "patient_recognition_rate" not in metrics:
        metrics.append("patient_recognition_rate")
    if name == "vgg_fig4":
        keys.append("weights")
    return spec["title"], keys, metrics, bool(spec["percent"])


def fold_stats(folds: list[dict]) -> dict[str, dict]:
    """Mean ± std over folds (``metrics.mean_std_over_folds``); no std from a single fold."""
    from breakhis_ray.metrics import mean_std_over_folds

    stats = mean_std_over_folds(folds)
    return {k: {**v, "std": v["std"] if v["n"] > 1 else None} for k, v in stats.items()}


def format_tables(rows: list[dict], protocols: list[str]) -> str:
    """Markdown: per paper table, one line per setting, mean ± std over folds for each protocol side by side,
    and the accuracy gap image - patient when both protocols ran."""
    import pandas as pd

    from breakhis_ray.metrics import format_mean_std
    from breakhis_ray.report import METRIC_LABELS

    if not rows:
        return "(no finished trial yet)\n"
    df = pd.DataFrame(rows)
    blocks = []
    for name in dict.fromkeys(df["table"]):
        title, keys, metrics, percent = _table_spec(name)
        sub = df[df["table"] == name]
        ran = [p for p in protocols if p in set(sub["protocol"])]
        unit = " %" if percent else ""
        headers = [*keys, *[f"{p}: {METRIC_LABELS.get(m, m)}{unit}" for p in ran for m in metrics], "folds"]
        gap = "patient" in ran and "image" in ran and "accuracy" in metrics
        if gap:
            headers.append(f"accuracy gap image - patient{unit}")
        lines = [f"### {name}: {title}", "", "| " + " | ".join(headers) + " |",
                 "|" + "---|" * len(headers)]
        for key_values, group in sub.groupby(keys, sort=False):
            key_values = key_values if isinstance(key_values, tuple) else (key_values,)
            cells, means = [], {}
            for protocol in ran:
                folds = group[group["protocol"] == protocol]
                stats = fold_stats(folds[metrics].to_dict("records"))
                cells += [format_mean_std(stats, m, percent=percent, digits=2 if percent else 3) for m in metrics]
                means[protocol] = (stats.get("accuracy") or {}).get("mean")
            line = [*map(str, key_values), *cells, str(group["fold"].nunique())]
            if gap:
                diff = None if None in (means["image"], means["patient"]) else means["image"] - means["patient"]
                line.append("n/a" if diff is None else f"{diff * 100:+.2f}" if percent else f"{diff:+.3f}")
            lines.append("| " + " | ".join(line) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ----------------------------------------------------------------------------------------- outputs
def _distribution(inputs: GridInputs) -> dict:
    """Tab. 1 (before) / Tab. 2 (after enhancement) per protocol and fold, from each prepare.json."""
    out: dict[str, Any] = {}
    for (protocol, fold), uri in inputs.prepare_summaries.items():
        summary = json.loads(storage.read_text(uri))
        out.setdefault(protocol, {})[f"fold{fold}"] = {"prepare_summary": uri, "tables": summary.get("tables")}
    return out


def _report_config(cfg: ExperimentsConfig, inputs: GridInputs, rows: list[dict]) -> ReportConfig:
    """A ready ``breakhis-ray report --config`` for this grid: its tables, Tab. 1/2 and CancerNet's curves."""
    first = (cfg.protocols[0], cfg.folds[0])
    curves = [r["run_dir"] for r in rows if r["table"] == "cancernet_tab1" and (r["protocol"], r["fold"]) == first]
    if not curves:
        curves = [r["run_dir"] for r in rows if (r["protocol"], r["fold"]) == first]
    return ReportConfig(
        out=storage.join(cfg.out, "report"),
        title="BreakHis experiment grid: the papers' tables under patient and image splits",
        data_source="synthetic" if cfg.synthetic is not None else "unspecified",
        manifest=inputs.manifest,
        prepare_summary=inputs.prepare_summaries[first],
        train_runs=list(dict.fromkeys(curves)),
        grid=storage.join(cfg.out, "grid.json"),
        configs=[storage.join(cfg.out, "config.yaml")],
    )


def write_outputs(cfg: ExperimentsConfig, inputs: GridInputs, rows: list[dict], tables: str) -> dict[str, str]:
    import pandas as pd

    from breakhis_ray.inference import write_atomic

    uris = {name: storage.join(cfg.out, name) for name in
            ("grid.json", "grid.csv", "tables.md", "distribution.json", "report.yaml")}
    _write_json_atomic(uris["grid.json"], rows)
    write_atomic(uris["grid.csv"], pd.DataFrame(rows).to_csv(index=False).encode())
    write_atomic(uris["tables.md"], tables.encode())
    _write_json_atomic(uris["distribution.json"], _distribution(inputs))
    write_atomic(uris["report.yaml"], config_yaml(_report_config(cfg, inputs, rows)).encode())
    return uris


# ----------------------------------------------------------------------------------------- driver
def _check_resume(cfg: ExperimentsConfig, done: set[str]) -> None:
    if not cfg.resume and (done or storage.exists(storage.join(cfg.out, STATE_DIR))):
        raise ConfigError(f"{cfg.out} already holds a grid ({len(done)} finished trial(s)): set resume=true to "
                          "continue it, or use a new out")


def _absolute(cfg: ExperimentsConfig) -> ExperimentsConfig:
    """Local paths made absolute: Ray Tune runs each trial in its own working directory."""
    data = dump_config(cfg)
    data["out"] = storage.join(cfg.out)
    if cfg.root is not None and "://" not in cfg.root:
        data["root"] = storage.join(cfg.root)
    if cfg.synthetic is not None and "://" not in cfg.synthetic.out:
        data["synthetic"]["out"] = storage.join(cfg.synthetic.out)
    if cfg.segmenter.checkpoint and "://" not in cfg.segmenter.checkpoint:
        data["segmenter"]["checkpoint"] = storage.join(cfg.segmenter.checkpoint)
    return validate_config(ExperimentsConfig, data)


def _check_before_work(cfg: ExperimentsConfig) -> None:
    """Fail on a missing root or a bad table setting before any data stage or Ray work starts."""
    if cfg.synthetic is None and not storage.exists(cfg.tree_root):
        raise DataError(f"root not found: {cfg.tree_root}")
    unet = cfg.segmenter.checkpoint or storage.join(cfg.out, "segmenter", "<trained by the grid>")
    plan_trials(cfg, GridInputs(manifest="", unet_checkpoint=unet, prepared={
        (p, f): prepared_uri(cfg, p, f) for p in cfg.protocols for f in cfg.folds}))
    _check_resume(cfg, finished_trials(cfg.out))


def run_experiments(cfg: ExperimentsConfig) -> dict:
    """CLI stage: data stages, trial plan, Ray Tune over the pending trials, then the tables from every record."""
    from breakhis_ray.ray_utils import ensure_ray

    cfg = _absolute(cfg)
    _check_before_work(cfg)
    storage.write_text(storage.join(cfg.out, "config.yaml"), config_yaml(cfg))
    ensure_ray(cfg.ray)
    inputs = prepare_inputs(cfg)
    cells, specs = plan_trials(cfg, inputs)
    done = finished_trials(cfg.out)
    pending = [s for s in specs if s["trial_id"] not in done]
    print(f"experiments: {len(cells)} table cells -> {len(specs)} trials over protocols {cfg.protocols} and "
          f"folds {cfg.folds}: {len(specs) - len(pending)} finished earlier, {len(pending)} to run "
          f"(at most {cfg.max_concurrent_trials} at a time)", flush=True)
    start = time.perf_counter()
    errors = run_tune(cfg, pending) if pending else []
    rows = grid_rows(cfg, cells)
    tables = format_tables(rows, cfg.protocols)
    uris = write_outputs(cfg, inputs, rows, tables)
    print(tables, flush=True)
    print(f"experiments: {len(rows)} of {len(cells)} rows in {uris['grid.json']} "
          f"({time.perf_counter() - start:.0f} s for {len(pending)} trial(s)); report: "
          f"breakhis-ray report --config {uris['report.yaml']}", flush=True)
    if errors:
        listed = "; ".join(f"{tid}: {msg}" for tid, msg in errors[:3])
        raise BreakhisError(f"{len(errors)} of {len(pending)} trial(s) failed ({listed}); re-run with the same "
                            f"out to retry only those")
    return {"out": cfg.out, "cells": len(cells), "trials": [s["trial_id"] for s in specs],
            "ran": [s["trial_id"] for s in pending], "rows": len(rows), **uris}


__all__ = ["Cell", "GridInputs", "format_tables", "grid_rows", "plan_trials", "prepare_inputs",
           "run_experiments", "run_trial", "run_tune", "score_checkpoint", "trial_id_for"]
