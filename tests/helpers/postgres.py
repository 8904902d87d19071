"""A throw-away PostgreSQL server for the tests: Debian's binaries, a temp cluster, a free loopback port.

Why this shape: CI runs as root, and PostgreSQL refuses to run as root, so the
cluster is made and run as an unprivileged user (`nobody`) with `runuser`.
The cluster lives in its own directory under /tmp (pytest's tmp dirs are
private to root, so `nobody` could not reach them); `stop()` shuts the server
down and removes that directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dicom_node.peers import free_port

UNPRIVILEGED = "nobody"


def postgres_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL bin folder, or None when the server is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """initdb + pg_ctl start on 127.0.0.1:`port`; `url(dbname)` gives a psycopg SQLAlchemy URL."""

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found (Debian package 'postgresql')")
        self.bin_dir = bin_dir
        self.root = root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            root.chmod(0o755)
            shutil.chown(root, UNPRIVILEGED)
            self._as_user = ["runuser", "-u", UNPRIVILEGED, "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {self.port} -k {root} -c fsync=off -c max_connections=200",
            "start",
        )  # fmt: skip

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self._as_user, str(self.bin_dir / tool), *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def create_database(self, name: str) -> str:
        """Create database `name` and return its SQLAlchemy URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def wait_ready(server: PostgresServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = subprocess.run([str(server.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port)])
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"PostgreSQL did not become ready on port {server.port}")
