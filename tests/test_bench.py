"""``breakhis-ray bench``: config presets, the step timer, target verdicts, and one tiny end-to-end run that
checks the JSON contract (structure and finite positive numbers, never speed: timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from breakhis_ray.config import BenchConfig, dump_config, load_config, validate_config
from breakhis_ray.errors import BreakhisError, ConfigError

# Sizes that make every section run in seconds (structure only; the numbers mean nothing).
TINY = [
    "ingest.n_images=16", "ingest.batch_size=8", "ingest.source=random", "ingest.repeats=1",
    "train.models=[tiny_cnn]", "train.image_size=32", "train.batch_size=8", "train.steps=3", "train.warmup_steps=1",
    "train.warmup_s=0", "train.scale_workers=0",  # the 2-worker TorchTrainer start-up alone is ~20 s
    "inference.n_images=4", "inference.unet_n_images=4", "inference.scale=2", "inference.input_size=32", "inference.segment_size=64",
    "inference.image_size=[92,140]", "inference.batch_size=4", "inference.forward_sweep=[2,4]",
    "synth.patients=2", "synth.fraction=0.0001", "synth.size=140x92",
]
CONTRACT = [
    ("ingest", "ratio_vs_dataloader"), ("ingest", "ratio_same_decoder"), ("train", "ratio_ray_vs_plain"),
    ("inference", "ratio_vs_raw"),
    ("inference", "memory_ratio_10x"), ("synth", "ratio_ray_vs_single"),
]


def test_quick_presets_fill_sizes_but_explicit_values_win():
    cfg = load_config(BenchConfig, None, ["ingest.n_images=50"], {"quick": True})
    assert cfg.ingest.n_images == 50
    assert cfg.train.models == ["tiny_cnn"] and cfg.synth.patients == 8
    # inference: N spans several decode batches per actor or task (the marginal N -> 10N rate is the steady one),
    # wherever decode runs; U-Net N apart
    from breakhis_ray.config import InferConfig
    from breakhis_ray.inference.plan import plan_stages

    n = cfg.inference.n_images
    for placement in ("actors", "tasks"):
        stages = plan_stages(validate_config(InferConfig, {"input": "a", "out": "b", "classifier": "c",
                                                           "decode_placement": placement}), 2.0)
        assert n >= 4 * stages.actors * stages.call_images(n), placement
    assert cfg.inference.unet_n_images == 16
    assert validate_config(BenchConfig, dump_config(cfg)) == cfg  # workers' round trip is lossless
    assert BenchConfig().train.models == ["tiny_cnn", "resnet18"]


def test_bench_config_rejects_typos_and_bad_sizes():
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(BenchConfig, None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(BenchConfig, None, ["inference.segment_size=100"])


def test_step_timer_times_only_the_steps_after_warmup():
    from breakhis_ray.bench.train import StepTimer

    batches = [(None, [0] * 4)] * 10
    timer = StepTimer(batches, warmup=2, steps=5)
    assert len(list(timer)) == 7
    stats = timer.result()
    assert stats["samples"] == 20 and stats["seconds"] > 0
    assert math.isclose(stats["step_ms"], stats["data_ms"] + stats["compute_ms"], rel_tol=1e-6)
    with pytest.raises(BreakhisError, match="ran out after 3 batches"):
        list(StepTimer(batches[:3], warmup=2, steps=5))


def test_targets_say_met_or_by_how_much_they_are_missed():
    from breakhis_ray.bench.table import evaluate_targets

    results = {"train": {"ratio_ray_vs_plain": 0.72},
               "inference": {"classifier": {"ratio_vs_raw": 0.9, "peak_rss_ratio": 1.5}}}
    targets = evaluate_targets(results)
    assert targets["train_ray_vs_plain"] == {"ratio": 0.72, "op": ">=", "target": 0.95, "met": False,
                                             "off_pct": 24.2}
    assert targets["inference_classifier_vs_raw"]["met"] is True
    assert targets["inference_classifier_memory_10x"]["met"] is False
    assert "ingest_shards_vs_dataloader" not in targets  # sections that did not run have no verdict


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_bench_run_writes_the_json_contract_and_a_profile(ray_session, tmp_path, caplog):
    from breakhis_ray.bench import run_bench

    out = tmp_path / "bench.json"
    cfg = load_config(BenchConfig, None, TINY, {"json_out": str(out), "workdir": str(tmp_path / "work")})
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        results = run_bench(cfg)
    saved = json.loads(out.read_text())
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["torch"] and saved["machine"]["ray"]
    for section, key in CONTRACT:
        value = saved[section][key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (section, key, value)
    assert all(v > 0 and math.isfinite(v) for v in saved["ingest"]["images_per_s"].values())
    for mode in ("classifier", "unet_classifier"):  # two rounds of N and 2N; the fastest round's runs count
        entry = saved["inference"][mode]
        assert len(entry["marginal_images_per_s_rounds"]) == saved["inference"]["repeats"] == 2
        assert entry["marginal_images_per_s"] == max(m or 0.0 for m in entry["marginal_images_per_s_rounds"]) or (
            entry["marginal_images_per_s"] is None and not any(entry["marginal_images_per_s_rounds"]))
    from breakhis_ray.data.decode import available_backends

    for section in ("ingest", "inference"):  # every installed PNG backend, timed on that section's own tiles
        rates = saved[section]["decode_backends_1core"]
        assert list(rates) == available_backends() and all(v > 0 for v in rates.values()), (section, rates)
    explain = saved["inference"]["explain"]  # the cost of --explain gradcam, with and without
    assert explain["method"] == "gradcam" and explain["pipeline_explain"]["images"] == 8
    assert all(explain[k] > 0 for k in ("raw_ratio", "pipeline_ratio", "raw_predictor_explain_images_per_s"))
    assert set(saved["targets"]) >= {"train_ray_vs_plain", "inference_unet_classifier_memory_10x"}
    assert saved == json.loads(json.dumps(results))
    profile = (tmp_path / "bench.profile.txt").read_text()
    assert "time per step" in profile and "cProfile" in profile and "Ray Data statistics" in profile
    printed = caplog.text
    assert "TorchTrainer 1 worker vs plain loop" in printed and "verdict" in printed
    assert printed.count("PNG decode img/s on 1 core: pil ") == 2  # in the ingest and the inference header
    assert validate_config(BenchConfig, yaml.safe_load((tmp_path / "bench.config.yaml").read_text())) == cfg
    assert json.loads((tmp_path / "bench.versions.json").read_text())["ray"]


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_smoke_run_on_cpu_writes_one_json(ray_session, tmp_path, caplog):
    """``bench --gpu`` without a GPU (``gpu.device=cpu`` forces it where there is one): the same parts at smoke
    sizes on the CPU, one JSON, no utilisation."""
    from breakhis_ray.cli import main

    out = tmp_path / "gpu.json"
    assert main(["bench", "--gpu", "--json", str(out), f"workdir={tmp_path / 'work'}", "gpu.device=cpu"]) == 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["smoke"] is True and saved["sizes"]["models"] == ["tiny_cnn"]
    train = saved["train"]["tiny_cnn"]
    assert train["images_per_s"] > 0 and train["gpu_util_mean_pct"] is None and train["bf16_autocast"] is False
    infer = saved["inference"]
    assert infer["images"] == 8 and infer["pipeline_images_per_s"] > 0 and infer["raw_predictor_images_per_s"] > 0
    decode = saved["decode"]
    assert decode["images"] == 8 and decode["cpu_pil_1core_images_per_s"] > 0 and decode["gpu_nvjpeg_images_per_s"] is None
    assert decode["cpu_torchvision_1core_images_per_s"] > 0 and saved["wall_s"] > 0
    assert validate_config(BenchConfig, yaml.safe_load((tmp_path / "gpu.config.yaml").read_text())).gpu.enabled


def test_gpu_check_sizes_smoke_only_without_a_gpu_and_explicit_values_win():
    from breakhis_ray.bench.gpu import check_sizes
    from breakhis_ray.config import GPU_SMOKE

    section = load_config(BenchConfig, None, ["gpu.enabled=true", "gpu.steps=7"]).gpu
    assert check_sizes(section, use_gpu=True) == section and section.models == ["vgg16_bn", "resnet50"]
    smoke = check_sizes(section, use_gpu=False)
    assert smoke.steps == 7 and smoke.models == GPU_SMOKE["models"] and smoke.image_size == GPU_SMOKE["image_size"]
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(BenchConfig, None, ["gpu.segment_size=100"])


def test_others_cpu_counts_this_runs_short_lived_processes_as_ours():
    """Children that burn a core and exit inside the window are this run's work, not other processes' load.

    Independent of the machine's load: each child burns 1.0 s of its own CPU time (not wall time), then waits
    until the sampler has taken two more samples before it exits, so none of its time falls after the last
    sample; its CPU seconds must then be attributed to this tree, however busy other processes kept the machine.
    """
    import subprocess
    import sys
    import time

    from breakhis_ray.bench.memory import OthersCpu

    burn = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
            "print('burnt', flush=True)\nsys.stdin.read()")
    with OthersCpu(interval=0.05) as others:
        for _ in range(2):
            child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
            assert child.stdout.readline().strip() == "burnt"
            seen = others.samples
            while others.samples < seen + 2:  # sampled after the burn (the per-test timeout bounds this wait)
                time.sleep(0.01)
            child.communicate(input="")  # closes stdin: the child exits inside the window
            assert child.returncode == 0
    assert others.cores is not None
    # 2 x 1.0 s of CPU time (utime + stime in clock ticks: allow their rounding), plus the children's start-up
    assert others.own_seconds >= 1.95, others.own_seconds


def _one_section():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_one_section.py"
    spec = importlib.util.spec_from_file_location("bench_one_section", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_section_scripts_go_through_the_one_bench_config():
    """``python benchmarks/<section>.py`` = ``breakhis-ray bench`` with the other sections off: same config."""
    from breakhis_ray.cli import main

    one = _one_section()
    argv = one.section_argv("ingest", ["--quick", "ingest.n_images=20"])
    assert argv[0] == "bench"
    cfg = load_config(BenchConfig, None, argv[2:], {"quick": True})
    assert cfg.ingest.enabled and cfg.ingest.n_images == 20 and cfg.json_out == "runs/bench/ingest.json"
    assert not (cfg.train.enabled or cfg.inference.enabled or cfg.synth.enabled)
    assert cfg.ingest.decode_batch_size == BenchConfig().ingest.decode_batch_size  # no second set of defaults
    named = one.section_argv("synth", ["--json", "/tmp/x.json"])
    assert not any(a.startswith("json_out=") for a in named)
    assert main(one.section_argv("train", ["train.stepz=1"])) == 2  # typos fail as in every command
    with pytest.raises(ValueError, match="unknown bench section"):
        one.section_argv("nope", [])
