"""Disk pressure: below `min_free_disk_mb` the SCP answers 0xA700 (out of resources) and
logs it; a real ENOSPC while writing or committing is answered the same way; nothing
partial is kept (no file, no row, nothing in tmp/); the node recovers when space returns.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import threading

import pytest
from sqlalchemy.exc import OperationalError

import storage.ingest
import storage.instance_store
from dicom_node import status_codes
from dicom_node.logging_setup import configure_logging
from dicom_node.settings import LoggingSettings
from storage.jobs import list_jobs
from storage.models import JobState
from tests.reliability.conftest import SUCCESS, audit_store, echo_ok, pynetdicom_statuses, wait_for

MB = 1024 * 1024


@pytest.fixture
def node_log(start_node):
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="INFO"), stream=stream)

    def lines(event: str) -> list[dict]:
        parsed = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
        return [p for p in parsed if p.get("event") == event]

    yield lines
    configure_logging(LoggingSettings(format="json", level="WARNING"))


def assert_nothing_partial(node) -> None:
    audit_store(node.db, node.store.root)  # rows == files, hashes match, nothing stray
    assert not list(node.store.tmp_dir.iterdir()), "leftovers in tmp/"


def test_below_threshold_refuses_logs_and_recovers(start_node, node_log, phantom_factory, monkeypatch):
    node = start_node(DICOM_NODE__NODE__MIN_FREE_DISK_MB="100")
    port = node.address[1]
    files = phantom_factory(8401, "DISK01")
    real_free = node.store.free_bytes
    assert real_free() > 200 * MB, "the test machine itself is short of space"
    monkeypatch.setattr(node.store, "free_bytes", lambda: 50 * MB)

    statuses = pynetdicom_statuses(port, files)
    assert set(statuses.values()) == {status_codes.OUT_OF_RESOURCES}
    refused = node_log("store.refused_disk_full")
    assert len(refused) == len(files)
    assert refused[0]["free_mb"] == 50 and refused[0]["threshold_mb"] == 100
    assert not audit_store(node.db, node.store.root)
    assert_nothing_partial(node)
    assert echo_ok(port)  # verification still answered

    monkeypatch.setattr(node.store, "free_bytes", real_free)  # space returns
    assert set(pynetdicom_statuses(port, files).values()) == {SUCCESS}
    assert len(audit_store(node.db, node.store.root)) == len(files)
    (job,) = wait_for(lambda: [j for j in list_jobs(node.db) if j.state == JobState.QUEUED] or None)
    assert job.instance_count == len(files)


def test_space_running_out_mid_series_keeps_what_was_acknowledged(start_node, phantom_factory, monkeypatch):
    node = start_node(DICOM_NODE__NODE__MIN_FREE_DISK_MB="100")
    port = node.address[1]
    files = phantom_factory(8402, "DISK02")
    real_free = node.store.free_bytes
    calls = itertools.count()
    lock = threading.Lock()

    def shrinking():
        with lock:
            return 500 * MB if next(calls) < 4 else 10 * MB

    monkeypatch.setattr(node.store, "free_bytes", shrinking)
    statuses = pynetdicom_statuses(port, files)
    assert [statuses[f] for f in files] == [SUCCESS] * 4 + [status_codes.OUT_OF_RESOURCES] * (len(files) - 4)
    rows = audit_store(node.db, node.store.root)
    assert len(rows) == 4
    assert_nothing_partial(node)

    monkeypatch.setattr(node.store, "free_bytes", real_free)
    assert set(pynetdicom_statuses(port, files).values()) == {SUCCESS}  # the sender retries all
    assert len(audit_store(node.db, node.store.root)) == len(files)


class _FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes (the data is real)."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_real_enospc_while_writing_is_refused_and_leaves_nothing(
    start_node, node_log, phantom_factory, monkeypatch, where
):
    node = start_node()
    port = node.address[1]
    files = phantom_factory(8403, "DISK03")
    if where == "write":
        monkeypatch.setattr(
            storage.instance_store, "open", lambda *a, **k: _FullDisk(open(*a, **k), room=1000), raising=False
        )
    else:

        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        monkeypatch.setattr(storage.instance_store.os, "fsync", fsync)

    statuses = pynetdicom_statuses(port, files[:3])
    assert set(statuses.values()) == {status_codes.OUT_OF_RESOURCES}
    failed = node_log("store.failed")
    assert len(failed) == 3 and all(line["disk_full"] is True for line in failed)
    assert "No space left on device" in failed[0]["reason"]
    assert not audit_store(node.db, node.store.root)
    assert_nothing_partial(node)

    monkeypatch.undo()  # space returns
    assert set(pynetdicom_statuses(port, files).values()) == {SUCCESS}
    assert len(audit_store(node.db, node.store.root)) == len(files)
    assert_nothing_partial(node)


def test_database_full_after_the_file_was_written_removes_the_file(start_node, node_log, phantom_factory, monkeypatch):
    """SQLite's 'database or disk is full' at commit: the instance was already on disk;
    it must be removed again, and the store answered 0xA700, never success."""
    node = start_node()
    port = node.address[1]
    files = phantom_factory(8404, "DISK04")

    def full(*args, **kwargs):
        raise OperationalError("INSERT INTO instances ...", {}, Exception("database or disk is full"))

    # Both commit paths: a series' first instance (with its job) and the grouped rows of a series receiving.
    monkeypatch.setattr(storage.ingest, "_commit_row_opening_job", full)
    monkeypatch.setattr(storage.ingest, "_insert_into_open_series", full)
    statuses = pynetdicom_statuses(port, files[:2])
    assert set(statuses.values()) == {status_codes.OUT_OF_RESOURCES}
    failed = node_log("store.failed")
    assert len(failed) == 2 and "database or disk is full" in failed[0]["reason"]
    assert not list((node.store.root / "instances").rglob("*.dcm"))
    assert_nothing_partial(node)
    monkeypatch.undo()
    assert set(pynetdicom_statuses(port, files[:1]).values()) == {SUCCESS}  # the series is receiving now
    monkeypatch.setattr(storage.ingest, "_insert_into_open_series", full)
    assert set(pynetdicom_statuses(port, files[1:3]).values()) == {status_codes.OUT_OF_RESOURCES}
    assert len(list((node.store.root / "instances").rglob("*.dcm"))) == 1
    assert_nothing_partial(node)

    monkeypatch.undo()
    assert set(pynetdicom_statuses(port, files).values()) == {SUCCESS}
    assert len(audit_store(node.db, node.store.root)) == len(files)
