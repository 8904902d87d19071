"""`dicom-node worker` refuses a device it cannot use with one line, before touching the job store."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dicom_node.cli import app


def worker(tmp_path, *args: str):
    env = {"DICOM_NODE__STORAGE__DATA_DIR": str(tmp_path / "var"), "DICOM_NODE_CONFIG": ""}
    return CliRunner().invoke(app, ["worker", *args], env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "--device 'gpu' must be auto, cpu, cuda or cuda:N"),
        (["--device", "cpu", "--count", "2"], "give --count or --device, not both"),
        (
            ["--device", f"cuda:{torch.cuda.device_count()}"],
            f'--device = "cuda:{torch.cuda.device_count()}": no such CUDA device on this host',
        ),
    ],
    ids=["not-a-device", "count-and-device", "missing-gpu"],
)
def test_a_device_the_worker_cannot_use_is_one_clear_line(tmp_path, args, message):
    result = worker(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "var").exists(), "the job store was opened before the device was checked"
