"""`dicom-node route DICOM_DIR`: dry run of the routing rules on a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_node.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "node.example.toml"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three MR instances of one series (in a sub-folder), one CT, one non-DICOM file."""
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    (tmp_path / "mr").mkdir()
    for index in range(3):
        mr.SOPInstanceUID = generate_uid()
        mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
        mr.save_as(tmp_path / "mr" / f"{index}.dcm")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.save_as(tmp_path / "ct.dcm")
    (tmp_path / "README.txt").write_text("not DICOM")
    return tmp_path


def route(*args: str):
    return CliRunner().invoke(app, ["route", *args])


def test_text_report(folder: Path) -> None:
    result = route(str(folder), "--config", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert "-> rule brain-mr: model default, send to tps" in result.output
    assert "3 instance(s)" in result.output
    assert "-> rejected: no rule matched" in result.output
    assert "rule brain-mr: Modality 'CT' does not match ^(?:MR)$" in result.output
    assert "skipped" in result.output and "README.txt" in result.output


def test_json_report(folder: Path) -> None:
    result = route(str(folder), "--config", str(EXAMPLE), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    by_modality = {item["modality"]: item for item in report["series"]}
    mr, ct = by_modality["MR"], by_modality["CT"]
    assert (mr["matched"], mr["rule"], mr["model"], mr["destinations"], mr["instances"]) == (
        True,
        "brain-mr",
        "default",
        ["tps"],
        3,
    )
    assert mr["rules"] == [{"name": "brain-mr", "matched": True, "detail": "Modality 'MR' matches ^(?:MR)$"}]
    assert ct["matched"] is False and ct["rule"] is None
    assert ct["reason"] == "no rule matched: rule brain-mr: Modality 'CT' does not match ^(?:MR)$"
    assert {"series_uid", "study_uid", "series_description", "reason"} <= set(ct)
    assert [Path(s["path"]).name for s in report["skipped"]] == ["README.txt"]


def test_without_rules_everything_is_rejected(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    report = json.loads(route(str(folder), "--json").output)
    assert {item["reason"] for item in report["series"]} == {"no rule matched: no routing rules are configured"}


def test_errors_exit_2(tmp_path: Path) -> None:
    result = route(str(tmp_path / "absent"))
    assert result.exit_code == 2 and "not a directory" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "broken"\nmatch = { Modality = "[" }\n')
    result = route(str(tmp_path), "--config", str(bad))
    assert result.exit_code == 2 and "broken" in result.output and "Traceback" not in result.output
