"""`dicom-node train` and `dicom-node evaluate`: argument handling of the thin CLI layer."""

from __future__ import annotations

from pathlib import Path

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


def test_evaluate_reports_a_missing_package(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "nowhere"), "--phantoms", "1"])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception) + result.output


def test_train_rejects_bad_settings_before_preparing_any_data(tmp_path: Path) -> None:
    runner = CliRunner()
    for option, message in ((["--crop-size", "384"], "smaller than input_size"),
                            (["--crop-size", "100"], "multiple of 16"),
                            (["--ema-decay", "1.5"], "ema_decay"),
                            (["--crop-dice", "per-slice"], "crop_dice")):
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "pkg"), "--phantoms", "2", *option],
                               terminal_width=200)
        assert result.exit_code == 2, result.output  # a usage error, not a traceback
        assert message in result.output
    assert not (tmp_path / "pkg").exists()
