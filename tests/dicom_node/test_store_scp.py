"""The Store SCP against real peers: DCMTK echoscu/storescu and pynetdicom, on 127.0.0.1."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage
from sqlalchemy import func, select

from dicom_node import status_codes
from dicom_node.store_scp import error_comment
from storage.instance_store import InstanceStore, sha256_file
from storage.models import Instance, Job
from tests.dicom_node.conftest import jobs_by_state, require_tool, storescu, wait_for

RULES_CONFIG = """
[[destinations]]
name = "tps"
ae_title = "TPS"
host = "127.0.0.1"
port = 11113

[[rules]]
name = "t1ce"
model = "default"
destinations = ["tps"]
[rules.match]
Modality = "MR"
SeriesDescription = "T1 CE.*"
"""


def echoscu(port: int, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("echoscu"), "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def count(service, model) -> int:
    with service.db.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_echoscu_gets_success(start_node):
    node = start_node()
    result = echoscu(node.address[1], "ECHOSCU")
    assert result.returncode == 0, result.stderr


def test_series_stored_completely_then_queued_and_other_rejected(start_node, tmp_path, mr_series, other_series):
    config = tmp_path / "node.toml"
    config.write_text(RULES_CONFIG)
    node = start_node(config)
    port = node.address[1]

    result = storescu(port, mr_series + other_series)
    assert result.returncode == 0, result.stderr

    assert count(node, Instance) == len(mr_series) + len(other_series)
    with node.db.session() as session:
        stored = {row.sop_instance_uid: row for row in session.scalars(select(Instance)).all()}
    for source in mr_series + other_series:
        original = pydicom.dcmread(source)
        row = stored[original.SOPInstanceUID]
        path = node.store.absolute(row.path)
        assert sha256_file(path) == row.sha256
        copy = pydicom.dcmread(path)
        assert copy.SeriesInstanceUID == original.SeriesInstanceUID
        np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)

    jobs = wait_for(lambda: (found := jobs_by_state(node)) and "received" not in found and found)
    queued, rejected = jobs["queued"], jobs["rejected"]
    assert len(queued) == 1 and len(rejected) == 1
    assert queued[0].series_uid == pydicom.dcmread(mr_series[0]).SeriesInstanceUID
    assert queued[0].rule_name == "t1ce" and queued[0].instance_count == len(mr_series)
    assert rejected[0].reason.startswith("rejected: no rule matched")
    assert "SeriesDescription 'T2 FLAIR'" in rejected[0].reason


def test_resending_a_series_stores_nothing_twice(start_node, mr_series):
    node = start_node()
    port = node.address[1]
    assert storescu(port, mr_series).returncode == 0
    wait_for(lambda: jobs_by_state(node).get("queued"))
    files_before = sorted((node.store.root / "instances").rglob("*.dcm"))

    assert storescu(port, mr_series).returncode == 0

    assert count(node, Instance) == len(mr_series)
    assert sorted((node.store.root / "instances").rglob("*.dcm")) == files_before
    assert not (node.store.root / "conflicts").exists()
    # Duplicates are not a new delivery: no second job appears after the quiet period.
    node.watcher.check_once()
    assert count(node, Job) == 1


def test_calling_ae_outside_allow_list_is_refused(start_node):
    node = start_node(DICOM_NODE__NODE__ALLOWED_CALLING_AETS='["MR_SCANNER1"]')
    port = node.address[1]
    refused = echoscu(port, "INTRUDER")
    assert refused.returncode != 0
    assert (
        "Called AE Title Not Recognized" in refused.stderr
        or "Calling AE Title Not Recognized" in refused.stderr
        or "rejected" in refused.stderr.lower()
    )
    assert echoscu(port, "MR_SCANNER1").returncode == 0


def test_wrong_called_ae_is_refused(start_node):
    node = start_node()
    result = subprocess.run(
        [require_tool("echoscu"), "-aet", "X", "-aec", "NOTTHENODE", "127.0.0.1", str(node.address[1])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_pydicom_mr_files_in_each_transfer_syntax_stored_intact(start_node, name):
    node = start_node()
    original = pydicom.dcmread(get_testdata_file(name))
    syntax = original.file_meta.TransferSyntaxUID
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(MRImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", node.address[1], ae_title="DICOMNODE")
    assert assoc.is_established
    status = assoc.send_c_store(original)
    assoc.release()
    assert status.Status == status_codes.SUCCESS

    with node.db.session() as session:
        row = session.scalar(select(Instance))
    assert row.transfer_syntax_uid == syntax
    stored = pydicom.dcmread(node.store.absolute(row.path))
    assert stored.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)


def send_one(port: int, path: Path) -> int:
    return int(send_one_response(port, path).Status)


def send_one_response(port: int, path: Path) -> pydicom.Dataset:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    response = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    return response


def test_storage_failure_returns_failure_and_leaves_no_file(start_node, mr_series, monkeypatch):
    node = start_node()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error (simulated)")

    monkeypatch.setattr("storage.instance_store.os.fsync", broken_fsync)
    response = send_one_response(node.address[1], mr_series[0])
    assert response.Status == status_codes.OUT_OF_RESOURCES
    assert response.ErrorComment == "node storage error; retry later"
    monkeypatch.undo()

    assert count(node, Instance) == 0
    assert not list((node.store.root / "instances").rglob("*.dcm"))
    assert not list(node.store.tmp_dir.iterdir())
    # The service keeps serving once the fault is gone.
    assert send_one(node.address[1], mr_series[0]) == status_codes.SUCCESS


def test_low_disk_space_refuses_with_out_of_resources(start_node, mr_series):
    node = start_node(DICOM_NODE__NODE__MIN_FREE_DISK_MB=str(10**12))
    assert send_one(node.address[1], mr_series[0]) == status_codes.OUT_OF_RESOURCES
    assert count(node, Instance) == 0
    assert not list((node.store.root / "instances").rglob("*.dcm"))


def test_same_uid_with_different_content_keeps_first_and_saves_conflict(start_node, mr_series, tmp_path):
    node = start_node()
    port = node.address[1]
    assert send_one(port, mr_series[0]) == status_codes.SUCCESS
    changed = pydicom.dcmread(mr_series[0])
    changed.SeriesDescription = "CHANGED"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    assert send_one(port, changed_path) == status_codes.SUCCESS

    assert count(node, Instance) == 1
    with node.db.session() as session:
        row = session.scalar(select(Instance))
    assert pydicom.dcmread(node.store.absolute(row.path)).SeriesDescription == "T1 CE AX"
    conflicts = list((node.store.root / "conflicts").rglob("*.dcm"))
    assert len(conflicts) == 1 and pydicom.dcmread(conflicts[0]).SeriesDescription == "CHANGED"


def test_invalid_uid_is_refused_and_never_becomes_a_path(start_node, mr_series, tmp_path):
    node = start_node()
    for bad in ("1.2.3/../../etc", "1.2." + "9" * 70, "1.2..3"):
        ds = pydicom.dcmread(mr_series[0])
        ds.SeriesInstanceUID = bad
        path = tmp_path / "bad.dcm"
        ds.save_as(path)
        response = send_one_response(node.address[1], path)
        assert response.Status == status_codes.CANNOT_UNDERSTAND
        # The sender is told which attribute, whole, without the value (that is in the node's log).
        assert response.ErrorComment in (
            "Series Instance UID is not a valid UID",
            "Series Instance UID is longer than 64 characters (74)",
        )
    assert count(node, Instance) == 0
    assert {p.name for p in node.store.root.iterdir()} <= {
        "instances",
        "outputs",
        "tmp",
        "dicom-node.db",
        "dicom-node.db-wal",
        "dicom-node.db-shm",
        "store-id",  # which job store this data directory belongs to
        "run",  # the process slots (dicom_node.incarnation)
    }


def test_instance_store_rejects_escaping_paths(tmp_path):
    store = InstanceStore(tmp_path)
    with pytest.raises(ValueError):
        store.instance_path("1.2", "..", "1.2.3")
    with pytest.raises(ValueError):
        store.absolute("../outside")


def test_the_demo_sender_without_dcmtk_stores_through_pynetdicom(start_node, mr_series, monkeypatch):
    """`peers.send_series` falls back to one pynetdicom association where DCMTK is not installed
    (the demo on a machine without it): every file arrives, counted as sent."""
    import dicom_node.peers as peers

    monkeypatch.setattr(peers, "find_dcmtk", lambda name: None)
    node = start_node()
    counted: list[int] = []
    assert peers.send_series(mr_series[:3], node.address[1], on_sent=counted.append) == "pynetdicom"
    assert counted == [1, 1, 1]
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3


@pytest.mark.parametrize(
    ("text", "comment"),
    [
        ("short", "short"),
        ("back\\slash and\ncontrol", "back?slash and?control"),
        ("a\x85b\u00e9\u4e2d", "a?b??"),  # C1 control, Latin-1 and CJK: outside the default repertoire
        ("x" * 80, "x" * 61 + "..."),
    ],
)
def test_an_error_comment_is_always_a_valid_lo(text, comment):
    assert error_comment(text) == comment
