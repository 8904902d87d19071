"""Fixtures that make DICOM data, shared by every test folder.

Phantom series come from `inference.synthetic.phantoms` (the same generator the demo model
is trained on), written as real MR Image Storage files. They are cached per test
session: generating and writing costs about a second each, and tests must not
modify the returned files (copy them first, see `copy_series`).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from inference.synthetic.phantoms import Phantom, generate_phantom, write_phantom_series
from tests.helpers.models import make_tiny_package
from tests.helpers.postgres import PostgresServer, postgres_bin_dir, wait_ready

_HEADER_KEYWORDS = ("patient_id", "patient_name", "series_description", "transfer_syntax")


@dataclass(frozen=True)
class PhantomSeries:
    """A generated phantom and its DICOM files in slice order (read-only, shared)."""

    phantom: Phantom
    files: list[Path]


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., PhantomSeries]:
    """The one phantom-series maker, cached per session.

    `make(seed, *, patient_id=None, patient_name=..., series_description=..., **generate_phantom_kwargs)`:
    the keyword arguments of `write_phantom_series` set the header, the rest shape the phantom.
    """
    cache: dict[tuple, PhantomSeries] = {}

    def make(seed: int, **kwargs) -> PhantomSeries:
        key = (seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            header = {k: kwargs.pop(k) for k in _HEADER_KEYWORDS if k in kwargs}
            phantom = generate_phantom(seed, **kwargs)
            files = write_phantom_series(phantom, tmp_path_factory.mktemp(f"phantom-{seed}"), **header)
            cache[key] = PhantomSeries(phantom, files)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def small_axial_series(phantom_series: Callable[..., PhantomSeries]) -> PhantomSeries:
    """A small axial phantom: 96x96, 20 slices of 4 mm, two lesions."""
    return phantom_series(7, orientation="axial", matrix=96, slices=20, slice_spacing=4.0, n_lesions=2)


@pytest.fixture
def copy_series(tmp_path: Path) -> Callable[[list[Path]], list[Path]]:
    """`copy(files) -> files`: private copies a test may edit or delete."""

    def copy(files: list[Path]) -> list[Path]:
        target = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        return [Path(shutil.copy2(f, target / f.name)) for f in files]

    return copy


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL server for the session (Debian `postgresql`; skipped where absent)."""
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL server not installed (Debian package 'postgresql'; .ci/run installs it)")
    server = PostgresServer()
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def job_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty job store URL: SQLite in tmp_path, and a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def edited_series(copy_series: Callable[[list[Path]], list[Path]]) -> Callable[..., list[Path]]:
    """`edit(files, indices=None, **changes) -> files`: private copies with data set elements set
    (a value of None deletes the element) in the files at `indices` (default: every file)."""

    def edit(files: list[Path], indices: Iterable[int] | None = None, **changes: object) -> list[Path]:
        copies = copy_series(files)
        for index in range(len(copies)) if indices is None else indices:
            ds = pydicom.dcmread(copies[index])
            for keyword, value in changes.items():
                if value is None:
                    if keyword in ds:
                        delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            ds.save_as(copies[index], enforce_file_format=False)
        return copies

    return edit


@pytest.fixture(scope="session")
def firing_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deliberately weak model package that fires all over the image (the plausibility gate's prey).

    An untrained tiny MTSA-Net (64 px input, no N4) whose output layer is amplified 200x
    with a zero bias, thresholded at 0.5 with no minimum volume: the sign of its random
    features becomes a speckle of "lesions" following the image's texture. On
    `small_axial_series` it reports hundreds of lesions (429 when this was written).
    Its manifest keeps the default plausibility bounds.
    """
    return make_tiny_package(
        tmp_path_factory.mktemp("firing-model"),
        name="firing-test",
        gtv_gain=200.0,
        thresholds={"gtv_probability": 0.5, "min_lesion_volume_mm3": 0.0},
    )


# Test files that run for minutes, longest first (slow tier, `--durations`, on 2 cores). They are
# handed to the xdist workers before every other file: under `--dist loadfile` a file runs whole on
# one worker, and one of minutes started when the other worker has little left is the run's tail.
# xdist's own order (files by number of tests, most first) put these one- and few-test files last.
LONG_RUNNING_FILES = (
    "tests/reliability/test_crash_safety.py",
    "tests/e2e/test_end_to_end.py",
    "tests/reliability/test_worker_processes.py",
    "tests/inference/test_training.py",
    "tests/inference/test_demo_model.py",
    "tests/dicom_node/test_reruns.py",
    "tests/reliability/test_bad_input.py",
    "tests/inference/test_pipeline.py",
    "tests/dicom_node/http/test_demo_dashboard.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Files go to the xdist workers in the order `pytest_collection_modifyitems` leaves them."""
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's `--loadscope-reorder`, on by default
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tier (`-m "not slow"`) leaves out whole folders that start real services and peers.

    Items are ordered by file: `LONG_RUNNING_FILES` first, longest first, then the other files by
    number of tests, most first (xdist's own order), each file's tests in their own order.
    """
    for item in items:
        if {"e2e", "reliability"} & set(item.path.parts):
            item.add_marker(pytest.mark.slow)
    root = config.rootpath
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(
            item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else str(item.path), []
        ).append(item)
    long_rank = {name: rank for rank, name in enumerate(LONG_RUNNING_FILES)}
    order = sorted(by_file, key=lambda name: (long_rank.get(name, len(long_rank)), -len(by_file[name])))
    items[:] = [item for name in order for item in by_file[name]]
