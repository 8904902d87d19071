"""Series an outside tester scrambled on purpose: each once gave a delivered "no lesions", a traceback or a
misleading reason; each now fails with a reason that names the fault (or, for a rescale that is only
extreme, gives the same lesions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.errors import SeriesError
from inference.imaging import preprocess
from inference.imaging.brain_mask import brain_mask
from inference.imaging.screening import screen_series
from inference.imaging.volume_loader import load_series


def _rewritten(files: list[Path], out: Path, change) -> list[Path]:
    out.mkdir()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        change(ds)
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=False)
    return copies


def test_byte_swapped_pixels_are_no_brain_not_no_lesions(small_axial_series, tmp_path):
    """A converter that writes 16-bit pixels in the wrong byte order: a 21 cm3 "brain" in a 1600 cm3
    head passed the 10 cm3 floor, and an SR with 0 lesions was delivered."""

    def swap(ds):
        ds.PixelData = ds.pixel_array.byteswap().tobytes()

    image = load_series(_rewritten(small_axial_series.files, tmp_path / "swapped", swap)).image
    with pytest.raises(SeriesError, match=r"no brain found in the image: .* % of its .* cm3 of tissue, where a head"):
        brain_mask(image)
    assert sitk.GetArrayViewFromImage(brain_mask(load_series(small_axial_series.files).image)).any()


@pytest.mark.parametrize("slope", [1e-9, 1e16])
def test_an_extreme_but_finite_rescale_is_normalised_like_any_other(small_axial_series, copy_series, slope):
    """z-scoring floored the spread at 1e-6 (a 1e-9 slope under-scaled the model input) and summed in
    float32 (a 1e16 slope overflowed): the model saw no lesion."""
    image = load_series(small_axial_series.files).image
    mask = brain_mask(image)
    scaled = sitk.Cast(image, sitk.sitkFloat32) * slope
    reference = sitk.GetArrayFromImage(preprocess.zscore(image, mask))
    normalised = sitk.GetArrayFromImage(preprocess.zscore(scaled, mask))
    np.testing.assert_allclose(normalised, reference, atol=1e-3)
    with pytest.raises(SeriesError, match="nothing to normalise"):
        preprocess.zscore(image * 0, mask)


def test_an_offset_that_dwarfs_the_image_is_named(small_axial_series, tmp_path):
    """RescaleIntercept 1e9: float32 keeps a few levels of the image; numpy's histogram raised."""
    files = _rewritten(small_axial_series.files, tmp_path / "offset", lambda ds: setattr(ds, "RescaleIntercept", "1e9"))
    with pytest.raises(SeriesError, match=r"too narrow to tell tissue apart \(an offset such as RescaleIntercept"):
        brain_mask(load_series(files).image)


def test_an_image_below_zero_is_not_called_constant(small_axial_series, tmp_path):
    files = _rewritten(
        small_axial_series.files, tmp_path / "negative", lambda ds: setattr(ds, "RescaleIntercept", "-100000")
    )
    with pytest.raises(SeriesError, match=r"no intensity above zero: .* \(a negative RescaleSlope or RescaleIntercept"):
        brain_mask(load_series(files).image)


def test_float_pixel_data_is_named(small_axial_series, tmp_path):
    def to_float(ds):
        values = ds.pixel_array.astype(np.float32)
        del ds.PixelData
        ds.FloatPixelData = values.tobytes()

    files = _rewritten(small_axial_series.files, tmp_path / "float", to_float)
    with pytest.raises(SeriesError, match="FloatPixelData instead of Pixel Data: MR Image Storage holds integer"):
        load_series(files)


def test_a_position_beyond_any_scanner_is_refused_before_n4_fails_on_it(small_axial_series, tmp_path):
    def far(ds):
        ds.ImagePositionPatient = [f"{float(v) + 300000:g}" for v in ds.ImagePositionPatient]

    files = _rewritten(small_axial_series.files, tmp_path / "far", far)
    with pytest.raises(SeriesError, match=r"ImagePositionPatient .* lies over 10 m from the patient coordinate origin"):
        screen_series(files)


def test_an_unknown_character_set_is_refused(small_axial_series, tmp_path):
    """pydicom falls back to its default: the name the outputs would carry is a guess."""
    files = _rewritten(
        small_axial_series.files, tmp_path / "charset", lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 999")
    )
    with (
        pytest.warns(UserWarning),
        pytest.raises(SeriesError, match="SpecificCharacterSet ISO_IR 999 is not a defined"),
    ):
        screen_series(files)
