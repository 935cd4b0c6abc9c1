"""The ``breakhis-ray`` command line and the ``jobs/`` entry points: every subcommand has a config and a
target, flags name real config keys, bad input is one ``error:`` line with exit 2, and log records of the
package reach stdout as plain lines at the chosen level.

Unit tier: no Ray (stage targets are replaced where a command would run), no network.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

from breakhis_ray import cli
from breakhis_ray import config as config_module
from breakhis_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
JOB_FILES = sorted(p for p in JOBS.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture
def clean_logging():
    """Restore the root handlers and the package logger's level after a test that runs ``cli.main``."""
    root, ours = logging.getLogger(), logging.getLogger(cli.PACKAGE_LOGGER)
    handlers, level = list(root.handlers), ours.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    ours.setLevel(level)


@pytest.fixture
def fake_stage(monkeypatch, clean_logging):
    """Replace the stage call with one that logs at every level and records the validated config."""
    seen = {}

    def run_command(name, config_path, values, overrides):
        cls = getattr(config_module, next(c for c in cli.COMMANDS if c.name == name).config)
        seen["cfg"] = config_module.load_config(cls, config_path, overrides, values)
        log = logging.getLogger("breakhis_ray.some_stage")
        log.debug("debug line")
        log.info("info line")
        log.warning("warning line")

    monkeypatch.setattr(cli, "run_command", run_command)
    monkeypatch.delenv(cli.LOG_LEVEL_ENV, raising=False)
    return seen


# ------------------------------------------------------------------------------------------ table
@pytest.mark.parametrize("cmd", cli.COMMANDS, ids=lambda c: c.name)
def test_every_command_has_a_config_a_target_and_real_flag_keys(cmd):
    cls = getattr(config_module, cmd.config)
    assert issubclass(cls, BaseModel)
    module_name, func_name = cmd.target.split(":")
    assert importlib.util.find_spec(module_name) is not None, cmd.target
    for flag in cmd.flags:
        model = cls
        for part in flag.key.split("."):
            assert part in model.model_fields, f"{cmd.name} {flag.name}: {cls.__name__} has no key {flag.key!r}"
            model = model.model_fields[part].annotation


def test_top_level_and_subcommand_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd.name in out for cmd in cli.COMMANDS)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--log-level" in out and "key=value" in out


# ------------------------------------------------------------------------------------------ errors
def test_a_config_error_is_one_line_and_exit_2(capsys, clean_logging):
    code = cli.main(["evaluate", "--predictions", "p", "--manifest", "m", "--out", "o", "not_a_key=1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == "error: unknown config key 'not_a_key' for EvaluateConfig\n"


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["split", "--mode", "random"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_bad_log_level_in_the_environment(monkeypatch, capsys, fake_stage):
    monkeypatch.setenv(cli.LOG_LEVEL_ENV, "LOUD")
    assert cli.main(["report", "--out", "o"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {cli.LOG_LEVEL_ENV}='LOUD' is not a log level")


# ----------------------------------------------------------------------------------------- logging
def test_info_lines_reach_stdout_as_plain_text(capsys, fake_stage):
    assert cli.main(["report", "--out", "o", "title=T"]) == 0
    assert fake_stage["cfg"].title == "T"
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["info line", "warning line"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_log_level_from_the_flag_or_the_environment(how, monkeypatch, capsys, fake_stage):
    argv = ["report", "--out", "o"]
    if how == "flag":
        argv.insert(1, "--log-level")
        argv.insert(2, "warning")
    else:
        monkeypatch.setenv(cli.LOG_LEVEL_ENV, "warning")
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == ["warning line"]
    assert "log_level" not in fake_stage["cfg"].model_dump()


def test_debug_level_and_repeated_set_up_add_one_handler(capsys, fake_stage):
    for _ in range(2):
        assert cli.main(["report", "--log-level", "DEBUG", "--out", "o"]) == 0
    assert capsys.readouterr().out.splitlines() == ["debug line", "info line", "warning line"] * 2
    ours = [h for h in logging.getLogger().handlers if isinstance(h, cli._StdoutHandler)]
    assert len(ours) == 1


def test_other_libraries_stay_at_warning(capsys, fake_stage):
    assert cli.main(["report", "--out", "o"]) == 0
    capsys.readouterr()
    logging.getLogger("some.library").info("library chatter")
    assert capsys.readouterr().out == ""


# -------------------------------------------------------------------------------------------- jobs
def _load_job(path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(JOBS))
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_entry_point_is_main_over_its_subcommand(path, monkeypatch, capsys, clean_logging):
    command = path.stem.replace("_", "-")
    assert command in {c.name for c in cli.COMMANDS}, f"{path.name}: no subcommand {command!r}"
    job = _load_job(path, monkeypatch)
    assert job.main(["not_a_key_of_any_config=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_job_main_runs_the_command(monkeypatch, fake_stage, capsys):
    job = _load_job(JOBS / "evaluate.py", monkeypatch)
    assert job.main(["--predictions", "p", "--manifest", "m", "--out", "o", "threshold=0.3"]) == 0
    cfg = fake_stage["cfg"]
    assert isinstance(cfg, config_module.EvaluateConfig)
    assert (cfg.threshold.rule, cfg.threshold.value) == ("fixed", 0.3)  # a bare number: a fixed threshold


def test_config_error_type_is_a_breakhis_error():
    assert issubclass(ConfigError, cli.BreakhisError)
