"""load_series: exact geometry for every orientation, and one test per rejection reason."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless

from inference.errors import SeriesError
from inference.imaging.volume_loader import MIN_SLICES, load_series
from inference.synthetic.phantoms import write_phantom_series
from inference.uids import new_uid


def edit(path: Path, **changes) -> None:
    """Rewrite one file with data elements changed (None deletes)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=False)


def reason(files: list[Path]) -> str:
    with pytest.raises(SeriesError) as info:
        load_series(files)
    return str(info.value)


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_geometry_and_pixels_are_exact_in_any_file_order(phantom_series, orientation):
    series = phantom_series(21, orientation=orientation, matrix=64, slices=12, n_lesions=1)
    shuffled = list(series.files)
    random.Random(0).shuffle(shuffled)
    loaded = load_series(shuffled)
    truth = series.phantom.image
    assert loaded.image.GetSize() == truth.GetSize()
    np.testing.assert_allclose(loaded.image.GetOrigin(), truth.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(loaded.image.GetSpacing(), truth.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(loaded.image.GetDirection(), truth.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image), np.round(sitk.GetArrayViewFromImage(truth)))
    assert loaded.files == series.files  # slice order, whatever the input order
    assert all("PixelData" not in ds for ds in loaded.datasets)
    assert [int(ds.InstanceNumber) for ds in loaded.datasets] == list(range(1, 13))


def test_geometry_agrees_with_simpleitk_gdcm_reader(phantom_series):
    series = phantom_series(22, orientation="oblique", matrix=64, slices=12, n_lesions=1)
    loaded = load_series(series.files)
    gdcm = sitk.ReadImage([str(f) for f in series.files])
    np.testing.assert_allclose(loaded.image.GetOrigin(), gdcm.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(loaded.image.GetSpacing(), gdcm.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(loaded.image.GetDirection(), gdcm.GetDirection(), atol=1e-5)


def test_slices_written_head_to_feet_are_sorted_along_the_normal(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    n = len(files)
    for k, path in enumerate(files):  # mirror the stack: slice k takes slice n-1-k's position
        ds = pydicom.dcmread(small_axial_series.files[n - 1 - k], stop_before_pixels=True)
        edit(path, ImagePositionPatient=ds.ImagePositionPatient)
    loaded = load_series(files)
    assert loaded.files == files[::-1]
    np.testing.assert_allclose(loaded.image.GetOrigin(), small_axial_series.phantom.image.GetOrigin(), atol=1e-4)


def test_rescale_slope_and_intercept_are_applied_per_slice(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[3], RescaleSlope="2", RescaleIntercept="-10")
    loaded = load_series(files)
    raw = pydicom.dcmread(files[3]).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image)[3], raw * 2 - 10)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded.image)[4], pydicom.dcmread(files[4]).pixel_array)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_series_decode_to_the_same_volume(small_axial_series, tmp_path, syntax):
    files = write_phantom_series(small_axial_series.phantom, tmp_path, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(load_series(files).image),
        sitk.GetArrayFromImage(load_series(small_axial_series.files).image),
    )


# --- rejections, each with its reason ---------------------------------------------------


def test_empty_list(tmp_path):
    assert "no files" in reason([])


def test_not_a_dicom_file(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    files[2].write_text("patient notes, not an image")
    assert reason(files).startswith(f"{files[2].name}: not a DICOM file")


def test_truncated_file_is_unreadable(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    data = files[2].read_bytes()
    sop_class = b"1.2.840.10008.5.1.4.1.1.4"
    in_data_set = data.index(sop_class, data.index(sop_class) + 1)  # the first one is in the file meta
    files[2].write_bytes(data[: in_data_set + 12])  # cut inside the SOP Class UID value
    text = reason(files)
    assert text.startswith(f"{files[2].name}: no pixel data (SOP Class 1.2.840.1000: not an image, or a truncated")


def test_no_pixel_data(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[5], PixelData=None)
    assert reason(files) == (
        f"{files[5].name}: no pixel data (MR Image Storage without pixel data: a truncated or header-only file)"
    )


def test_a_non_image_object_in_the_series(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[5], PixelData=None, SOPClassUID="1.2.840.10008.5.1.4.1.1.481.3")
    assert reason(files) == f"{files[5].name}: no pixel data (RT Structure Set Storage is not an image)"


def test_pixel_data_shorter_than_rows_times_columns(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    ds = pydicom.dcmread(files[4])
    edit(files[4], PixelData=ds.PixelData[: len(ds.PixelData) // 2])
    text = reason(files)
    assert text.startswith(f"{files[4].name}: pixel data is") and "shorter than Rows x Columns" in text


def test_undecodable_transfer_syntax_is_named(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    ds = pydicom.dcmread(files[1])
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # an MPEG-2 sequence header, nothing decodable
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(files[1], enforce_file_format=True)
    text = reason(files)
    assert text.startswith(f"{files[1].name}: pixel data in MPEG2 Main Profile / Main Level")
    assert "cannot be decoded" in text


def test_missing_geometry(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[0], ImagePositionPatient=None)
    assert reason(files) == f"{files[0].name}: not a usable image, missing geometry: ImagePositionPatient"


def test_two_series(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[6], SeriesInstanceUID=new_uid())
    text = reason(files)
    assert text.startswith("files from 2 series") and "(19 files)" in text and "(1 files)" in text


def test_mixed_orientations(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[6], ImageOrientationPatient=["1", "0", "0", "0", "0.99619470", "-0.08715574"])
    text = reason(files)
    assert text.startswith("mixed orientations") and files[6].name in text


def test_mixed_sizes(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    ds = pydicom.dcmread(files[6])
    cropped = ds.pixel_array[:80, :]
    edit(files[6], Rows=80, PixelData=cropped.tobytes())
    assert reason(files) == "mixed image sizes (Rows x Columns): 96x96 (19 files), 80x96 (1 files)"


def test_mixed_pixel_spacings(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[6], PixelSpacing=["1.0", "1.0"])
    text = reason(files)
    assert text.startswith("mixed pixel spacings") and files[6].name in text


def test_duplicated_slice_position(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    duplicate = files[0].parent / "IM_dup.dcm"
    duplicate.write_bytes(files[9].read_bytes())
    edit(duplicate, SOPInstanceUID=new_uid())
    text = reason(files + [duplicate])
    assert text.startswith("duplicated slice position") and "IM_dup.dcm" in text
    assert (
        "21 files at 20 positions" in text
        and "the same image twice under two SOP Instance UIDs: one slice sent twice?" in text
    )


def test_two_acquisitions_in_one_series_are_named_as_such(small_axial_series, copy_series):
    """Every position twice, the second set with AcquisitionNumber 2: the reason says what differs."""
    files = copy_series(small_axial_series.files)
    second = []
    for path in files:
        copy = path.parent / f"second_{path.name}"
        copy.write_bytes(path.read_bytes())
        edit(copy, SOPInstanceUID=new_uid(), AcquisitionNumber=2)
        edit(path, AcquisitionNumber=1)
        second.append(copy)
    text = reason(files + second)
    assert "40 files at 20 positions" in text
    assert "differ in AcquisitionNumber 1 and 2: several acquisitions in one series?" in text


def test_two_different_images_at_one_position_are_not_called_a_re_send(small_axial_series, copy_series):
    """An outside review: different pixels, no attribute telling them apart (e.g. b-values kept in a
    private tag), were reported as "one slice sent twice"; and TriggerTime "0" equals "0.0"."""
    files = copy_series(small_axial_series.files)
    other = files[0].parent / "IM_other.dcm"
    ds = pydicom.dcmread(files[9])
    ds.SOPInstanceUID = new_uid()
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.TriggerTime = "0.0"
    ds.save_as(other, enforce_file_format=False)
    edit(files[9], TriggerTime="0")
    text = reason(files + [other])
    assert text.endswith("(two different images, told apart by no acquisition attribute)"), text


def test_duplicated_instance(small_axial_series):
    files = list(small_axial_series.files)
    assert reason(files + [files[3]]).startswith("duplicated SOP Instance UID")


def test_missing_slice_is_a_gap(small_axial_series):
    files = list(small_axial_series.files)
    del files[8]
    text = reason(files)
    assert text.startswith("missing slice(s): gap of 8.000 mm between IM_0008.dcm and IM_0010.dcm")
    assert "4.000 mm apart; about 1 slice(s) missing" in text


def test_non_uniform_spacing(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    position = [float(v) for v in pydicom.dcmread(files[10]).ImagePositionPatient]
    edit(files[10], ImagePositionPatient=[position[0], position[1], position[2] + 0.5])
    text = reason(files)
    assert text.startswith("non-uniform slice spacing") and "IM_0011.dcm is 0.5" in text


def test_small_jitter_within_tolerance_is_accepted(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    position = [float(v) for v in pydicom.dcmread(files[10]).ImagePositionPatient]
    edit(files[10], ImagePositionPatient=[position[0], position[1], position[2] + 0.03])
    assert load_series(files).image.GetSize()[2] == len(files)


def test_sheared_stack(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    for k, path in enumerate(files):  # a gantry-tilt-like shear: y shifts with the slice
        position = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
        edit(path, ImagePositionPatient=[position[0], position[1] + 0.5 * k, position[2]])
    assert reason(files).startswith("slices are not stacked along their normal")


def test_too_few_slices(small_axial_series):
    files = small_axial_series.files[: MIN_SLICES - 1]
    assert reason(files).startswith(f"only {MIN_SLICES - 1} slice(s); at least {MIN_SLICES} are needed")


def test_pydicom_bundled_single_mr_file_is_too_few_slices():
    path = Path(get_testdata_file("MR_small.dcm"))
    assert reason([path]).startswith("only 1 slice(s)")


def test_multi_frame_is_refused_with_a_reason(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[0], NumberOfFrames=2, SOPClassUID="1.2.840.10008.5.1.4.1.1.4.1")
    text = reason(files)
    assert "multi-frame image (Enhanced MR Image Storage, 2 frames) is not supported" in text


def test_a_monochrome1_series_is_inverted_to_what_monochrome2_shows(small_axial_series, copy_series):
    """MONOCHROME1 shows high values dark. Stored as max - value it displays exactly like the
    original; loaded as is, the model saw an inverted head and delivered "no lesions"."""
    files = copy_series(small_axial_series.files)
    original = sitk.GetArrayFromImage(load_series(small_axial_series.files).image)
    top = int(original.max())
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PixelData = (top - ds.pixel_array.astype(np.int32)).astype(ds.pixel_array.dtype).tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path, enforce_file_format=False)
    loaded = sitk.GetArrayFromImage(load_series(files).image)
    np.testing.assert_allclose(loaded - loaded.min(), original - original.min())


def test_an_image_that_is_not_greyscale_is_refused(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[2], PhotometricInterpretation="PALETTE COLOR")
    assert reason(files) == (
        f"{files[2].name}: PhotometricInterpretation PALETTE COLOR; an MR image is greyscale (MONOCHROME2 or MONOCHROME1)"
    )


@pytest.mark.parametrize(
    ("slope", "why"),
    [("0", "RescaleSlope 0 maps every pixel to one value"), ("NaN", "non-finite RescaleSlope nan")],
)
def test_a_rescale_slope_of_zero_or_nan_is_refused(small_axial_series, copy_series, slope, why):
    """Slope 0 used to be read as 1 (silently another image), NaN ended as "no brain found"."""
    files = copy_series(small_axial_series.files)
    edit(files[4], RescaleSlope=slope)
    assert reason(files) == f"{files[4].name}: {why}" + ("; no image left" if slope == "0" else " (NaN or infinity)")


# --- intensities a header got wrong (an outside tester's series) --------------------------------------


@pytest.mark.parametrize("factor", [100.0, 0.01])
def test_a_rescale_slope_that_breaks_agreeing_slices_apart_is_refused(small_axial_series, copy_series, factor):
    """One slice's RescaleSlope 100x (or 1/100x) with its stored values unchanged: that slice's lesions
    and brain were 100x brighter than their neighbours' and went to the model."""
    files = copy_series(small_axial_series.files)
    slope = float(pydicom.dcmread(files[9]).get("RescaleSlope", 1))
    edit(files[9], RescaleSlope=f"{slope * factor:g}")
    text = reason(files)
    jump = re.match(
        rf"{files[9].name}: rescaled intensities ([\d.e-]+)x those of {files[8].name} and ([\d.e-]+)x those of "
        rf"{files[10].name}, which agree with each other \(RescaleSlope {slope * factor:g} against {slope:g}",
        text,
    )
    assert jump, text
    assert [float(g) for g in jump.groups()] == pytest.approx([factor, factor], rel=0.3)
    assert text.endswith("a rescale in the header is wrong")


def _reencoded(source: list[Path], out: Path, encode) -> list[Path]:
    """The series' intensities written again: `encode(k, intensities) -> (stored, slope, intercept, signed)`."""
    out.mkdir()
    intensities = sitk.GetArrayFromImage(load_series(source).image).astype(np.float64)
    files = []
    for k, path in enumerate(sorted(source)):
        ds = pydicom.dcmread(path)
        values, slope, intercept, signed = encode(k, intensities)
        ds.PixelRepresentation = int(signed)
        ds.PixelData = np.round(values).astype(np.int16 if signed else np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        files.append(out / path.name)
        ds.save_as(files[-1], enforce_file_format=False)
    return files


def _per_slice_scaled(volume: np.ndarray, k: int) -> tuple[np.ndarray, float, float, bool]:
    """Each slice's slope chosen to fill 0..4095 with that slice (per-slice scaling, as Philips does)."""
    slope = max(float(volume[k].max()), 1.0) / 4095
    return volume[k] / slope, slope, 0.0, False


@pytest.mark.parametrize("edge", ["dark-first-slice", "noise-only-end-slices"])
def test_per_slice_scaling_at_the_edge_of_the_head_is_not_refused(small_axial_series, tmp_path, edge):
    """An outside review: per-slice slopes make stored values agree by construction, and at the edge of
    the head the rescaled values really do differ over 4x between two slices."""
    rng = np.random.default_rng(0)

    def encode(k, volume):
        volume = volume.copy()
        if edge == "dark-first-slice":
            volume[0] *= 0.15  # vertex partial volume
        else:
            sigma = 0.015 * volume.max()
            volume[:2] = np.hypot(*rng.normal(0, sigma, (2, *volume[:2].shape)))  # air: Rician noise only
        return _per_slice_scaled(volume, k)

    load_series(_reencoded(small_axial_series.files, tmp_path / edge, encode))


def test_signed_storage_with_an_offset_intercept_and_padding_is_loaded(small_axial_series, tmp_path):
    """int16 spanning its whole range with an intercept bringing it back to >= 0 (a valid modality LUT),
    and -32768 used as declared padding: nothing negative in the image itself."""

    def encode(k, volume):
        slope = volume.max() / 65535
        values = volume[k] / slope - 32768
        values[:3, :3] = -32768
        return values, slope, 32768 * slope, True

    def pad(path: Path, **changes: str) -> None:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "SS", -32768)  # PixelPaddingValue, signed like the pixels
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=False)

    files = _reencoded(small_axial_series.files, tmp_path / "offset", encode)
    for path in files:
        pad(path)
    load_series(files)
    for path in files:
        pad(path, RescaleIntercept="0")  # without its offset the image itself goes negative: refused
    with pytest.raises(SeriesError, match="wrap the brightest"):
        load_series(files)


def test_a_rescale_that_compensates_its_stored_values_is_loaded(small_axial_series, copy_series):
    """What scanners do (Philips-style per-slice scaling): stored values halved, slope doubled."""
    files = copy_series(small_axial_series.files)
    original = sitk.GetArrayFromImage(load_series(small_axial_series.files).image)
    ds = pydicom.dcmread(files[9])
    slope = float(ds.get("RescaleSlope", 1))
    halved = ds.pixel_array // 2
    ds.PixelData = halved.astype(ds.pixel_array.dtype).tobytes()
    ds.RescaleSlope = f"{slope * 2:g}"
    ds.save_as(files[9], enforce_file_format=False)
    loaded = sitk.GetArrayFromImage(load_series(files).image)
    np.testing.assert_allclose(loaded[9], halved * slope * 2)
    np.testing.assert_array_equal(loaded[8], original[8])


def test_unsigned_values_read_as_signed_are_refused(small_axial_series, copy_series):
    """Stored values up to 60000 (unsigned) declared PixelRepresentation 1: the brightest pixels wrap
    to negative, so enhancing lesions turn dark."""
    files = copy_series(small_axial_series.files)
    top = max(int(pydicom.dcmread(p).pixel_array.max()) for p in files)
    for path in files:
        ds = pydicom.dcmread(path)
        scaled = np.round(ds.pixel_array.astype(np.float64) * 60000 / top).astype(np.uint16)
        ds.PixelData = scaled.tobytes()
        ds.PixelRepresentation = 1
        ds.save_as(path, enforce_file_format=False)
    text = reason(files)
    assert (
        "a magnitude MR image is not negative; stored values above 32767 declared signed (PixelRepresentation 1" in text
    )


def test_a_genuinely_signed_series_with_small_negative_values_is_loaded(small_axial_series, copy_series):
    """Signed storage (as some consoles write) with reconstruction noise a little below zero."""
    files = copy_series(small_axial_series.files)
    for path in files:
        ds = pydicom.dcmread(path)
        values = ds.pixel_array.astype(np.int16)
        values[0, :8] = -3  # a few small negatives at the edge of the field of view
        ds.PixelData = values.tobytes()
        ds.PixelRepresentation = 1
        ds.save_as(path, enforce_file_format=False)
    assert sitk.GetArrayFromImage(load_series(files).image).min() == -3


def _signed_copy(files: list[Path], out: Path, transform) -> list[Path]:
    """Copies with PixelRepresentation 1 and int16 stored values `transform(k, values)`."""
    out.mkdir()
    copies = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.PixelRepresentation = 1
        ds.PixelData = transform(k, ds.pixel_array.astype(np.int32)).astype(np.int16).tobytes()
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=False)
    return copies


def test_one_wrapped_pixel_is_enough_and_declared_padding_is_not_wrapping(small_axial_series, tmp_path):
    """A third review: a wrapped enhancing spot of a few pixels on every slice loaded (10 were needed),
    and padding declared as US 32768 for int16 pixels (meaning -32768) was refused as wrapping."""
    files = sorted(small_axial_series.files)
    top = max(int(pydicom.dcmread(p).pixel_array.max()) for p in files)

    def bright_range(k, values):
        values = values * 30000 // top  # up to the top of the signed range, as wrapped data is
        values[40, 40] = -30000  # one wrapped pixel: a 49536 read as signed
        return values

    with pytest.raises(SeriesError, match=r"1 pixel\(s\) down to -30000"):
        load_series(_signed_copy(files, tmp_path / "one", bright_range))

    def padded(k, values):
        values = values * 30000 // top
        values[:8, :8] = -32768  # 64 padding pixels
        return values

    copies = _signed_copy(files, tmp_path / "padded", padded)
    with pytest.raises(SeriesError, match="wrap the brightest"):
        load_series(copies)  # undeclared, the padding looks like wrapping
    for path in copies:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "US", 32768)  # what many writers put: the bit pattern of -32768
        ds.add_new(0x00280121, "US", [])  # an empty range limit: ignored, not a crash
        ds.save_as(path, enforce_file_format=False)
    load_series(copies)


def test_a_signed_series_that_stays_low_is_not_called_wrapped(small_axial_series, tmp_path):
    """Phase-sensitive IR and subtraction images are negative by nature and stay far from the top of
    the signed range: not wrapping (whether the model takes them is screening's call)."""
    files = sorted(small_axial_series.files)
    load_series(_signed_copy(files, tmp_path / "psir", lambda k, values: values - values.max() // 2))


def test_a_slice_whose_neighbours_disagree_is_not_judged(small_axial_series, copy_series):
    """Slice 9 over 4x brighter than both neighbours, but they differ 3x from each other: nothing says
    which of the three is off, so nothing is refused."""
    files = sorted(copy_series(small_axial_series.files))
    for k, factor in ((8, 1), (9, 20), (10, 3)):
        slope = float(pydicom.dcmread(files[k]).get("RescaleSlope", 1))
        edit(files[k], RescaleSlope=f"{slope * factor:g}")
    load_series(files)


def test_a_rescale_that_overflows_is_refused(small_axial_series, copy_series):
    files = copy_series(small_axial_series.files)
    edit(files[5], RescaleSlope="1e36")
    assert reason(files).startswith(f"{files[5].name}: rescaled values are not finite (RescaleSlope 1e+36")
