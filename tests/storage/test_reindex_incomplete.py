"""`storage.reindex.incomplete`: an instance file cut short (a power cut before its data was flushed) is
recognised, on pydicom's bundled MR files with native, RLE and JPEG 2000 Pixel Data, whole and cut."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from storage.reindex import incomplete

FILES = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
PIXEL_DATA = 0x7FE00010


def bundled(name: str) -> bytes:
    return Path(str(get_testdata_file(name))).read_bytes()


def cut(tmp_path: Path, data: bytes, at: int) -> Path:
    path = tmp_path / f"cut-{at}.dcm"
    path.write_bytes(data[:at])
    return path


def pixel_data_span(data: bytes, tmp_path: Path) -> tuple[int, int]:
    """Where the Pixel Data element starts (its tag) and where its value ends, in the whole file."""
    path = cut(tmp_path, data, len(data))
    ds = pydicom.dcmread(path)
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    start = element.value_tell - 12  # explicit VR OB/OW: tag, VR, reserved, 4-byte length
    if element.length != 0xFFFFFFFF:
        return start, element.value_tell + element.length
    padding = ds.get_item(0xFFFCFFFC, keep_deferred=True)  # the trailing padding after the delimiter
    return start, padding.value_tell - 12 - 8


@pytest.mark.parametrize("name", FILES)
def test_a_whole_file_is_complete(name: str, tmp_path: Path) -> None:
    assert incomplete(cut(tmp_path, bundled(name), len(bundled(name)))) is None


@pytest.mark.parametrize("name", FILES)
def test_a_file_cut_short_is_refused_where_pydicom_reads_it(name: str, tmp_path: Path) -> None:
    data = bundled(name)
    start, end = pixel_data_span(data, tmp_path)
    points = {
        "inside a header element's value": 402,
        "at the element boundary before Pixel Data": start,
        "inside the Pixel Data element header": start + 6,
        "just into the Pixel Data value": start + 20,
        "half of the Pixel Data": (start + end) // 2,
        "one byte before the Pixel Data's end": end - 1,
    }
    for where, at in points.items():
        path = cut(tmp_path, data, at)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(path)  # pydicom reads each of these cut files without an error
        reason = incomplete(path)
        assert reason is not None, f"{name} cut {where} (at {at} of {len(data)} bytes) was taken as whole"


@pytest.mark.parametrize("name", FILES)
def test_every_cut_that_loses_a_value_is_refused_or_unreadable(name: str, tmp_path: Path) -> None:
    """A sweep over the whole file: only cuts after the Pixel Data's value (in its delimiter's length
    or the trailing padding) keep every value, and only they may pass."""
    data = bundled(name)
    _, end = pixel_data_span(data, tmp_path)
    passed = []
    for at in range(132, len(data), 37):
        path = cut(tmp_path, data, at)
        try:
            reason = incomplete(path)
        except Exception:  # cannot be read at all: reindex reports it as unreadable
            continue
        if reason is None:
            passed.append(at)
    assert all(at >= end for at in passed), f"cut files taken as whole: {passed} (Pixel Data ends at {end})"


def test_native_pixel_data_shorter_than_its_rows_and_columns_is_refused(tmp_path: Path) -> None:
    """A file whose Pixel Data element declares fewer bytes than the image needs (all of them present)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path = tmp_path / "short-pixels.dcm"
    ds.save_as(path)
    assert "Pixel Data has 4096 bytes" in str(incomplete(path))


def test_whole_files_a_reviewer_found_refused_are_not(tmp_path) -> None:
    """Out-of-order elements, a malformed Number of Frames, YBR_FULL_422, a deflated file, a file
    cut inside its trailing padding: each has every value, so reindex must not set it aside."""
    import pydicom
    from pydicom.data import get_testdata_file

    from storage.reindex import incomplete

    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    raw = bytearray(open(get_testdata_file("MR_small.dcm"), "rb").read())  # noqa: SIM115
    late = tmp_path / "late_private.dcm"  # (0009,0010) LO appended after Pixel Data
    late.write_bytes(bytes(raw) + b"\x09\x00\x10\x00LO\x04\x00ACME")
    frames = tmp_path / "frames.dcm"
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    mr[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)  # as a faulty writer would
    mr.save_as(frames)
    padded = tmp_path / "padded.dcm"
    whole = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    whole.DataSetTrailingPadding = b"\0" * 64
    whole.save_as(padded)
    padded.write_bytes(padded.read_bytes()[:-6])  # cut inside the padding
    for path in [
        late,
        frames,
        padded,
        Path(get_testdata_file("SC_ybr_full_422_uncompressed.dcm")),
        Path(get_testdata_file("image_dfl.dcm")),
    ]:
        assert incomplete(path) is None, (path.name, incomplete(path))
