"""Fixtures for the node: a running NodeService on a free loopback port, small MR series."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.logging_setup import configure_logging
from dicom_node.peers import find_dcmtk
from dicom_node.service import NodeService
from dicom_node.settings import LoggingSettings, load_settings
from inference.synthetic.phantoms import generate_phantom, write_phantom_series

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
def mr_series(tmp_path_factory) -> list[Path]:
    """A small axial phantom series (12 slices of 64x64) written as MR Image Storage."""
    phantom = generate_phantom(4242, orientation="axial", matrix=64, slices=12, n_lesions=1)
    return write_phantom_series(phantom, tmp_path_factory.mktemp("mr_series"), series_description="T1 CE AX")


@pytest.fixture(scope="session")
def other_series(tmp_path_factory) -> list[Path]:
    """A second small series of another patient, described as a T2 FLAIR (matches no T1 rule)."""
    phantom = generate_phantom(4343, orientation="axial", matrix=64, slices=10, n_lesions=1)
    return write_phantom_series(
        phantom, tmp_path_factory.mktemp("t2_series"), series_description="T2 FLAIR", patient_id="OTHER1"
    )


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
