"""RT Structure Set writer: one CLOSED_PLANAR ROI per lesion, as a TPS imports it.

DICOM PS3.3 A.19 (RT Structure Set IOD) with C.7.1.1 Patient, C.7.2.1 General
Study, C.8.8.1 RT Series, C.7.5.1 General Equipment, C.8.8.5 Structure Set,
C.8.8.6 ROI Contour, C.8.8.8 RT ROI Observations, C.8.8.16 Approval and
C.12.1 SOP Common.

Decisions
---------
- Geometry comes from each source slice's own header (slice k of
  `result.label_map` is `result.series.datasets[k]`): PS3.3 C.7.6.2.1.1,
  ``P = S + col * dc * F_row + row * dr * F_col`` with Pixel Spacing
  ``[dr (between rows), dc (between columns)]``, so axial, sagittal, coronal and
  oblique series with any spacing are handled by the same code.
- Contours are the 0.5 iso-lines of the binary slice padded with background
  (marching squares, `skimage.measure.find_contours`). On a binary grid they run
  along pixel edges where the boundary is straight and cut corners diagonally
  through edge midpoints, so every foreground pixel centre lies inside, every
  background centre outside, each at least 0.5/sqrt(2) ~ 0.354 px from the line.
  They are deliberately not dilated by half a pixel: that would put the line
  through background pixel centres, which centre-sampling TPSs would then fill.
  The price is 1/8 px^2 of area per corner.
- Holes and several islands on one slice: every iso-line is its own contour and
  TPSs combine the contours of one ROI on one slice by the even-odd rule (PS3.3
  C.8.8.6.3 and common TPS practice): a hole inside a lesion, an island inside a
  hole. ``fully_connected="low"`` keeps diagonally touching foreground pixels in
  separate contours that share no point.
- Simplification: Douglas-Peucker with a tolerance below 0.354 px (default
  0.25 px) keeps every pixel centre on its side, so rasterisation reproduces the
  mask; it drops the collinear points of straight pixel edges. It is the
  distance rule of `skimage.measure.approximate_polygon`, computed for all open
  segments of a contour at once (`simplify_polyline`): the skimage loop costs one
  Python step per kept point, which dominated the writer for many lesions.
- Contour Data (DS, often thousands of values per ROI) is encoded once as the
  bytes of its backslash-separated text (`_decimal_string_element`); letting
  pydicom validate every value was the other large per-lesion cost.
- Degenerate contours (fewer than 3 points, zero area) are never written; a lesion
  left without any contour is an error, never an empty ROI.
- No lesions: the Structure Set ROI Sequence is Type 1 (at least one item), so an
  RTSTRUCT without ROIs would be invalid; `build_rtstruct` raises `ValueError`
  and `inference.outputs.dicom_outputs` skips the RTSTRUCT and says so.
- Cost linear in the number of lesions: the label map is read once and each
  lesion is cut out of its own bounding box (`scipy.ndimage.find_objects`), never
  compared against the whole volume (that made 321 lesions on 176x512x512 take
  99 s). `bench/writers.py` measures it.
- At most `MAX_ROIS` (1,000) ROIs: a format guard only; the plausibility gate
  (`inference.plausibility`, 30 lesions by default) holds such results long before.
- A re-run (`inference.outputs.supersession`) writes into the same output
  series; the structure set names the one it replaces (Predecessor Structure
  Set Sequence, description) and its label ends with the revision.
- Approval Status is UNAPPROVED: the structure set is a proposal until a
  clinician approves it in the TPS.
- Patient and study attributes are copied from the source headers, text decoded,
  and written as UTF-8 (Specific Character Set ISO_IR 192).
- ROI names are ``<roi_name_prefix>GTV_<n>``: a site's TPS naming convention
  (``AI_``, TG-263-style) is a prefix, configured in ``[outputs]``. The prefix
  is checked here (`check_roi_name_prefix`), the one place that knows the
  lesion names' longest form, so prefix + name fits ROI Name's 16 characters
  (VR SH) for up to `MAX_LESIONS_NAMED` lesions.
"""

from __future__ import annotations

import colorsys
import enum
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import SimpleITK as sitk
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage
from pydicom.valuerep import PersonName
from scipy import ndimage
from skimage.measure import find_contours

from inference.outputs.notice import full_statement, short_label, structure_set_label
from inference.outputs.patient_study import TYPE2_COPIED, TYPE3_COPIED
from inference.outputs.supersession import Predecessor
from inference.result import InferenceResult, Lesion
from inference.uids import new_uid

#: Largest simplification tolerance (px) that keeps every pixel centre on its side.
MAX_SIMPLIFY_TOLERANCE_PX = 0.5 / np.sqrt(2.0)
_MIN_AREA_PX2 = 1e-6
#: Format guard on ROIs per structure set; the plausibility gate holds far fewer.
MAX_ROIS = 1000
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


class RTROIInterpretedType(str, enum.Enum):
    """RT ROI Interpreted Type (3006,00A4), DICOM PS3.3 C.8.8.8.1 (subset used)."""

    GTV = "GTV"


class ROIGenerationAlgorithm(str, enum.Enum):
    """ROI Generation Algorithm (3006,0036), DICOM PS3.3 C.8.8.5."""

    AUTOMATIC = "AUTOMATIC"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    MANUAL = "MANUAL"


class ApprovalStatus(str, enum.Enum):
    """Approval Status (300E,0002), DICOM PS3.3 C.8.8.16."""

    APPROVED = "APPROVED"
    UNAPPROVED = "UNAPPROVED"
    REJECTED = "REJECTED"


class ContourGeometricType(str, enum.Enum):
    """Contour Geometric Type (3006,0042), DICOM PS3.3 C.8.8.6.1 (subset used)."""

    CLOSED_PLANAR = "CLOSED_PLANAR"


def slice_contours(mask: np.ndarray, simplify_tolerance_px: float = 0.25) -> list[np.ndarray]:
    """Closed sub-pixel contours of a binary slice, in (row, column) pixel indices.

    Parameters
    ----------
    mask : numpy.ndarray
        2D boolean (rows, columns) slice.
    simplify_tolerance_px : float
        Douglas-Peucker tolerance in pixels, ``0 <= t < MAX_SIMPLIFY_TOLERANCE_PX``.

    Returns
    -------
    list of numpy.ndarray
        One ``(n, 2)`` float array per contour (outer boundaries, holes and islands
        alike, to be combined by the even-odd rule), ``n >= 3``, non-zero area,
        first point not repeated at the end (CLOSED_PLANAR, PS3.3 C.8.8.6.1).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask: expected a 2D slice, got shape {mask.shape}")
    return stack_contours(mask[np.newaxis], simplify_tolerance_px)[0]


def stack_contours(masks: np.ndarray, simplify_tolerance_px: float = 0.25) -> list[list[np.ndarray]]:
    """`slice_contours` of every slice of a (k, rows, columns) stack, simplified in one batch."""
    _check_tolerance(simplify_tolerance_px)
    traced = [find_contours(np.pad(m.astype(np.float32), 1), 0.5, fully_connected="low") for m in masks]
    simplified = iter(simplify_polylines([line for lines in traced for line in lines], simplify_tolerance_px))
    result = []
    for lines in traced:
        contours = []
        for _ in lines:
            closed = next(simplified) - 1.0
            points = closed[:-1] if np.array_equal(closed[0], closed[-1]) else closed
            if len(points) >= 3 and abs(polygon_area(points)) > _MIN_AREA_PX2:
                contours.append(points)
        result.append(contours)
    return result


def simplify_polylines(lines: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Douglas-Peucker simplification of polylines (each (n, 2)), first and last points kept.

    The distance of a point to a segment is the perpendicular distance when its
    projection falls inside the segment, else the distance to the nearer end
    (as `skimage.measure.approximate_polygon`). Every open segment of every line
    is split at its farthest point in the same round, so the number of numpy
    rounds is the depth of the recursion, not the number of kept points or
    lines. ``tolerance <= 0`` returns the lines unchanged.
    """
    if tolerance <= 0 or not lines:
        return list(lines)
    coords = np.concatenate(lines)
    ends = np.cumsum([len(line) for line in lines])
    starts = ends - np.array([len(line) for line in lines])
    keep = np.zeros(len(coords), bool)
    keep[starts] = keep[ends - 1] = True
    open_segments = np.stack([starts, ends - 1], 1)
    while len(open_segments):
        lengths = open_segments[:, 1] - open_segments[:, 0] - 1
        open_segments = open_segments[lengths > 0]
        lengths = lengths[lengths > 0]
        if not len(open_segments):
            break
        owner = np.repeat(np.arange(len(open_segments)), lengths)
        first = np.cumsum(lengths) - lengths
        inner = open_segments[owner, 0] + 1 + (np.arange(len(owner)) - first[owner])
        first_point, last_point = coords[open_segments[owner, 0]], coords[open_segments[owner, 1]]
        points = coords[inner]
        chord = last_point - first_point
        to_start, to_end = points - first_point, points - last_point
        inside = (np.einsum("ij,ij->i", to_start, chord) > 0) & (np.einsum("ij,ij->i", -to_end, chord) > 0)
        norm = np.hypot(chord[:, 0], chord[:, 1])
        cross = np.abs(to_start[:, 0] * chord[:, 1] - to_start[:, 1] * chord[:, 0])
        perpendicular = np.divide(cross, norm, out=np.zeros_like(cross), where=norm > 0)
        nearer_end = np.minimum(np.hypot(to_start[:, 0], to_start[:, 1]), np.hypot(to_end[:, 0], to_end[:, 1]))
        distance = np.where(inside, perpendicular, nearer_end)
        best = np.maximum.reduceat(distance, first)
        split = best > tolerance
        # the first point reaching its segment's maximum, as argmax would pick
        at_max = distance == best[owner]
        candidates = np.flatnonzero(at_max & split[owner])
        chosen = candidates[np.unique(owner[candidates], return_index=True)[1]]
        cut = inner[chosen]
        keep[cut] = True
        parents = open_segments[owner[chosen]]
        open_segments = np.concatenate([np.stack([parents[:, 0], cut], 1), np.stack([cut, parents[:, 1]], 1)])
    return [coords[start:end][keep[start:end]] for start, end in zip(starts, ends)]


def _check_tolerance(simplify_tolerance_px: float) -> None:
    """Raise `ValueError` unless ``0 <= simplify_tolerance_px < MAX_SIMPLIFY_TOLERANCE_PX``."""
    if not 0.0 <= simplify_tolerance_px < MAX_SIMPLIFY_TOLERANCE_PX:
        raise ValueError(
            f"simplify_tolerance_px: {simplify_tolerance_px} is outside [0, {MAX_SIMPLIFY_TOLERANCE_PX:.3f}) px"
        )


def polygon_area(points: np.ndarray) -> float:
    """Signed shoelace area of a closed polygon given without its closing point."""
    y, x = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def pixel_to_patient(points_rc: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map (row, column) pixel indices of one slice to patient coordinates (mm).

    DICOM PS3.3 C.7.6.2.1.1: ``P = S + X * dc * c + Y * dr * r`` where S is Image
    Position (Patient), X and Y the first and second triplet of Image Orientation
    (Patient) and Pixel Spacing is ``[dr, dc]`` (row spacing, column spacing).
    """
    origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    along_row, along_col = orientation[:3], orientation[3:]
    cols = points_rc[:, 1:2] * col_spacing
    rows = points_rc[:, 0:1] * row_spacing
    return origin + cols * along_row + rows * along_col


def roi_display_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct ROI Display Colors (3006,002A), golden-ratio hue steps."""
    if not 0 <= count <= MAX_ROIS:
        raise ValueError(f"count: {count} is outside [0, {MAX_ROIS}]")
    colours: list[tuple[int, int, int]] = []
    step = 0
    while len(colours) < count:
        hue = (step * _GOLDEN_RATIO_CONJUGATE) % 1.0
        value = 1.0 - 0.25 * ((step // 360) % 3)
        rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, value))
        if rgb not in colours:
            colours.append(rgb)  # type: ignore[arg-type]
        step += 1
    return colours


MAX_ROI_NAME_CHARS = 16  # ROI Name (3006,0026) is SH
MAX_LESIONS_NAMED = 99  # the longest lesion name checked against the limit is GTV_99
_LONGEST_LESION_NAME = f"GTV_{MAX_LESIONS_NAMED}"


def check_roi_name_prefix(prefix: str) -> str:
    """Return `prefix` if ``prefix + "GTV_99"`` is a valid ROI Name, else raise `ValueError` saying why.

    ROI Name is VR SH (PS3.5 6.2): at most 16 characters, no backslash or control characters;
    treatment-planning systems refuse longer names rather than truncate them.
    """
    longest = prefix + _LONGEST_LESION_NAME
    if len(longest) > MAX_ROI_NAME_CHARS:
        room = MAX_ROI_NAME_CHARS - len(_LONGEST_LESION_NAME)
        raise ValueError(
            f"roi_name_prefix {prefix!r} is too long: ROI Name (3006,0026) holds {MAX_ROI_NAME_CHARS} characters"
            f" and {longest!r} has {len(longest)}; use at most {room} characters"
        )
    if "\\" in prefix or any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        raise ValueError(f"roi_name_prefix {prefix!r} contains a backslash or control character (not allowed in SH)")
    return prefix


def build_rtstruct(
    result: InferenceResult,
    *,
    roi_name_prefix: str = "",
    series_number: int = 901,
    manufacturer: str = "dicom-node",
    simplify_tolerance_px: float = 0.25,
    timestamp: datetime | None = None,
    series_instance_uid: str | None = None,
    supersedes: Predecessor | None = None,
) -> Dataset:
    """Build the RT Structure Set (one GTV ROI per lesion) of an inference result.

    Parameters
    ----------
    result : inference.result.InferenceResult
        Lesions, label map on the source grid and the source headers.
    roi_name_prefix : str
        Put before each lesion's name (``GTV_1`` ...) in ROI Name, e.g. ``AI_``; see `check_roi_name_prefix`.
    series_number : int
        Series Number (0020,0011) of the new RTSTRUCT series, positive.
    manufacturer : str
        Manufacturer (0008,0070) of the General Equipment module.
    simplify_tolerance_px : float
        Contour simplification tolerance in pixels, see `slice_contours`.
    timestamp : datetime.datetime or None
        Creation time written to the Series, Structure Set and SOP Common dates
        and times; now when None.
    series_instance_uid : str or None
        The output series (`inference.outputs.supersession.output_series_uid`); a new UID when None.
    supersedes : inference.outputs.supersession.Predecessor or None
        The structure set this one replaces (a re-run): referenced in the Predecessor
        Structure Set Sequence, named in the description, and the label and Instance
        Number carry the revision.

    Returns
    -------
    pydicom.dataset.Dataset
        RT Structure Set Storage instance with file meta (Explicit VR Little Endian).

    Raises
    ------
    ValueError
        No lesions, inconsistent source headers, a label map that does not
        match the source grid, or a lesion without any contour.
    """
    _validate_result(result)
    check_roi_name_prefix(roi_name_prefix)
    if len(result.lesions) > MAX_LESIONS_NAMED and roi_name_prefix:
        raise ValueError(f"result: {len(result.lesions)} lesions; a roi_name_prefix allows {MAX_LESIONS_NAMED}")
    if series_number < 1:
        raise ValueError(f"series_number: must be positive, got {series_number}")
    _check_tolerance(simplify_tolerance_px)
    when = timestamp or datetime.now().astimezone()
    sources = result.series.datasets
    frame_of_reference_uid = sources[0].FrameOfReferenceUID

    ds = _base_dataset(result, series_number, manufacturer, when, series_instance_uid or new_uid())
    if supersedes is not None:
        _mark_superseding(ds, result, supersedes)
    roi_items, contour_items, observation_items = [], [], []
    contoured_slices: set[int] = set()
    colours = roi_display_colours(len(result.lesions))
    labels = sitk.GetArrayViewFromImage(result.label_map)
    boxes = ndimage.find_objects(labels)
    for number, (lesion, colour) in enumerate(zip(result.lesions, colours), start=1):
        box = boxes[lesion.label - 1] if 0 < lesion.label <= len(boxes) else None
        contours = _lesion_contour_items(result, lesion, labels, box, simplify_tolerance_px)
        contoured_slices.update(index for index, _ in contours)
        roi_items.append(_structure_set_roi(number, roi_name_prefix + lesion.name, frame_of_reference_uid, result))
        contour_items.append(_roi_contour(number, colour, [item for _, item in contours]))
        observation_items.append(_roi_observation(number))

    ds.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_referenced_frame_of_reference(sources, sorted(contoured_slices))]
    )
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    _mark_encoded_as_written(ds, convert_encodings(ds.SpecificCharacterSet))
    return ds


def _mark_encoded_as_written(ds: Dataset, encoding: list[str]) -> None:
    """Declare `ds` and its items Explicit VR Little Endian in `encoding`, as the file will be.

    pydicom then writes the pre-encoded Contour Data bytes as they are instead of
    decoding and re-encoding every coordinate (pydicom's `set_original_encoding`).
    """
    ds.set_original_encoding(False, True, encoding)
    for element in ds.elements():  # raw elements stay raw
        if element.VR == "SQ":
            for item in element.value:
                _mark_encoded_as_written(item, encoding)


def _validate_result(result: InferenceResult) -> None:
    """Raise `ValueError` naming `result` when it cannot make a valid RTSTRUCT."""
    if not result.lesions:
        raise ValueError(
            "result: no lesions; an RT Structure Set needs at least one ROI "
            "(Structure Set ROI Sequence is Type 1, PS3.3 C.8.8.5)"
        )
    if len(result.lesions) > MAX_ROIS:
        raise ValueError(f"result: {len(result.lesions)} lesions exceed {MAX_ROIS} ROIs")
    sources = result.series.datasets
    size = result.label_map.GetSize()
    if size != result.series.image.GetSize() or size[2] != len(sources):
        raise ValueError(
            f"result: label map size {size} does not match the source series "
            f"({result.series.image.GetSize()}, {len(sources)} headers)"
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(getattr(ds, keyword, "")) for ds in sources}
        if len(values) != 1 or "" in values:
            raise ValueError(f"result: source headers have missing or mixed {keyword}")
    for index, ds in enumerate(sources):
        missing = [
            keyword
            for keyword in (
                "SOPClassUID",
                "SOPInstanceUID",
                "ImagePositionPatient",
                "ImageOrientationPatient",
                "PixelSpacing",
                "Rows",
                "Columns",
            )
            if keyword not in ds
        ]
        if missing:
            raise ValueError(f"result: source header {index} lacks {', '.join(missing)}")
        if (ds.Rows, ds.Columns) != (size[1], size[0]):
            raise ValueError(
                f"result: source header {index} is {ds.Rows}x{ds.Columns}, label map slices are {size[1]}x{size[0]}"
            )
    _check_slice_geometry(result)


def _check_slice_geometry(result: InferenceResult) -> None:
    """Raise unless header k lies where slice k of the label map lies.

    Contours are placed with the headers, the mask comes from the label map: a
    mis-ordered or foreign header would silently move contours to the wrong
    slice. Tolerance: max(0.2 mm, a quarter of the slice spacing), above the
    position jitter the volume loader accepts (max(1 % of the spacing, 0.1 mm))
    and below the one-slice error it is meant to catch.
    """
    label_map = result.label_map
    tolerance = max(0.2, 0.25 * label_map.GetSpacing()[2])
    direction = np.asarray(label_map.GetDirection(), dtype=float).reshape(3, 3)
    for index, ds in enumerate(result.series.datasets):
        expected = np.asarray(label_map.TransformIndexToPhysicalPoint((0, 0, index)))
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        if np.linalg.norm(position - expected) > tolerance or not np.allclose(
            orientation, direction[:, :2].T.ravel(), atol=1e-3
        ):
            raise ValueError(
                f"result: source header {index} (Image Position/Orientation) does not lie on "
                f"slice {index} of the label map"
            )


def _generation_description(result: InferenceResult) -> str:
    """ROI Generation Description (LO, 64 chars): the model name and version."""
    text = f"{result.model.name} {result.model.version}"
    if len(text) > 64:
        raise ValueError(f"result: model name and version '{text}' exceed 64 characters")
    return text


def _mark_superseding(ds: Dataset, result: InferenceResult, predecessor: Predecessor) -> None:
    """A re-run's structure set: revision in label and Instance Number, the predecessor named and referenced."""
    ds.StructureSetLabel = structure_set_label(result.model, predecessor.next_revision)
    ds.StructureSetDescription = f"{full_statement(result.model)} {predecessor.sentence()}"
    ds.InstanceNumber = predecessor.next_revision
    reference = Dataset()
    reference.ReferencedSOPClassUID = predecessor.sop_class_uid
    reference.ReferencedSOPInstanceUID = predecessor.sop_instance_uid
    ds.PredecessorStructureSetSequence = DicomSequence([reference])


def _base_dataset(
    result: InferenceResult, series_number: int, manufacturer: str, when: datetime, series_instance_uid: str
) -> Dataset:
    """Top-level modules without the ROI sequences.

    SOP Common, Patient, General Study, RT Series, Frame of Reference (C.7.4.1,
    same as the source), General Equipment, the Structure Set header and
    Approval (C.8.8.16).
    """
    source = result.series.datasets[0]
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    ds = Dataset()
    sop_instance_uid = new_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    _copy_patient_and_study(source, ds)

    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = short_label(result.model)
    ds.OperatorsName = ""

    ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    ds.PositionReferenceIndicator = getattr(source, "PositionReferenceIndicator", "")

    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = result.model.name[:64]
    ds.SoftwareVersions = result.model.version[:64]

    ds.StructureSetLabel = structure_set_label(result.model)
    ds.StructureSetName = short_label(result.model)
    ds.StructureSetDescription = full_statement(result.model)
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = ApprovalStatus.UNAPPROVED.value
    return ds


def _copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy Patient / General Study attributes, decoded, for re-encoding as UTF-8."""
    for keyword in TYPE2_COPIED:
        value = getattr(source, keyword, "")
        setattr(target, keyword, _decoded(value))
    for keyword in TYPE3_COPIED:
        if keyword in source:
            setattr(target, keyword, _decoded(getattr(source, keyword)))
    target.StudyInstanceUID = source.StudyInstanceUID


def _decoded(value: object) -> object:
    """A value free of its source encoding (Person Names as plain text)."""
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, DicomSequence):
        return DicomSequence([_decoded_item(item) for item in value])
    return value


def _decoded_item(item: Dataset) -> Dataset:
    """A copy of a sequence item; iterating converts raw elements with the source charset."""
    copy = Dataset()
    for element in item:
        copy.add(DataElement(element.tag, element.VR, _decoded(element.value)))
    return copy


def _image_reference(ds: Dataset) -> Dataset:
    """A Contour Image Sequence item (PS3.3 C.8.8.6, Image SOP Instance Reference)."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _lesion_contour_items(
    result: InferenceResult,
    lesion: Lesion,
    labels: np.ndarray,
    box: tuple[slice, slice, slice] | None,
    simplify_tolerance_px: float,
) -> list[tuple[int, Dataset]]:
    """(slice index, Contour Sequence item) of every contour of one lesion.

    `labels` is the label map as an array (k, rows, cols) and `box` the lesion's
    bounding box in it (None: the label is absent); contours are traced on the
    box only, then shifted back.
    """
    if box is None or not (mask := labels[box] == lesion.label).any():
        raise ValueError(f"result: lesion {lesion.name} (label {lesion.label}) has no voxels")
    offset = np.array([box[1].start, box[2].start], dtype=np.float64)
    items: list[Dataset] = []
    for local, contours in enumerate(stack_contours(mask, simplify_tolerance_px)):
        index = box[0].start + local
        source = result.series.datasets[index]
        for points_rc in contours:
            patient = pixel_to_patient(points_rc + offset, source)
            item = Dataset()
            item.ContourImageSequence = DicomSequence([_image_reference(source)])
            item.ContourGeometricType = ContourGeometricType.CLOSED_PLANAR.value
            item.NumberOfContourPoints = len(patient)
            item.ContourNumber = len(items) + 1
            item[_CONTOUR_DATA] = _decimal_string_element(_CONTOUR_DATA, patient.ravel())
            items.append((int(index), item))
    if not items:
        raise ValueError(f"result: lesion {lesion.name} (label {lesion.label}) has no contour on any slice")
    return items


_CONTOUR_DATA = Tag("ContourData")


def _decimal_string_element(tag: Tag, values: np.ndarray) -> RawDataElement:
    """A DS element holding `values` with 4 decimals, already encoded (even length, space-padded).

    At most 16 characters per value (PS3.5 6.2): 4 decimals leave 10 digits before
    the point, far beyond any patient coordinate in mm.
    """
    if not np.all(np.abs(values) < 1e9):
        raise ValueError(f"result: a coordinate in {tag} does not fit a 16-character Decimal String")
    text = "\\".join(f"{v:.4f}" for v in values)
    data = (text + " " * (len(text) % 2)).encode("ascii")
    return RawDataElement(tag, "DS", len(data), data, 0, False, True)


def _structure_set_roi(number: int, name: str, frame_of_reference_uid: str, result: InferenceResult) -> Dataset:
    """A Structure Set ROI Sequence item (PS3.3 C.8.8.5)."""
    item = Dataset()
    item.ROINumber = number
    item.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    item.ROIName = name
    item.ROIDescription = full_statement(result.model)
    item.ROIGenerationAlgorithm = ROIGenerationAlgorithm.AUTOMATIC.value
    item.ROIGenerationDescription = _generation_description(result)
    return item


def _roi_contour(number: int, colour: tuple[int, int, int], contours: list[Dataset]) -> Dataset:
    """An ROI Contour Sequence item (PS3.3 C.8.8.6)."""
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = list(colour)
    item.ContourSequence = DicomSequence(contours)
    return item


def _roi_observation(number: int) -> Dataset:
    """An RT ROI Observations Sequence item (PS3.3 C.8.8.8)."""
    item = Dataset()
    item.ObservationNumber = number
    item.ReferencedROINumber = number
    item.RTROIInterpretedType = RTROIInterpretedType.GTV.value
    item.ROIInterpreter = ""
    return item


def _referenced_frame_of_reference(sources: Sequence[Dataset], contoured: list[int]) -> Dataset:
    """Referenced Frame of Reference -> RT Referenced Study -> Series -> Contour Images."""
    series = Dataset()
    series.SeriesInstanceUID = sources[0].SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([_image_reference(sources[k]) for k in contoured])
    study = Dataset()
    # Detached Study Management SOP Class (retired), the value PS3.3 C.8.8.5 names.
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = sources[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = sources[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame
