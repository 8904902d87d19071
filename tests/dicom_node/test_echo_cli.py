"""`dicom-node echo` against a real peer: DCMTK's storescp on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.peers import free_port


def dcmtk_storescp() -> str:
    """DCMTK's storescp (pynetdicom installs an unrelated `storescp` into the venv)."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidate = shutil.which("storescp", path=folder)
        if candidate is None:
            continue
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
        if "dcmtk" in version.stdout.lower():
            return candidate
    pytest.skip("DCMTK storescp not installed (Debian package dcmtk; CI installs it)")


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"storescp exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"storescp not listening on {port} after {timeout} s")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start DCMTK storescp with extra options; returns its port. All stopped at teardown."""
    binary = dcmtk_storescp()
    processes: list[subprocess.Popen] = []

    def start(*options: str) -> int:
        port = free_port()
        process = subprocess.Popen(
            [binary, "--aetitle", "TPS", "--output-directory", str(tmp_path), *options, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_listening(port, process)
        return port

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def echo(*args: str):
    return CliRunner().invoke(app, ["echo", *args])


def test_echo_success(storescp: Callable[..., int]) -> None:
    port = storescp()
    result = echo("127.0.0.1", str(port), "--aet", "DICOMNODE", "--aec", "TPS")
    assert result.exit_code == 0, result.output
    assert f"C-ECHO to TPS@127.0.0.1:{port}: success (0x0000)" in result.output


def test_echo_rejected_association_gives_the_reason(storescp: Callable[..., int]) -> None:
    """storescp --refuse closes the connection right after its A-ASSOCIATE-RJ; that raced
    pynetdicom into reporting an abort about 1 time in 4, so the echo is repeated."""
    port = storescp("--refuse")
    for _ in range(12):
        result = echo("127.0.0.1", str(port), "--aec", "TPS")
        assert result.exit_code == 1
        assert "association rejected by TPS@127.0.0.1" in result.output, result.output
        assert "Rejected Permanent" in result.output


def test_echo_nobody_listening() -> None:
    result = echo("127.0.0.1", str(free_port()), "--timeout", "2")
    assert result.exit_code == 1
    assert "no association with DICOMNODE@127.0.0.1" in result.output


def test_echo_bad_options_exit_2() -> None:
    result = echo("127.0.0.1", "11112", "--aet", "A" * 17)
    assert result.exit_code == 2 and "is longer than 16 characters" in " ".join(result.output.split())
    result = echo("127.0.0.1", "11112", "--aec", "BAD\\AE")
    assert result.exit_code == 2 and "contains a backslash" in " ".join(result.output.split())
    result = echo("127.0.0.1", "11112", "--tls-ca", "/nonexistent/ca.pem")
    assert result.exit_code == 2
    assert "ca_file '/nonexistent/ca.pem' does not exist" in " ".join(result.output.split())
