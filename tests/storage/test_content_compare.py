"""Content comparison of two encodings of one instance (storage/content_compare.py), on pydicom's real files."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from storage.content_compare import compare_files

BASE = "MR_small.dcm"  # Explicit VR Little Endian; the files below hold the same instance in other syntaxes


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    return Path(path)


@pytest.mark.parametrize(
    "other",
    [
        "MR_small_implicit.dcm",  # Implicit VR LE
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    ],
)
def test_the_same_instance_in_another_transfer_syntax_is_the_same_content(other: str) -> None:
    base, resent = pydicom_file(BASE), pydicom_file(other)
    assert base.read_bytes() != resent.read_bytes()
    assert pydicom.dcmread(base).file_meta.TransferSyntaxUID != pydicom.dcmread(resent).file_meta.TransferSyntaxUID
    diff = compare_files(base, resent)
    assert diff.same_content, diff.describe()
    assert diff.material == []


def test_other_file_meta_alone_is_the_same_content(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file(BASE))
    ds.file_meta.ImplementationVersionName = "OTHER_PACS_1"
    ds.file_meta.SourceApplicationEntityTitle = "PACS2"
    ds.save_as(tmp_path / "meta.dcm")
    assert compare_files(pydicom_file(BASE), tmp_path / "meta.dcm").same_content


def test_a_correction_is_reported_by_keyword_without_patient_values(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file(BASE))
    original_name = str(ds.PatientName)
    ds.PatientName = "Corrected^Name"
    ds.PatientID = "NEW-ID-77"
    ds.ImagePositionPatient = [1.5, 2, 3]
    pixels = ds.pixel_array.copy()
    pixels[10, 10] += 1
    ds.PixelData = pixels.tobytes()
    ds.add_new(0x00291010, "LO", "vendor note")
    ds.save_as(tmp_path / "corrected.dcm")

    diff = compare_files(pydicom_file(BASE), tmp_path / "corrected.dcm")
    assert diff.keywords == ["(0029,1010)", "ImagePositionPatient", "PatientID", "PatientName", "PixelData"]
    assert diff.material == diff.keywords  # a private element too: routing may read it
    text = diff.describe()
    assert "ImagePositionPatient " in text and "-> 1.5\\2.0\\3.0" in text  # geometry values are shown
    assert "PixelData (decoded values differ)" in text
    for secret in ("Corrected", "NEW-ID-77", original_name, str(pydicom.dcmread(pydicom_file(BASE)).PatientID)):
        assert secret not in text


def test_a_pixel_change_in_a_compressed_resend_is_found(tmp_path: Path) -> None:
    """The decoded values are compared: an RLE re-send with one pixel changed is a conflict."""
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(pydicom_file(BASE))
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 7
    ds.compress(RLELossless, pixels, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle.dcm")
    diff = compare_files(pydicom_file(BASE), tmp_path / "rle.dcm")
    assert diff.keywords == ["PixelData"] and diff.material == ["PixelData"]


def test_only_when_and_by_whom_the_encoding_was_made_is_not_material(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file(BASE))
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20261201", "101010"
    ds.InstanceCreatorUID = "1.2.3.4"
    ds.save_as(tmp_path / "recreated.dcm")
    diff = compare_files(pydicom_file(BASE), tmp_path / "recreated.dcm")
    assert set(diff.keywords) == {"InstanceCreationDate", "InstanceCreationTime", "InstanceCreatorUID"}
    assert diff.material == []


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("BodyPartExamined", "PELVIS"),
        ("StationName", "OTHER"),
        ("PositionReferenceIndicator", "XX"),
        ("InstanceNumber", "99"),
        ("InstitutionName", "Other Hospital"),
        ("WindowCenter", 123),
    ],
)
def test_every_other_change_is_material(tmp_path: Path, keyword: str, value: object) -> None:
    """The reviewer's case: elements no fixed list named (routing rules may read any attribute)."""
    ds = pydicom.dcmread(pydicom_file(BASE))
    setattr(ds, keyword, value)
    ds.save_as(tmp_path / "x.dcm")
    diff = compare_files(pydicom_file(BASE), tmp_path / "x.dcm")
    assert diff.keywords == diff.material == [keyword]


def test_pixel_data_that_cannot_be_decoded_counts_as_a_material_change(tmp_path: Path) -> None:
    """A truncated re-send cannot be shown to be the same image: a conflict, both versions kept."""
    (tmp_path / "truncated.dcm").write_bytes(pydicom_file(BASE).read_bytes()[:-3000])
    diff = compare_files(pydicom_file(BASE), tmp_path / "truncated.dcm")
    assert diff.describe().startswith("PixelData (could not be compared")
    assert diff.material == ["PixelData"]


def test_an_unreadable_version_counts_as_a_material_change(tmp_path: Path) -> None:
    diff = compare_files(pydicom_file(BASE), tmp_path / "vanished.dcm")
    assert not diff.same_content and diff.unreadable and diff.material == ["data set"]
