"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package (``.ci/run`` installs it), a fresh cluster
made with ``initdb`` in a temp folder, run by ``pg_ctl`` as an unprivileged user (``postgres`` when the tests run
as root) on a free port of 127.0.0.1 only, with a password, and stopped afterwards."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres", password: bool = False) -> str:
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"


def postgres_bin() -> str | None:
    """The folder of ``initdb``/``pg_ctl``: Debian keeps them out of PATH, in /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("pg_ctl")
    return os.path.dirname(on_path) if on_path else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    bindir = postgres_bin()
    if bindir is None:
        import pytest

        pytest.skip("PostgreSQL is not installed (Debian's postgresql package; .ci/run installs it)")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="pcdarts-pg-")
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    server = Postgres("127.0.0.1", free_port(), "pcdarts", secrets.token_hex(12))
    pwfile, data = os.path.join(root, "pw"), os.path.join(root, "data")

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"

    try:
        run("sh", "-c", f"umask 077 && printf %s {server.password} > {pwfile}")
        run(f"{bindir}/initdb", "-D", data, "-U", server.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "-E", "UTF8", "--no-instructions")
        # TCP on 127.0.0.1 only; the Unix socket in the cluster's own folder, not /var/run/postgresql.
        run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={root} -c fsync=off", "start")
        try:
            yield server
        finally:
            run(f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
