"""Failure modes of searches, checkpoints and dashboard metrics (issue 11, the search side; docs/failures.md), as a
user meets them: CLI subprocesses, real files, a SIGKILLed run, and the metrics endpoint of a real local Ray
cluster scraped while a sweep runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import TensorDataset

from orchestrator.cli import EXIT_BAD_INPUT, EXIT_FAILED, run_cli
from orchestrator.search import main as search_main
from pcdarts_core.config import RANGES, EvalConfig, SearchConfig, eval_config, search_config
from pcdarts_core.data import EvalData, SearchData, synthetic_images
from pcdarts_core.genotypes import derive_genotype
from pcdarts_core.runtime import CheckpointError, SearchDiverged, load_checkpoint
from pcdarts_core.search import Searcher
from pcdarts_core.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """This process's environment at call time (a Ray cluster started here sets its auth mode in it)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


#: the smoke preset's tiny net; lr 10 with weight decay 1 (both accepted) makes the weights blow up at once
DIVERGING = ["--set", "lr=10", "--set", "weight_decay=1", "--set", "grad_clip=1e6", "--set", "warmup_epochs=0"]


def _cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# -- numbers refused at the boundary -------------------------------------------------------------------------------
def test_a_diverging_lr_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The issue's command: ``--set lr=1e30 --set arch_lr=1e30`` is now bad input with the accepted range."""
    proc = _cli("orchestrator.search", "single", "--preset", "smoke", "--set", "lr=1e30", "--set", "arch_lr=1e30",
                "--storage", str(tmp_path), "--name", "huge")
    line = _one_error_line(proc, EXIT_BAD_INPUT)
    assert "lr must be in (0, 10], got 1e+30" in line
    assert not (tmp_path / "huge").exists()


@pytest.mark.parametrize("setting, message", [
    ("lr=nan", "lr must be a finite number in (0, 10], got nan"),
    ("lr=.nan", "lr must be a finite number in (0, 10], got nan"),  # YAML's own NaN
    ("arch_lr=inf", "arch_lr must be a finite number in (0, 10], got inf"),
    ("momentum=-.inf", "momentum must be a finite number in [0, 1), got -inf"),
    ("batch_size=2097152", "batch_size must be in [1, 1048576], got 2097152"),
    ("epochs=100000", "epochs must be in [1, 10000], got 100000"),
    ("weight_decay=5", "weight_decay must be in [0, 1], got 5.0"),
    ("arch_betas=[0.5, .nan]", "arch_betas must be a finite number in [0, 1), got nan"),
])
def test_nonfinite_and_absurd_settings_are_one_error_line(setting: str, message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(search_main, ["single", "--preset", "smoke", "--set", setting, "--storage", str(tmp_path),
                              "--name", "x"])
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_configs_built_directly_are_checked_too() -> None:
    """The dataclasses themselves refuse NaN, infinities and out-of-range numbers (not only the dict builders)."""
    with pytest.raises(ValueError, match=re.escape("lr must be a finite number in (0, 10], got nan")):
        SearchConfig(dataset="synthetic", lr=float("nan"))
    with pytest.raises(ValueError, match=re.escape("grad_clip must be in (0, 1000000], got 0.0")):
        EvalConfig(dataset="synthetic", grad_clip=0.0)
    with pytest.raises(ValueError, match=re.escape("drop_path must be in [0, 1), got 1.0")):
        eval_config("synthetic", drop_path=1.0)
    # Every float field is checked for finiteness, ranged or not; the ranges are the documented ones.
    assert str(RANGES["lr"]) == "(0, 10]" and str(RANGES["batch_size"]) == "[1, 1048576]"
    assert search_config("pcdarts", "synthetic", lr=10, arch_lr=10).lr == 10  # the bounds themselves are fine


# -- divergence --------------------------------------------------------------------------------------------------
def _tiny(**overrides) -> SearchConfig:
    values = dict(epochs=2, warmup_epochs=0, batch_size=8, init_channels=4, layers=3, k=2, image_size=16,
                  steps_per_epoch=3, eval_steps=1, device="cpu")
    return search_config("pcdarts", "synthetic", **{**values, **overrides})


def _images(n: int, poisoned: bool) -> TensorDataset:
    images, labels = synthetic_images(n, image_size=16, seed=1)
    if poisoned:
        images = torch.full_like(images, float("nan"))
    return TensorDataset(images, labels)


@pytest.mark.parametrize("poison, warmup, message", [
    ("weights", 0, "diverged at epoch 1 (loss nan): the train loss of step 1 is not finite"),
    ("arch", 0, "diverged at epoch 1 (loss nan): the arch loss of step 1 is not finite"),
    # arch frozen in epoch 1: the training losses stay finite, the validation of the epoch is the first NaN
    ("arch", 1, "diverged at epoch 1 (loss nan): the val loss is not finite"),
])
def test_the_search_stops_at_the_first_nonfinite_loss(poison: str, warmup: int, message: str) -> None:
    torch.set_num_threads(1)
    data = SearchData(weight_set=_images(32, poison == "weights"), arch_set=_images(32, poison == "arch"),
                      num_classes=10, image_size=16)
    searcher = Searcher(_tiny(warmup_epochs=warmup), data)
    with pytest.raises(SearchDiverged) as exc:
        searcher.run_epoch()
    assert str(exc.value).startswith(message)
    assert searcher.epoch == 0  # the epoch was not counted, nor derived from NaN alphas


def test_the_evaluation_loop_stops_at_the_first_nonfinite_loss() -> None:
    torch.set_num_threads(1)
    cfg = eval_config("synthetic", epochs=1, batch_size=8, init_channels=4, layers=3, auxiliary=False,
                      image_size=16, steps_per_epoch=2, eval_steps=1, device="cpu")
    data = EvalData(train_set=_images(16, True), test_set=_images(16, False), num_classes=10, image_size=16)
    genotype = derive_genotype(torch.zeros(14, 8), torch.zeros(14, 8))
    with pytest.raises(SearchDiverged, match=re.escape("diverged at epoch 1 (loss nan): the train loss of step 1")):
        Trainer(cfg, genotype, data).run_epoch()


def test_deriving_from_nan_alphas_is_a_clear_error() -> None:
    """It used to end in ``StopIteration`` (NaN != NaN) inside derive_cell, turned into a RuntimeError."""
    alphas = torch.zeros(14, 8)
    alphas[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        derive_genotype(alphas, torch.zeros(14, 8))


def test_a_diverging_search_ends_with_one_error_line_and_exit_3(tmp_path: Path) -> None:
    proc = _cli("orchestrator.search", "single", "--preset", "smoke", *DIVERGING, "--storage", str(tmp_path),
                "--name", "div")
    line = _one_error_line(proc, EXIT_FAILED)
    assert re.match(r"error: search 'div' failed: diverged at epoch 1 \(loss (nan|inf)\): the (train|arch|val) loss", line), line
    (trial,) = pq.read_table(tmp_path / "div" / "trials.parquet").to_pylist()
    assert trial["status"] == "failed" and "diverged at epoch 1" in trial["error"]
    assert not (tmp_path / "div" / "checkpoint.pt").exists()  # no epoch finished: nothing to resume from


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_a_killed_run_leaves_a_whole_checkpoint_and_a_corrupted_one_is_named(tmp_path: Path) -> None:
    """SIGKILL while epochs are being written: the checkpoint on disk is always whole (atomic writes) and the
    same command resumes from it. A checkpoint truncated by something else is one error line naming the file."""
    args = ["single", "--preset", "smoke", "--set", "epochs=40", "--set", "steps_per_epoch=1",
            "--storage", str(tmp_path), "--name", "kill"]
    ckpt = tmp_path / "kill" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.search", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt.exists() and load_checkpoint(ckpt)["searcher"]["epoch"] >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.2)
        time.sleep(0.3)  # most likely in the middle of writing the next one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    state = load_checkpoint(ckpt)  # whole, never half written
    assert state["searcher"]["epoch"] >= 2

    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    line = _one_error_line(_cli("orchestrator.search", *args), EXIT_BAD_INPUT)
    assert str(ckpt) in line and "truncated, corrupted" in line
    with pytest.raises(CheckpointError, match=re.escape(f"s3://bucket/run/{ckpt.name} is truncated")):
        load_checkpoint(ckpt.read_bytes(), name=f"s3://bucket/run/{ckpt.name}")  # bytes read from a store


# -- dashboard metrics -------------------------------------------------------------------------------------------
def _scrape(port: int) -> dict[str, list]:
    """Samples of the pcdarts metrics on the node's Prometheus endpoint: exported name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "pcdarts" in sample.name:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_trials_export_the_documented_metrics_tagged_with_the_experiment(ray_cluster, tmp_path: Path) -> None:
    """A real sweep (the CLI, joining the session's cluster) while its node's metrics endpoint is scraped: the
    names the README lists, ``run`` = the sweep's ``--name``, and the step time for sweep trials. Once all are
    seen, Ctrl-C stops the sweep (exit status 130)."""
    import ray

    from orchestrator.metrics import DEFINITIONS

    port = ray.nodes()[0]["MetricsExportPort"]
    args = ["stability", "--preset", "smoke", "--name", "metrics-exp", "--storage", str(tmp_path), "--address",
            ray_cluster, "--set", "grid.k=[2]", "--set", "seeds=[0]", "--set", "epochs=300",
            "--set", "warmup_epochs=0", "--set", "steps_per_epoch=1"]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    expected = {name + ("_total" if kind == "counter" else "") for name, (kind, _, _) in DEFINITIONS.items()}
    expected = {f"ray_{name}" for name in expected}
    seen: dict[str, list] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        samples = _scrape(port)
        for name, rows in samples.items():
            seen.setdefault(name, []).extend(r for r in rows if r[0].get("run") == "metrics-exp")
        if all(seen.get(name) for name in expected) or proc.poll() is not None:
            break
        time.sleep(1)
    assert proc.poll() is None, "the sweep ended before all metrics were seen: " + "".join(output)[-2000:]
    proc.send_signal(signal.SIGINT)  # Ctrl-C: no need to wait for the remaining epochs
    proc.wait(timeout=300)
    reader.join(timeout=10)
    assert proc.returncode == 130, "".join(output)
    assert {n for n in seen if seen[n]} >= expected, (sorted(seen), "".join(output)[-2000:])
    (trial,) = pq.read_table(tmp_path / "metrics-exp" / "trials.parquet").to_pylist()
    step_labels = {labels["trial"] for labels, _ in seen["ray_pcdarts_step_time_seconds"]}
    assert step_labels == {trial["trial_id"]}
    assert all(value > 0 for _, value in seen["ray_pcdarts_step_time_seconds"])
