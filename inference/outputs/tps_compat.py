"""What treatment-planning systems are known to reject, checked on the bytes a TPS would receive.

Why a separate check: the RTSTRUCT writer is built to avoid each of these, but
a TPS import failure is found in the clinic, late. So every RTSTRUCT is
serialised and read back, as the TPS will, and checked before it may be
written to the outputs (`dicom_outputs` raises on any problem; the job fails
with the list). The rules (SPEC.md "DICOM outputs"):

- every DS value at most 16 characters (PS3.5 6.2; Eclipse and RayStation
  refuse longer ones);
- Structure Set Label and every ROI Name at most 16 characters;
- every ROI has one RT ROI Observation with the same, non-empty RT ROI
  Interpreted Type;
- every contour references its image (Contour Image Sequence), and that image
  is one of the source series' instances;
- no contour with fewer than 3 points, and Number of Contour Points matches
  the Contour Data;
- every ROI's Frame of Reference is the source images' one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

MAX_DS_CHARS = 16
MAX_SH_CHARS = 16


def tps_problems(rtstruct: Dataset, sources: Sequence[Dataset]) -> list[str]:
    """Every reason a TPS may refuse `rtstruct` (empty when there is none).

    Parameters
    ----------
    rtstruct : pydicom.dataset.Dataset
        The RT Structure Set as built (it is serialised and re-read here).
    sources : sequence of pydicom.dataset.Dataset
        The source series' headers the structure set was drawn on.
    """
    received = _as_received(rtstruct)
    problems = list(_long_ds_values(received))
    label = str(received.get("StructureSetLabel", ""))
    if not label or len(label) > MAX_SH_CHARS:
        problems.append(f"StructureSetLabel {label!r} must have 1-{MAX_SH_CHARS} characters")
    source_uids = {str(ds.SOPInstanceUID) for ds in sources}
    frames = {str(ds.FrameOfReferenceUID) for ds in sources}
    rois = list(received.get("StructureSetROISequence", []))
    observed = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "")) for o in
                received.get("RTROIObservationsSequence", [])}  # fmt: skip
    if len(set(observed.values())) > 1:
        problems.append(f"RTROIInterpretedType differs between ROIs: {sorted(set(observed.values()))}")
    for roi in rois:
        number, name = int(roi.ROINumber), str(roi.get("ROIName", ""))
        if not name or len(name) > MAX_SH_CHARS:
            problems.append(f"ROI {number}: ROIName {name!r} must have 1-{MAX_SH_CHARS} characters")
        if not observed.get(number):
            problems.append(f"ROI {number}: no RT ROI Observation with an RTROIInterpretedType")
        if str(roi.ReferencedFrameOfReferenceUID) not in frames:
            problems.append(f"ROI {number}: Frame of Reference {roi.ReferencedFrameOfReferenceUID} is not the image's")
    for roi_contour in received.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        for index, contour in enumerate(roi_contour.get("ContourSequence", []), start=1):
            problems += _contour_problems(f"ROI {number} contour {index}", contour, source_uids)
    return problems


def check_tps_compatible(rtstruct: Dataset, sources: Sequence[Dataset]) -> None:
    """Raise `ValueError` listing every problem `tps_problems` finds."""
    problems = tps_problems(rtstruct, sources)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"the RTSTRUCT would be refused by planning systems: {shown}")


def _as_received(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _long_ds_values(ds: Dataset) -> Iterable[str]:
    for element in ds.iterall():
        if element.VR != "DS" or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            text = getattr(value, "original_string", None) or str(value)
            if len(text) > MAX_DS_CHARS:
                yield f"{element.keyword or element.tag}: DS value {text!r} is longer than {MAX_DS_CHARS} characters"
                break


def _contour_problems(where: str, contour: Dataset, source_uids: set[str]) -> list[str]:
    problems = []
    points = int(contour.get("NumberOfContourPoints", 0))
    data = contour.get("ContourData", [])
    if points < 3:
        problems.append(f"{where}: {points} point(s); a closed planar contour needs at least 3")
    if len(data) != 3 * points:
        problems.append(f"{where}: ContourData has {len(data)} values for {points} points")
    images = contour.get("ContourImageSequence", [])
    if not images:
        problems.append(f"{where}: no Contour Image Sequence (the contour does not reference its image)")
    for image in images:
        if str(image.ReferencedSOPInstanceUID) not in source_uids:
            problems.append(f"{where}: references image {image.ReferencedSOPInstanceUID}, not in the source series")
    return problems
