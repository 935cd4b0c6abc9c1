"""The grid's data stages, each run once per ``out``: synthetic tree, manifest, splits per protocol, prepared
shards per protocol and fold, and the U-Net (only for ``segmentation: unet`` without a given checkpoint).

Each stage's resolved config and result are kept in ``<out>/state/<stage>.json``; a re-run with the same
settings keeps the result, one with other settings is refused.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from breakhis_ray import storage
from breakhis_ray.artifacts import write_json
from breakhis_ray.config import (
    ExperimentsConfig,
    ManifestConfig,
    PrepareConfig,
    SegTrainConfig,
    SplitConfig,
    dump_config,
    load_config,
)
from breakhis_ray.errors import ConfigError
from breakhis_ray.experiments.plan import DATA_DIR, STATE_DIR, GridInputs, prepared_uri

log = logging.getLogger(__name__)


def _stage(cfg: ExperimentsConfig, name: str, stage_cfg, run: Callable[[], Any],
           keep: Callable[[Any], dict]) -> dict:
    """Run a stage once per ``out``: its resolved config and ``keep(run())`` are kept in
    ``<out>/state/<name>.json``; a re-run with the same config returns the kept result."""
    settings = dump_config(stage_cfg)
    uri = storage.join(cfg.out, STATE_DIR, f"{name}.json")
    if storage.exists(uri):
        kept = json.loads(storage.read_text(uri))
        if kept.get("settings") == settings:
            log.info("experiments: %s: kept from an earlier run", name)
            return kept["result"]
        changed = sorted(k for k in set(settings) | set(kept.get("settings") or {})
                         if settings.get(k) != (kept.get("settings") or {}).get(k))
        raise ConfigError(f"{cfg.out} holds stage {name!r} made with other settings ({', '.join(changed)}): "
                          "use a new out, or the same settings to resume")
    result = keep(run())
    write_json(uri, {"settings": settings, "result": result})
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
    from breakhis_ray.train import run_train_segmenter

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


def prepare_folds(cfg, protocols: list[str], folds: list[int]) -> GridInputs:
    """Run (or keep) the data stages shared by the grid and ``cv``: synthetic tree, manifest, splits per
    protocol (split mode), shards per protocol and fold. ``cfg`` names ``out``, ``synthetic``, ``tree_root``,
    ``split`` and ``prepare_overrides`` (an :class:`ExperimentsConfig` or a ``CVConfig``)."""
    if cfg.synthetic is not None:
        _synthetic_stage(cfg)
    manifest = _manifest_stage(cfg, cfg.tree_root)
    inputs = GridInputs(manifest=manifest, prepared={})
    for protocol in protocols:
        splits = _split_stage(cfg, manifest, protocol)
        for fold in folds:
            out = _prepare_stage(cfg, manifest, splits, protocol, fold)
            inputs.prepared[(protocol, fold)] = out
            inputs.prepare_summaries[(protocol, fold)] = storage.join(out, "prepare.json")
    return inputs


def prepare_inputs(cfg: ExperimentsConfig) -> GridInputs:
    """Run (or keep) the data stages: synthetic tree, manifest, splits per protocol, shards per fold, U-Net."""
    inputs = prepare_folds(cfg, cfg.protocols, cfg.folds)
    if _needs_unet(cfg):
        inputs.unet_checkpoint = _segmenter_stage(cfg, cfg.tree_root)
    return inputs
