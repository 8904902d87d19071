"""Helpers for the reliability suite: phantom series, senders that report per-instance
statuses, and database/disk audits. Node fixtures are shared with tests/dicom_node."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import MRImageStorage, Verification
from sqlalchemy import select

from storage.database import Database
from storage.instance_store import sha256_file
from storage.jobs import list_jobs, load_job
from storage.models import TERMINAL_STATES, Instance
from tests.dicom_node.conftest import (  # noqa: F401  (fixtures re-exported for this folder)
    mr_outputs,
    mr_series,
    node_env,
    require_tool,
    start_node,
    unstarted_node,
    wait_for,
)
from tests.helpers.models import make_tiny_package

SUCCESS = 0x0000


def tps_rules(port: int) -> str:
    """Node config (TOML) routing every MR series to one TPS destination on 127.0.0.1:`port`."""
    return f"""
[[destinations]]
name = "tps"
ae_title = "TPS"
host = "127.0.0.1"
port = {port}

[[rules]]
name = "mr"
destinations = ["tps"]
[rules.match]
Modality = "MR"
"""


@pytest.fixture(scope="session")
def phantom_factory(phantom_series):
    """`make(seed, patient_id, slices=10, matrix=64, **kw) -> files`: small axial one-lesion `phantom_series`."""

    def make(seed: int, patient_id: str, *, slices: int = 10, matrix: int = 64, **kw) -> list[Path]:
        kw.setdefault("orientation", "axial")
        kw.setdefault("n_lesions", 1)
        kw.setdefault("series_description", "T1 CE AX")
        return phantom_series(seed, patient_id=patient_id, slices=slices, matrix=matrix, **kw).files

    return make


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.*)\)")


def storescu_statuses(
    port: int, files: list[Path], *, calling: str = "STORESCU", timeout: float = 120, extra: Iterable[str] = ()
) -> dict[Path, bool]:
    """Send `files` with DCMTK storescu on one association; return, per file, whether
    the node answered Success. A file without a response (killed peer) is False."""
    result = subprocess.run(
        [
            require_tool("storescu"),
            "-v",
            *extra,
            "-aet",
            calling,
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return parse_storescu(result.stdout + result.stderr, files)


def parse_storescu(output: str, files: list[Path]) -> dict[Path, bool]:
    outcome = {f: False for f in files}
    current: Path | None = None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            outcome[current] = m.group(1).startswith("Success")
            current = None
    return outcome


def pynetdicom_statuses(
    port: int, files: list[Path], *, calling: str = "PYSCU", called: str = "DICOMNODE", timeout: float = 30
) -> dict[Path, int | None]:
    """Send `files` on one pynetdicom association; status per file (None: no answer).

    Files are sent as they are on disk (pynetdicom's path mode: the request takes
    the file-meta SOP Class/Instance UIDs, the data set bytes go unchanged), so
    deliberately broken files reach the node exactly as written."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # only affects sends of paths, as here
    ae = AE(ae_title=calling)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # one context each: sent as is
        ae.add_requested_context(MRImageStorage, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    outcome: dict[Path, int | None] = {f: None for f in files}
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return outcome
    try:
        for path in files:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(path)
            outcome[path] = int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def send_dataset(port: int, ds, *, context: str = MRImageStorage, calling: str = "PYSCU") -> int | None:
    """One C-STORE of an in-memory data set; the status (None: no answer)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(context, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "association refused"
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def echo_ok(port: int, calling: str = "PROBE") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == SUCCESS
    finally:
        if assoc.is_established:
            assoc.release()


def audit_store(db: Database, root: Path) -> dict[str, Instance]:
    """Check the store's invariants; return the instance rows by SOP Instance UID.

    Every row's file exists and hashes to the row's sha256; every file under
    instances/ has a row; no `*.partial` (or anything else) lies under instances/.
    """
    with db.session() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance)).all()}
    on_disk = {p for p in (root / "instances").rglob("*") if p.is_file()}
    stray = [p for p in on_disk if p.suffix != ".dcm"]
    assert not stray, f"stray files under instances/: {stray}"
    by_path = {root / r.path: r for r in rows.values()}
    assert set(by_path) == on_disk, (
        f"files without rows: {sorted(on_disk - set(by_path))[:5]}; "
        f"rows without files: {sorted(set(by_path) - on_disk)[:5]}"
    )
    for path, row in by_path.items():
        assert sha256_file(path) == row.sha256, f"{path} does not match its recorded sha256"
    return rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small, untrained MTSA-Net package (64 px input, no N4) so that jobs run the real
    engine in about a second on a CPU. Its outputs are meaningless; what the tests
    check is the node's handling of jobs, not the segmentation."""
    return make_tiny_package(tmp_path_factory.mktemp("tiny-model"), name="tiny-reliability-test")


@pytest.fixture
def with_tiny_model(tiny_model, monkeypatch) -> Path:
    """Make the tiny package the node's default model (`$DICOM_NODE_MODEL`)."""
    monkeypatch.setenv("DICOM_NODE_MODEL", str(tiny_model))
    return tiny_model


NO_DESTINATION_RULES = """
[[rules]]
name = "mr"
[rules.match]
Modality = "MR"
"""


def settled(node, count: int, timeout: float = 120) -> list:
    """Wait until `count` jobs are done/failed/rejected; return them (with events), oldest first."""

    def finished():
        jobs = [load_job(node.db, j.id) for j in list_jobs(node.db)]
        done = [j for j in jobs if j.state in TERMINAL_STATES]
        return sorted(done, key=lambda j: j.id) if len(done) >= count else None

    return wait_for(finished, timeout=timeout, interval=0.3)
