"""`dicom-node train` and `dicom-node evaluate`: argument handling of the thin CLI layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dicom_node.cli import app


def test_train_needs_exactly_one_data_source(tmp_path: Path) -> None:
    runner = CliRunner()
    neither = runner.invoke(app, ["train", "--out", str(tmp_path / "pkg")])
    both = runner.invoke(app, ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", "--data", str(tmp_path)])
    for result in (neither, both):
        assert result.exit_code != 0
        assert "exactly one of --phantoms N or --data DIR" in result.output
    assert not (tmp_path / "pkg").exists()


def test_train_help_documents_the_data_layout() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "labels.csv" in result.output and "rtstruct.dcm" in result.output


def test_a_warm_start_needs_the_same_architecture(tmp_path: Path) -> None:
    from inference.model.package import DEMO_PACKAGE_DIR

    args = ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", "--init-from", str(DEMO_PACKAGE_DIR)]
    result = CliRunner().invoke(app, args, terminal_width=200)  # the demo has width 8, the default is 32
    printed = " ".join(result.output.replace("│", " ").split())  # Rich boxes and wraps the message
    assert result.exit_code == 2 and "its architecture" in printed
    assert not (tmp_path / "pkg").exists()


def test_evaluate_reports_a_missing_package(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "nowhere"), "--phantoms", "1"])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception) + result.output


def test_train_rejects_bad_settings_before_preparing_any_data(tmp_path: Path) -> None:
    runner = CliRunner()
    for option, message in (
        (["--crop-size", "384"], "smaller than input_size"),
        (["--crop-size", "100"], "multiple of 16"),
        (["--ema-decay", "1.5"], "ema_decay"),
        (["--crop-dice", "per-slice"], "crop_dice"),
        (["--phantom-lesions", "three"], "LOW-HIGH"),
        (["--phantom-lesions", "3-"], "LOW-HIGH"),
        (["--crop-dice", "per-crop"], "needs crop steps"),
        (["--phantom-lesions", "5-2"], "1 <= LOW <= HIGH"),
    ):
        result = runner.invoke(
            app, ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", *option], terminal_width=200
        )
        assert result.exit_code == 2, result.output  # a usage error, not a traceback
        assert message in result.output
    assert not (tmp_path / "pkg").exists()


def test_phantom_lesions_only_with_phantoms(tmp_path: Path) -> None:
    args = ["train", "--out", str(tmp_path / "pkg"), "--data", str(tmp_path), "--phantom-lesions", "3-6"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and "only applies to --phantoms" in result.output


def test_evaluate_rejects_bad_sweep_values_before_any_work(tmp_path: Path) -> None:
    runner = CliRunner()
    model = ["--model", str(tmp_path / "nowhere")]  # never opened: the options are checked first
    for option, message in (
        (["--sweep", "0.3,high"], "comma-separated numbers"),
        (["--sweep-min-volumes", "10"], "needs --sweep"),
        (["--styles", "own"], "styles must be some of"),
    ):
        result = runner.invoke(app, ["evaluate", *model, *option], terminal_width=200)
        assert result.exit_code == 2, result.output
        assert message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_on_a_missing_gpu_is_a_usage_error(tmp_path: Path) -> None:
    args = ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", "--device", "cuda"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "no such CUDA device" in result.output
    assert not (tmp_path / "pkg").exists()
