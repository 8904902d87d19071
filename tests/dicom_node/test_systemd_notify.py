"""sd_notify without systemd: the datagrams a real notify socket receives, and the watchdog interval."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dicom_node import systemd_notify


def test_notify_sends_one_datagram_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd_notify.notify("READY=1")
        assert systemd_notify.notify("WATCHDOG=1")
        assert [listener.recv(100), listener.recv(100)] == [b"READY=1", b"WATCHDOG=1"]


def test_notify_outside_systemd_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd_notify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not systemd_notify.notify("READY=1")  # a vanished socket never raises


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "120000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd_notify.watchdog_interval_s() == 60
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd_notify.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd_notify.watchdog_interval_s() is None
