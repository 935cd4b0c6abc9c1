"""Every YAML in jobs/configs/ validates with the config class of the subcommand its name starts with.

``train_tiny.yaml`` -> ``train`` -> ``TrainConfig``; ``train_segmenter_*.yaml`` -> ``train-segmenter``
(longest subcommand name wins). The mapping comes from ``breakhis_ray.cli.COMMANDS``, so a new subcommand
needs no change here. Unit tier: no Ray, no network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from breakhis_ray import config as config_module
from breakhis_ray.cli import COMMANDS
from breakhis_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "jobs" / "configs"
CONFIG_FILES = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])


def command_for(path: Path):
    """The subcommand whose name (``-`` read as ``_``) is the file stem or its ``<name>_`` prefix."""
    stem = path.stem
    for cmd in sorted(COMMANDS, key=lambda c: len(c.name), reverse=True):
        prefix = cmd.name.replace("-", "_")
        if stem == prefix or stem.startswith(prefix + "_"):
            return cmd
    return None


def config_class(cmd):
    """The config class for ``cmd``: every subcommand has one."""
    cls = getattr(config_module, cmd.config, None)
    assert cls is not None, f"breakhis_ray.config has no {cmd.config} (config of `breakhis-ray {cmd.name}`)"
    return cls


def test_config_dir_has_the_cluster_configs():
    names = {p.name for p in CONFIG_FILES}
    assert {"train_vgg16_gpu.yaml", "infer_gpu.yaml"} <= names, sorted(names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_validates(path: Path):
    cmd = command_for(path)
    prefixes = sorted(c.name.replace("-", "_") for c in COMMANDS)
    assert cmd is not None, f"{path.name}: name must start with a subcommand name + '_' ({', '.join(prefixes)})"
    cls = config_class(cmd)
    cfg = config_module.load_config(cls, path)
    # Workers re-validate the dumped config: the round trip must be lossless.
    again = config_module.validate_config(cls, config_module.dump_config(cfg))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_rejects_a_typo(path: Path, tmp_path: Path):
    """The strict models catch a misspelt top-level key in each file (before any cluster starts)."""
    cmd = command_for(path)
    if cmd is None:
        pytest.fail(f"{path.name}: no subcommand prefix (see test_config_file_validates)")
    cls = config_class(cmd)
    broken = tmp_path / path.name
    broken.write_text(path.read_text() + "\nnot_a_key_of_any_config: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'not_a_key_of_any_config'"):
        config_module.load_config(cls, broken)


def test_gpu_configs_ask_for_gpus():
    train = config_module.load_config(config_module.TrainConfig, CONFIG_DIR / "train_vgg16_gpu.yaml")
    assert train.scaling.use_gpu and train.scaling.num_workers == 4
    assert (train.model.name, train.model.weights) == ("vgg16_bn", "torchvision")
    assert train.data.image_size == (224, 224) and (train.train.batch_size, train.train.epochs) == (64, 25)
    assert train.run.storage_path.startswith("s3://"), "multi-node Ray Train needs shared storage"
    assert train.data.shards.startswith("s3://")
    infer = config_module.load_config(config_module.InferConfig, CONFIG_DIR / "infer_gpu.yaml")
    assert infer.num_gpus >= 1 and infer.concurrency >= 1
