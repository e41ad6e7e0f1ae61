"""Sweep presets: every shipped preset loads; bad configs are one ``error:`` line and exit 2 before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.presets import (CONFIG_DIR, check_resources, load_preset, preset_from_dict)

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_preset_loads_and_validates_its_sections():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"smoke", "local", "cifar10", "imagenet-transfer", "stability"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset.groups(), name
        preset.failure_spec()
        if preset.evaluate:
            preset.evaluation()
        if preset.hpo:
            spec = preset.hpo_spec()
            assert len(spec.seeds) >= 2


def test_local_preset_is_the_readme_job():
    preset = load_preset("local")
    assert len(preset.groups()) >= 2 and len(preset.seeds) >= 3
    assert all(g["dataset"] == "synthetic" for g in preset.groups())
    assert preset.resources["gpu"] == 0


def test_gpu_presets_ask_for_one_gpu_and_use_amp():
    for name in ("cifar10", "stability"):
        preset = load_preset(name)
        assert preset.resources["gpu"] == 1, name
        cfg = preset.search_config(preset.groups()[0], seed=0)
        assert cfg.amp and cfg.channels_last and cfg.epochs == 50, name
    transfer = load_preset("imagenet-transfer").evaluation()
    assert transfer.config.dataset == "imagenet" and transfer.config.layers == 14


def test_configurations_and_grid_make_groups():
    preset = preset_from_dict({"search": {"dataset": "synthetic"}, "configurations": [
        {"method": "pcdarts", "k": 4}, {"method": "darts"}], "grid": {"arch_lr": [1e-3, 3e-3]}, "seeds": 2})
    groups = preset.groups()
    assert len(groups) == 4 and preset.seeds == (0, 1)
    assert preset.group_keys() == ["method", "k", "arch_lr"]
    assert {g["method"] for g in groups} == {"pcdarts", "darts"}


@pytest.mark.parametrize("sets, message", [
    (["search.kk=3"], "unknown search config key 'kk' (did you mean 'k'?)"),
    (["epochs=abc"], "epochs must be an integer"),
    (["epochs="], "epochs needs a value, got an empty one"),
    (["frobnicate.x=1"], "unknown top-level key 'frobnicate'"),
    (["failure.max_failures=-3"], "failure.max_failures"),
    (["failure.max_failures=true"], "failure.max_failures: Input should be a valid integer, got True"),
    (["distributed.checkpoints_to_keep=1.5"], "distributed.checkpoints_to_keep: Input should be a valid integer"),
    (["evaluate.epochz=3"], "unknown evaluation config key 'epochz'"),
    (["evaluate.genotypes=[NOPE]"], "'NOPE' is neither a published genotype"),
    (["hpo.space.k={normal: [1, 2]}"], "unknown distribution 'normal'"),
    (["hpo.space.k={choice: [3]}"], "hpo.space.k=3"),
    (["hpo.seeds=[0]"], "at least 2 seeds"),
    (["seeds=[0, 0]"], "seeds has duplicates"),
    (["resources.tpu=1"], "cpu and gpu"),
    (["warmup_epochs=5"], "warmup_epochs=5 must be in [0, epochs=2)"),
])
def test_invalid_presets_are_one_line_errors(sets, message):
    with pytest.raises(ValueError) as err:
        load_preset("smoke", sets)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_resources_beyond_the_cluster_are_refused():
    check_resources({"cpu": 2, "gpu": 0}, {"CPU": 2.0})
    with pytest.raises(ValueError, match="asks for 3 CPU"):
        check_resources({"cpu": 3, "gpu": 0}, {"CPU": 2.0})
    with pytest.raises(ValueError, match="asks for 0.5 GPU"):
        check_resources({"cpu": 1, "gpu": 0.5}, {"CPU": 8.0})


def _sweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("sets, message", [
    (["--set", "search.bogus=1"], "unknown search config key 'bogus'"),
    (["--set", "k=three"], "k must be an integer"),
    (["--set", "epochs="], "epochs needs a value, got an empty one"),
    (["--set", "dataset=cifar10", "--set", "data_dir=/nonexistent/cifar"], "cifar10 data not found at"),
    (["--set", "resources.cpu=4096"], "a trial asks for 4096 CPU(s) but the cluster has"),
])
def test_cli_config_errors_exit_2_with_one_line_before_ray_starts(tmp_path, sets, message):
    proc = _sweep("stability", "--preset", "smoke", "--storage", str(tmp_path), *sets)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "smoke").exists()  # nothing was started or written


def test_cli_unknown_preset_and_status_of_nothing(tmp_path):
    proc = _sweep("stability", "--preset", "no-such-preset", "--storage", str(tmp_path))
    assert proc.returncode == 2 and "unknown preset 'no-such-preset'" in proc.stderr
    proc = _sweep("summary", "nothing-here", "--storage", str(tmp_path))
    assert proc.returncode == 2 and "no experiment 'nothing-here'" in proc.stderr
