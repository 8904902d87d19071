"""From a list of DICOM instance files to one volume with exact geometry, or a precise refusal.

Why: everything downstream (model grid, contours in patient coordinates, the
RTSTRUCT's references) trusts this geometry, so the loader checks the series the
way a physicist would and refuses it with a reason that names the problem and
the files, instead of guessing.

Decisions:

- Geometry comes only from ImagePositionPatient (IPP), ImageOrientationPatient
  (IOP) and PixelSpacing, never from SliceLocation or InstanceNumber. The slice
  normal is row x column (IOP); slices are sorted by IPP . normal, so the volume's
  direction cosines (row, column, normal) are right-handed and the slice spacing is
  positive. Origin = IPP of the first sorted slice; spacing = (column spacing
  PixelSpacing[1], row spacing PixelSpacing[0], measured inter-slice distance).
  SliceThickness and SpacingBetweenSlices are not used (thickness is not spacing).
- Non-finite (NaN, infinity) ImagePositionPatient, ImageOrientationPatient or
  PixelSpacing is refused here too, although screening refuses it first: every
  comparison with NaN is False, so it would pass every tolerance check below.
- Tolerances: orientations agree when every IOP component differs by at most
  1e-4; pixel spacings when they differ by at most 1e-4 mm. Slice positions must
  lie on a uniform grid: every slice within max(1 % of the spacing, 0.1 mm) of
  first + k x spacing (spacing = (last - first) / (n - 1)); 0.1 mm is far below
  any voxel and absorbs rounding of IPP values. A step over 1.5x the median step is
  reported as missing slice(s); positions closer than 0.01 mm are duplicates.
  Slices must also be stacked along their normal (no shear or gantry tilt; the
  in-plane offset between slices at most 0.1 mm) because a sheared stack has no
  exact SimpleITK geometry.
- At least `MIN_SLICES` = 8 slices: fewer is a localizer or a single-slice
  series, not a volume in which 3D lesion components, volumes and diameters mean
  anything.
- Pixel values are decoded with pydicom (with the pylibjpeg plugins for JPEG,
  JPEG-LS, JPEG 2000 and RLE) and RescaleSlope/RescaleIntercept are applied per
  slice (they may differ between slices), giving float32.
- Intensities a header got wrong are refused, not modelled (`_check_intensities`;
  an outside tester's series passed before):
  - a signed image (PixelRepresentation 1) whose stored values reach a quarter
    of the signed range or more, with any pixel (padding excluded) rescaled
    below minus half the series' 99.5th percentile: unsigned values past
    2^(BitsStored-1)-1 read as signed; they are the brightest pixels, the
    enhancing lesions, turned dark. Signed images that stay low (phase-sensitive
    IR, phase, subtraction: negative by nature) are left to screening;
  - rescaled values that are not finite (a slope that overflows float32);
  - a slice whose RescaleSlope/RescaleIntercept differs from its neighbours'
    and whose rescaled values stand over 4x from both of them (median ratio
    over the pixels bright in both), while the two neighbours agree within 2x:
    a wrong rescale. A pair of slices alone is not judged (at the edge of the
    head, or where a scanner scales each slice to its own range, 4x between
    two slices is real), so a wrong rescale on the first or last slice, or on
    a run of slices, passes.
- Greyscale only: PhotometricInterpretation MONOCHROME2, or MONOCHROME1 (the
  two the MR Image IOD allows); anything else (PALETTE COLOR, RGB, missing) is
  refused, and so is a series that mixes them. A MONOCHROME1 volume (high values
  shown dark) is inverted within its own range (max + min - value) after the
  rescale, so the model sees bright as bright, as in the MONOCHROME2 data it was
  trained on; without it a valid series gave an inverted brain and "no lesions".
- Multi-frame images (Enhanced MR and any NumberOfFrames > 1) are refused: the
  outputs reference one image per contoured slice (RTSTRUCT Contour Image
  Sequence), which the writers do for single-frame instances only; the reason
  says so and suggests sending the classic (single-frame) MR series.
- `datasets` keep the headers (pixel data removed) in slice order; `files` are the
  source paths in the same order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from inference.errors import SeriesError
from inference.result import LoadedSeries

MIN_SLICES = 8
GREYSCALE = ("MONOCHROME2", "MONOCHROME1")
ORIENTATION_TOLERANCE = 1e-4
PIXEL_SPACING_TOLERANCE_MM = 1e-4
POSITION_TOLERANCE_MM = 0.1
POSITION_TOLERANCE_FRACTION = 0.01
DUPLICATE_TOLERANCE_MM = 0.01
GAP_FACTOR = 1.5
_GEOMETRY_TAGS = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


@dataclass
class SliceHeader:
    """One instance's header and parsed geometry (the screening checks the same from headers only)."""

    path: Path
    ds: pydicom.Dataset
    position: np.ndarray  # IPP, mm
    orientation: np.ndarray  # IOP, 6 values
    pixel_spacing: np.ndarray  # (row spacing, column spacing), mm


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise SeriesError(f"{path.name}: not a DICOM file ({err})") from err
    except Exception as err:  # noqa: BLE001 - truncated or garbled files raise many kinds
        raise SeriesError(f"{path.name}: unreadable DICOM file ({type(err).__name__}: {err})") from err


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return UID(str(uid)).name if uid else "unknown SOP class"


def _no_pixel_data(path: Path, ds: pydicom.Dataset) -> SeriesError:
    """Say whether an image lost its pixel data (truncated) or the object is no image at all."""
    uid = str(ds.get("SOPClassUID", ""))
    name = UID(uid).name if uid else ""
    floats = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
    if floats:
        return SeriesError(
            f"{path.name}: {floats[0]} instead of Pixel Data: {name or 'this SOP class'} holds integer pixels; "
            "floating-point pixels are for parametric maps, not MR images"
        )
    if "Image" in name:
        return SeriesError(f"{path.name}: no pixel data ({name} without pixel data: a truncated or header-only file)")
    if name and name != uid:
        return SeriesError(f"{path.name}: no pixel data ({name} is not an image)")
    return SeriesError(f"{path.name}: no pixel data (SOP Class {uid or 'missing'}: not an image, or a truncated file)")


def check_single_frame(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse a multi-frame image (module doc); the screening calls it on headers too."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        raise SeriesError(
            f"{path.name}: multi-frame image ({_sop_class_name(ds)}, {ds.get('NumberOfFrames', '?')} frames) "
            "is not supported; send the classic single-frame MR series instead"
        )


def check_greyscale(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse an image that is not one greyscale sample per pixel (module doc); the screening calls it too."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError(f"{path.name}: colour image (SamplesPerPixel {ds.SamplesPerPixel}); greyscale MR needed")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if photometric not in GREYSCALE:
        raise SeriesError(
            f"{path.name}: PhotometricInterpretation {photometric or '(missing)'}; an MR image is greyscale "
            f"({' or '.join(GREYSCALE)})"
        )


def _as_slice(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    """Check one instance is a single-frame greyscale image with geometry."""
    check_single_frame(path, ds)
    if "PixelData" not in ds:
        raise _no_pixel_data(path, ds)
    missing = [tag for tag in _GEOMETRY_TAGS if ds.get(tag) in (None, "")]
    if missing:
        raise SeriesError(f"{path.name}: not a usable image, missing geometry: {', '.join(missing)}")
    check_greyscale(path, ds)
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        spacing = np.array([float(v) for v in ds.PixelSpacing])
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{path.name}: unreadable geometry values ({err})") from err
    geometry = {"ImagePositionPatient": position, "ImageOrientationPatient": orientation, "PixelSpacing": spacing}
    for name, values in geometry.items():
        if not np.all(np.isfinite(values)):
            raise SeriesError(f"{path.name}: non-finite {name} {list(values)} (NaN or infinity)")
    if position.shape != (3,) or orientation.shape != (6,) or spacing.shape != (2,) or np.any(spacing <= 0):
        raise SeriesError(
            f"{path.name}: malformed geometry (IPP {list(position)}, IOP {list(orientation)}, "
            f"PixelSpacing {list(spacing)})"
        )
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise SeriesError(
            f"{path.name}: ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
        )
    return SliceHeader(path, ds, position, orientation, spacing)


def _check_one_series(slices: list[SliceHeader]) -> None:
    uids = Counter(str(s.ds.get("SeriesInstanceUID", "")) for s in slices)
    if len(uids) > 1:
        listed = ", ".join(f"{uid or '(none)'} ({n} files)" for uid, n in uids.most_common())
        raise SeriesError(f"files from {len(uids)} series (one series per job): {listed}")
    instances = Counter(str(s.ds.get("SOPInstanceUID", "")) for s in slices)
    repeated = [uid for uid, n in instances.items() if n > 1]
    if repeated:
        raise SeriesError(f"duplicated SOP Instance UID {repeated[0]} ({instances[repeated[0]]} files)")


def check_consistent(slices: list[SliceHeader]) -> None:
    """Same orientation, matrix and pixel spacing in every slice (also used by the screening)."""
    first = slices[0]
    for s in slices[1:]:
        if np.abs(s.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"mixed orientations: ImageOrientationPatient {_fmt(first.orientation)} in {first.path.name} "
                f"but {_fmt(s.orientation)} in {s.path.name}"
            )
    sizes = Counter((int(s.ds.Rows), int(s.ds.Columns)) for s in slices)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} files)" for (r, c), n in sizes.most_common())
        raise SeriesError(f"mixed image sizes (Rows x Columns): {listed}")
    for s in slices[1:]:
        if np.abs(s.pixel_spacing - first.pixel_spacing).max() > PIXEL_SPACING_TOLERANCE_MM:
            raise SeriesError(
                f"mixed pixel spacings: {_fmt(first.pixel_spacing)} mm in {first.path.name} "
                f"but {_fmt(s.pixel_spacing)} mm in {s.path.name}"
            )


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


_TWICE_KEYWORDS = (
    "AcquisitionNumber",
    "EchoNumbers",
    "TemporalPositionIdentifier",
    "TemporalPositionIndex",
    "InStackPositionNumber",
    "DiffusionBValue",
    "TriggerTime",
    "AcquisitionTime",
    "ContentTime",
    "ImageType",
)


def _same_value(a: object, b: object) -> bool:
    """Equal as numbers where both are ("0" and "0.0"), else as text."""
    try:
        return float(str(a)) == float(str(b))
    except ValueError:
        return str(a) == str(b)


def _why_twice(first: pydicom.Dataset, second: pydicom.Dataset) -> str:
    """What tells two slices at one position apart (several acquisitions, echoes, b-values or time
    points in one series), or, when their pixels are the same, that one slice was sent twice."""
    differ = [
        f"{keyword} {first.get(keyword)} and {second.get(keyword)}"
        for keyword in _TWICE_KEYWORDS
        if not _same_value(first.get(keyword, ""), second.get(keyword, ""))
    ]
    if differ:
        return f" (these two differ in {'; '.join(differ)}: several acquisitions in one series?)"
    if _same_pixels(first, second):
        return " (the same image twice under two SOP Instance UIDs: one slice sent twice?)"
    return " (two different images, told apart by no acquisition attribute)"


def _same_pixels(first: pydicom.Dataset, second: pydicom.Dataset) -> bool:
    """The same bytes, or (compressed two ways) the same decoded values; False when either cannot be read."""
    if first.get("PixelData") == second.get("PixelData"):
        return True
    try:
        return bool(np.array_equal(first.pixel_array, second.pixel_array))
    except Exception:  # noqa: BLE001 - undecodable: the loader names it later
        return False


def _slice_spacing(slices: list[SliceHeader], normal: np.ndarray) -> float:
    """Check the sorted slices form a uniform stack along `normal`; return the spacing in mm."""
    depth = np.array([s.position @ normal for s in slices])
    steps = np.diff(depth)
    names = [s.path.name for s in slices]
    duplicates = [k for k, step in enumerate(steps) if step < DUPLICATE_TOLERANCE_MM]
    if duplicates:
        k = duplicates[0]
        raise SeriesError(
            f"duplicated slice position {depth[k]:.3f} mm along the normal ({names[k]} and {names[k + 1]}); "
            f"{len(slices)} files at {len(slices) - len(duplicates)} positions: one volume has one slice per "
            f"position{_why_twice(slices[k].ds, slices[k + 1].ds)}"
        )
    median = float(np.median(steps))
    for k, step in enumerate(steps):
        if step > GAP_FACTOR * median:
            missing = max(1, round(step / median) - 1)
            raise SeriesError(
                f"missing slice(s): gap of {step:.3f} mm between {names[k]} and {names[k + 1]} "
                f"(positions {depth[k]:.3f} and {depth[k + 1]:.3f} mm) where slices are {median:.3f} mm apart; "
                f"about {missing} slice(s) missing"
            )
    spacing = float((depth[-1] - depth[0]) / (len(depth) - 1))
    tolerance = max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * spacing)
    deviation = np.abs(depth - (depth[0] + spacing * np.arange(len(depth))))
    worst = int(np.argmax(deviation))
    if deviation[worst] > tolerance:
        raise SeriesError(
            f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm; {names[worst]} "
            f"is {deviation[worst]:.3f} mm off a uniform {spacing:.3f} mm grid (tolerance {tolerance:.3f} mm)"
        )
    offsets = np.array([s.position - slices[0].position for s in slices])
    shear = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if shear.max() > POSITION_TOLERANCE_MM:
        worst = int(np.argmax(shear))
        raise SeriesError(
            f"slices are not stacked along their normal: {names[worst]} is shifted {shear[worst]:.3f} mm "
            "in-plane (sheared stack or gantry tilt)"
        )
    return spacing


def _stored(s: SliceHeader) -> np.ndarray:
    """Decoded stored pixel values (rows, cols), before the rescale."""
    ds = s.ds
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.TransferSyntaxUID)) if meta is not None and "TransferSyntaxUID" in meta else None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if syntax is not None and not syntax.is_compressed:
        expected = rows * cols * int(ds.get("BitsAllocated", 16)) // 8
        if len(ds.PixelData) < expected:
            raise SeriesError(
                f"{s.path.name}: pixel data is {len(ds.PixelData)} bytes, shorter than Rows x Columns "
                f"({rows} x {cols} x {int(ds.get('BitsAllocated', 16)) // 8} bytes = {expected})"
            )
    try:
        array = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoders raise many kinds
        name = f"{syntax.name} ({syntax})" if syntax else "unknown transfer syntax"
        raise SeriesError(f"{s.path.name}: pixel data in {name} cannot be decoded: {err}") from err
    if array.shape != (rows, cols):
        raise SeriesError(f"{s.path.name}: decoded pixel data has shape {array.shape}, expected ({rows}, {cols})")
    return array


def _rescale_of(s: SliceHeader) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a slice, checked."""
    slope, intercept = _rescale(s, "RescaleSlope", 1.0), _rescale(s, "RescaleIntercept", 0.0)
    if slope == 0:
        raise SeriesError(f"{s.path.name}: RescaleSlope 0 maps every pixel to one value; no image left")
    return slope, intercept


def _rescale(s: SliceHeader, keyword: str, default: float) -> float:
    """RescaleSlope or RescaleIntercept (absent or empty: `default`); a value that is not a finite
    number is refused (NaN made the brain mask find "no brain", a misleading reason)."""
    value = s.ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{s.path.name}: {keyword} {value!r} is not a number") from err
    if not math.isfinite(number):
        raise SeriesError(f"{s.path.name}: non-finite {keyword} {number} (NaN or infinity)")
    return number


WRAP_FRACTION = 0.5  # rescaled values below -0.5 x the series' 99.5th percentile ...
MIN_WRAPPED_PIXELS = 1  # ... in this many pixels of a slice: wrapped (module doc; a small lesion is few)
RESCALE_JUMP = 4.0  # a slice this far from both neighbours ...
NEIGHBOURS_AGREE = 2.0  # ... which agree within this: a wrong rescale (module doc)
_SAMPLE = 4  # every 4th row and column: the checks read intensity levels, not detail


def _check_intensities(
    slices: list[SliceHeader], stored: list[np.ndarray], rescale: list[tuple[float, float]], volume: np.ndarray
) -> None:
    """`SeriesError` for intensities a header got wrong (module doc); `volume` is rescaled."""
    _check_wrapped(slices, stored, volume)
    _check_rescale_outliers(slices, rescale, volume)


def _bits_stored(ds: pydicom.Dataset) -> int:
    try:
        bits = int(ds.get("BitsStored") or 16)
    except (TypeError, ValueError):
        return 16
    return bits if 1 <= bits <= 32 else 16


def _padding_value(ds: pydicom.Dataset, keyword: str) -> int | None:
    """A padding attribute as the stored pixels hold it: its first value, sign-extended from
    BitsStored when the pixels are signed (writers often give it VR US, so -32768 reads as 32768);
    None when absent or not a number."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if value else None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        bits = _bits_stored(ds)
        number &= (1 << bits) - 1
        if number >= 1 << (bits - 1):
            number -= 1 << bits
    return number


def _padding(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Pixels marked as padding (PixelPaddingValue, up to PixelPaddingRangeLimit): not image."""
    value = _padding_value(ds, "PixelPaddingValue")
    if value is None:
        return np.zeros(stored.shape, dtype=bool)
    limit = _padding_value(ds, "PixelPaddingRangeLimit")
    low, high = sorted((value, value if limit is None else limit))
    return (stored >= low) & (stored <= high)


def _check_wrapped(slices: list[SliceHeader], stored: list[np.ndarray], volume: np.ndarray) -> None:
    """Wrapping has a shape: the stored values climb up to near the top of the signed range (at
    least a quarter of it), and carry on as negative values. A signed image that never comes near
    the top (phase-sensitive IR, phase, subtraction images are negative by nature) is not judged."""
    signed = [k for k, s in enumerate(slices) if int(s.ds.get("PixelRepresentation", 0) or 0) == 1]
    if not signed:
        return
    bits = _bits_stored(slices[signed[0]].ds)
    if max(int(stored[k].max()) for k in signed) < 1 << (bits - 2):
        return
    level = float(np.percentile(np.concatenate([volume[k, ::_SAMPLE, ::_SAMPLE].ravel() for k in signed]), 99.5))
    if level <= 0:
        return
    for k in signed:
        wrapped = (volume[k] < -WRAP_FRACTION * level) & ~_padding(slices[k].ds, stored[k])
        count = int(np.count_nonzero(wrapped))
        if count >= MIN_WRAPPED_PIXELS:
            raise SeriesError(
                f"{slices[k].path.name}: {count} pixel(s) down to {float(volume[k][wrapped].min()):g} where the "
                f"series' 99.5th percentile is {level:g} and its stored values reach {1 << (bits - 2)} or more: a "
                f"magnitude MR image is not negative; stored values above {2 ** (bits - 1) - 1} declared signed "
                f"(PixelRepresentation 1, BitsStored {bits}) wrap the brightest pixels, the enhancing ones, to dark"
            )


def _level_ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """Median of a / b over the pixels bright in both (above a tenth of each slice's 99th percentile),
    or None when too few are."""
    bright = (a > 0.1 * np.percentile(a, 99)) & (b > 0.1 * np.percentile(b, 99)) & (a > 0) & (b > 0)
    if np.count_nonzero(bright) < max(16, 0.01 * a.size):
        return None
    return float(np.median(a[bright] / b[bright]))


def _check_rescale_outliers(slices: list[SliceHeader], rescale: list[tuple[float, float]], volume: np.ndarray) -> None:
    """A slice whose rescale differs from its neighbours', whose rescaled values stand over 4x apart from
    both while they agree with each other. Neighbour pairs alone are not judged: at the edge of the
    head, or where a scanner scales each slice to its own range, >4x between two slices is real."""
    for k in range(1, len(slices) - 1):
        if rescale[k] == rescale[k - 1] == rescale[k + 1]:
            continue
        before, here, after = (volume[j, ::_SAMPLE, ::_SAMPLE].astype(np.float64) for j in (k - 1, k, k + 1))
        ratios = [_level_ratio(here, before), _level_ratio(here, after), _level_ratio(after, before)]
        if any(r is None for r in ratios):
            continue
        to_before, to_after, neighbours = (float(r) for r in ratios if r is not None)
        apart = min(to_before, to_after) > RESCALE_JUMP or max(to_before, to_after) < 1 / RESCALE_JUMP
        if apart and 1 / NEIGHBOURS_AGREE <= neighbours <= NEIGHBOURS_AGREE:
            (slope, intercept), (slope_n, intercept_n) = rescale[k], rescale[k - 1]
            raise SeriesError(
                f"{slices[k].path.name}: rescaled intensities {to_before:.3g}x those of {slices[k - 1].path.name} "
                f"and {to_after:.3g}x those of {slices[k + 1].path.name}, which agree with each other "
                f"(RescaleSlope {slope:g} against {slope_n:g}, RescaleIntercept {intercept:g} against "
                f"{intercept_n:g}): a rescale in the header is wrong"
            )


def _header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The data set as read (file meta, character set, encoding kept) without its pixel data."""
    del ds.PixelData
    return ds


def load_series(files: Sequence[Path]) -> LoadedSeries:
    """Validated volume (float32, exact geometry) plus headers and files in slice order.

    Raises `SeriesError` with a physicist-readable reason when the series cannot be used.
    """
    if not files:
        raise SeriesError("no files in the series")
    paths = [Path(f) for f in files]
    slices = [_as_slice(path, _read(path)) for path in paths]
    _check_one_series(slices)
    check_consistent(slices)
    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row  # remove the (tolerated) rounding non-orthogonality
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    slices.sort(key=lambda s: float(s.position @ normal))
    if len(slices) < MIN_SLICES:
        raise SeriesError(
            f"only {len(slices)} slice(s); at least {MIN_SLICES} are needed for a 3D volume "
            "(a localizer or a single slice cannot give lesion volumes)"
        )
    slice_spacing = _slice_spacing(slices, normal)
    photometric = Counter(str(s.ds.PhotometricInterpretation).strip() for s in slices)
    if len(photometric) > 1:
        listed = ", ".join(f"{value} ({n} files)" for value, n in photometric.most_common())
        raise SeriesError(f"mixed PhotometricInterpretation in one series: {listed}")
    stored = [_stored(s) for s in slices]
    rescale = [_rescale_of(s) for s in slices]
    volume = np.empty((len(slices), *stored[0].shape), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, by name
        for k, (values, (slope, intercept)) in enumerate(zip(stored, rescale, strict=True)):
            volume[k] = values.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(volume).all():  # a slope like 1e36 overflows float32
        worst = next(k for k in range(len(slices)) if not np.isfinite(volume[k]).all())
        slope, intercept = rescale[worst]
        raise SeriesError(
            f"{slices[worst].path.name}: rescaled values are not finite (RescaleSlope {slope:g}, "
            f"RescaleIntercept {intercept:g} overflow 32-bit floating point)"
        )
    _check_intensities(slices, stored, rescale, volume)
    del stored
    if "MONOCHROME1" in photometric:  # high values shown dark: inverted within its range (module doc)
        volume = (volume.max() + volume.min() - volume).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    row_spacing, col_spacing = slices[0].pixel_spacing
    image.SetSpacing((float(col_spacing), float(row_spacing), slice_spacing))
    image.SetOrigin(tuple(float(v) for v in slices[0].position))
    image.SetDirection(tuple(np.stack([row, col, normal], axis=1).flatten().tolist()))
    return LoadedSeries(image=image, datasets=[_header(s.ds) for s in slices], files=[s.path for s in slices])
