"""Search spaces through the commands users run: ``genotype info|show --space`` as subprocesses, and smoke sweeps
of the robustdarts preset (S1-S4) and of NAS-Bench-201 with a benchmark file on the local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator import genotype as genotype_cli
from orchestrator import sweep
from orchestrator.cli import run_cli
from orchestrator.presets import load_preset
from pcdarts_core.nb201 import NB201SearchNetwork
from pcdarts_core.nb201_arch import parse_arch, random_arch

from test_spaces import ALL_CONV, BENCH_PARAMS, EXAMPLE, PARAM_FREE, analytic_params
from test_spaces_data import write_benchmark

ROOT = Path(__file__).resolve().parents[1]
MIXED = "|nor_conv_1x1~0|+|none~0|nor_conv_3x3~1|+|avg_pool_3x3~0|skip_connect~1|nor_conv_1x1~2|"

#: run as subprocesses, as users run them (two at a time)
CASES = {
    **{f"info-{d}": ["info", ALL_CONV, "--space", "nb201", "--dataset", d, "--json"] for d in BENCH_PARAMS},
    "show": ["show", EXAMPLE, "--space", "nb201", "--json"],
    "bad-string": ["info", "|nor_conv_3x3~0|+|bogus~0|none~1|+|none~0|none~1|none~2|", "--space", "nb201",
                   "--dataset", "cifar10"],
    "wrong-space": ["info", EXAMPLE, "--dataset", "cifar10"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.genotype", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(run, CASES.values())))


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("dataset", sorted(BENCH_PARAMS))
def test_info_nb201_prints_the_benchmarks_parameter_count(runs, capsys, dataset):
    classes, smallest, largest = BENCH_PARAMS[dataset]
    proc = runs[f"info-{dataset}"]
    assert proc.returncode == 0, proc.stderr
    info = _last_json(proc.stdout)
    assert info["params"] == largest and info["space"] == "nb201" and info["dataset"] == dataset
    assert (info["channels"], info["layers"]) == (16, 5) and info["input_size"] == (16 if "16" in dataset else 32)
    for arch, expected in ((PARAM_FREE, smallest), (MIXED, analytic_params(parse_arch(MIXED), classes))):
        assert genotype_cli.main(["info", arch, "--space", "nb201", "--dataset", dataset, "--json"]) == 0
        assert _last_json(capsys.readouterr().out)["params"] == expected


def test_show_nb201_and_the_darts_space_is_unchanged(runs, capsys):
    proc = runs["show"]
    assert proc.returncode == 0, proc.stderr
    assert _last_json(proc.stdout) == {"nb201": EXAMPLE}
    assert "NAS-Bench-201 cell" in proc.stdout and "nor_conv_3x3" in proc.stdout
    assert genotype_cli.main(["info", "PC_DARTS_CIFAR", "--dataset", "cifar10", "--json"]) == 0
    darts = _last_json(capsys.readouterr().out)
    assert darts["space"] == "darts" and darts["params"] == 3_634_678  # PC-DARTS's 3.6M


@pytest.mark.parametrize("case, message", [
    ("bad-string", "unknown op 'bogus'"),
    ("wrong-space", "is a NAS-Bench-201 cell, not a cell of search space darts; use --space nb201"),
])
def test_bad_input_is_one_error_line_and_exit_2(runs, case, message):
    proc = runs[case]
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["show", "|none~0|+|none~0|none~5|+|none~0|none~1|none~2|", "--space", "nb201"], "node 2 cannot take input 5"),
    (["show", "DARTS_V2", "--space", "nb201"], "is a DARTS genotype, not a cell of search space nb201"),
    (["info", EXAMPLE, "--space", "nb201", "--dataset", "imagenet"], "--dataset imagenet is not one of search"),
    (["show", EXAMPLE, "--space", "nb301"], "invalid choice: 'nb301'"),
    (["info", EXAMPLE, "--space", "nb201", "--dataset", "cifar10", "--layers", "0"], "--layers must be in 1..100"),
])
def test_more_bad_input_in_process(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        run_cli(genotype_cli.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# -- sweeps ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def quiet_tune(monkeypatch):
    for key in ("RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_STRICT_METRIC_CHECKING"):
        monkeypatch.setenv(key, os.environ.get(key, "1" if key == "RAY_AIR_NEW_OUTPUT" else "0"))


#: the preset's documented smoke-sized override (description), narrowed to one space and one seed
ROBUST_SMOKE = ["search.dataset=synthetic", "search.data_dir=null", "search.epochs=2", "search.steps_per_epoch=2",
                "search.synthetic_samples=128", "search.init_channels=4", "search.layers=3", "search.device=cpu",
                "seeds=[0]", "resources.gpu=0", "resources.cpu=1"]


def test_robustdarts_preset_is_a_grid_over_s1_to_s4():
    preset = load_preset("robustdarts")
    assert [g["search_space"] for g in preset.groups()] == ["s1", "s2", "s3", "s4"] and preset.seeds == (0, 1, 2)
    cfg = preset.search_config(preset.groups()[3], seed=0)
    assert (cfg.method, cfg.dataset, cfg.epochs, cfg.init_channels, cfg.layers, cfg.batch_size, cfg.k) == \
        ("darts", "cifar10", 50, 16, 8, 64, 1)
    assert preset.evaluation().config.search_space == "darts"  # S1-S4 cells train in DARTS's network
    for line in ROBUST_SMOKE:
        assert line.replace("search.", "").split("=")[0] in preset.description.replace("search.", "")


@pytest.mark.ray
@pytest.mark.slow
def test_robustdarts_smoke_trial_records_the_parameter_free_share(ray_cluster, quiet_tune, tmp_path):
    sets = [x for s in ROBUST_SMOKE + ["grid.search_space=[s4]"] for x in ("--set", s)]
    assert sweep.main(["stability", "--preset", "robustdarts", "--storage", str(tmp_path), *sets]) == 0
    exp = tmp_path / "robustdarts"
    trials = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(trials) == 1 and trials[0]["status"] == "done" and trials[0]["group"] == "method=darts,search_space=s4"
    genotype = json.loads(trials[0]["genotype"])
    assert {op for op, _ in genotype["normal"] + genotype["reduce"]} <= {"noise", "sep_conv_3x3"}
    share = sum(op == "noise" for op, _ in genotype["normal"]) / 8
    assert trials[0]["param_free_share_normal"] == pytest.approx(share)
    epochs = pq.read_table(exp / "epochs.parquet").to_pylist()
    assert len(epochs) == 2 and all(r["param_free_share_reduce"] is not None for r in epochs)
    row = pq.read_table(exp / "stability.parquet").to_pylist()[0]
    assert row["param_free_share_normal_mean"] == pytest.approx(share)


@pytest.mark.ray
@pytest.mark.slow
def test_nb201_sweep_looks_up_every_search_in_the_benchmark(ray_cluster, quiet_tune, tmp_path):
    # With a negligible arch lr the derived cell stays the argmax of the seeded initial alphas, so the file can
    # hold just the two seeds' cells (and a few others) instead of all 5^6.
    archs = sorted({str(NB201SearchNetwork(4, 10, 1, seed=seed).genotype()) for seed in (0, 1)}
                   | {str(random_arch(i)) for i in range(3)})
    expected = write_benchmark(tmp_path / "bench.pth", archs, seed=2)
    sets = ["search.search_space=nb201", f"search.nb201_benchmark={tmp_path / 'bench.pth'}", "search.layers=1",
            "search.init_channels=4", "search.k=2", "search.arch_lr=1e-9", "grid={}", "seeds=[0, 1]"]
    args = ["stability", "--preset", "smoke", "--storage", str(tmp_path), "--name", "nb201",
            *[x for s in sets for x in ("--set", s)]]
    assert sweep.main(args) == 0
    exp = tmp_path / "nb201"
    trials = pq.read_table(exp / "trials.parquet").to_pylist()
    assert len(trials) == 2 and {r["status"] for r in trials} == {"done"}
    for r in trials:
        arch = str(parse_arch(json.loads(r["genotype"])["nb201"]))
        assert r["bench_acc_cifar100"] == pytest.approx(expected[arch]["cifar100"])
    epochs = pq.read_table(exp / "epochs.parquet").to_pylist()
    assert len(epochs) == 4 and all(r["bench_acc_imagenet16-120"] is not None for r in epochs)
    assert all(len(r["alphas_normal"]) == 6 and r["alphas_reduce"] is None for r in epochs)
    row = pq.read_table(exp / "stability.parquet").to_pylist()[0]
    mean = sum(r["bench_acc_cifar10"] for r in trials) / 2
    assert row["bench_acc_cifar10_mean"] == pytest.approx(mean)
    assert row["bench_acc_cifar10_ci_low"] <= mean <= row["bench_acc_cifar10_ci_high"]
    assert json.loads(row["consensus_genotype"])["nb201"].startswith("|")
