"""Receiving a large instance does not hold it in memory (issue #13 item 4, issue #18).

The node runs as its own process (`dicom-node serve`) so its peak RSS (VmHWM) is its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.peers import free_port
from tests.helpers.node_processes import NodeProcess, clean_env
from tests.reliability.conftest import echo_ok, require_tool, wait_for

MiB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_receiving_200_mib_raises_peak_rss_by_at_most_50_mib(tmp_path):
    big = tmp_path / "big.dcm"
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 10240
    ds.PixelData = np.zeros((10240, 10240), dtype=np.uint16).tobytes()  # 200 MiB
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(big)
    del ds
    small = Path(get_testdata_file("MR_small.dcm"))

    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text("")  # built-in defaults, overridden below
    env = clean_env(
        DICOM_NODE__NODE__PORT=str(port),
        DICOM_NODE__STORAGE__DATA_DIR=str(tmp_path / "var"),
        DICOM_NODE__NODE__MIN_FREE_DISK_MB="1",
        DICOM_NODE__WORKER__COUNT="0",
        DICOM_NODE__LOGGING__FORMAT="json",
    )
    node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log", env)
    try:
        wait_for(lambda: node.alive() and echo_ok(port), timeout=60)
        assert storescu(port, small).returncode == 0  # warm: every code path of a store has run once
        before = peak_rss_mib(node.pid)
        result = storescu(port, big)
        assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stdout + result.stderr
        after = peak_rss_mib(node.pid)
        print(
            f"\npeak RSS of the node: {before:.0f} MiB before, {after:.0f} MiB after a 200 MiB instance "
            f"(+{after - before:.0f} MiB)"
        )
        assert after - before <= 50
        [stored] = [p for p in (tmp_path / "var" / "instances").rglob("*.dcm") if p.stat().st_size > 100 * MiB]
        assert stored.stat().st_size >= 200 * MiB
        assert not list((tmp_path / "var" / "tmp").iterdir())
    finally:
        node.stop()
