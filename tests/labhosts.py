"""Test hosts on this machine for ``ray up cluster/onprem.yaml``: each host is a network namespace of its own, with a
private address on a veth (10.217.X.0/24, inside the namespaces made here only), running Debian's ``openssh-server``
in its own PID, UTS and mount namespaces, so that it has its own processes (``ray stop`` on one host ends only its
own Ray), its own hostname, its own ``/tmp`` and its own home directory. The file system is otherwise this machine's:
every host sees the same virtualenv and the same results folder (a shared file system, as a lab's NFS would be).

A ``lab`` namespace holds the switch (a bridge) and the user's machine (``lab.run``: ``ray up``, ``ray job submit``).
Killing a host (``kill``) ends its PID namespace at once: every process on it, as a power cut would. Everything is
removed on exit. Needs root (``ip netns``), ``/usr/sbin/sshd``, ``ssh-keygen`` and ``rsync``."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[1]  # the checkout the hosts run (ray up copies it; the venv may live in it)


def missing() -> str | None:
    """Why the test hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "the test hosts need root (ip netns)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(SSHD, os.X_OK):
        return "openssh-server is not installed (.ci/run installs it)"
    return None


def _sh(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()[-800:]}")
    return proc.stdout


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    root: Path
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Lab:
    netns: str
    ip: str
    home: Path  # the user's HOME: ~/.ssh/id_ed25519 logs into every host, ~/.ray/auth_token
    key: Path
    hosts: list[Host] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "RAY_USAGE_STATS_ENABLED": "0", **extra}

    def popen(self, cmd: Sequence[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """``cmd`` on the user's machine (the lab namespace), HOME its own."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], env=env or self.env(), **kwargs)

    def run(self, cmd: Sequence[str], timeout: float, env: dict | None = None, cwd: str | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], env=env or self.env(), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    def ssh(self, host: Host, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``command`` on ``host`` as root over SSH, with the lab's key, from the user's machine."""
        return self.run(["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o",
                         "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                         f"root@{host.ip}", command], timeout=timeout)

    def kill(self, host: Host) -> None:
        """Power off ``host``: SIGKILL to its PID namespace's first process ends every process in it."""
        assert host.proc is not None
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait(timeout=30)

    def processes(self, host: Host) -> list[str]:
        """The command lines of the processes running on ``host`` (its PID namespace)."""
        import psutil

        if not host.alive():
            return []
        ns = os.readlink(f"/proc/{host.proc.pid}/ns/pid")  # unshare's own namespace is its child's
        children = psutil.Process(host.proc.pid).children(recursive=True)
        lines = []
        for proc in children:
            with contextlib.suppress(psutil.Error, OSError):
                if os.readlink(f"/proc/{proc.pid}/ns/pid") != ns:
                    lines.append(" ".join(proc.cmdline()))
        return lines


def _wait_for_ssh(lab: Lab, host: Host, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not host.alive():
            raise RuntimeError(f"sshd of {host.name} exited: {(host.root / 'sshd.log').read_text()[-800:]}")
        probe = lab.ssh(host, "hostname", timeout=10)
        if probe.returncode == 0 and probe.stdout.strip() == host.name:
            return
        time.sleep(0.3)
    raise RuntimeError(f"{host.name} ({host.ip}) never answered SSH")


def _needed_from_root() -> list[str]:
    """The folders of /root that this machine's Python lives in (e.g. pyenv's), which a host's home must keep."""
    real = Path(os.path.realpath(sys.executable))
    return [real.relative_to("/root").parts[0]] if real.is_relative_to("/root") else []


@contextlib.contextmanager
def lab_hosts(names: Sequence[str], home_links: dict[str, str] | None = None) -> Iterator[Lab]:
    """Hosts ``names`` (the first is meant as the head), reachable as root over SSH with the lab's key; each home
    holds ``home_links`` (name -> a path on this machine, e.g. an existing virtualenv)."""
    tag = secrets.token_hex(3)
    subnet = f"10.217.{int(tag[:2], 16)}"
    base = Path(tempfile.mkdtemp(prefix=f"pcdarts-lab-{tag}-", dir="/var/tmp"))  # not /tmp: the hosts' is theirs
    lab = Lab(netns=f"pcd-{tag}-lab", ip=f"{subnet}.1", home=base / "user", key=base / "user" / ".ssh" / "id_ed25519")
    made: list[str] = []
    try:
        (lab.home / ".ssh").mkdir(parents=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pcdarts-lab-test", "-f", str(lab.key))
        _sh("ip", "netns", "add", lab.netns)
        made.append(lab.netns)
        _sh("ip", "-n", lab.netns, "link", "set", "lo", "up")
        _sh("ip", "-n", lab.netns, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", lab.netns, "addr", "add", f"{lab.ip}/24", "dev", "br0")
        _sh("ip", "-n", lab.netns, "link", "set", "br0", "up")
        # The hosts' default route ends here (Ray finds a node's address from its route to the internet), and this
        # namespace has no way out and forwards nothing: no packet leaves the namespaces made here.
        _sh("ip", "netns", "exec", lab.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        for i, name in enumerate(names):
            host = Host(name=name, ip=f"{subnet}.{10 + i}", netns=f"pcd-{tag}-{i}", root=base / name)
            _sh("ip", "netns", "add", host.netns)
            made.append(host.netns)
            _sh("ip", "link", "add", f"p{tag}{i}", "netns", lab.netns, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
            _sh("ip", "-n", lab.netns, "link", "set", f"p{tag}{i}", "master", "br0", "up")
            for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{host.ip}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["route", "add", "default", "via", lab.ip]):
                _sh("ip", "-n", host.netns, *cmd)
            (host.root / "home" / ".ssh").mkdir(parents=True)
            shutil.copy(f"{lab.key}.pub", host.root / "authorized_keys")
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.root / "host_key"))
            (host.root / "home" / ".bashrc").write_text("export RAY_USAGE_STATS_ENABLED=0\n")
            for link, target in (home_links or {}).items():
                (host.root / "home" / link).symlink_to(target)
            (host.root / "sshd_config").write_text(
                f"ListenAddress {host.ip}\nPort 22\nHostKey {host.root}/host_key\nPidFile none\n"
                f"AuthorizedKeysFile {host.root}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "AllowTcpForwarding local\nMaxStartups 100\nMaxSessions 100\nSubsystem sftp internal-sftp\n")
            # Its own processes, hostname, /tmp and home (bound over /root, with what this machine's Python needs
            # from the real /root bound into it); then sshd as its first process.
            keep = "".join(f"mkdir -p {host.root}/home/{d} && mount --bind /root/{d} {host.root}/home/{d} && "
                           for d in _needed_from_root())
            # what this machine keeps under /tmp and a host needs (a checkout or virtualenv there, as in a CI
            # clone): set aside before the host's own /tmp hides it, then bound back at the same path
            under_tmp = sorted({str(Path(p).resolve()) for p in [*(home_links or {}).values(), REPO]
                                if str(Path(p).resolve()).startswith("/tmp/")})
            aside = "".join(f"mkdir -p {host.root}/aside/{i} && mount --bind {p} {host.root}/aside/{i} && "
                            for i, p in enumerate(under_tmp))
            back = "".join(f"mkdir -p {p} && mount --bind {host.root}/aside/{i} {p} && "
                           for i, p in enumerate(under_tmp))
            script = (f"hostname {name} && {aside}mount -t tmpfs tmpfs /tmp && {back}{keep}"
                      f"mount --rbind {host.root}/home /root && exec {SSHD} -D -e -f {host.root}/sshd_config")
            host.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
                stdout=open(host.root / "sshd.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
            lab.hosts.append(host)
        deadline = time.monotonic() + 60
        for host in lab.hosts:
            _wait_for_ssh(lab, host, deadline)
        yield lab
    finally:
        for host in lab.hosts:
            if host.alive():
                lab.kill(host)
        for ns in reversed(made):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _sh("ip", "netns", "del", ns)
        shutil.rmtree(base, ignore_errors=True)

