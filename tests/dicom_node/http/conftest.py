"""Fixtures for the operations view: a running node with HTTP on a free loopback port, users, a done job.

Requests are plain urllib (a real HTTP client over a real socket); headless
Chromium is found here or the test skips with the reason (CI installs it).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_node.http.auth import hash_secret
from dicom_node.logging_setup import configure_logging
from dicom_node.peers import ReceivingNode, free_port, send_series
from dicom_node.service import NodeService
from dicom_node.settings import LoggingSettings, load_settings
from storage.jobs import list_jobs
from storage.models import JobState
from tests.dicom_node.conftest import EXAMPLE_CONFIG, wait_for

# Cheap scrypt parameters: tests verify many credentials; production hashes use the defaults.
PASSWORDS = {"alice": ("physicist", "alice-secret-1"), "victor": ("viewer", "victor-secret-1")}
TOKEN = "test-token-for-prometheus-0123456789"


def _users_toml() -> str:
    entries = [
        f'{{name = "{name}", role = "{role}", password_hash = "{hash_secret(password, n=2**10)}"}}'
        for name, (role, password) in PASSWORDS.items()
    ]
    return "[" + ", ".join(entries) + "]"


def http_env(host: str = "127.0.0.1") -> dict[str, str]:
    """Overrides that enable HTTP with two users (alice: physicist, victor: viewer) and one viewer token."""
    token = f'[{{name = "prometheus", role = "viewer", token_hash = "{hash_secret(TOKEN, n=2**10)}"}}]'
    return {
        "DICOM_NODE__HTTP__ENABLED": "true",
        "DICOM_NODE__HTTP__HOST": host,
        "DICOM_NODE__HTTP__PORT": "0",
        "DICOM_NODE__HTTP__USERS": _users_toml(),
        "DICOM_NODE__HTTP__TOKENS": token,
    }


def basic(name: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{PASSWORDS[name][1]}".encode()).decode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


def request(
    url: str, *, method: str = "GET", auth: str | None = None, data: bytes | None = None, headers: dict | None = None
) -> Reply:
    """One real HTTP request; error statuses are returned, not raised. Redirects are not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    all_headers = dict(headers or {})
    if auth:
        all_headers["Authorization"] = auth
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, data=data, method=method, headers=all_headers), timeout=60) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def node_url(service: NodeService) -> str:
    return service.http.url.rstrip("/")


@pytest.fixture
def http_node(start_node) -> NodeService:
    """A started node (no workers) serving HTTP on loopback with the test users."""
    return start_node(**http_env())


@dataclass
class DoneJob:
    service: NodeService
    job_id: int
    tps: ReceivingNode
    files: list[Path]


@pytest.fixture(scope="module")
def done_job(small_axial_series, tmp_path_factory) -> Iterator[DoneJob]:
    """A node with one worker that received a two-lesion phantom, ran the demo model and delivered to a TPS stand-in.

    Module-scoped: one inference run serves every test of a module (the tests only read it).
    """
    configure_logging(LoggingSettings(format="json", level="WARNING"))
    tmp_path = tmp_path_factory.mktemp("done-job")
    tps = ReceivingNode(tmp_path / "tps", free_port())
    env = {
        "DICOM_NODE__STORAGE__DATA_DIR": str(tmp_path / "var"),
        "DICOM_NODE__NODE__PORT": "0",
        "DICOM_NODE__NODE__MIN_FREE_DISK_MB": "1",
        "DICOM_NODE__SERIES__QUIET_PERIOD_S": "3",  # storescu sends in batches: no early completion
        "DICOM_NODE__SERIES__CHECK_INTERVAL_S": "0.2",
        "DICOM_NODE__WORKER__COUNT": "1",
        "DICOM_NODE__DESTINATIONS__0__PORT": str(tps.port),
        "DICOM_NODE__EXPORT__RETRY_INITIAL_S": "0.5",
        **http_env(),
    }
    service = NodeService(load_settings(EXAMPLE_CONFIG, env=env))
    try:
        service.start()
        send_series(small_axial_series.files, service.address[1], calling_ae="MR_SCANNER")
        (job,) = wait_for(
            lambda: [j for j in list_jobs(service.db) if j.state in (JobState.DONE, JobState.FAILED)], timeout=300
        )
        assert job.state == JobState.DONE, job.reason
        yield DoneJob(service, job.id, tps, small_axial_series.files)
    finally:
        service.stop()
        tps.stop()


def chromium() -> str:
    """The headless browser, or skip (Debian package `chromium`; scripts/setup.sh and CI install it)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed (Debian package chromium; scripts/setup.sh installs it)")


@pytest.fixture
def browser(tmp_path) -> Callable[..., str]:
    """`browse(url, screenshot=None) -> DOM`: real headless Chromium; optionally a PNG of the page."""
    binary = chromium()

    def browse(url: str, screenshot: Path | None = None) -> str:
        base = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
        ]
        if screenshot is not None:
            run = subprocess.run(
                [*base, f"--screenshot={screenshot}", "--window-size=1280,2400", url],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert screenshot.is_file(), run.stderr[-2000:]
        run = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    return browse
