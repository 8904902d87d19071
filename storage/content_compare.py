"""Do two encodings of one SOP Instance carry the same content? (Only when their bytes differ.)

A re-sent instance whose sha256 differs from the stored one is either a real
correction (demographics fix, patient merge, re-reconstruction) or the same
content in another encoding: another transfer syntax (Implicit instead of
Explicit VR, RLE or JPEG-LS lossless instead of native pixels), other file meta
information (implementation class, source AE), defined instead of undefined
sequence lengths, other padding. Only the first is a conflict.

Decisions:
- Compared: every data set element except the file meta information (group
  0002), group lengths and trailing padding, each one by its value encoded the
  same way (Implicit VR Little Endian), so the VR written on the wire, the
  byte order and the string padding make no difference; sequences item by item.
- Pixel data is compared by its decoded values (`pixel_array`): a lossless
  re-encoding is the same image, a lossy one is not. Raw bytes that are equal
  need no decoding. Pixel data that cannot be decoded counts as different
  (a conflict is the safe answer: both versions are kept).
- `material`: every changed element except the few listed in
  `IMMATERIAL_KEYWORDS`. The rule is inverted on purpose: the model, input
  screening, routing rules (which may name any attribute) and the outputs read
  more than any fixed list would name (BodyPartExamined,
  PositionReferenceIndicator, StationName, InstanceNumber ...), so a change is
  material unless known not to be. Immaterial are only the elements that
  record when and by whom this encoding was made or signed (instance creation
  date, time and creator, coercion time, original-attributes audit trail,
  digital signatures); private elements, window presets and institution names
  are material (routing may read them; a second delivery is the safe error).
  A change there makes a replaced series a new delivery.
- `describe` never shows a patient's data: values are shown only for numbers
  outside the Patient module (geometry, rescale, timings); everything else is
  named only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag

# Pixel data elements (PixelData, FloatPixelData, DoubleFloatPixelData): compared by decoded value.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_TRAILING_PADDING = 0xFFFCFFFC

# The identity the RTSTRUCT and SR copy from the series (inference/outputs).
IDENTITY_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDsSequence",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "StudyDescription",
        "AccessionNumber",
        "ReferringPhysicianName",
    }
)
# The only changes that do not make a replaced series a new delivery (module doc): when and by whom
# this encoding was made or signed. Nothing downstream reads them; the outputs write their own.
IMMATERIAL_KEYWORDS = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "InstanceCreatorUID",
        "InstanceCoercionDateTime",
        "OriginalAttributesSequence",
        "DigitalSignaturesSequence",
        "MACParametersSequence",
    }
)

_NUMERIC_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_SHOWN_VALUE_CHARS = 60


@dataclass(frozen=True)
class Change:
    """One top-level element that differs: its name, and its values when they may be shown."""

    name: str
    before: str | None = None  # None: not shown (text, identifying, or absent on one side)
    after: str | None = None
    note: str | None = None

    def describe(self) -> str:
        if self.note is not None:
            return f"{self.name} ({self.note})"
        if self.before is not None and self.after is not None:
            return f"{self.name} {self.before} -> {self.after}"
        return self.name


@dataclass(frozen=True)
class ContentDiff:
    """The differences between a stored instance and a re-sent one (empty: same content)."""

    changes: tuple[Change, ...] = field(default_factory=tuple)
    unreadable: bool = False  # a version could not be read whole: treated as a material change

    @property
    def same_content(self) -> bool:
        return not self.changes

    @property
    def keywords(self) -> list[str]:
        return [change.name for change in self.changes]

    @property
    def material(self) -> list[str]:
        """The changed elements that may matter downstream: all but `IMMATERIAL_KEYWORDS` (module doc)."""
        return [name for name in self.keywords if name not in IMMATERIAL_KEYWORDS]

    def describe(self, limit: int = 12) -> str:
        """A one-line summary without patient data (see module doc)."""
        shown = [change.describe() for change in self.changes[:limit]]
        more = len(self.changes) - limit
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def compare_files(stored: Path, resent: Path) -> ContentDiff:
    """Compare two encoded instances (file meta + data set), see module doc. Never raises:
    a version that cannot be read whole is reported as a change (`unreadable`)."""
    try:
        return _compare(pydicom.dcmread(stored, force=True), pydicom.dcmread(resent, force=True))
    except Exception as exc:
        return ContentDiff((Change("data set", note=f"could not be read: {exc.__class__.__name__}"),), unreadable=True)


def _compare(first: Dataset, second: Dataset) -> ContentDiff:
    changes = [
        Change(_name(tag), *_shown_values(first.get(tag), second.get(tag)))
        for tag in _differing_tags(first, second)
        if int(tag) not in _PIXEL_TAGS
    ]
    pixels = _pixel_change(first, second)
    if pixels is not None:
        changes.append(pixels)
    changes.sort(key=lambda change: change.name)
    return ContentDiff(tuple(changes))


def _differing_tags(first: Dataset, second: Dataset) -> list[BaseTag]:
    """Top-level tags whose element differs (present on one side only, or another value)."""
    tags = {tag for tag in (*first.keys(), *second.keys()) if _compared(tag)}
    return sorted(tag for tag in tags if not _same_element(first.get(tag), second.get(tag)))


def _compared(tag: BaseTag) -> bool:
    return tag.group != 0x0002 and tag.element != 0x0000 and int(tag) != _TRAILING_PADDING


def _same_element(a: DataElement | None, b: DataElement | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if int(a.tag) in _PIXEL_TAGS:
        return True  # compared decoded, by _pixel_change
    a_items, b_items = _items(a), _items(b)
    if a_items is not None or b_items is not None:
        if a_items is None or b_items is None or len(a_items) != len(b_items):
            return False
        return all(not _differing_tags(x, y) for x, y in zip(a_items, b_items, strict=True))
    return _encoded(a) == _encoded(b)


def _items(element: DataElement) -> list[Dataset] | None:
    """The items of a sequence; None for any other element (an unknown-VR sequence is decoded first)."""
    if element.VR == "SQ":
        return list(element.value)
    return None


def _encoded(element: DataElement) -> bytes:
    """The element's value bytes in Implicit VR Little Endian: independent of how it was sent."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    try:
        write_data_element(buffer, element)
    except Exception:  # a value pydicom cannot re-encode: compare what it holds
        return repr(element.value).encode()
    return buffer.getvalue()[8:]  # without tag and length


def _pixel_change(first: Dataset, second: Dataset) -> Change | None:
    """None when the pixel data is the same image, else the change with a short note."""
    for tag in sorted(_PIXEL_TAGS):
        a, b = first.get(tag), second.get(tag)
        if a is None and b is None:
            continue
        name = _name(BaseTag(tag))
        if a is None or b is None:
            return Change(name, note="present in one version only")
        if _transfer_syntax(first) == _transfer_syntax(second) and a.value == b.value:
            continue
        try:
            same = _same_pixels(first.pixel_array, second.pixel_array)
        except Exception as exc:  # no decoder, corrupt data: cannot show they are equal
            return Change(name, note=f"could not be compared: {exc.__class__.__name__}")
        if not same:
            return Change(name, note="decoded values differ")
    return None


def _same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    return str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None


def _name(tag: BaseTag) -> str:
    """The keyword, or `(gggg,eeee)` for a private or unknown tag."""
    keyword = pydicom.datadict.keyword_for_tag(tag)
    return keyword or f"({tag.group:04X},{tag.element:04X})"


def _shown_values(a: DataElement | None, b: DataElement | None) -> tuple[str | None, str | None]:
    """Both values when both are numbers outside the Patient module; else nothing is shown."""
    if a is None or b is None or a.VR not in _NUMERIC_VRS or b.VR not in _NUMERIC_VRS:
        return None, None
    if a.keyword.startswith(("Patient", "OtherPatient")) or a.keyword in IDENTITY_KEYWORDS:
        return None, None
    return _short(a.value), _short(b.value)


def _short(value: object) -> str:
    text = (
        "\\".join(str(v) for v in value) if isinstance(value, Iterable) and not isinstance(value, str) else str(value)
    )
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."
