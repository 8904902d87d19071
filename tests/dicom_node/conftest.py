"""Fixtures for the node: a running NodeService on a free loopback port, small MR series,
and the exporter's test peers (DCMTK storescp, pynetdicom SCPs that misbehave on purpose)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicom_node.export_targets import ExportTargets
from dicom_node.exporter import Exporter
from dicom_node.logging_setup import configure_logging
from dicom_node.peers import find_dcmtk
from dicom_node.service import NodeService
from dicom_node.settings import Destination, ExportSettings, LoggingSettings, load_settings
from dicom_node.store_scp import instance_meta
from inference.imaging.postprocess import extract_lesions
from inference.imaging.volume_loader import load_series
from inference.outputs.dicom_outputs import WrittenOutput, write_dicom_outputs
from inference.result import EgfrCall, EgfrPrediction, InferenceResult, ModelIdentity
from storage.exports import resend
from storage.ingest import store_instance
from storage.jobs import RoutingOutcome, claim_next_job, complete_series, load_job, record_outputs
from storage.models import Job, JobState

MR_PHANTOM = {"seed": 4242, "orientation": "axial", "matrix": 64, "slices": 12, "n_lesions": 1}

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "node.example.toml"


def require_tool(name: str) -> str:
    """Path of a DCMTK/dicom3tools binary, or skip with the reason (CI installs them).

    pynetdicom's same-named scripts in the venv are not the independent peers
    we test against; `find_dcmtk` skips them.
    """
    path = find_dcmtk(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package dcmtk/dicom3tools; CI installs it)")
    return path


def wait_for(predicate: Callable[[], object], timeout: float = 20, interval: float = 0.1):
    """Poll until `predicate()` is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture(scope="session")
def mr_series(phantom_series) -> list[Path]:
    """A small axial phantom series (12 slices of 64x64) written as MR Image Storage."""
    return phantom_series(**MR_PHANTOM, series_description="T1 CE AX").files


@pytest.fixture(scope="session")
def mr_outputs(mr_series, phantom_series, tmp_path_factory) -> list[WrittenOutput]:
    """The RTSTRUCT and Comprehensive 3D SR the node's writers make for `mr_series`, its phantom lesion as result."""
    series = load_series(mr_series)
    phantom = phantom_series(**MR_PHANTOM, series_description="T1 CE AX").phantom
    truth = sitk.Cast(phantom.mask > 0, sitk.sitkFloat32)
    truth.CopyInformation(series.image)
    label_map, lesions = extract_lesions(  # a binary mask: every voxel in
        truth, brain_mask=sitk.Cast(truth >= -1, sitk.sitkUInt8), threshold=0.5, min_volume_mm3=0
    )
    result = InferenceResult(
        series=series,
        label_map=label_map,
        probability_map=None,
        lesions=lesions,
        egfr=EgfrPrediction(EgfrCall.NOT_ASSESSABLE, None, 0),
        model=ModelIdentity("MTSA-Net test outputs", "0", True),
    )
    written = write_dicom_outputs(result, tmp_path_factory.mktemp("mr_outputs"))
    assert [w.kind for w in written] == ["RTSTRUCT", "SR"]
    return written


@pytest.fixture(scope="session")
def other_series(phantom_series) -> list[Path]:
    """A second small series of another patient, described as a T2 FLAIR (matches no T1 rule)."""
    return phantom_series(
        4343, orientation="axial", matrix=64, slices=10, n_lesions=1, series_description="T2 FLAIR", patient_id="OTHER1"
    ).files


@pytest.fixture
def node_env(tmp_path) -> dict[str, str]:
    """Environment overrides for a test node: temp data dir, free ports, short quiet period, no workers."""
    return {
        "DICOM_NODE__STORAGE__DATA_DIR": str(tmp_path / "var"),
        "DICOM_NODE__NODE__PORT": "0",
        "DICOM_NODE__NODE__MIN_FREE_DISK_MB": "1",
        "DICOM_NODE__SERIES__QUIET_PERIOD_S": "0.5",
        "DICOM_NODE__SERIES__CHECK_INTERVAL_S": "0.2",
        "DICOM_NODE__WORKER__COUNT": "0",
        "DICOM_NODE__HTTP__PORT": "0",
    }


@pytest.fixture
def start_node(node_env) -> Iterator[Callable[..., NodeService]]:
    """Start NodeService instances from the example config plus overrides; all stopped at teardown."""
    started: list[NodeService] = []
    configure_logging(LoggingSettings(format="json", level="WARNING"))

    def start(config: Path = EXAMPLE_CONFIG, **overrides: str) -> NodeService:
        settings = load_settings(config, env={**node_env, **overrides})
        service = NodeService(settings)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def unstarted_node(node_env) -> Iterator[NodeService]:
    """A node's job store and instance store without its scheduler, for tests that drive an Exporter.

    A started node runs its own exporter every few seconds on the same export rows;
    two exporters settling one job made such tests flaky.
    """
    service = NodeService(load_settings(EXAMPLE_CONFIG, env=node_env))
    yield service
    service.db.dispose()


def exporting_job(node, source: Path, destinations: list[str]) -> tuple[int, Path]:
    """A job in `exporting` whose one output is a copy of `source` (any storable object)."""
    job_id, outputs = exporting_job_with(node, [source], destinations, mr_source=source)
    return job_id, outputs[0]


def exporting_job_with(
    node,
    sources: list[Path],
    destinations: list[str],
    targets: ExportTargets | None = None,
    *,
    mr_source: Path,
) -> tuple[int, list[Path]]:
    """A job in `exporting` on the series of `mr_source` whose outputs are copies of `sources`.

    Export rows are made as the worker makes them (`targets`: the destinations' object filters).
    Each call stores `mr_source` again (a no-op after the first) and completes series 1 into a new job.
    """
    ds = pydicom.dcmread(mr_source)
    store_instance(
        node.db, node.store, instance_meta(ds, ds.file_meta.TransferSyntaxUID, "TEST"), mr_source.read_bytes()
    )
    job_id = complete_series(node.db, 1, RoutingOutcome("r", "default", destinations, "test"))
    assert claim_next_job(node.db, "test") == job_id
    out_dir = node.store.root / "outputs" / f"job-{job_id}" / "attempt-1"
    out_dir.mkdir(parents=True)
    copies, outputs = [], []
    for index, source in enumerate(sources):
        copy = Path(shutil.copy(source, out_dir / f"result-{index}.dcm"))
        output = pydicom.dcmread(copy, stop_before_pixels=True)
        copies.append(copy)
        outputs.append(
            (str(output.SOPInstanceUID), str(output.SOPClassUID), copy.relative_to(node.store.root).as_posix())
        )
    rows = (targets or ExportTargets([])).rows(destinations, outputs)
    record_outputs(node.db, job_id, out_dir.relative_to(node.store.root).as_posix(), {"outputs": outputs}, rows)
    return job_id, copies


def exporter_for(
    node, port: int, *, give_up_after_s: float = 60, dimse_timeout_s: float = 5, ae_title: str = "TPS"
) -> Exporter:
    destination = Destination(name="tps", ae_title=ae_title, host="127.0.0.1", port=port)
    return exporter_to(node, [destination], give_up_after_s=give_up_after_s, dimse_timeout_s=dimse_timeout_s)


def exporter_to(
    node, destinations: list[Destination], *, give_up_after_s: float = 60, dimse_timeout_s: float = 5
) -> Exporter:
    """An Exporter on the node's stores with short retry intervals (0.1-0.2 s)."""
    settings = ExportSettings(retry_initial_s=0.1, retry_max_interval_s=0.2, give_up_after_s=give_up_after_s)
    return Exporter(node.db, node.store, destinations, settings, "DICOMNODE", dimse_timeout_s)


def run_until_settled(exporter: Exporter, node, job_id: int, timeout: float = 30) -> object:
    def settled():
        exporter.run_once()
        job = load_job(node.db, job_id)
        return job if job.state in (JobState.DONE, JobState.FAILED) else None

    return wait_for(settled, timeout=timeout, interval=0.15)


def start_storescp(port: int, out_dir: Path, *options: str) -> subprocess.Popen:
    """DCMTK storescp on 127.0.0.1:`port`, ready when echoscu gets an answer (accepted or rejected)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", "TPS", "-od", str(out_dir), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    answer = "Association Rejected" if "--refuse" in options else "Received Echo Response"
    echo = [require_tool("echoscu"), "-v", "-aec", "TPS", "127.0.0.1", str(port)]
    wait_for(
        lambda: answer in subprocess.run(echo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout,
        timeout=10,
    )
    return process


class MisbehavingSCP:
    """A pynetdicom Store SCP answering every C-STORE with `status` after `delay` seconds.

    `contexts`: the SOP classes it accepts (default: all storage classes), e.g. only
    RT Structure Set Storage, as many planning systems do.
    """

    def __init__(
        self,
        port: int,
        status: int = 0x0000,
        delay: float = 0.0,
        ae_title: str = "TPS",
        contexts: list[str] | None = None,
    ):
        self.received: list[tuple[str, str, float]] = []  # (SOP class, SOP instance, monotonic time)
        self.status, self.delay = status, delay
        ae = AE(ae_title=ae_title)
        if contexts is None:
            ae.supported_contexts = AllStoragePresentationContexts
        for uid in contexts or []:
            ae.add_supported_context(uid)
        ae.require_called_aet = True
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle)])

    def handle(self, event):
        time.sleep(self.delay)
        request = event.request
        self.received.append((request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, time.monotonic()))
        return self.status

    def stop(self):
        self.server.shutdown()


def assert_resend_delivers(node, job_id: int, port: int) -> None:
    """Re-send a failed job's exports (as `dicom-node jobs export`) to a healthy SCP on `port`."""
    good = MisbehavingSCP(port)
    try:
        assert resend(node.db, job_id, ["tps"]) == 1
        job = run_until_settled(exporter_for(node, port), node, job_id)
    finally:
        good.stop()
    assert job.state == JobState.DONE and len(good.received) == 1


def storescu(port: int, files: list[Path], calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("storescu"), "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def jobs_by_state(service) -> dict[str, list[Job]]:
    with service.db.session() as session:
        found: dict[str, list[Job]] = {}
        for job in session.scalars(select(Job)).all():
            found.setdefault(job.state.value, []).append(job)
        return found


def cli(node_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run `dicom-node ARGS` in a fresh interpreter with the test node's environment."""
    env = {**os.environ, **node_env}
    env.pop("DICOM_NODE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )
