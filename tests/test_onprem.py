"""``ray up -y cluster/onprem.yaml`` for real, against three test hosts on this machine (tests/labhosts.py: network
namespaces with veth addresses, each running Debian's openssh-server): the smoke sweep submitted with
``ray job submit`` through the tunnel of ``ray dashboard``, a worker host killed mid-sweep, the results checked on the
hosts' shared file system, then ``ray down -y``.

The cluster file is onprem.yaml as committed, with the hosts' addresses, the SSH user and key filled in and one
change: ``setup_commands`` (``pip install`` of this checkout) is left out, since each host's ``~/pcdarts-venv``
is this machine's virtualenv already (onprem.yaml's own ``initialization_commands`` then find it and activate it).
The start commands, file mounts and token authentication are the file's own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import labhosts

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
RAY_BIN = str(Path(__import__("ray").__file__).parent / "core" / "src" / "ray")  # gcs_server, raylet
EPOCHS = 10  # long enough for a worker host to be killed while its searches run

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.onprem]


@pytest.fixture(scope="module")
def lab():
    if why := labhosts.missing():
        pytest.skip(why)
    with labhosts.lab_hosts(["head", "worker1", "worker2"], {"pcdarts-venv": sys.prefix}) as lab:
        yield lab


def _cluster_file(lab: labhosts.Lab) -> Path:
    cfg = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    head, *workers = lab.hosts
    cfg["cluster_name"] = f"pcdarts-test-{lab.netns.split('-')[1]}"
    cfg["provider"].update(head_ip=head.ip, worker_ips=[w.ip for w in workers])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(lab.key)}
    cfg["setup_commands"] = []
    path = lab.home / "onprem.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _alive_nodes(lab: labhosts.Lab, env: dict) -> int:
    proc = lab.run([RAY, "list", "nodes", "--address", "http://127.0.0.1:8265", "--format", "json",
                    "--filter", "state=ALIVE"], timeout=60, env=env)
    return len(json.loads(proc.stdout)) if proc.returncode == 0 and proc.stdout.strip().startswith("[") else 0


def _gone(lab: labhosts.Lab, hosts: list[labhosts.Host], after: str) -> None:
    deadline = time.monotonic() + 60  # `ray stop` signals the processes; the last ones exit a little later
    while left := {h.name: p for h in hosts for p in lab.processes(h) if p.startswith(("ray::", RAY_BIN))}:
        assert time.monotonic() < deadline, f"{after} left Ray running: {left}"
        time.sleep(1)


def test_ray_up_onprem_submit_the_smoke_sweep_kill_a_worker_host_and_ray_down(lab):
    config = _cluster_file(lab)
    env = lab.env(RAY_AUTH_MODE="token")
    _ok(lab.run([RAY, "get-auth-token", "--generate"], timeout=60), "ray get-auth-token")
    storage = lab.home.parent / "results"  # /var/tmp/...: every host's file system has it (not their /tmp)
    timings: dict[str, float] = {}
    start = time.monotonic()
    # As onprem.yaml's header says: Ray's autoscaler v2 (ray up's default) does not support the local provider.
    _ok(lab.run([RAY, "up", "-y", "--no-config-cache", str(config)], timeout=600, cwd=str(ROOT),
                env=lab.env(RAY_UP_enable_autoscaler_v2="0")), "ray up")
    timings["ray up (head)"] = time.monotonic() - start
    tunnel = lab.popen([RAY, "dashboard", "--port", "8265", str(config)], cwd=str(ROOT),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _alive_nodes(lab, env) < 3:  # the head's autoscaler starts the workers over SSH
            assert time.monotonic() < deadline, "the workers never joined"
            assert tunnel.poll() is None, "ray dashboard's tunnel ended"
            time.sleep(2)
        timings["ray up (all 3 nodes alive)"] = time.monotonic() - start

        shared = json.dumps({"env_vars": {"PCDARTS_SHARED_STORAGE": "1"}})  # /var/tmp: one filesystem for all
        submit = lab.run([RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                          "--runtime-env-json", shared, "--no-wait", "--", "python", "-m", "orchestrator.sweep", "stability", "--preset", "smoke",
                          "--storage", str(storage), "--set", f"epochs={EPOCHS}", "--set", "max_concurrent_trials=4"],
                         timeout=120, env=env, cwd=str(ROOT))
        said = _ok(submit, "ray job submit") + submit.stderr
        job = next(w.strip("'") for line in said.splitlines() if "submitted successfully" in line
                   for w in line.split() if w.strip("'").startswith("raysubmit_"))

        # Kill a worker host while one of its searches is past its first epoch.
        epochs_file = storage / "smoke" / "epochs.parquet"
        deadline, victim = time.monotonic() + 300, None
        while victim is None:
            if time.monotonic() >= deadline:
                logs = lab.run([RAY, "job", "logs", "--address", "http://127.0.0.1:8265", job], timeout=60, env=env)
                raise AssertionError(f"no search ran on a worker host; the job's log ends:\n"
                                     f"{(logs.stdout + logs.stderr)[-3000:]}")
            time.sleep(1)
            if not (epochs_file.exists() and any(r["epoch"] >= 2 for r in pq.read_table(epochs_file).to_pylist())):
                continue
            victim = next((h for h in lab.hosts[1:] if any(p.startswith("ray::") and "ImplicitFunc" in p
                                                           for p in lab.processes(h))), None)
        lab.kill(victim)
        killed_at = time.monotonic()

        deadline = time.monotonic() + 600
        while True:
            status = lab.run([RAY, "job", "status", "--address", "http://127.0.0.1:8265", job], timeout=60, env=env)
            said = status.stdout + status.stderr  # Ray's CLI logger writes to stderr: "Job 'ID' succeeded"
            if ended := re.search(rf"Job '{job}' (succeeded|failed|stopped)", said):
                break
            assert time.monotonic() < deadline, said[-2000:]
            time.sleep(3)
        timings["sweep after the kill"] = time.monotonic() - killed_at
        logs = lab.run([RAY, "job", "logs", "--address", "http://127.0.0.1:8265", job], timeout=60, env=env)
        logs = logs.stdout + logs.stderr
        assert ended.group(1) == "succeeded", logs[-4000:]
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=30)
        start = time.monotonic()
        down = lab.run([RAY, "down", "-y", str(config)], timeout=300, cwd=str(ROOT))
        timings["ray down"] = time.monotonic() - start
        print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
    _ok(down, "ray down")
    head, *workers = lab.hosts
    _gone(lab, [head], "ray down")
    # The local provider's `ray down` runs `ray stop` on the head only and marks the workers as gone: a worker's
    # raylet ends with its head, its runtime-env agent does not. docs/cluster.md says to stop them so.
    for worker in workers:
        if worker.alive():
            _ok(lab.ssh(worker, "source ~/pcdarts-venv/bin/activate && ray stop"), f"ray stop on {worker.name}")
    _gone(lab, workers, "ray stop on the workers")

    trials = pq.read_table(storage / "smoke" / "trials.parquet").to_pylist()
    assert len(trials) == 4 and {r["status"] for r in trials} == {"done"}, trials
    assert any((r["num_failures"] or 0) >= 1 for r in trials), "no search was retried after its host died"
    epochs = pq.read_table(storage / "smoke" / "epochs.parquet").to_pylist()
    keys = [(r["trial_id"], r["epoch"]) for r in epochs]
    assert len(keys) == len(set(keys)) == 4 * EPOCHS
    assert "searches: 4 done, 0 failed, 0 unfinished" in logs, logs[-3000:]
    print("retried searches:", sum(1 for r in trials if r["num_failures"]), "epoch rows:", len(epochs))
