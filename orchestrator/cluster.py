"""The Ray cluster a command runs on: joined (its port probed for ``$PCDARTS_CONNECT_TIMEOUT_S`` s, default 30, so
an unreachable one is one ``error:`` line, never minutes of GCS retries) or started here, owned by this process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

CONNECT_TIMEOUT_ENV = "PCDARTS_CONNECT_TIMEOUT_S"
#: ``1``: the local ``--storage`` path is one shared filesystem mounted at the same path on every node (NFS, ...)
SHARED_STORAGE_ENV = "PCDARTS_SHARED_STORAGE"


def connect_timeout() -> float:
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else 30.0
    except ValueError:
        raise ValueError(f"{CONNECT_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:  # (nan and inf fail too)
        raise ValueError(f"{CONNECT_TIMEOUT_ENV} must be in (0, 3600] seconds, got {text!r}")
    return value


def cluster_address(address: str | None) -> str | None:
    """``--address``, else ``$RAY_ADDRESS``, else None: start Ray here."""
    return address or os.environ.get("RAY_ADDRESS") or None


def machine_cpus() -> int:
    """CPUs this process may use: the affinity mask, further limited by a cgroup CPU quota when there is one."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError), open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
        quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    return count


def local_resources() -> dict[str, float]:
    """What a local Ray started by this process would have (checked before Ray starts)."""
    import torch

    return {"CPU": float(machine_cpus()), "GPU": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}


def resolve(address: str) -> str:
    """``address`` checked to be reachable; ``auto`` becomes the local cluster's GCS address."""
    from ray._private.services import find_bootstrap_address

    timeout = connect_timeout()
    target = find_bootstrap_address(None) if address == "auto" else address
    if not target:
        raise ValueError("--address auto: no Ray cluster is running on this machine; start one with "
                         "`ray start --head` or leave out --address to run Ray here")
    host, sep, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address {address!r} must be auto, HOST:PORT or ray://HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=min(5.0, timeout)):
                return target
        except OSError as err:
            if time.monotonic() >= deadline:
                what = address if address == target else f"{address} ({target})"
                raise ValueError(f"cannot reach the Ray cluster at {what} ({err.strerror or err}) within "
                                 f"{timeout:g} s: check that it is running and the address/port "
                                 f"(or set {CONNECT_TIMEOUT_ENV})") from None
            time.sleep(0.5)


#: what a cluster started by ``ray start`` (Ray 2.60: token authentication on) needs from a driver that joins it
AUTH_HINT = ("set RAY_AUTH_MODE=token and give this machine the cluster's token in ~/.ray/auth_token (or "
             "$RAY_AUTH_TOKEN; `ray get-auth-token` on the head node prints it)")


def check_auth(address: str) -> None:
    """One GCS call without a token: a cluster that refuses it wants token authentication, which a driver without
    ``RAY_AUTH_MODE=token`` would retry for 20 s and fail without saying why; a one-line ``ValueError`` instead."""
    if address.startswith("ray://") or os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=min(5.0, connect_timeout()))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ValueError(f"the Ray cluster at {address} requires token authentication: {AUTH_HINT}") \
                    from None  # anything else: ray.init says what it is


def preflight(address: str | None) -> str | None:
    """The cluster to join, checked reachable and joinable before anything is written (None: Ray starts here)."""
    if not (address := cluster_address(address)):
        return None
    target = resolve(address)
    check_auth(target)
    return target


def check_storage(store: Any) -> None:
    """A ``ValueError`` of one line unless the experiment's folder can be made there: a local path under a file or
    in a folder this user may not write; a bucket that does not exist; storage that does not answer within the
    connect timeout (else object stores retry for minutes)."""
    if store.fs.type_name == "local":
        return check_local_folder(store.storage, store.root)
    errors: list[BaseException] = []
    found: list[Any] = []

    def probe() -> None:
        try:
            found.append(store.fs.get_file_info(store.root))
            if store.fs.type_name == "s3":
                found.append(store.fs.get_file_info(store.root.split("/", 1)[0]))  # the bucket
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    # a daemon thread, not a thread pool: a probe that never answers must not hold up the exit
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout := connect_timeout())
    if thread.is_alive():
        raise ValueError(f"storage {store.storage} did not answer within {timeout:g} s: check the bucket, the "
                         f"credentials and the network (or set {CONNECT_TIMEOUT_ENV})")
    from .s3 import storage_error

    if errors:
        text = str(errors[0]).splitlines()[0] if str(errors[0]) else type(errors[0]).__name__
        code = next((c for c in ("ACCESS_DENIED", "NO_SUCH_BUCKET") if f"AWS Error {c}" in text), "")
        raise ValueError(storage_error(store.storage, code, "") if code else
                         f"storage {store.storage} cannot be read: {text}")
    if len(found) == 2 and found[1].type == pafs.FileType.NotFound:
        raise ValueError(storage_error(store.storage, "NoSuchBucket", ""))


def check_local_folder(storage: str, folder: str) -> None:
    """A ``ValueError`` unless ``folder`` is, or can be made as, a folder this user may write in."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise ValueError(f"storage {storage}: {path} is a file, not a folder; pick another --storage")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"storage {storage}: no permission to write in {path}; pick another --storage")


def project_env_vars() -> dict[str, str]:
    """This process's ``PCDARTS_*`` variables, for the trials' runtime env; those a Ray job's own runtime env sets
    already (``ray job submit --runtime-env-json``) are left out: Ray refuses to merge the same key twice, and the
    job's env reaches the trials anyway."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    set_by_job = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in os.environ.items() if k.startswith("PCDARTS_") and k not in set_by_job}


def connect(address: str | None, verbose: bool = False, store: Any = None) -> dict[str, float]:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``) or start Ray here, unless connected; its capacity.
    With the experiment's ``store``: refused (a ``ValueError``) when it is node-local and the cluster has several
    nodes (see :func:`check_shared_storage`)."""
    import ray

    if not verbose:
        route_ray_messages()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
        if env_vars := project_env_vars():
            kwargs["runtime_env"] = {"env_vars": env_vars}
        if address := cluster_address(address):
            try:
                ray.init(address=preflight(address), **kwargs)
            except (ConnectionError, RuntimeError) as err:
                raise ValueError(f"cannot join the Ray cluster at {address}: {str(err).splitlines()[0]}") from None
        else:
            reap_orphans()
            ctx = ray.init(num_cpus=machine_cpus(), **kwargs)
            record_local_cluster()
            if getattr(ctx, "dashboard_url", None):
                print(f"Ray dashboard: http://{ctx.dashboard_url}")
    if store is not None:
        check_shared_storage(store)
    return cluster_capacity()


#: where the driver writes the messages Ray's cluster publishes to it (a lost node's log tail, dead workers)
RAY_MESSAGES_FILE = "pcdarts-ray-messages.log"


def ray_messages_log() -> Path:
    """The log of Ray's published messages: in this Ray session's log folder (else the temp folder)."""
    with contextlib.suppress(Exception):  # a private API; the temp folder does as well
        import ray._private.worker as worker

        return Path(worker._global_node.get_logs_dir_path(), RAY_MESSAGES_FILE)
    return Path(tempfile.gettempdir(), RAY_MESSAGES_FILE)


def route_ray_messages() -> None:
    """Ray prints every error message its cluster publishes on the driver's stdout, however quiet ``ray.init`` is
    asked to be: a lost node's 19-line ``[state-dump]``, a dead worker's traceback. Send them to
    :func:`ray_messages_log` instead, with one line each on the terminal (``--verbose`` leaves Ray's printing
    alone). Ray has no option for this: its listener thread looks ``print_to_stdstream`` up at every message."""
    import ray._private.worker as worker

    original = worker.print_to_stdstream
    if getattr(original, "routed", False):
        return

    def route(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":  # worker logs (only with log_to_driver): Ray's own printing
            return original(data, ignore_prefix)
        path = ray_messages_log()
        lines = [line for text in data.get("lines", []) for line in str(text).splitlines() if line.strip()]
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + "\n".join(lines) + "\n")
        first = lines[0].strip() if lines else "a message"
        print(f"ray: {first[:160]}{'...' if len(first) > 160 else ''} ({len(lines)} line(s) in {path})", flush=True)

    route.routed = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = route


def check_shared_storage(store: Any) -> None:
    """A ``ValueError`` when the results go to a local path and the connected Ray cluster has several nodes: a
    trial on another node would write its checkpoints and rows to that node's own disk, where this driver never
    sees them. Unless ``$PCDARTS_SHARED_STORAGE=1`` declares the path one shared filesystem on every node."""
    import ray

    if store.fs.type_name != "local" or os.environ.get(SHARED_STORAGE_ENV, "").strip() == "1":
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        raise ValueError(f"storage {store.storage} is a path on this machine, but the Ray cluster has {nodes} nodes: "
                         f"trials elsewhere would write to their own disks; use s3://BUCKET/prefix, or set "
                         f"{SHARED_STORAGE_ENV}=1 if the path is one shared filesystem mounted on every node")


# -- a local cluster is owned by the driver that started it: ray.shutdown stops it at a normal exit; a driver
# killed outright leaves it, and the next run here ends it (reap_orphans) --------------------------------------
def _owners() -> Path:
    return Path(tempfile.gettempdir(), "pcdarts-local-ray")


def record_local_cluster() -> None:
    """Note the processes of the local Ray this driver just started, for :func:`reap_orphans`."""
    import psutil

    me = psutil.Process()
    procs = [{"pid": p.pid, "created": p.create_time()} for p in me.children(recursive=True)]
    _owners().mkdir(parents=True, exist_ok=True)
    with open(_owners() / f"{me.pid}.json", "w", encoding="utf-8") as f:
        json.dump({"driver": me.pid, "created": me.create_time(), "processes": procs}, f)


def reap_orphans() -> int:
    """End the local Ray processes of drivers on this machine that died without stopping them; returns how many.
    Only processes recorded by :func:`record_local_cluster` (same pid and start time) are touched."""
    import psutil

    ended = 0
    for path in sorted(_owners().glob("*")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if abs(psutil.Process(record["driver"]).create_time() - record["created"]) < 1:
                continue  # its driver is alive: not an orphan
        except psutil.NoSuchProcess:
            pass
        except (OSError, ValueError, KeyError):
            continue
        for entry in record.get("processes", []):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(entry["pid"])
                if abs(proc.create_time() - entry["created"]) < 1:
                    proc.kill()
                    ended += 1
        path.unlink()
    return ended


def cluster_capacity() -> dict[str, float]:
    """The most CPUs/GPUs this cluster can have: the autoscaler's limits when it publishes them, else its nodes'."""
    import ray

    limits: Any = {}
    with contextlib.suppress(Exception):  # a private API; without it the current totals are the best we know
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    now = ray.cluster_resources()
    return {key: max(float(now.get(key, 0)), float(limits.get(key) or 0)) for key in ("CPU", "GPU")}
