"""Where results live, for real: the experiment lock raced by processes released at the same instant, locally and
on an S3 server (moto's, over HTTP); storage errors as one line; the smoke sweep, its evaluations, status, summary
and report on S3; node-local storage refused on a cluster of several nodes (issue 17)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_orchestration_failures import _one_error_line as one_error_line

from conftest import s3_bucket
from orchestrator.results import LOCK_FILE, ResultStore, experiment_lock

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 20


def _cli(module: str, *args: str, env: dict | None = None, timeout: int = 400, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    return one_error_line(proc, 2, *needles)


def _lock_files(store: ResultStore) -> list[str]:
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.base_name.startswith("lock."))


# -- the lock: two processes released at the same instant, 20 times ---------------------------------------------------
def _contend(storage: str, barrier, results) -> None:
    """One contender: each round, wait for the start, try to own the round's experiment, then wait until both
    decided and until the parent looked (an owner holds the lock meanwhile)."""
    for r in range(ROUNDS):
        store = ResultStore(storage, f"race{r}")
        barrier.wait()
        try:
            with experiment_lock(store):
                results.put((r, os.getpid(), "owner"))
                barrier.wait()
                barrier.wait()
        except ValueError as err:
            results.put((r, os.getpid(), "refused" if "is being run by process" in str(err) else str(err)))
            barrier.wait()
            barrier.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _race(storage: str) -> None:
    """Rounds of two processes started together on a fresh experiment: no lock, a dead process's lock on this
    host, a lock of another host whose heartbeat is an hour old. Exactly one owns it each time, the other is
    refused with the usual line naming the owner; the stale lock is gone and the owner's is the only one."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(storage, barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        for r in range(ROUNDS):
            store = ResultStore(storage, f"race{r}")
            stale = (None, {"host": socket.gethostname(), "pid": _dead_pid() if r % 3 == 1 else 0},
                     {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600})[r % 3]
            if stale:
                store.write_json(LOCK_FILE.format(1), stale)
            barrier.wait()  # go
            barrier.wait()  # both decided
            got = sorted(results.get(timeout=60)[1:] for _ in range(2))
            outcomes = sorted(outcome for _, outcome in got)
            assert outcomes == ["owner", "refused"], (r, got)
            owner = next(pid for pid, outcome in got if outcome == "owner")
            files = _lock_files(store)
            assert len(files) == 1 and store.read_json(files[0])["pid"] == owner, (r, files)
            barrier.wait()  # looked: the owner releases it
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert all(not _lock_files(ResultStore(storage, f"race{r}")) for r in range(ROUNDS))


def test_two_processes_started_together_one_owns_the_experiment_local(tmp_path):
    _race(str(tmp_path))
    # nothing was written: the folders made by the lock are gone, those of a planted stale lock are left empty
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"race{r}" for r in range(ROUNDS) if r % 3)
    assert not [p for p in tmp_path.glob("*/*")]


def test_two_processes_started_together_one_owns_the_experiment_s3(s3):
    _race(f"s3://{s3}/locks")


# -- storage errors: one line, exit 2, nothing written ---------------------------------------------------------------
SWEEP = ("orchestrator.sweep", "stability", "--preset", "smoke")
SINGLE = ("orchestrator.search", "single", "--preset", "smoke", "--name", "one")


@pytest.mark.parametrize("command", [SWEEP, SINGLE], ids=["sweep", "search"])
def test_a_missing_bucket_is_one_line(s3_server, s3, command):
    proc = _cli(*command, "--storage", "s3://nosuchbucket-17/x", env=s3_server, timeout=120)
    _one_error_line(proc, "storage s3://nosuchbucket-17/x: there is no such bucket")


def test_no_permission_to_write_the_bucket_is_one_line(s3_server, s3):
    """Credentials of a user who may read the bucket but not write it (moto enforcing IAM from here on)."""
    import json

    import boto3
    import requests

    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    env = {**s3_server, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    reset = f"{s3_server['AWS_ENDPOINT_URL']}/moto-api/reset-auth"
    requests.post(reset, data=b"0", timeout=10).raise_for_status()
    try:
        proc = _cli(*SWEEP, "--storage", f"s3://{s3}/nas", env=env, timeout=120)
    finally:
        requests.post(reset, data=b"inf", timeout=10).raise_for_status()
    _one_error_line(proc, f"storage s3://{s3}/nas: no permission there (AccessDenied)")
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=s3)


def test_a_storage_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    for command in (SWEEP, SINGLE):
        proc = _cli(*command, "--storage", str(tmp_path / "results"), timeout=120)
        _one_error_line(proc, f"{tmp_path / 'results'} is a file, not a folder")


def test_a_folder_without_write_permission_is_one_line(tmp_path):
    """A folder this user may not write in (root may write anywhere: the folder is made immutable then)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    as_root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(folder)], check=True) if as_root else folder.chmod(0o555)
    try:
        proc = _cli(*SINGLE, "--storage", str(folder / "nas"), timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True) if as_root else folder.chmod(0o755)
    _one_error_line(proc, f"no permission to write in {folder}")
    assert not list(folder.iterdir())


# -- node-local storage on a cluster of several nodes ---------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_node_local_storage_on_a_cluster_of_two_nodes_is_refused_unless_declared_shared(tmp_path):
    """Two nodes of 1 CPU (``ray.cluster_utils.Cluster``): a plain local path is refused before anything runs;
    declared shared (here it is: both nodes are this machine) the same sweep runs, one search on each node."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        args = (*SWEEP, "--storage", str(tmp_path), "--address", cluster.address, "--set", "k=2")
        proc = _cli(*args, timeout=300)
        _one_error_line(proc, f"storage {tmp_path} is a path on this machine, but the Ray cluster has 2 nodes",
                        "PCDARTS_SHARED_STORAGE=1")
        assert not list(tmp_path.iterdir())  # nothing ran, nothing written
        proc = _cli(*args, env={"PCDARTS_SHARED_STORAGE": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        trials = ResultStore(str(tmp_path), "smoke").read("trials").to_pylist()
        assert len(trials) == 2 and {r["status"] for r in trials} == {"done"}
    finally:
        cluster.shutdown()


# -- the smoke sweep on S3 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_smoke(s3_server) -> dict:
    """The smoke stability sweep (one group x 2 seeds) on the S3 server, as a user runs it: each command a
    subprocess starting its own Ray (its workers reach the server through the same environment), then
    ``evaluate --from`` (the preset's top-1, consensus and random cells), ``status``, ``summary`` (the
    experiment's URI) and the report. Returns the bucket, the storage URI and what each command printed."""
    with s3_bucket(s3_server) as bucket:
        storage = f"s3://{bucket}/nas"
        env = {**s3_server, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
        out = {}
        for key, args in [
            ("sweep", ("orchestrator.sweep", "stability", "--preset", "smoke", "--set", "k=2", "--storage", storage)),
            ("evaluate", ("orchestrator.evaluate", "--from", "smoke", "--storage", storage)),
            ("status", ("orchestrator.sweep", "status", "smoke", "--storage", storage)),
            ("summary", ("orchestrator.sweep", "summary", f"{storage}/smoke")),
            ("report", ("orchestrator.report", "smoke", "--storage", storage)),
        ]:
            proc = _cli(*args, env=env, timeout=600)
            assert proc.returncode == 0, (key, proc.stdout[-3000:] + proc.stderr[-3000:])
            out[key] = proc.stdout
        yield {"bucket": bucket, "storage": storage, "out": out}


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_on_s3_writes_its_results_checkpoints_and_report_there(s3_smoke):
    import boto3

    bucket, storage = s3_smoke["bucket"], s3_smoke["storage"]
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert all(k == "nas/" or k.startswith("nas/smoke/") for k in keys), keys[:5]  # (and pyarrow's folder markers)
    # Tune's experiment state and the trials' checkpoints (Tune's storage_path is the experiment's URI)
    assert any(k.startswith("nas/smoke/search/experiment_state") for k in keys)
    checkpoints = {k.split("/")[3] for k in keys if k.startswith("nas/smoke/search/") and "/checkpoint_" in k}
    assert len(checkpoints) == 2, checkpoints  # one folder per search: nas/smoke/search/<trial>/checkpoint_*
    assert any(k.startswith("nas/smoke/evaluate-") and "/checkpoint_" in k for k in keys)  # the retrainings
    for kind in ("trials", "epochs", "stability", "evaluations"):
        assert any(k.startswith(f"nas/smoke/{kind}.parquet/part-") for k in keys), kind
    assert not [k for k in keys if "/lock." in k]  # released by every command

    store = ResultStore(storage, "smoke")
    trials = store.read("trials").to_pylist()
    assert len(trials) == 2 and {r["status"] for r in trials} == {"done"}
    assert len(store.read("epochs")) == 4
    (group,) = store.read("stability").to_pylist()
    assert group["group"] == "method=pcdarts,k=2" and group["n_seeds"] == 2
    evaluations = store.read("evaluations").to_pylist()
    sources = {r["source"].split(":")[0] for r in evaluations}
    assert len(evaluations) == 3 and {r["status"] for r in evaluations} == {"done"}
    assert sources == {"trial", "consensus", "random"}

    out = s3_smoke["out"]
    assert f"results in {storage}/smoke" in out["sweep"]
    assert "3 evaluation(s) (0 already done)" in out["evaluate"]
    assert "2 done, 0 running, 0 failed" in out["status"] and "method=pcdarts,k=2" in out["status"]
    assert "method=pcdarts,k=2" in out["summary"]
    assert f"report: {storage}/smoke/report.html" in out["report"]
    page = store.read_file("report.html").decode("utf-8")
    assert "<html" in page.lower() and "method=pcdarts,k=2" in page


@pytest.mark.ray
@pytest.mark.slow
def test_distributed_search_on_s3(s3_server, s3):
    """``search distributed`` on 2 Ray Train workers with the S3 server as storage: Ray Train's checkpoints, the
    run's rows and its genotype are in the bucket, and a second run of the same command finds it finished."""
    import boto3

    storage = f"s3://{s3}/nas"
    args = ("orchestrator.search", "distributed", "--preset", "smoke", "--num-workers", "2", "--storage", storage,
            "--name", "dist")
    env = {**s3_server, "OMP_NUM_THREADS": "1"}
    proc = _cli(*args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3, Prefix="nas/dist/").get("Contents", [])]
    assert any("/checkpoint_" in k and k.endswith("/search.pt") for k in keys), keys
    store = ResultStore(storage, "dist")
    (trial,) = store.read("trials").to_pylist()
    assert trial["status"] == "done" and trial["epochs_done"] == 2
    assert store.read_json("genotype.json")["normal"] and len(store.read("epochs")) == 2
    again = _cli(*args, env=env, timeout=600)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]


def test_a_ray_jobs_own_env_vars_are_not_passed_again(monkeypatch):
    """``ray job submit --runtime-env-json '{"env_vars": {"PCDARTS_SHARED_STORAGE": "1"}}'``: the driver must not
    hand the same key to ``ray.init`` (Ray refuses to merge it); the other project variables still travel."""
    import json

    from orchestrator.cluster import project_env_vars

    monkeypatch.setenv("PCDARTS_SHARED_STORAGE", "1")
    monkeypatch.setenv("PCDARTS_STORAGE", "/shared/pcdarts")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"PCDARTS_SHARED_STORAGE": "1"}}, "metadata": {}}))
    assert project_env_vars() == {"PCDARTS_STORAGE": "/shared/pcdarts"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert project_env_vars() == {"PCDARTS_SHARED_STORAGE": "1", "PCDARTS_STORAGE": "/shared/pcdarts"}
