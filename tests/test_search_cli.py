"""``python -m orchestrator.search single``: results layout, exact resume after a crash, presets, bad input.

(The ``distributed`` command runs on Ray: tests/test_distributed.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.cli import run_cli
from orchestrator.distributed import DistributedOptions
from pcdarts_core.config import global_config, rank_config
from orchestrator.presets import CONFIG_DIR, load_preset
from orchestrator.search import main
from pcdarts_core.genotypes import parse_genotype
from pcdarts_core.search import Searcher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory) -> Path:
    """The smoke preset, plus ``distributed.lr_reference_batch: 64`` (its lr 0.05 then means 0.025 at batch 32)."""
    raw = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    raw["distributed"] = {"lr_reference_batch": 64}
    path = tmp_path_factory.mktemp("presets") / "smoke64.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(root: Path, kind: str) -> list[dict]:
    return sorted(pq.read_table(root / f"{kind}.parquet").to_pylist(), key=lambda r: r.get("epoch") or 0)


def _cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, list(argv))
    return exc.value.code


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, preset_file) -> Path:
    """One uninterrupted run through the real command line (a subprocess)."""
    storage = tmp_path_factory.mktemp("storage")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.search", "single", "--preset", str(preset_file),
                           "--storage", str(storage), "--name", "straight"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2/2" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("genotype: ")
    return storage / "straight"


def test_single_writes_the_sweeps_layout(straight_run):
    names = {p.name for p in straight_run.iterdir()}
    assert {"epochs.parquet", "trials.parquet", "genotype.json", "search_config.json", "checkpoint.pt"} <= names
    epochs = _rows(straight_run, "epochs")
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["trial_id"] == "straight" and r["seed"] == 0 and r["world_size"] == 1 for r in epochs)
    assert len(epochs[0]["alphas_normal"]) == 14 and epochs[0]["lr"] == pytest.approx(0.025)  # scaled 0.05*32/64
    (trial,) = _rows(straight_run, "trials")
    genotype = parse_genotype((straight_run / "genotype.json").read_text())
    assert trial["status"] == "done" and trial["epochs_done"] == 2 and trial["genotype"] == genotype.to_json()
    meta = json.loads((straight_run / "search_config.json").read_text())
    assert meta["config"]["lr"] == pytest.approx(0.025) and meta["values"]["seed"] == 0


def test_a_crashed_run_resumes_exactly(straight_run, preset_file, monkeypatch, capsys):
    storage = straight_run.parent
    original = Searcher.run_epoch

    def crash_in_epoch_two(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Searcher, "run_epoch", crash_in_epoch_two)
    # One torch thread, as the straight run's subprocess has (OMP_NUM_THREADS=1): float sums depend on the split.
    argv = ["single", "--preset", str(preset_file), "--storage", str(storage), "--name", "crashed", "--threads", "1"]
    assert _cli(*argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    (trial,) = _rows(storage / "crashed", "trials")
    assert trial["status"] == "failed" and trial["error"] == "interrupted" and trial["epochs_done"] == 1

    monkeypatch.setattr(Searcher, "run_epoch", original)
    assert _cli(*argv) == 0
    out = capsys.readouterr().out
    assert "resuming crashed after epoch 1/2" in out
    a, b = _rows(straight_run, "epochs"), _rows(storage / "crashed", "epochs")
    for x, y in zip(a, b):
        for key in ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce", "train_loss", "val_acc"):
            assert np.asarray(x[key]).tolist() == np.asarray(y[key]).tolist(), (x["epoch"], key)
    assert (storage / "crashed" / "genotype.json").read_text() == (straight_run / "genotype.json").read_text()
    assert _rows(storage / "crashed", "trials")[0]["status"] == "done"

    # Once more: finished, so nothing runs; other settings are refused; --resume needs an existing run.
    assert _cli(*argv) == 0 and "already finished its 2 epochs" in capsys.readouterr().out
    assert _rows(storage / "crashed", "epochs") == b
    assert _cli(*argv, "--set", "k=2") == 2
    assert "cannot resume run 'crashed'" in capsys.readouterr().err
    assert _cli("single", "--preset", str(preset_file), "--storage", str(storage), "--name", "nope",
                "--resume") == 2
    assert "no run named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["single", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["single", "--preset", "smoke", "--set", "kk=2"], "unknown search config key 'kk'"),
    (["single", "--preset", "smoke", "--method", "nosuch"], "unknown method 'nosuch'"),
    (["single", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar10 data not found"),
    (["single", "--preset", "smoke", "--name", "a/b"], "--name 'a/b'"),
    (["distributed", "--preset", "smoke"], "needs --num-workers"),
    (["distributed", "--preset", "smoke", "--num-workers", "0"], "num_workers must be >= 1"),
    (["distributed", "--preset", "smoke", "--num-workers", "4-2"], "1 <= MIN <= MAX"),
    (["distributed", "--preset", "smoke", "--num-workers", "64"], "smaller than the 64 data-parallel workers"),
    (["single", "--preset", "smoke", "--set", "distributed.num_worker=2"], "unknown distributed key"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert _cli(*argv, "--storage", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_rome_runs_from_the_smoke_preset(tmp_path, capsys):
    assert _cli("single", "--preset", "smoke", "--method", "rome", "--storage", str(tmp_path)) == 0
    run = tmp_path / "smoke-rome-synthetic-s0"
    parse_genotype((run / "genotype.json").read_text())
    assert [r["epoch"] for r in _rows(run, "epochs")] == [1, 2]


def test_imagenet_preset_is_the_papers_search():
    preset = load_preset("imagenet")
    opts = DistributedOptions.from_mapping(preset.distributed)
    cfg = global_config({**preset.search, "seed": 0}, opts.lr_reference_batch)
    assert (cfg.dataset, cfg.k, cfg.batch_size, cfg.lr, cfg.lr_warmup_epochs, cfg.arch_lr) == \
           ("imagenet", 2, 1024, 0.5, 5, 6e-3)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.init_channels, cfg.layers) == (50, 35, 16, 8)
    assert (opts.num_workers, opts.use_gpu) == (8, True)
    per_gpu = rank_config(cfg, 8)
    assert per_gpu.batch_size == 128 and per_gpu.lr == 0.5
    half = load_preset("imagenet", ["batch_size=512"])
    assert global_config({**half.search, "seed": 0}, opts.lr_reference_batch).lr == pytest.approx(0.25)


def test_record_epoch_is_a_no_op_without_ray():
    """In a fresh process (this one may hold the suite's Ray cluster): nothing recorded, no Ray started."""
    code = ("import ray; from orchestrator.metrics import record_epoch; "
            "assert record_epoch({'epoch': 1, 'throughput': 1.0}, run='r', trial='t') is False; "
            "assert not ray.is_initialized(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
