"""The config package: one size parser with one axis order, load/validate/dump, shared sections, no defaults
that depend on the working directory, and a bottom layer that imports nothing from ``breakhis_ray.data``.

Unit tier: no Ray, no network.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import breakhis_ray.config as config
from breakhis_ray.config import (
    DataConfig,
    DecodeSection,
    DemoConfig,
    ExperimentsConfig,
    InferConfig,
    PrepareConfig,
    SegDataConfig,
    SynthConfig,
    TrainConfig,
    load_config,
    parse_hw,
    validate_config,
)
from breakhis_ray.config.base import parse_bytes, parse_magnifications, wh_size
from breakhis_ray.errors import ConfigError

PACKAGE_DIR = Path(config.__file__).parent

#: Every public name of the former single-module ``breakhis_ray/config.py`` but ``parse_size`` (width-first,
#: replaced by ``parse_hw``; ``wh_size`` reorders it for the width-first fields).
FORMER_PUBLIC_NAMES = """
MAGNIFICATIONS StrictModel RayConfig SynthConfig ManifestConfig SplitOptions SplitConfig
ENHANCE_TRANSFORMS EnhanceConfig PrepareConfig ModelT parse_override read_yaml load_config validate_config
dump_config config_yaml AugmentConfig DataConfig ModelConfig LossConfig OptimConfig ScalingSection
FailureInjection RunSection GuidanceConfig TrainConfig SegSplitSection SegSourceSection SegDataConfig
SegModelConfig SegLossConfig SegOptimConfig SegRunSection SegTrainConfig SegEvalConfig InferConfig
EvaluateConfig ReportConfig GRID_TABLES LossTableSection StrategyTableSection MagnificationTableSection
SegmentationTableSection GridSegmenterSection GridScoringSection ExperimentsConfig DemoConfig
BenchIngestSection BenchTrainSection BenchInferenceSection BenchSynthSection BENCH_QUICK BenchConfig
""".split()


def models() -> list[type[BaseModel]]:
    return [obj for obj in vars(config).values() if isinstance(obj, type) and issubclass(obj, BaseModel)]


# -------------------------------------------------------------------------------------- size parser
@pytest.mark.parametrize("value, expected", [
    (224, (224, 224)),
    ([120, 160], (120, 160)),
    ((120, 160), (120, 160)),
    ("160x120", (120, 160)),  # "WxH": width first in strings
    ("700X460", (460, 700)),
])
def test_parse_hw_returns_height_then_width(value, expected):
    assert parse_hw(value) == expected


@pytest.mark.parametrize("bad", [True, "160", "ax8", "8x8x8", [8], [8, 8, 8], "4x100", [100, 7], None])
def test_parse_hw_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_hw(bad)


def test_one_parser_same_string_same_size_everywhere():
    """The same "WxH" string means the same width and height in every field that takes it; only the order
    a field stores differs (image-file dimensions are stored width-first, model inputs (H, W))."""
    train = TrainConfig.model_validate({"data": {"shards": "s", "image_size": "350x230"}})
    synth = SynthConfig(size="350x230")
    demo = DemoConfig(size="350x230")
    prepare = PrepareConfig(root="r", out="o", resize="350x230", expected_size=[350, 230])
    seg = SegDataConfig(root="r", image_size="352x224")
    infer = InferConfig(input="i", out="o", classifier="c", segment_size="350x230")
    assert train.data.image_size == (230, 350) == infer.segment_size
    assert synth.size == demo.size == (350, 230) == wh_size("350x230")
    assert parse_hw(prepare.resize) == parse_hw(prepare.expected_size) == train.data.image_size
    assert seg.image_size == (224, 352)
    # Width-first fields keep accepting a width-first list, as before.
    assert SynthConfig(size=[350, 230]).size == synth.size and SynthConfig(size=(64, 48)).size == (64, 48)


def test_the_preprocessing_spec_uses_the_same_parser():
    from breakhis_ray.data import transforms

    assert transforms.parse_hw is config.base.parse_hw
    assert transforms.PreprocessSpec(size="350x230").size == (230, 350)


def test_width_first_fields_report_their_convention():
    with pytest.raises(ConfigError, match=r"WxH or \[W, H\]"):
        validate_config(SynthConfig, {"size": [700, 460, 3]})
    with pytest.raises(ConfigError, match="resize"):
        validate_config(PrepareConfig, {"root": "r", "out": "o", "resize": "7x4"})


def test_unet_sizes_are_multiples_of_32():
    with pytest.raises(ConfigError, match="multiples of 32"):
        validate_config(SegDataConfig, {"root": "r", "image_size": "350x230"})


# ----------------------------------------------------------------------------------- other parsers
def test_parse_bytes_and_magnifications():
    assert parse_bytes("256MB") == 256 * 10**6 and parse_bytes("1GiB") == 2**30 and parse_bytes(7) == 7
    assert PrepareConfig(root="r", out="o", shard_bytes="2KiB").shard_bytes == 2048
    with pytest.raises(ValueError):
        parse_bytes("12 parsecs")
    assert parse_magnifications("all") == "all" and parse_magnifications(["400x", 40, "100X"]) == [40, 100, 400]
    assert DataConfig(shards="s", magnifications="200X").magnifications == [200]
    with pytest.raises(ValueError, match="not one of"):
        parse_magnifications(50)


# -------------------------------------------------------------------------------- load and validate
def test_precedence_defaults_yaml_flags_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": "from-yaml"}, "train": {"lr": 0.5, "epochs": 3}}))
    cfg = load_config(TrainConfig, path, ["train.lr=0.25", "model.name=resnet18"], {"data.shards": "from-flag"})
    assert cfg.data.shards == "from-flag" and cfg.train.lr == 0.25 and cfg.train.epochs == 3
    assert cfg.model.name == "resnet18" and cfg.train.batch_size == 32  # default kept


@pytest.mark.parametrize("overrides, message", [
    (["data.shards=s", "nope=1"], "unknown config key 'nope' for TrainConfig"),
    (["data.shards=s", "train.lr=-1"], "bad config value train.lr=-1"),
    ([], "missing required config key 'data' for TrainConfig"),
    (["lr"], "must look like key.sub=value"),
    (["a..b=1"], "empty key"),
])
def test_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as info:
        load_config(TrainConfig, None, overrides)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(TrainConfig, tmp_path / "list.yaml")


@pytest.mark.parametrize("cls, data", [
    (TrainConfig, {"data": {"shards": "s", "image_size": "96x64"}, "guidance": {"method": "threshold"}}),
    (PrepareConfig, {"root": "r", "out": "o", "resize": [64, 48], "max_pixels": 1000}),
    (InferConfig, {"input": "i", "out": "o", "classifier": "c", "segment_size": 64}),
    (ExperimentsConfig, {"out": "o", "synthetic": {"out": "o/s", "size": "96x64"}}),
])
def test_dump_and_revalidate_is_lossless(cls, data):
    cfg = validate_config(cls, data)
    assert validate_config(cls, config.dump_config(cfg)) == cfg
    assert validate_config(cls, yaml.safe_load(config.config_yaml(cfg))) == cfg


# ---------------------------------------------------------------------------------------- decode
def test_one_max_pixels_default_for_every_decoding_stage():
    prepare, infer = PrepareConfig(root="r", out="o"), InferConfig(input="i", out="o", classifier="c")
    assert prepare.max_pixels == infer.max_pixels == DecodeSection().max_pixels == config.DEFAULT_MAX_PIXELS
    from breakhis_ray.data import decode

    assert decode.DEFAULT_MAX_PIXELS == config.DEFAULT_MAX_PIXELS, "the decoder and the config disagree"


def test_former_max_pixels_key_still_works():
    assert load_config(PrepareConfig, None, ["max_pixels=50000"], {"root": "r", "out": "o"}).max_pixels == 50000
    cfg = load_config(InferConfig, None, ["decode.max_pixels=9"], {"input": "i", "out": "o", "classifier": "c"})
    assert cfg.max_pixels == 9 and config.dump_config(cfg)["decode"]["max_pixels"] == 9
    assert "max_pixels" not in config.dump_config(cfg)
    with pytest.raises(ConfigError, match="not both"):
        validate_config(PrepareConfig, {"root": "r", "out": "o", "max_pixels": 5, "decode": {"max_pixels": 6}})
    with pytest.raises(ConfigError, match="decode.max_pixels"):
        validate_config(PrepareConfig, {"root": "r", "out": "o", "max_pixels": 0})


# ------------------------------------------------------------------------------ working directory
def test_shipped_config_defaults_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo, grid = DemoConfig(), ExperimentsConfig(out="o", root="r")
    for path in (demo.train_config, demo.segmenter_config, grid.base_train_config, grid.segmenter.config):
        assert Path(path).is_absolute() and Path(path).is_file(), path
    assert load_config(TrainConfig, demo.train_config).model.name == "tiny_cnn"
    assert load_config(config.SegTrainConfig, grid.segmenter.config).run.name == "unet-tiny"


def test_no_relative_default_names_a_file_to_read():
    """Relative defaults left are output locations (documented as relative to where a command runs); a
    default naming an input file (a YAML, a checkpoint) is absolute."""
    relative = {}
    for cls in models():
        try:
            instance = cls()
        except Exception:  # noqa: BLE001 - models with required fields have no full default
            continue
        for name, value in instance:
            if isinstance(value, str) and ("/" in value or value.endswith((".yaml", ".json"))):
                if not Path(value).is_absolute():
                    relative[f"{cls.__name__}.{name}"] = value
    assert relative == {
        "SynthConfig.out": "runs/demo/synthetic", "DemoConfig.out": "runs/demo",
        "BenchConfig.json_out": "runs/bench/bench.json", "RunSection.storage_path": "runs/train",
        "SegRunSection.storage_path": "runs/segmenter",
    }


# ------------------------------------------------------------------------------------ the package
def test_every_former_public_name_is_still_exported():
    missing = [name for name in FORMER_PUBLIC_NAMES if not hasattr(config, name)]
    assert not missing
    assert not hasattr(config, "parse_size"), "one size parser: parse_hw"
    assert set(config.__all__) <= set(dir(config))
    from breakhis_ray.domain import MAGNIFICATIONS

    assert config.MAGNIFICATIONS is MAGNIFICATIONS


def test_config_package_imports_nothing_from_data_or_stages():
    """Statically: no module of the package names breakhis_ray.data (or a stage module) in an import."""
    allowed = ("breakhis_ray.config", "breakhis_ray.domain", "breakhis_ray.errors")
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("breakhis_ray"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"


def test_importing_the_config_loads_no_data_module():
    code = ("import sys, breakhis_ray.config; "
            "print(sorted(m for m in sys.modules if m.startswith('breakhis_ray') and not "
            "m.startswith(('breakhis_ray.config', 'breakhis_ray.domain', 'breakhis_ray.errors')) "
            "and m != 'breakhis_ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE_DIR.glob("*.py")}
    assert max(sizes.values()) <= 400, sizes
