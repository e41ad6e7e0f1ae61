"""``hpo.study_storage: postgresql://...`` against a real PostgreSQL server (tests/postgres.py): a study whose driver
is killed resumes from the same study, and a study storage that cannot be opened is one line before anything runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_orchestration_failures import _one_error_line

from orchestrator.results import ResultStore
from postgres import free_port, running_postgres

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def postgres():
    with running_postgres() as server:
        yield server


def _sweep(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """``python -m orchestrator.sweep ARGS``: run to the end, or started (``popen=True``)."""
    env = {**os.environ, **(env or {})}
    if kwargs.pop("popen", False):
        return subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=kwargs.pop("timeout", 300))


@pytest.mark.ray
@pytest.mark.slow
def test_hpo_study_on_postgres_resumes_after_its_driver_is_killed(ray_cluster, postgres, tmp_path):
    import optuna

    EPOCHS = 12  # each configuration's seeds still running when the driver is killed
    # The URL has no password: libpq takes it from PGPASSWORD (or ~/.pgpass), so it is never in a preset.
    args = ["hpo", "--preset", "smoke", "--storage", str(tmp_path), "--address", ray_cluster,
            "--set", f"epochs={EPOCHS}", "--set", f"hpo.study_storage={postgres.url()}"]
    env = {"PGPASSWORD": postgres.password, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    exp = tmp_path / "smoke-hpo"
    proc = _sweep(*args, env=env, popen=True)
    deadline, seen = time.monotonic() + 300, None
    while time.monotonic() < deadline:  # as test_sweep's killed stability driver: after a checkpoint and a save
        time.sleep(0.5)
        assert proc.poll() is None, "the study ended before its driver could be killed"
        if seen is None:
            epochs = exp / "epochs.parquet"
            if epochs.exists() and any(r["epoch"] >= 2 for r in pq.read_table(epochs).to_pylist()):
                seen = time.time()
            continue
        states = list((exp / "hpo").glob("experiment_state-*.json"))
        if states and max(p.stat().st_mtime for p in states) > seen + 0.5:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    study_url = postgres.url(password=True)
    before = optuna.load_study(study_name="smoke-hpo", storage=study_url).trials
    assert 1 <= len(before) <= 2 and "RUNNING" in {t.state.name for t in before}, [t.state for t in before]
    assert not (exp / "optuna.db").exists()  # the study is in postgres, not beside the results

    again = _sweep(*args, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the Tune experiment" in again.stdout
    assert postgres.password not in again.stdout + again.stderr
    trials = optuna.load_study(study_name="smoke-hpo", storage=study_url).trials
    # num_samples is 2: the resumed driver went on with the study's own trials instead of sampling new ones.
    assert [t.number for t in trials] == [0, 1], [(t.number, t.state.name) for t in trials]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"} and "COMPLETE" in {t.state.name for t in trials}
    assert {t.number for t in before} <= {t.number for t in trials}
    store = ResultStore(str(tmp_path), "smoke-hpo")
    rows = store.read("trials").to_pylist()
    assert rows and len({r["trial_id"] for r in rows}) == len(rows) and {r["status"] for r in rows} == {"done"}
    assert len({r["hpo_trial"] for r in rows}) == 2
    epochs = store.read("epochs").to_pylist()
    keys = [(r["trial_id"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys)) and len(keys) == EPOCHS * len(rows)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = _one_error_line(proc, 2, *needles)
    assert err.startswith("error: hpo.study_storage "), err
    return err


def test_a_study_storage_that_cannot_be_opened_is_one_line_before_anything_runs(postgres, tmp_path):
    storage = ["--storage", str(tmp_path), "--set"]
    wrong = postgres.url(password=True).replace(postgres.password, "not-the-password")
    err = _one_line(_sweep("hpo", "--preset", "smoke", *storage, f"hpo.study_storage={wrong}"),
                    "password authentication failed", f"{postgres.user}:***@")
    assert "not-the-password" not in err
    nobody = f"postgresql://{postgres.user}@127.0.0.1:{free_port()}/postgres"  # no server on that port
    _one_line(_sweep("hpo", "--preset", "smoke", *storage, f"hpo.study_storage={nobody}",
                     env={"PGPASSWORD": postgres.password}), "Connection refused")
    _one_line(_sweep("hpo", "--preset", "smoke", *storage, "hpo.study_storage=nosuchdb://x/y"), "nosuchdb")
    assert not list(tmp_path.iterdir()), "nothing may be written before the study storage opens"
