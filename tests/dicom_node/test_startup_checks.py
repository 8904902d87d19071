"""`serve` and `worker` refuse to start, with one line naming what to fix and a non-zero exit, when a
routing rule's model package does not verify, the configured device does not exist on this host, or
the job store cannot be reached (its URL shown with the password masked). Run as an operator runs
them: the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dicom_node.peers import free_port
from inference.model.package import MANIFEST_NAME
from tests.helpers.models import make_tiny_package

pytestmark = pytest.mark.slow

COMMANDS = [["serve"], ["worker"]]
IDS = ["serve", "worker"]


def config(tmp_path: Path, *, device: str = "cpu", model: str = "default", extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {free_port()}

[storage]
data_dir = "{tmp_path / "var"}"
{extra}

[worker]
count = 1
device = "{device}"

[[rules]]
name = "brain-mr"
model = "{model}"
[rules.match]
Modality = "MR"
"""
    )
    return path


def run(command: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *command, "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal, as one line (Rich may wrap it); no traceback anywhere."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    return " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def corrupt_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny package whose weights no longer match the sha256 in its manifest (one byte changed)."""
    folder = make_tiny_package(tmp_path_factory.mktemp("corrupt-model"))
    weights = folder / json.loads((folder / MANIFEST_NAME).read_text())["weights_file"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_cuda_device_this_host_lacks_is_refused_naming_the_setting(tmp_path: Path, command: list[str]) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: "cuda:0" on a host without any
    line = one_line(run(command, config(tmp_path, device=missing)))
    assert f'cannot start: [worker] device = "{missing}": no such CUDA device on this host' in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: plain `cuda` exists")
def test_plain_cuda_on_a_host_without_a_gpu_is_refused(tmp_path: Path) -> None:
    line = one_line(run(["serve"], config(tmp_path, device="cuda")))
    assert '[worker] device = "cuda": no such CUDA device on this host (0 found)' in line


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_model_package_that_does_not_verify_is_refused_naming_the_rule(
    tmp_path: Path, corrupt_model: Path, command: list[str]
) -> None:
    line = one_line(run(command, config(tmp_path, model=str(corrupt_model))))
    assert f'cannot start: rule "brain-mr" (model = "{corrupt_model}"): model package {corrupt_model}' in line
    assert "sha256 mismatch" in line


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_an_unreachable_job_store_is_one_line_with_the_password_masked(tmp_path: Path, command: list[str]) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://dicom_node:s3cr3t-pw@127.0.0.1:{port}/dicom_node"
    result = run(command, config(tmp_path, extra=f'database_url = "{url}"'))
    line = one_line(result)
    assert f"cannot reach the job store postgresql+psycopg://dicom_node:***@127.0.0.1:{port}/dicom_node:" in line
    assert "refused" in line.lower()
    assert "s3cr3t-pw" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_model_package_with_a_malformed_manifest_is_one_line_not_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    folder = make_tiny_package(tmp_path / "odd-model")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["thresholds"] = [0.5]  # a list where the loader expects a table
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    line = one_line(run(command, config(tmp_path, model=str(folder))))
    assert f'cannot start: rule "brain-mr" (model = "{folder}")' in line, line
