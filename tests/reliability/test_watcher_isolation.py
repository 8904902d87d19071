"""The series watcher: one series that cannot be routed fails alone; the others proceed."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from dicom_node.series_watcher import SeriesWatcher
from storage.models import Job
from tests.dicom_node.conftest import storescu
from tests.reliability.conftest import pynetdicom_statuses

RULES = """
[[destinations]]
name = "tps"
ae_title = "TPS"
host = "127.0.0.1"
port = 11113

[[rules]]
name = "small-matrix"
model = "default"
destinations = ["tps"]
[rules.match]
Rows = "64"
"""


def with_malformed_rows(files: list[Path], out: Path) -> list[Path]:
    """Copies whose Rows (US) value is 3 bytes long: pydicom raises when the value is used."""
    out.mkdir()
    good = b"\x28\x00\x10\x00US\x02\x00"  # (0028,0010) US, length 2, explicit VR little endian
    copies = []
    for source in files:
        data = source.read_bytes()
        at = data.index(good)
        copies.append(out / source.name)
        copies[-1].write_bytes(data[:at] + b"\x28\x00\x10\x00US\x03\x00\x40\x00\x00" + data[at + 10 :])
    return copies


def test_a_malformed_matched_value_fails_its_series_only(start_node, tmp_path, mr_series, phantom_factory):
    config = tmp_path / "node.toml"
    config.write_text(RULES)
    node = start_node(config, DICOM_NODE__SERIES__QUIET_PERIOD_S="600")  # its own watcher stays out of the way
    malformed = with_malformed_rows(phantom_factory(4343, "OTHER1"), tmp_path / "malformed")
    # Sent raw (DCMTK would pad the odd length); the oldest pending series is the bad one.
    assert set(pynetdicom_statuses(node.address[1], malformed).values()) == {0}
    assert storescu(node.address[1], mr_series).returncode == 0
    watcher = SeriesWatcher(node.db, node.store, node.watcher.rules, quiet_period_s=0.2)
    time.sleep(0.3)

    assert len(watcher.check_once()) == 2

    with node.db.session() as session:
        jobs = {job.series_uid: job for job in session.scalars(select(Job)).all()}
    bad = jobs[pydicom.dcmread(malformed[0]).SeriesInstanceUID]
    good = jobs[pydicom.dcmread(mr_series[0]).SeriesInstanceUID]
    assert bad.state.value == "failed", bad.reason
    assert bad.reason.startswith("failed: routing failed on ") and "(0028,0010)" in bad.reason
    assert good.state.value == "queued" and good.rule_name == "small-matrix"
