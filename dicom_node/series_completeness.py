"""Does a received series look whole? Evidence from its headers, read without pixel data.

DIMSE has no "end of series", so the watcher waits for a quiet period; this
module tells it whether what arrived looks like the whole series, so that a
series can be routed soon after its sender released the association, and a
series with a gap waits longer (`dicom_node.series_watcher`).

Evidence, most trusted first; a count is used only when it is consistent:

1. **An expected count.** ImagesInAcquisition (0020,1002), the standard,
   vendor-independent attribute, when every instance carries the same value,
   the series holds one acquisition (one AcquisitionNumber at most), no
   InstanceNumber exceeds it and no more instances arrived than it says (a
   count that does not describe this series is ignored, never trusted to hold
   a series back). Fewer instances than the count: incomplete, with the
   missing InstanceNumbers when the numbering is 1..N. As many: complete.
   Without it, a vendor's count of slice locations, read as dcm2niix reads
   them and only under its private creator: GE LocationsInAcquisition
   (0021,xx4F, GEMS_RELA_01), Philips NumberOfSlicesMR (2001,xx18, Philips
   Imaging DD 001), compared with the distinct slice locations received.
   Counts are not used for DERIVED images (ImageType): a reformat may carry
   its source acquisition's count.
2. **Temporal and cardiac positions.** NumberOfTemporalPositions (0020,0105)
   with TemporalPositionIdentifier (0020,0100): every position 1..N must be
   present with the same number of slices. CardiacNumberOfImages (0018,1090):
   every slice location must have that many images.
3. **Slice positions.** ImagePositionPatient projected on the slice normal
   (ImageOrientationPatient): a step larger than 1.5 times the median step
   inside the extent is a gap, i.e. missing slices.

What cannot be seen: without a count, trailing (or leading) slices that never
arrived leave evenly spaced positions behind, so such a series looks whole.
Then only the quiet period protects it (README, "Series completion").

Reading: only the attributes above are parsed (`specific_tags`,
`stop_before_pixels`): about 1 ms per instance.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

# The attributes the verdict reads (and nothing else is parsed).
COMPLETENESS_KEYWORDS = (
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "ImagesInAcquisition",
    "AcquisitionNumber",
    "NumberOfTemporalPositions",
    "TemporalPositionIdentifier",
    "CardiacNumberOfImages",
    "Rows",
    "Columns",
)
# A step between slice positions larger than this times the median step is a gap.
GAP_FACTOR = 1.5
# Slice positions closer than this (mm) along the normal are one location (e.g. repeated per time point).
SAME_LOCATION_MM = 0.01
# Orientation cosines that differ by more than this are another orientation.
ORIENTATION_TOLERANCE = 1e-3
# Vendor counts of slice locations: (group, private creator, element offset, name in the verdict).
VENDOR_LOCATION_COUNTS = (
    (0x0021, "GEMS_RELA_01", 0x4F, "GE LocationsInAcquisition"),
    (0x2001, "Philips Imaging DD 001", 0x18, "Philips NumberOfSlicesMR"),
)
# Private blocks looked for (creator elements gggg,0010 .. gggg,001F).
_PRIVATE_BLOCKS = range(0x10, 0x20)
_PRIVATE_TAGS = [
    tag
    for group, _, offset, _ in VENDOR_LOCATION_COUNTS
    for block in _PRIVATE_BLOCKS
    for tag in ((group << 16) | block, (group << 16) | (block << 8) | offset)
]


@dataclass(frozen=True)
class SliceHeader:
    """The completeness attributes of one instance (None: absent or unusable)."""

    instance_number: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    matrix: tuple[int | None, int | None] = (None, None)  # Rows, Columns
    images_in_acquisition: int | None = None
    acquisition_number: int | None = None
    temporal_positions: int | None = None
    temporal_position: int | None = None
    cardiac_images: int | None = None
    derived: bool = False  # ImageType value 1 is DERIVED
    vendor_locations: tuple[str, int] | None = None  # (name, value) of a vendor's slice-location count


@dataclass(frozen=True)
class Completeness:
    """The verdict on one series as received so far."""

    received: int
    expected: int | None  # images, from ImagesInAcquisition when it applies to this series
    missing: str | None  # why it looks incomplete; None when nothing is seen missing
    evidence: str  # what the verdict rests on, for the job's history
    counted: bool = False  # a header count applies and is met (not merely nothing seen missing)

    @property
    def incomplete(self) -> bool:
        return self.missing is not None

    @property
    def confirmed(self) -> bool:
        """Complete by a count from the headers."""
        return self.missing is None and self.counted

    def describe(self) -> str:
        return f"incomplete: {self.missing}" if self.missing else self.evidence


def read_slice_header(path: Path) -> SliceHeader:
    """The completeness attributes of one stored instance; raises if the file cannot be read."""
    ds = pydicom.dcmread(
        path, stop_before_pixels=True, specific_tags=[*COMPLETENESS_KEYWORDS, "ImageType", *_PRIVATE_TAGS]
    )
    return SliceHeader(
        instance_number=_int(ds, "InstanceNumber"),
        position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=_floats(ds, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
        matrix=(_int(ds, "Rows"), _int(ds, "Columns")),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        acquisition_number=_int(ds, "AcquisitionNumber"),
        temporal_positions=_int(ds, "NumberOfTemporalPositions"),
        temporal_position=_int(ds, "TemporalPositionIdentifier"),
        cardiac_images=_int(ds, "CardiacNumberOfImages"),
        derived=_first(ds.get("ImageType")).strip().upper() == "DERIVED",
        vendor_locations=_vendor_locations(ds),
    )


def assess(headers: Sequence[SliceHeader]) -> Completeness:
    """Combine every piece of evidence (module doc) into one verdict."""
    received = len(headers)
    expected, count_missing, count_evidence = _count(headers)
    if expected is None:
        count_missing, count_evidence = _location_count(headers)
    counted = count_evidence is not None  # a count applies and is met
    findings = [f for f in (count_missing, _temporal(headers), _cardiac(headers)) if f]
    positions_missing, positions_evidence = _positions(headers)
    if positions_missing and not counted:
        findings.append(positions_missing)  # with every counted image here, a gap is spacing (the engine's concern)
    evidence = "; ".join(e for e in (count_evidence, positions_evidence) if e) or "no count or slice positions"
    missing = "; ".join(findings) or None
    return Completeness(received, expected, missing, f"{received} instances: {evidence}", counted)


def _count(headers: Sequence[SliceHeader]) -> tuple[int | None, str | None, str | None]:
    """(expected count, what is missing by it, evidence) from ImagesInAcquisition when it applies."""
    count = _consistent(h.images_in_acquisition for h in headers)
    if count is None or count <= 0 or any(h.derived for h in headers):
        return None, None, None
    if len({h.acquisition_number for h in headers if h.acquisition_number is not None}) > 1:
        return None, None, None  # the count is per acquisition; several here
    received = len(headers)
    numbers = [h.instance_number for h in headers if h.instance_number is not None]
    if received > count or (numbers and max(numbers) > count):
        return None, None, None  # the count does not describe this series: never trusted to hold it back
    if received == count:
        return count, None, f"{count} of {count} images (ImagesInAcquisition)"
    missing = f"{received} of {count} images (ImagesInAcquisition {count})"
    if len(numbers) == received and len(set(numbers)) == received and min(numbers) >= 1:
        missing += f", InstanceNumber {_ranges(sorted(set(range(1, count + 1)) - set(numbers)))} missing"
    return count, missing, None


def _location_count(headers: Sequence[SliceHeader]) -> tuple[str | None, str | None]:
    """(what is missing, evidence when met) by a vendor's count of slice locations, when it applies."""
    vendor = _consistent_pair(h.vendor_locations for h in headers)
    normal = _normal(headers)
    if vendor is None or normal is None or any(h.derived for h in headers):
        return None, None
    name, count = vendor
    locations = len({_location(h, normal) for h in headers})
    if count <= 0 or locations > count:
        return None, None  # the count does not describe this series
    if locations == count:
        return None, f"{locations} of {count} slice locations ({name})"
    return f"{locations} of {count} slice locations ({name} {count})", None


def _temporal(headers: Sequence[SliceHeader]) -> str | None:
    """Missing temporal positions, or a last position with fewer slices than the others."""
    positions = _consistent(h.temporal_positions for h in headers)
    if positions is None or positions <= 1 or any(h.temporal_position is None for h in headers):
        return None
    per_position = Counter(h.temporal_position for h in headers)
    if not all(isinstance(p, int) and 1 <= p <= positions for p in per_position):
        return None  # identifiers outside 1..N: the attributes do not describe this series
    absent = sorted(set(range(1, positions + 1)) - set(per_position))
    findings = []
    if absent:
        findings.append(f"temporal position {_ranges(absent)} of {positions} missing (NumberOfTemporalPositions)")
    full = max(per_position.values())
    short = sorted((p, n) for p, n in per_position.items() if n < full)
    findings += [f"temporal position {p}: {n} of {full} slices" for p, n in short]
    return "; ".join(findings) or None


def _cardiac(headers: Sequence[SliceHeader]) -> str | None:
    """Slice locations with fewer images than CardiacNumberOfImages."""
    phases = _consistent(h.cardiac_images for h in headers)
    normal = _normal(headers)
    if phases is None or phases <= 1 or normal is None:
        return None
    per_location = Counter(_location(h, normal) for h in headers)
    short = sorted((z, n) for z, n in per_location.items() if n < phases)
    if not short:
        return None
    listed = ", ".join(f"{z:g} mm: {n}" for z, n in short[:3]) + (" ..." if len(short) > 3 else "")
    return f"{len(short)} slice locations with fewer than {phases} images (CardiacNumberOfImages; {listed})"


def _positions(headers: Sequence[SliceHeader]) -> tuple[str | None, str | None]:
    """(gaps inside the extent of the slice positions, evidence); nothing without usable positions."""
    normal = _normal(headers)
    if normal is None or len({h.matrix for h in headers}) > 1:  # mixed matrices: the engine names that fault
        return None, None
    locations = sorted({_location(h, normal) for h in headers})
    if len(locations) < 3:
        return None, None
    steps = [b - a for a, b in zip(locations, locations[1:], strict=False)]
    spacing = statistics.median(steps)
    if spacing < SAME_LOCATION_MM:
        return None, None
    gaps = [(a, b) for a, b, step in zip(locations, locations[1:], steps, strict=False) if step > GAP_FACTOR * spacing]
    evidence = f"{len(locations)} slice positions, spacing {spacing:.3g} mm"
    if not gaps:
        return None, evidence + ", no gap"
    slices = sum(round((b - a) / spacing) - 1 for a, b in gaps)
    listed = ", ".join(f"{a:g} to {b:g} mm" for a, b in gaps[:3]) + (" ..." if len(gaps) > 3 else "")
    return f"about {slices} slices missing between slice positions {listed} (spacing {spacing:.3g} mm)", evidence


def _normal(headers: Sequence[SliceHeader]) -> tuple[float, float, float] | None:
    """The common slice normal, or None when positions or one orientation are lacking."""
    if not headers or any(h.position is None or h.orientation is None for h in headers):
        return None
    first = headers[0].orientation
    assert first is not None
    for h in headers:
        assert h.orientation is not None
        if any(abs(a - b) > ORIENTATION_TOLERANCE for a, b in zip(h.orientation, first, strict=True)):
            return None  # mixed orientations: the engine fails such a series with its own reason
    r, c = first[:3], first[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if not math.isfinite(norm) or norm < 0.5:
        return None
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def _location(header: SliceHeader, normal: tuple[float, float, float]) -> float:
    assert header.position is not None
    z = sum(p * n for p, n in zip(header.position, normal, strict=True))
    return round(z / SAME_LOCATION_MM) * SAME_LOCATION_MM


def _consistent(values: Iterable[int | None]) -> int | None:
    """The one value every instance carries, else None (absent somewhere, or disagreeing)."""
    seen = set(values)
    if len(seen) != 1:
        return None
    return next(iter(seen))


def _consistent_pair(values: Iterable[tuple[str, int] | None]) -> tuple[str, int] | None:
    seen = set(values)
    return next(iter(seen)) if len(seen) == 1 else None


def _vendor_locations(ds: pydicom.Dataset) -> tuple[str, int] | None:
    """The first vendor slice-location count present under its own private creator."""
    for group, creator, offset, name in VENDOR_LOCATION_COUNTS:
        try:
            return name, int(_first(ds.private_block(group, creator)[offset].value))
        except (KeyError, TypeError, ValueError, IndexError):
            continue
    return None


def _first(value: object) -> str:
    """The first value of a multi-valued element (MultiValue, list) or the value itself, as text."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return str(value[0]) if len(value) else ""
    return "" if value is None else str(value)


def _ranges(numbers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9' (at most five runs, then '...')."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:5])
    return text + (", ..." if len(runs) > 5 else "")


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
        if value is None or len(value) != n:
            return None
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None
