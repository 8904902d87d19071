"""`dicom-node demo --keep-running`: prints the dashboard URL, serves the job until Ctrl-C, then stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dicom_node.http.conftest import request


@pytest.mark.slow
def test_demo_keeps_running_with_its_dashboard_until_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "demo", "--out", str(tmp_path / "demo"), "--matrix", "96"]
        + ["--slices", "20", "--keep-running"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 600
        while "Ctrl-C stops it" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert "Ctrl-C stops it" in text, text[-3000:]
        url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", text).group(1)
        job_url = re.search(r"open (http://\S+/jobs/\d+)", text).group(1)
        assert job_url.startswith(url)
        page = request(job_url)
        assert page.status == 200 and "done" in page.text and "Lesions" in page.text
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0  # stop() bounds: exporter 10 s, each worker 60 s, HTTP; slower under load
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):  # the dashboard stopped with the node
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
