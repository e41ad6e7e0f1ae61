"""Failures of commands as a user or operator meets them (issue 11, orchestration side), with real processes:
CLI subprocesses, real files, a real lock held by a live process. Each case is a row of docs/failures.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import FailAtEpoch
from orchestrator import search
from orchestrator.cli import run_cli
from orchestrator.presets import load_preset
from orchestrator.results import LOCK_FILE, ResultStore
from orchestrator.run import RunFailed, run_single

ROOT = Path(__file__).resolve().parents[1]


def _cli(module: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def smoke_values(**overrides) -> dict:
    return {**load_preset("smoke").search, "seed": 0, **overrides}


# -- a failed attempt never blocks the corrected command -------------------------------------------------------------
def test_a_search_that_failed_before_any_epoch_leaves_nothing_that_blocks_the_fix(tmp_path):
    with pytest.raises(RunFailed, match="injected failure before epoch 1"):
        run_single(smoke_values(k=4), str(tmp_path), "b17", echo=None, callbacks=[FailAtEpoch(1)])
    assert not (tmp_path / "b17" / "search_config.json").exists()
    fixed = run_single(smoke_values(k=2), str(tmp_path), "b17", echo=None)  # other settings, same name: fine
    assert fixed.epochs_done == 2 and not fixed.resumed


def test_truncated_checkpoint_names_the_file_and_a_fresh_rerun_is_not_called_finished(tmp_path, capsys):
    base = ["single", "--preset", "smoke", "--storage", str(tmp_path), "--name", "t", "--threads", "1"]
    with pytest.raises(SystemExit) as done:
        run_cli(search.main, base)
    assert done.value.code == 0
    checkpoint = tmp_path / "t" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    capsys.readouterr()
    with pytest.raises(SystemExit) as failed:
        run_cli(search.main, base + ["--set", "epochs=3"])
    assert failed.value.code == 2  # an unreadable file: bad input, named in one line; nothing ran
    err = capsys.readouterr().err
    assert err.count(str(checkpoint)) == 1 and "truncated, corrupted" in err
    checkpoint.unlink()
    with pytest.raises(SystemExit) as rerun:
        run_cli(search.main, base + ["--set", "epochs=3"])
    out = capsys.readouterr().out
    assert rerun.value.code == 0 and "already finished" not in out and "finished t: 3 epochs" in out
    epochs = ResultStore(str(tmp_path), "t").read("epochs").column("epoch").to_pylist()
    assert sorted(epochs) == [1, 2, 3]


# -- one writer per experiment ------------------------------------------------------------------------------------------
def test_second_process_on_the_same_experiment_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        store = ResultStore(str(tmp_path), "smoke")
        store.write_json(LOCK_FILE.format(1), {"host": os.uname().nodename, "pid": owner.pid, "heartbeat": time.time()})
        args = ["stability", "--preset", "smoke", "--storage", str(tmp_path), "--address", "127.0.0.1:9"]
        proc = _cli("orchestrator.sweep", *args, env={"PCDARTS_CONNECT_TIMEOUT_S": "1"})
        _one_error_line(proc, 2, f"being run by process {owner.pid}")
    finally:
        owner.kill()
        owner.wait()
    # The owner is gone (as after a SIGKILL): the next run takes over and gets as far as the cluster.
    proc = _cli("orchestrator.sweep", *args, env={"PCDARTS_CONNECT_TIMEOUT_S": "1"})
    _one_error_line(proc, 2, "cannot reach the Ray cluster at 127.0.0.1:9")
    assert not list((tmp_path / "smoke").glob("lock.*"))  # released when the command ended
    assert not (tmp_path / "smoke" / "sweep.json").exists()  # nothing recorded before Ray was reached


# -- unreachable clusters, in bounded time ------------------------------------------------------------------------------
@pytest.mark.parametrize("address, needle", [
    ("127.0.0.1:6399", "cannot reach the Ray cluster at 127.0.0.1:6399"),
    ("ray://127.0.0.1:10099", "cannot reach the Ray cluster at ray://127.0.0.1:10099"),
    ("auto", "no Ray cluster is running on this machine"),
])
def test_unreachable_cluster_is_one_line_within_the_timeout(tmp_path, address, needle):
    start = time.monotonic()
    proc = _cli("orchestrator.sweep", "stability", "--preset", "smoke", "--storage", str(tmp_path),
                "--address", address, env={"PCDARTS_CONNECT_TIMEOUT_S": "2", "RAY_TMPDIR": str(tmp_path / "ray")})
    _one_error_line(proc, 2, needle)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "smoke").exists()


def test_unreachable_object_storage_is_one_line_within_the_timeout(tmp_path):
    """An S3 endpoint where nothing answers (a loopback port): one line naming the storage, well within bounds."""
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_EC2_METADATA_DISABLED": "true", "PCDARTS_CONNECT_TIMEOUT_S": "2"}
    start = time.monotonic()
    proc = _cli("orchestrator.sweep", "stability", "--preset", "smoke", "--storage", "s3://bucket/p", env=env)
    _one_error_line(proc, 2, "storage s3://bucket/p did not answer within 2 s")
    assert time.monotonic() - start < 60


# -- the config boundary --------------------------------------------------------------------------------------------------
def test_set_on_a_grid_key_replaces_the_axis():
    preset = load_preset("smoke", ["k=1"])
    assert preset.grid["k"] == [1] and [g["k"] for g in preset.groups()] == [1]
    assert [g["k"] for g in load_preset("smoke", ["search.k=[1,2]"]).groups()] == [1, 2]


@pytest.mark.parametrize("sets, message", [
    (["seeds=100000000"], "seeds must be a count in [1, 10000]"),
    (["seeds=[0,4294967296]"], "integers in [0, 4294967295]"),
    (["k=four"], "k must be an integer, got 'four'"),
    (["kk=2"], "unknown search config key 'kk' (did you mean 'k'?)"),
    (["hpo.space.arch_lr.loguniform=[0.0001,.inf]"], "need finite low < high"),
])
def test_bad_settings_are_refused_at_the_boundary_naming_the_key(sets, message):
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        load_preset("smoke", sets)
    assert message in str(err.value)
    assert sets[0].startswith("hpo") or "hpo" not in str(err.value)  # the key at fault is blamed
    assert time.monotonic() - start < 5  # no giant seed list is built first


def test_default_names_never_collide_across_commands():
    single = search.resolve(search.build_parser().parse_args(["single", "--preset", "smoke"]))[3]
    dist = search.resolve(search.build_parser().parse_args(["distributed", "--preset", "smoke"]))[3]
    assert single == "smoke-pcdarts-synthetic-s0" and dist == "smoke-pcdarts-synthetic-s0-dp"
    assert "smoke" not in (single, dist) and "smoke-hpo" not in (single, dist)  # the sweep's defaults


def test_settings_record_is_written_with_state(tmp_path):
    run_single(smoke_values(), str(tmp_path), "rec", echo=None)
    record = json.loads((tmp_path / "rec" / "search_config.json").read_text())
    assert record["finished"] and record["epochs_done"] == 2 and record["config"]["k"] == 4


# -- a killed driver leaves no Ray processes behind ----------------------------------------------------------------------
def test_local_ray_of_a_killed_driver_is_ended_by_the_next_run(monkeypatch):
    import psutil

    from orchestrator.cluster import reap_orphans

    code = ("import time; from orchestrator.cluster import connect; connect(None); print('up', flush=True); "
            "time.sleep(600)")
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="pr", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    # The driver's record of its Ray (and so the reaping below) lives in a temp folder of this test's own: a
    # command another xdist worker runs meanwhile reaps only the records in its temp folder, never this one.
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp})
    monkeypatch.setattr(tempfile, "tempdir", ray_tmp)
    try:
        assert "up" in iter(lambda: driver.stdout.readline().strip(), "")  # after the dashboard's line
        ray_procs = psutil.Process(driver.pid).children(recursive=True)
        assert ray_procs
    finally:
        driver.kill()  # SIGKILL: no chance to stop its cluster
        driver.wait()
    time.sleep(1)
    left = [p for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left, "nothing was left behind to clean up"
    assert reap_orphans() >= len(left)
    psutil.wait_procs(left, timeout=30)
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
