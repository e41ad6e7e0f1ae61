"""Fixtures shared by the whole suite, and how pytest-xdist splits it between its workers.

``pyproject.toml`` runs the suite on two xdist workers (``-n 2``), a test file at a time per worker; each
worker is its own pytest session, so each has its own ``ray_cluster``. ``-n 0`` runs it in one process.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

#: Files that go first, longest first (measured on the project's 2-core machine), so that the two workers finish
#: together: a worker takes the next file when it is almost out of work, and the short files fill in at the end.
FIRST = ("test_onprem.py", "test_sweep.py", "test_step_capture.py", "test_report.py", "test_storage.py",
         "test_study_postgres.py", "test_distributed.py", "test_genotype_cli.py", "test_search.py", "test_spaces_cli.py",
         "test_orchestration_failures.py", "test_failures_core.py", "test_presets.py")

#: Files whose tests share session fixtures below (the same smoke sweeps): one worker runs them all.
SAME_WORKER = {"tests/test_report.py": "tests/test_sweep.py",
               # the killed-worker-group test times Ray Train's recovery: not beside the three on-prem Ray nodes
               "tests/test_distributed.py": "tests/test_onprem.py"}


def pytest_collection_modifyitems(config, items):
    """The files in :data:`FIRST` first, in that order; the rest after them, as collected."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the files of :data:`SAME_WORKER` sent to the same worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(scope, scope)

    return Scheduling(config, log)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole session; yields its GCS address for subprocess drivers."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@contextlib.contextmanager
def tune_env():
    """The sweep sets Tune's output variables in this process: put them back afterwards."""
    saved = {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_STRICT_METRIC_CHECKING")}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server() -> dict[str, str]:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint, as Ray's own tests use) for the session: the
    environment that points boto3, pyarrow and the commands (subprocesses and their Ray workers) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    server.stop()


@contextlib.contextmanager
def s3_bucket(env: dict[str, str]):
    """A new bucket on the S3 server of ``env``, with ``env`` set in this process meanwhile: yields its name."""
    import uuid

    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield bucket


@pytest.fixture
def s3(s3_server) -> str:
    """A new bucket on the session's S3 server, the environment pointing at it for this test."""
    with s3_bucket(s3_server) as bucket:
        yield bucket


@pytest.fixture(scope="session")
def smoke_sweep(ray_cluster, tmp_path_factory) -> dict:
    """One smoke stability sweep (2 groups x 2 seeds) with ``--evaluate``, then the evaluate command adding two
    random cells and a published one (DARTS_V2). The sweep's tests (test_sweep.py) and the report's
    (test_report.py) assert different things about this one run.

    Returns ``exp`` (the experiment folder), ``sweep_out``/``evaluate_out`` (what each command printed) and
    ``after_sweep`` (each table's rows as the sweep left them, before the evaluate command; None where the sweep
    wrote no such table)."""
    from orchestrator import evaluate as evaluate_cli
    from orchestrator import sweep
    from orchestrator.results import ResultStore

    root = tmp_path_factory.mktemp("smoke-sweep")
    exp = root / "smoke"
    store = ResultStore(str(root), "smoke")
    with tune_env():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = sweep.main(["stability", "--preset", "smoke", "--storage", str(root), "--evaluate"])
        assert code == 0, out.getvalue()[-3000:]
        sweep_out = out.getvalue()
        after_sweep = {kind: store.read(kind).to_pylist() if (exp / f"{kind}.parquet").is_dir() else None
                       for kind in ("trials", "epochs", "stability", "evaluations")}
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = evaluate_cli.main(["--from", "smoke", "--storage", str(root), "--random", "2",
                                      "--genotype", "DARTS_V2", "--seeds", "0"])
        assert code == 0, out.getvalue()[-3000:]
    return {"exp": exp, "sweep_out": sweep_out, "evaluate_out": out.getvalue(), "after_sweep": after_sweep}


@pytest.fixture(scope="session")
def smoke_hpo(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """One smoke HPO study (``sweep hpo --preset smoke``): (its experiment folder, what the command printed). The
    sweep's tests and the report's assert different things about it."""
    from orchestrator import sweep

    root = tmp_path_factory.mktemp("smoke-hpo")
    with tune_env(), contextlib.redirect_stdout(io.StringIO()) as out:
        code = sweep.main(["hpo", "--preset", "smoke", "--storage", str(root)])
    assert code == 0, out.getvalue()[-3000:]
    return root / "smoke-hpo", out.getvalue()
