"""Stability sweeps, HPO and evaluation trials on a real local Ray cluster (2 CPUs, shared by this module).

Smoke-size searches (seconds each). Subprocess tests join the module's cluster with ``--address``, which is also
how a sweep joins a real cluster; in-process tests call the commands' ``main`` in this (driver) process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator import progress, sweep
from orchestrator import experiment
from orchestrator.results import epoch_row

from faults import FailAtEpoch

ROOT = Path(__file__).resolve().parents[1]


# -- pure helpers (no Ray) -------------------------------------------------------------------------------------------
def test_rows_from_results():
    config = {"search": {"method": "pcdarts", "dataset": "synthetic", "k": 4, "epochs": 2}, "seed": 3}
    result = {"epoch": 2, "val_acc": 0.5, "train_acc": 0.6, "val_loss": float("nan"), "genotype": "{}",
              "final_genotype": "G", "time_total_s": 12.0, "alphas_normal": [[0.1] * 8] * 14, "arch_loss": 1.5,
              "trial_id": "x", "pid": 7, "search_done": True}
    row = experiment.stability_trial_row("t1", config, result, "done", ["k"])
    assert row["group"] == "method=pcdarts,k=4" and row["seed"] == 3 and row["genotype"] == "G"
    assert row["cfg_k"] == 4 and row["cfg_seed"] == 3 and row["val_loss"] is None and row["wall_time_s"] == 12.0
    erow = epoch_row("t1", row["group"], 3, result)
    assert erow["epoch"] == 2 and erow["arch_loss"] == 1.5 and "pid" not in erow and "search_done" not in erow
    assert experiment.hpo_group({"method": "darts"}, {"arch_lr": 0.0012345678, "k": 2}) == "method=darts,arch_lr=0.001235,k=2"


def test_experiment_claim_refuses_changed_settings(tmp_path):
    from orchestrator.results import ResultStore

    store = ResultStore(str(tmp_path), "exp")
    experiment.claim_experiment(store, "stability", {"seeds": [0, 1]})
    experiment.claim_experiment(store, "stability", {"seeds": [0, 1]})  # the same: a resume
    with pytest.raises(ValueError, match="different settings \\(seeds differ\\)"):
        experiment.claim_experiment(store, "stability", {"seeds": [0, 1, 2]})
    with pytest.raises(ValueError, match="is a stability run, not hpo"):
        experiment.claim_experiment(store, "hpo", {"seeds": [0, 1]})


# -- on Ray ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def quiet_tune(monkeypatch):
    """The sweep sets Tune's output environment in the driver process: restore it after the test."""
    for key in ("RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_STRICT_METRIC_CHECKING"):
        monkeypatch.setenv(key, os.environ.get(key, "1" if key == "RAY_AIR_NEW_OUTPUT" else "0"))


def _table(path: Path, kind: str) -> list[dict]:
    from orchestrator.results import ResultStore

    return ResultStore(str(path.parent), path.name).read(kind).to_pylist()


def _cli(module: str, *args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_end_to_end_with_evaluation(smoke_sweep, capsys, monkeypatch):
    """``sweep stability --preset smoke --evaluate``, then ``evaluate`` adding cells (the session's smoke sweep,
    which the report's tests read too)."""
    exp = smoke_sweep["exp"]
    after_sweep = smoke_sweep["after_sweep"]
    for kind in ("trials", "epochs", "stability", "evaluations"):
        assert after_sweep[kind] is not None, kind

    trials = after_sweep["trials"]
    assert len(trials) == 4 and {r["status"] for r in trials} == {"done"}
    assert {(r["group"], r["seed"]) for r in trials} == {
        (f"method=pcdarts,k={k}", s) for k in (2, 4) for s in (0, 1)}
    assert all(r["genotype"].startswith("{") and 0 <= r["val_acc"] <= 1 and r["epochs_done"] == 2 for r in trials)
    assert all(r["cfg_dataset"] == "synthetic" and r["error"] is None for r in trials)

    epochs = after_sweep["epochs"]
    assert len(epochs) == 8 and len({(r["trial_id"], r["epoch"]) for r in epochs}) == 8
    row = epochs[0]
    assert len(row["alphas_normal"]) == 14 and len(row["alphas_normal"][0]) == 8 and len(row["betas_normal"]) == 14
    assert row["genotype"] and row["arch_entropy"] > 0 and row["n_skip_normal"] is not None

    stability = after_sweep["stability"]
    assert [r["group"] for r in stability] == ["method=pcdarts,k=2", "method=pcdarts,k=4"]
    assert all(r["n_seeds"] == 2 and r["genotype_distance_mean"] is not None for r in stability)
    assert all(r["n_evaluated"] == 1 and r["n_consensus_evals"] == 1 for r in stability)

    evaluations = after_sweep["evaluations"]
    sources = sorted(r["source"] for r in evaluations)
    assert len(evaluations) == 5 and {r["status"] for r in evaluations} == {"done"}
    assert sum(s.startswith("trial:") for s in sources) == 2  # top-1 of each group
    assert sum(s.startswith("consensus:") for s in sources) == 2
    assert "random:0" in sources
    assert all(r["test_acc"] is not None and r["params"] > 0 for r in evaluations)

    # The evaluate command adds a random cell and a published one; done evaluations are not rerun.
    assert "(1 already done)" in smoke_sweep["evaluate_out"]
    evaluations = _table(exp, "evaluations")
    assert len(evaluations) == 7 and len({r["eval_id"] for r in evaluations}) == 7
    assert {"random:1", "published:DARTS_V2"} <= {r["source"] for r in evaluations}

    # Status/summary read the Parquet files back, on a console wide enough for the tables: pytest imports readline,
    # which puts COLUMNS=80 in the environment its child processes (xdist workers too) start with.
    monkeypatch.setenv("COLUMNS", "140")
    monkeypatch.setattr(progress, "_console", None)
    assert sweep.main(["status", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "4 done, 0 running, 0 failed" in out and "method=pcdarts,k=4" in out
    assert "random cells" in out


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_lines_name_their_configuration(smoke_sweep):
    """Every finished search's line says which configuration and seed it was; the table comes with its legend and
    the levels its numbers compare to; the evaluation's lines name their cells."""
    import re

    out = smoke_sweep["sweep_out"]
    done = re.findall(r"^done (\S+) \((k=\d seed \d)\): val_acc \d", out, re.M)
    assert sorted(label for _, label in done) == [f"k={k} seed {s}" for k in (2, 4) for s in (0, 1)], out
    assert len({tid for tid, _ in done}) == 4
    text = " ".join(out.split())
    assert "Search stability per group: smoke (method=pcdarts)" in text
    assert "distance: mean genotype distance between two seeds' cells (0 = identical)" in text
    assert ("reference levels: chance accuracy 0.100 (synthetic) · random cells' distance 0.909 (darts) · uniform "
            "arch entropy 2.079 (log 8)") in text
    assert "eval columns empty" not in text  # --evaluate retrained them
    assert re.search(r"^done \S+ \(published:DARTS_V2 seed 0\): test_acc", smoke_sweep["evaluate_out"], re.M)


def test_without_a_preset_the_sweep_says_which_it_took(tmp_path):
    proc = _cli("orchestrator.sweep", "stability", "--storage", str(tmp_path), "--set", f"data_dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = " ".join(proc.stdout.split())
    assert "no --preset given: using the 'stability' preset (tune_configs/stability.yaml, CIFAR-10" in line
    assert "--preset local runs the offline sweep on this machine" in line
    assert proc.stderr.startswith("error: ") and "cifar10" in proc.stderr


@pytest.mark.ray
def test_joining_a_token_cluster_without_the_token_mode_is_one_line(ray_cluster, tmp_path):
    """The session's cluster was started by ray.init, which (Ray 2.60) turns token authentication on; a driver
    without RAY_AUTH_MODE=token is told so at once, and nothing is written."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "stability", "--preset", "smoke", "--storage",
                           str(tmp_path / "results"), "--address", ray_cluster], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "InvalidAuthToken" not in err, err
    assert err.startswith(f"error: the Ray cluster at {ray_cluster} requires token authentication")
    assert "RAY_AUTH_MODE=token" in err and "~/.ray/auth_token" in err
    assert not (tmp_path / "results").exists()  # no empty storage folder left behind


@pytest.mark.ray
def test_rays_published_messages_go_to_the_log(ray_cluster, capsys):
    """What a lost node makes Ray publish (its raylet's last log lines, a [state-dump]) reaches the driver's
    terminal as one line naming the log that holds it all."""
    import ray
    from ray._private.utils import publish_error_to_driver

    from orchestrator.cluster import connect, ray_messages_log

    connect(None)  # the commands' way in: routes the messages (Ray is already up here)
    marker = f"marker-{time.time_ns()}"
    dump = "\n".join([f"Raylet is terminated. Termination is unexpected. {marker}", "[state-dump] NodeManager:",
                      *[f"[state-dump] line {i}" for i in range(17)]])
    publish_error_to_driver("raylet_died", dump, ray._private.worker.global_worker.gcs_client)
    log = ray_messages_log()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (log.is_file() and marker in log.read_text()):
        time.sleep(0.2)
    assert marker in log.read_text() and "[state-dump] line 16" in log.read_text()
    time.sleep(0.5)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if marker in line]
    assert len(lines) == 1 and lines[0].startswith("ray: Raylet is terminated") and str(log) in lines[0]
    assert "[state-dump]" not in out


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates(ray_cluster, tmp_path):
    EPOCHS = 16  # enough that the searches are still running after Tune's next state save (~1 s, see below)
    args = ["stability", "--preset", "smoke", "--storage", str(tmp_path), "--address", ray_cluster,
            "--set", f"epochs={EPOCHS}", "--set", "grid.k=[4]"]
    # Tune saves its experiment state every TUNE_GLOBAL_CHECKPOINT_S seconds (by default at first every 10 s):
    # every second here, so that the driver can be killed soon after the searches' first checkpoints.
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=ROOT,
                            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    epochs_file = tmp_path / "smoke" / "epochs.parquet"
    deadline = time.monotonic() + 300
    seen = None  # when epoch-2 rows were on disk: their checkpoints were registered with Tune before then
    while time.monotonic() < deadline:
        time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        if seen is None:
            if epochs_file.exists() and any(r["epoch"] >= 2 for r in pq.read_table(epochs_file).to_pylist()):
                seen = time.time()
            continue
        # Then wait for Tune to save its experiment state once more, so it names those checkpoints.
        states = list((tmp_path / "smoke" / "search").glob("experiment_state-*.json"))
        if states and max(p.stat().st_mtime for p in states) > seen + 0.5:
            break
    proc.send_signal(signal.SIGKILL)  # no chance to save anything: the harshest way to lose the driver
    proc.wait(timeout=30)
    before = {r["trial_id"]: r["status"] for r in _table(tmp_path / "smoke", "trials")}
    assert before and "running" in before.values()

    again = _cli("orchestrator.sweep", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the Tune experiment" in again.stdout
    trials = _table(tmp_path / "smoke", "trials")
    assert len(trials) == 2 and {r["status"] for r in trials} == {"done"}
    epochs = _table(tmp_path / "smoke", "epochs")
    keys = [(r["trial_id"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys)) == 2 * EPOCHS
    # Searches that were running continued from a checkpoint rather than from scratch.
    assert any(r["resumed_from_epoch"] > 0 for r in epochs), sorted(
        (r["trial_id"], r["epoch"], r["resumed_from_epoch"]) for r in epochs)


@pytest.mark.ray
@pytest.mark.slow
def test_crashing_trial_is_retried_then_recorded_failed(ray_cluster, quiet_tune, tmp_path, capsys):
    preset = sweep.load_preset("smoke", ["grid.k=[4]"])
    code = sweep.run_stability(preset, str(tmp_path), "smoke", None, callbacks=[FailAtEpoch(2, frozenset({1}))])
    out = capsys.readouterr().out
    assert code == 3, out  # some searches failed: exit status 3, not 0
    assert "retrying" in out and "1 search(es) failed" in out
    trials = {r["seed"]: r for r in _table(tmp_path / "smoke", "trials")}
    assert trials[0]["status"] == "done" and trials[0]["error"] is None
    failed = trials[1]
    assert failed["status"] == "failed" and failed["num_failures"] == 2  # smoke: max_failures 1, so 2 attempts
    assert "InjectedFailure" in failed["error"]
    assert "this attempt started from epoch 1" in failed["error"]  # the retry resumed from the checkpoint
    stability = _table(tmp_path / "smoke", "stability")
    assert stability[0]["n_seeds"] == 1 and stability[0]["n_failed"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_hpo_smoke_writes_study_and_results(smoke_hpo):
    """``sweep hpo --preset smoke`` (the session's study, which the report's tests read too)."""
    import optuna

    exp, printed = smoke_hpo
    db = exp / "optuna.db"
    assert db.is_file()
    study = optuna.load_study(study_name="smoke-hpo", storage=f"sqlite:///{db}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 2 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(len(t.values) == 2 and 0 <= t.values[0] <= 1 and 0 <= t.values[1] <= 1 for t in complete)
    assert {"params/arch_lr", "params/k"} == set(complete[0].params)

    # Each configuration's line carries the Optuna trial number the final table lists, with its parameters.
    import re

    numbers = {t.number: t.params for t in study.trials}
    lines = re.findall(r"^(?:done|failed) \S+ \(#(\d+) arch_lr=(\S+) k=(\d+)\)", printed, re.M)
    assert lines and len(lines) == len(study.trials), printed
    for number, arch_lr, k in lines:
        params = numbers[int(number)]
        assert f"{params['params/arch_lr']:.4g}" == arch_lr and str(params["params/k"]) == k
    assert re.search(r"│\s*0\*?\s*│", printed)  # the Pareto table's '#' column

    trials = _table(exp, "trials")
    assert len(trials) >= 2 and all(r["status"] == "done" and "arch_lr=" in r["group"] for r in trials)
    assert len({r["trial_id"] for r in trials}) == len(trials)
    epochs = _table(exp, "epochs")
    assert len({(r["trial_id"], r["epoch"]) for r in epochs}) == len(epochs) >= 2 * len(trials)
    assert (exp / "stability.parquet").is_dir()
