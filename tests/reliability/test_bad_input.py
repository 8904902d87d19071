"""Bad input corpus: one test per item. Each ends in a clear, stored reason (a C-STORE
failure status plus a log line, or a job `failed`/`rejected` with a readable reason
in the job store) and the service keeps serving afterwards (a good instance is
stored and a C-ECHO succeeds).

Job-level items run the real engine (`inference.pipeline.run_series` through the
node's worker) and are skipped only while that module is absent.
"""

from __future__ import annotations

import io
import json
import random
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dicom_node import status_codes
from dicom_node.logging_setup import configure_logging
from dicom_node.settings import LoggingSettings
from storage.jobs import list_jobs
from storage.models import Instance, JobState
from tests.reliability.conftest import (
    NO_DESTINATION_RULES,
    SUCCESS,
    audit_store,
    echo_ok,
    pynetdicom_statuses,
    require_tool,
    settled,
    sop_uid,
    storescu_statuses,
    wait_for,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def node_log(start_node):
    """The node's log lines (JSON, parsed), captured from a stream as in production."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="INFO"), stream=stream)

    def lines(event: str | None = None) -> list[dict]:
        parsed = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
        return [p for p in parsed if event is None or p.get("event") == event]

    yield lines
    configure_logging(LoggingSettings(format="json", level="WARNING"))


def instance_count(node) -> int:
    with node.db.session() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def assert_still_serving(node, good: Path) -> None:
    """The service keeps serving: C-ECHO succeeds and a good instance is stored."""
    port = node.address[1]
    assert echo_ok(port)
    before = instance_count(node)
    assert pynetdicom_statuses(port, [good]) == {good: SUCCESS}
    assert instance_count(node) in (before, before + 1)  # +0 if it was stored already
    audit_store(node.db, node.store.root)


def rewrite(source: Path, target: Path, **changes) -> Path:
    """A copy of `source` with data set elements changed (file meta kept as is)."""
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=False)
    return target


# --- refused at the C-STORE --------------------------------------------------------------


def test_wrong_sop_class_for_the_payload_is_refused(start_node, node_log, phantom_factory, tmp_path):
    node = start_node()
    good = phantom_factory(8101, "BAD01")
    # File meta (and so the request) says MR Image Storage; the data set says CT.
    path = rewrite(good[0], tmp_path / "ct.dcm", SOPClassUID=CT_IMAGE_STORAGE)
    assert str(pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID) != CT_IMAGE_STORAGE
    statuses = pynetdicom_statuses(node.address[1], [path])
    assert statuses[path] == status_codes.DATASET_DOES_NOT_MATCH_SOP_CLASS
    (line,) = node_log("store.rejected")
    assert "SOP Class UID of the data set" in line["reason"] and CT_IMAGE_STORAGE in line["reason"]
    assert instance_count(node) == 0
    assert_still_serving(node, good[1])


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize(
    "bad",
    ["1.2.3/../../../etc/passwd", "..", "1.2.3\\4", "1.2." + "9" * 70],
    ids=["separator", "dotdot", "backslash", "over64"],
)
def test_invalid_uid_is_refused_and_never_becomes_a_path(start_node, node_log, phantom_factory, tmp_path, keyword, bad):
    node = start_node()
    good = phantom_factory(8102, "BAD02")
    # Sent from the file: the request carries the (valid) file-meta UID, the data set the bad one.
    path = rewrite(good[0], tmp_path / "bad.dcm", **{keyword: bad})
    statuses = pynetdicom_statuses(node.address[1], [path])
    assert statuses[path] == status_codes.CANNOT_UNDERSTAND
    (line,) = node_log("store.rejected")
    assert "not a valid UID" in line["reason"] or "longer than 64" in line["reason"]
    assert instance_count(node) == 0
    assert not [p for p in (node.store.root / "instances").rglob("*")]
    assert not [p for p in node.store.root.parent.rglob("passwd")]
    assert_still_serving(node, good[1])


def test_truncated_header_is_refused(start_node, node_log, phantom_factory, tmp_path):
    node = start_node()
    good = phantom_factory(8103, "BAD03")
    data = good[0].read_bytes()
    ds = pydicom.dcmread(good[0])
    # Cut inside the Series Instance UID value: the header cannot be read.
    cut = data.index(str(ds.SeriesInstanceUID).encode()) + 5
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[:cut])
    statuses = pynetdicom_statuses(node.address[1], [path])
    assert statuses[path] == status_codes.CANNOT_UNDERSTAND
    (line,) = node_log("store.rejected")
    assert line["reason"]
    assert instance_count(node) == 0
    assert_still_serving(node, good[1])


def test_same_uid_with_different_content_keeps_first_and_saves_the_new_one(
    start_node, node_log, phantom_factory, tmp_path
):
    """Policy (storage/ingest.py): first version kept and used; the new bytes kept under
    conflicts/<sop uid>/<sha256>.dcm; Success answered; a warning logged for review."""
    node = start_node()
    good = phantom_factory(8104, "BAD04")
    port = node.address[1]
    assert pynetdicom_statuses(port, [good[0]]) == {good[0]: SUCCESS}
    changed = rewrite(good[0], tmp_path / "changed.dcm", WindowCenter="123", SeriesDescription="CHANGED")
    assert pynetdicom_statuses(port, [changed]) == {changed: SUCCESS}
    rows = audit_store(node.db, node.store.root)
    (row,) = rows.values()
    assert row.sha256 != "" and pydicom.dcmread(node.store.absolute(row.path)).SeriesDescription == "T1 CE AX"
    conflicts = list((node.store.root / "conflicts").rglob("*.dcm"))
    assert len(conflicts) == 1
    assert conflicts[0].parent.name == row.sop_instance_uid
    assert pydicom.dcmread(conflicts[0]).SeriesDescription == "CHANGED"
    (line,) = node_log("store.conflict")
    assert line["sop_instance_uid"] == row.sop_instance_uid and "first version kept" in line["reason"]
    assert_still_serving(node, good[1])


def _refused_within(sock: socket.socket, seconds: float) -> bool:
    """True if the node answers with an A-ABORT PDU (type 0x07) or closes the connection."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by the node
    return data == b"" or data[0] == 0x07


def test_random_bytes_to_the_port_do_not_hurt_the_service(start_node, phantom_factory):
    node = start_node()
    good = phantom_factory(8105, "BAD05")
    port = node.address[1]
    rng = random.Random(5)
    for round_ in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            # First byte outside the PDU types 0x01..0x07: the node must abort the association.
            payload = bytes([rng.randrange(0x08, 0x100)]) + rng.randbytes(rng.randrange(5, 4096))
            try:
                sock.sendall(payload)
            except OSError:
                pass  # closed by the node before we finished: fine
            assert _refused_within(sock, 5), f"round {round_}: no A-ABORT/close from the node"
    # A plausible PDU header announcing more data than ever comes, then a hang-up.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0x00, 10_000_000) + rng.randbytes(100))
    # An HTTP request, as a misdirected browser or scanner would send.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
        assert _refused_within(sock, 5)
    assert_still_serving(node, good[0])


def test_connections_that_never_associate_do_not_use_up_the_association_limit(start_node, phantom_factory):
    """A TCP port check (monitoring, load balancer) connects and closes without a PDU.
    Each used to hold an association slot for `acse_timeout` (30 s), so `max_associations`
    such checks locked real peers out; now the slot is freed when the connection closes."""
    node = start_node(DICOM_NODE__NODE__MAX_ASSOCIATIONS="3")
    port = node.address[1]
    for _ in range(10):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    start = time.monotonic()
    assert wait_for(lambda: echo_ok(port), timeout=5)
    assert time.monotonic() - start < 5
    assert_still_serving(node, phantom_factory(8108, "BAD08")[0])


def test_wrong_called_ae_title_is_rejected(start_node, node_log, phantom_factory):
    node = start_node()
    good = phantom_factory(8106, "BAD06")
    port = node.address[1]
    result = subprocess.run(
        [require_tool("storescu"), "-aet", "MODALITY", "-aec", "NOT_THE_NODE", "127.0.0.1", str(port), str(good[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = (result.stdout + result.stderr).lower()
    assert result.returncode != 0
    assert "association rejected" in said and "called ae title not recognized" in said
    (line,) = node_log("association.rejected")
    assert line["calling_ae"] == "MODALITY"
    assert instance_count(node) == 0
    assert_still_serving(node, good[0])


# --- stored, then the job fails with its reason (the real engine via the node's worker) ------


@pytest.fixture
def job_node(start_node, with_tiny_model, tmp_path):
    """A node that runs jobs (one worker, the tiny model), results kept locally."""
    config = tmp_path / "node.toml"
    config.write_text(NO_DESTINATION_RULES)
    return start_node(config, DICOM_NODE__WORKER__COUNT="1", DICOM_NODE__WORKER__POLL_INTERVAL_S="0.2")


def send_series_expect_failure(node, files: list[Path], *reason_parts: str):
    """Store `files` (all acknowledged), wait for the job: failed, with a readable reason
    (stored files are named `<SOP Instance UID>.dcm`, so that is how a reason names one)."""
    statuses = pynetdicom_statuses(node.address[1], files)
    assert set(statuses.values()) == {SUCCESS}, statuses
    (job,) = settled(node, 1)
    assert job.state == JobState.FAILED, (job.state, job.reason)
    assert not job.reason.startswith("internal error"), job.reason
    for part in reason_parts:
        assert part in job.reason, job.reason
    errors = [e for e in job.events if e.kind.value == "error"]
    assert errors and errors[-1].message == job.reason
    return job


def test_truncated_file_fails_its_job_and_the_next_series_is_processed(job_node, phantom_factory, tmp_path):
    files = list(phantom_factory(8201, "JOB01"))
    data = files[4].read_bytes()
    files[4] = tmp_path / "IM_0005_truncated.dcm"
    files[4].write_bytes(data[: len(data) - 1500])  # cut inside Pixel Data
    job = send_series_expect_failure(job_node, files, sop_uid(files[4]) + ".dcm")
    assert "pixel data" in job.reason.lower() or "truncated" in job.reason.lower()
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])
    # The next study is processed normally.
    good = phantom_factory(8203, "JOB03")
    assert set(pynetdicom_statuses(job_node.address[1], good).values()) == {SUCCESS}
    jobs = settled(job_node, 3)  # failed, the one-instance series of assert_still_serving, the good one
    by_series = {j.series_uid: j for j in jobs}
    good_job = by_series[str(pydicom.dcmread(good[0]).SeriesInstanceUID)]
    assert good_job.state == JobState.DONE, good_job.reason
    assert (job_node.store.root / good_job.output_dir / "summary.json").is_file()


def test_missing_pixel_data_fails_its_job(job_node, phantom_factory, tmp_path):
    files = list(phantom_factory(8204, "JOB04"))
    files[3] = rewrite(files[3], tmp_path / "IM_0004_nopixels.dcm", PixelData=None)
    send_series_expect_failure(job_node, files, sop_uid(files[3]) + ".dcm", "no pixel data")
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])


def test_pixel_data_shorter_than_rows_by_columns_fails_its_job(job_node, phantom_factory, tmp_path):
    files = list(phantom_factory(8205, "JOB05"))
    pixels = pydicom.dcmread(files[2]).PixelData
    files[2] = rewrite(files[2], tmp_path / "IM_0003_short.dcm", PixelData=pixels[: len(pixels) // 2])
    send_series_expect_failure(job_node, files, sop_uid(files[2]) + ".dcm", "shorter than Rows x Columns")
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])


@pytest.mark.parametrize(
    "other, expected",
    [
        ({"orientation": "sagittal"}, "mixed orientations"),
        ({"matrix": 48}, "mixed image sizes"),
    ],
    ids=["orientation", "matrix"],
)
def test_mixed_series_under_one_series_uid_fails_naming_it(job_node, phantom_factory, tmp_path, other, expected):
    first = phantom_factory(8206, "JOB06", slices=6)
    second = phantom_factory(8207, "JOB06", slices=6, **other)
    head = pydicom.dcmread(first[0])
    same = {k: head.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    moved = [rewrite(f, tmp_path / "second" / f.name.replace("IM_", "IM2_"), **same) for f in second]
    send_series_expect_failure(job_node, [*first, *moved], expected)
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])


def send_series_expect_rejection(node, files: list[Path], *reason_parts: str):
    """Store `files`, wait for the job: rejected by the input screening, with its reason, no outputs."""
    statuses = pynetdicom_statuses(node.address[1], files)
    assert set(statuses.values()) == {SUCCESS}, statuses
    (job,) = settled(node, 1)
    assert job.state == JobState.REJECTED, (job.state, job.reason)
    assert job.reason.startswith("rejected: ") and job.output_dir is None, job.reason
    for part in reason_parts:
        assert part in job.reason, job.reason
    assert "model" not in {e.message for e in job.events}  # refused before the model ran
    return job


def test_single_slice_series_is_rejected_too_few_slices(job_node, phantom_factory):
    job = send_series_expect_rejection(job_node, phantom_factory(8208, "JOB08")[:1], "only 1 slice")
    assert "at least 8" in job.reason
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])


def test_t2_series_is_rejected_by_screening_naming_its_headers(job_node, phantom_factory):
    files = phantom_factory(8209, "JOB09", series_description="AX T2 FLAIR")
    send_series_expect_rejection(
        job_node, files, "not a post-contrast T1: ContrastBolusAgent 'GADOBUTROL 0.1 mmol/kg'", "'AX T2 FLAIR' names T2"
    )
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])


def test_nan_geometry_fails_its_job_naming_the_file(job_node, phantom_factory, tmp_path):
    files = list(phantom_factory(8210, "JOB10"))
    files[3] = rewrite(files[3], tmp_path / "IM_0004_nan.dcm", ImagePositionPatient=["NaN", "0", "0"])
    job = send_series_expect_failure(job_node, files, sop_uid(files[3]) + ".dcm", "non-finite ImagePositionPatient")
    assert job.output_dir is None
    assert_still_serving(job_node, phantom_factory(8202, "JOB02")[0])


def test_a_rules_screening_names_reach_the_worker(start_node, with_tiny_model, phantom_factory, tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(NO_DESTINATION_RULES + '[rules.screening]\nrefuse = ["^t1 ce ax$"]\n')
    node = start_node(config, DICOM_NODE__WORKER__COUNT="1", DICOM_NODE__WORKER__POLL_INTERVAL_S="0.2")
    send_series_expect_rejection(node, phantom_factory(8211, "JOB11"), "matches '^t1 ce ax$' (the rule refuses it)")


@pytest.mark.slow
def test_2000_slice_series_is_stored_completely_and_its_job_ends_clearly(
    start_node, with_tiny_model, phantom_factory, tmp_path
):
    """2000 slices of 8x8, sent by four storescu processes at once (as a PACS pushing with
    parallel associations): all 2000 stored, one series, one job, and the job ends done or
    failed with a readable reason. The quiet period is 5 s here (the production default, counted from the association's end):
    the tests' 0.5 s is shorter than a pause of a loaded 2-core machine, and a series
    evaluated early gets a second job by design."""
    config = tmp_path / "node.toml"
    config.write_text(NO_DESTINATION_RULES)
    node = start_node(config, DICOM_NODE__SERIES__QUIET_PERIOD_S="5", DICOM_NODE__WORKER__COUNT="1")
    files = phantom_factory(8107, "BAD07", slices=2000, matrix=8, slice_spacing=0.1, pixel_spacing=1.0)
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        parts = list(
            pool.map(
                lambda k: storescu_statuses(node.address[1], files[k::4], calling=f"PACS{k}", timeout=600), range(4)
            )
        )
    took = time.monotonic() - start
    outcome = {f: ok for part in parts for f, ok in part.items()}
    assert len(outcome) == 2000
    assert all(outcome.values()), f"{sum(not v for v in outcome.values())} of 2000 not acknowledged"
    rows = audit_store(node.db, node.store.root)
    assert len(rows) == 2000
    (job,) = settled(node, 1, timeout=240)
    assert job.instance_count == 2000 and len(list_jobs(node.db)) == 1
    assert job.state in (JobState.DONE, JobState.FAILED, JobState.REJECTED)
    if job.state != JobState.DONE:
        assert job.reason and not job.reason.startswith("internal error"), job.reason
    job_s = (job.finished_at - job.started_at).total_seconds()
    print(
        f"\n2000-SLICE: stored 2000 instances in {took:.1f} s ({2000 / took:.0f}/s); job {job.state.value} "
        f"in {job_s:.1f} s: {job.reason or job.summary.get('lesions', '')}"
    )
