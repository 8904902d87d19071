"""Screen a series from its headers, before any pixel is decoded: is it what the model accepts?

Why: a model trained on post-contrast T1 produces confident nonsense on a T2,
a FLAIR or a diffusion series, and a series with NaN or absurd geometry can
scramble slices or build a model grid of many GiB. So every series is checked
against the model package's `accepts` (`inference.model.accepts`) from its
headers alone (`dcmread(stop_before_pixels=True)`): nothing large is allocated
and nothing is decoded before the series passes. A refusal names the DICOM
attributes and values it is based on, for the physicist reading the job log.

Two kinds of refusal:

- `SeriesError`: the headers are defective (not DICOM, no PatientID or an
  identity that is not valid DICOM text (`_check_identity`), mixed PatientID,
  StudyInstanceUID, FrameOfReferenceUID, SeriesInstanceUID or
  PhotometricInterpretation in one series, no FrameOfReferenceUID, a
  multi-frame or non-greyscale image,
  missing or non-finite ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing or SliceThickness, and the loader's own check of one
  orientation, matrix and pixel spacing). The job fails.
- `SeriesRefused` (a `SeriesError`): the series is readable but not what the
  model accepts (modality, lossy-compressed images, contrast, spacing, slice
  count, field of view, model-grid size, memory). The job is rejected, with
  every bound it breaks.

How "post-contrast T1" is recognised (decision). No single attribute is
reliable: ContrastBolusAgent is often left empty by the console, names are
site conventions, and sequence parameters say "T1-weighted" but not "after
contrast". So the evidence is combined, and physics beats names:

1. Sequence parameters that contradict a T1 refuse, whatever the names say:
   EchoTime above 30 ms (T2, PD, T2*), RepetitionTime above 3000 ms (T2, PD,
   FLAIR; an MPRAGE repeats every 1900-2500 ms), InversionTime of 1500 ms or
   more (fluid-nulled FLAIR), ScanningSequence EP (echo planar: diffusion,
   perfusion). Absent parameters contradict nothing.
2. A routing rule's `refuse` patterns refuse; its `accept` patterns then accept
   (a site's own name for its T1-CE protocol wins over the built-in names below).
3. Built-in names refuse (`REFUSE_NAMES`, searched in SeriesDescription and
   ProtocolName, case-insensitive, "_" and "-" count as word separators): T2,
   FLAIR (including T1-FLAIR: not what the demo was trained on), diffusion
   (DWI, DTI, ADC, TRACE, ep2d_diff), SWI, PD, angiography, perfusion, STIR,
   pre-contrast ("pre", "nativ", "w/o", "non-contrast"), localizers, and
   derived images (subtraction, MIP).
4. Otherwise the series must show both
   - T1 weighting: a T1 name (`T1_NAMES`: T1, MPRAGE, SPGR, BRAVO, TFE, VIBE,
     ...) or T1 parameters (EchoTime <= 10 ms with RepetitionTime <= 3000 ms:
     gradient echo and MPRAGE; or EchoTime <= 30 ms with RepetitionTime <=
     1000 ms: spin echo), and
   - contrast: a ContrastBolusAgent that is not empty or a negation ("none",
     "no"), or a contrast name (`CONTRAST_NAMES`: Gd, gad, +C, C+, post, CE,
     contrast, KM, agent brand names).

Examples: "t1_mprage_tra_Gd" (Siemens), "AX T1 POST" and "T1 SE +GD" (GE),
"3D T1W TFE +C" (Philips) are accepted; "T2 TSE", "AX FLAIR", "ep2d_diff",
"T1 pre" and a T1 with an empty ContrastBolusAgent and no contrast name are
refused.

Geometry (headers only). The spacing bounds apply to PixelSpacing, to the
inter-slice distance measured from ImagePositionPatient and to SliceThickness;
the field of view is Rows x PixelSpacing[0] and Columns x PixelSpacing[1]. The
model grid is estimated as `inference.imaging.preprocess.model_grid` builds
it: a near-axial series keeps one model slice per source slice; any other is
resampled to axial slices of min(spacing) clipped to [1, 2] mm over the
volume's whole z extent (an upper bound: the pipeline covers the head only).
Peak memory is estimated as six float32 copies of the source volume and three
of the model grid (the loader's stack and image, N4, z-score, probabilities),
a deliberate over-estimate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import python_encoding
from pydicom.errors import InvalidDicomError

from inference.errors import SeriesError, SeriesRefused
from inference.imaging.compression import lossy_evidence
from inference.imaging.preprocess import NEAR_AXIAL_DEGREES
from inference.imaging.volume_loader import SliceHeader, check_consistent, check_greyscale, check_single_frame
from inference.model.accepts import ModelAccepts

MAX_T1_ECHO_TIME_MS = 30.0
MAX_T1_GRADIENT_ECHO_TIME_MS = 10.0
MAX_T1_REPETITION_TIME_MS = 3000.0
MAX_T1_SPIN_ECHO_REPETITION_TIME_MS = 1000.0
MIN_FLAIR_INVERSION_TIME_MS = 1500.0
MODEL_GRID_Z_SPACING_MM = (1.0, 2.0)  # as preprocess.model_grid
MAX_POSITION_MM = 10_000.0  # ImagePositionPatient beyond 10 m of the origin: not a position in a scanner
SOURCE_COPIES, MODEL_GRID_COPIES = 6, 3
NAME_ATTRIBUTES = ("SeriesDescription", "ProtocolName")
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_SAME_IN_SERIES = (
    "SeriesInstanceUID",
    "PatientID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PhotometricInterpretation",
)
_NEGATED_AGENT = re.compile(r"^\s*(none|no|nil|n/?a|-+|0|without)?\s*$", re.IGNORECASE)

_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # word edges where "_", "-", "+", " " separate


def _word(alternatives: str, *, open_end: bool = False) -> str:
    return f"{_B}(?:{alternatives}){'' if open_end else _E}"


REFUSE_NAMES: tuple[tuple[str, str], ...] = (
    ("T2", _word("t2", open_end=True)),
    ("FLAIR", r"flair"),
    ("diffusion", _word(r"dwi|dti|adc|trace|ep2d|diff\w*|resolve")),
    ("susceptibility", _word(r"swi|swan")),
    ("proton density", _word(r"pdw?")),
    ("angiography", _word(r"tof|mra|angio\w*")),
    ("perfusion", _word(r"perf\w*|dsc|dce|asl|pwi")),
    ("STIR", _word(r"stir")),
    ("pre-contrast", _word(r"pre|precontrast|nativ\w*|w/o|wo|non[-_ ]?contrast|no[-_ ]?contrast")),
    ("localizer", _word(r"locali[sz]er|scout|survey|aahead\w*")),
    ("derived", _word(r"sub|subtraction|mip|minip")),
)
T1_NAMES = _word(r"t1\w*|mp[-_ ]?rage|f?spgr|bravo|tfe|vibe|flash")
CONTRAST_NAMES = "|".join(
    (
        _word(r"gd|gad\w*|ce|km|mdc|contrast|kontrast\w*|post(?![-_ ]?op)\w*|enh\w*|t1[-_ ]?ce?"),
        r"\+\s*(?:c|gd|gad\w*|km|contrast)" + _E,
        _B + r"c\s*\+",
        _word(r"gadovist|gadavist|dotarem|clariscan|multihance|prohance|magnevist|omniscan|elucirem|vueway"),
    )
)


@dataclass(frozen=True)
class NamePatterns:
    """A routing rule's own names: `refuse` patterns refuse, `accept` patterns accept (regex, searched,
    case-insensitive, in SeriesDescription and ProtocolName); both come before the built-in names."""

    accept: tuple[str, ...] = ()
    refuse: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.accept, *self.refuse):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"invalid screening pattern {pattern!r}: {err}") from None


@dataclass(frozen=True)
class Screening:
    """What the headers said about a series that passed."""

    slices: int
    model_grid: tuple[int, int, int]  # (columns, rows, slices) of the estimated model grid
    memory_mib: float
    contrast: str  # the evidence it was accepted on


@dataclass(frozen=True)
class _Header:
    path: Path
    ds: pydicom.Dataset


def read_headers(files: Sequence[Path]) -> list[_Header]:
    """Every file's header, stopping before Pixel Data (nothing large is read)."""
    headers = []
    for path in map(Path, files):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError as err:
            raise SeriesError(f"{path.name}: not a DICOM file ({err})") from err
        except Exception as err:  # noqa: BLE001 - truncated or garbled headers raise many kinds
            raise SeriesError(f"{path.name}: unreadable DICOM header ({type(err).__name__}: {err})") from err
        headers.append(_Header(path, ds))
    return headers


def screen_series(
    files: Sequence[Path],
    accepts: ModelAccepts | None = None,
    *,
    model_size: int = 384,
    names: NamePatterns | None = None,
) -> Screening:
    """Check a series' headers against `accepts`; raise `SeriesError`/`SeriesRefused` with the reason."""
    accepts = accepts or ModelAccepts()
    if not files:
        raise SeriesError("no files in the series")
    headers = read_headers(files)
    _check_one_series(headers)
    for header in headers:  # the outputs copy the identity of whichever file sorts first
        _check_identity(header)
    first = headers[0].ds
    modality = _text(first, "Modality")
    if modality not in accepts.modality:
        raise SeriesRefused(
            f"Modality {_shown(modality)}: the model accepts {', '.join(accepts.modality)} only "
            f"(SeriesDescription {_shown(_text(first, 'SeriesDescription'))})"
        )
    for header in headers:  # before the slice count: a multi-frame object is not "one slice"
        check_single_frame(header.path, header.ds)
        check_greyscale(header.path, header.ds)
    if not accepts.lossy_compressed:
        _check_lossless(headers)
    geometry = _geometry(headers)
    evidence = "contrast not checked (the model accepts any)"
    if accepts.contrast == "T1-CE":
        evidence = recognise_t1ce(first, names or NamePatterns())
    problems = _bounds(geometry, accepts, model_size)
    if problems:
        raise SeriesRefused("outside what the model accepts: " + "; ".join(problems))
    grid = (model_size, model_size, geometry.model_slices())
    return Screening(geometry.slices, grid, geometry.memory_mib(model_size), evidence)


# --- one series ------------------------------------------------------------------------------


def _check_one_series(headers: list[_Header]) -> None:
    """One patient, study, frame of reference, series, modality and photometric interpretation;
    patient IDs are never shown. The frame of reference must be named: the RTSTRUCT's contours
    are defined in it, and a TPS matches them to the images by it."""
    unnamed = [h.path.name for h in headers if not _text(h.ds, "FrameOfReferenceUID")]
    if unnamed:
        raise SeriesError(
            f"no FrameOfReferenceUID in {len(unnamed)} of {len(headers)} files (e.g. {unnamed[0]}): "
            "contours cannot be tied to the images' frame of reference"
        )
    for keyword in _SAME_IN_SERIES:
        values = Counter(_text(h.ds, keyword) for h in headers)
        if len(values) < 2:
            continue
        counts = " and ".join(str(n) for _, n in values.most_common())
        if keyword == "PatientID":
            raise SeriesError(
                f"mixed PatientID in one series: {len(values)} different patients ({counts} files); "
                "a series must belong to one patient"
            )
        listed = ", ".join(f"{_shown(value)} ({n} files)" for value, n in values.most_common(3))
        if keyword == "SeriesInstanceUID":  # worded as the loader words it
            raise SeriesError(f"files from {len(values)} series (one series per job): {listed}")
        raise SeriesError(f"mixed {keyword} in one series: {len(values)} different values: {listed}")


def _check_lossless(headers: list[_Header]) -> None:
    """`SeriesRefused` when any image is known to be lossy-compressed (`inference.imaging.compression`)."""
    lossy = [(h.path.name, why) for h in headers if (why := lossy_evidence(h.path, h.ds))]
    if lossy:
        name, why = lossy[0]
        raise SeriesRefused(
            f"lossy-compressed images in {len(lossy)} of {len(headers)} files (e.g. {name}: {why}): the model "
            "accepts images never compressed lossily; send the original, uncompressed or losslessly compressed"
        )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_LO_CHARS = 64  # PatientID (LO), and each component group of PatientName (PN): PS3.5 6.2


def _terms(value: object) -> list[str]:
    """The defined terms of a SpecificCharacterSet value (one, several, or none)."""
    if value in (None, ""):
        return []
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return [str(term).strip() for term in values]


def _check_identity(header: _Header) -> None:
    """The patient's identity the outputs will carry must be readable DICOM text; values never shown.

    Why: the RTSTRUCT and SR copy PatientName and PatientID, and the planning
    system matches them to its patient. An outside tester's series delivered
    outputs with a name altered by undecodable bytes (U+FFFD), control
    characters, a 5,000-character name, or no PatientID at all."""
    ds, name = header.ds, header.path.name
    unknown = [term for term in _terms(ds.get("SpecificCharacterSet")) if term not in python_encoding]
    if unknown:
        raise SeriesError(
            f"{name}: SpecificCharacterSet {', '.join(unknown)} is not a defined term: the patient's name "
            "cannot be read as the sender wrote it"
        )
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise SeriesError(f"{name}: no PatientID: the outputs could not be matched to the patient")
    try:
        patient_name = str(ds.get("PatientName", "") or "")
    except Exception as err:  # noqa: BLE001 - undecodable values raise many kinds
        raise SeriesError(f"{name}: PatientName cannot be decoded ({type(err).__name__})") from err
    for keyword, value, groups in (
        ("PatientID", patient_id, [patient_id]),
        ("PatientName", patient_name, patient_name.split("=")),
    ):
        if "\ufffd" in value:
            raise SeriesError(
                f"{name}: {keyword} holds bytes that are not text in the declared SpecificCharacterSet "
                f"({_text(ds, 'SpecificCharacterSet') or 'default'}): the outputs would carry an altered identity"
            )
        if _CONTROL.search(value):
            raise SeriesError(f"{name}: {keyword} contains control characters: not DICOM text")
        if any(len(group) > MAX_LO_CHARS for group in groups):
            raise SeriesError(f"{name}: {keyword} is longer than DICOM allows ({MAX_LO_CHARS} characters)")


# --- post-contrast T1 --------------------------------------------------------------------------


def recognise_t1ce(ds: pydicom.Dataset, names: NamePatterns) -> str:
    """The evidence that `ds` is a post-contrast T1, or `SeriesRefused` naming the attributes."""
    echo, repetition, inversion = (_number(ds, k) for k in ("EchoTime", "RepetitionTime", "InversionTime"))
    scanning = _text(ds, "ScanningSequence")
    agent = _text(ds, "ContrastBolusAgent")
    why = _contradicting_parameters(echo, repetition, inversion, scanning)
    refused = _matches(ds, names.refuse)
    if refused:
        why.append(f"{refused} (the rule refuses it)")
    accepted = _matches(ds, names.accept)
    if not accepted:
        why += [found for label, pattern in REFUSE_NAMES if (found := _matches(ds, (pattern,), label=label))]
    if why:
        raise SeriesRefused(_not_t1ce(ds, why))
    if accepted:
        return f"post-contrast T1: {accepted} (the rule accepts it)"
    t1 = _matches(ds, (T1_NAMES,), label="T1") or _t1_parameters(echo, repetition)
    if agent and not _NEGATED_AGENT.match(agent):
        contrast = f"ContrastBolusAgent {_shown(agent)}"
    else:
        contrast = _matches(ds, (CONTRAST_NAMES,), label="contrast")
    missing = [
        *([] if t1 else ["no T1 weighting: no T1 name and no T1 EchoTime/RepetitionTime"]),
        *([] if contrast else ["no contrast: ContrastBolusAgent empty and no contrast name"]),
    ]
    if missing:
        raise SeriesRefused(_not_t1ce(ds, missing))
    return f"post-contrast T1: {t1}; {contrast}"


def _contradicting_parameters(
    echo: float | None, repetition: float | None, inversion: float | None, scanning: str
) -> list[str]:
    why = []
    if echo is not None and echo > MAX_T1_ECHO_TIME_MS:
        why.append(f"EchoTime {echo:g} ms is above the {MAX_T1_ECHO_TIME_MS:g} ms of a T1 (T2, PD or T2* weighted)")
    if repetition is not None and repetition > MAX_T1_REPETITION_TIME_MS:
        why.append(f"RepetitionTime {repetition:g} ms is above the {MAX_T1_REPETITION_TIME_MS:g} ms of a T1")
    if inversion is not None and inversion >= MIN_FLAIR_INVERSION_TIME_MS:
        why.append(f"InversionTime {inversion:g} ms nulls fluid (FLAIR)")
    if "EP" in scanning.split("\\"):
        why.append("ScanningSequence EP is echo planar (diffusion or perfusion)")
    return why


def _t1_parameters(echo: float | None, repetition: float | None) -> str:
    if echo is None or repetition is None:
        return ""
    gradient = echo <= MAX_T1_GRADIENT_ECHO_TIME_MS and repetition <= MAX_T1_REPETITION_TIME_MS
    spin = echo <= MAX_T1_ECHO_TIME_MS and repetition <= MAX_T1_SPIN_ECHO_REPETITION_TIME_MS
    return f"EchoTime {echo:g} ms and RepetitionTime {repetition:g} ms are T1-weighted" if gradient or spin else ""


def _matches(ds: pydicom.Dataset, patterns: Sequence[str], *, label: str | None = None) -> str:
    """'SeriesDescription 'X' names LABEL' (or 'matches P') for the first match, else ''."""
    for keyword in NAME_ATTRIBUTES:
        value = _text(ds, keyword)
        for pattern in patterns:
            if value and re.search(pattern, value, re.IGNORECASE):
                return f"{keyword} {_shown(value)} " + (f"names {label}" if label else f"matches {pattern!r}")
    return ""


def _not_t1ce(ds: pydicom.Dataset, why: list[str]) -> str:
    facts = [f"ContrastBolusAgent {_shown(_text(ds, 'ContrastBolusAgent'))}"]
    facts += [f"{k} {_shown(_text(ds, k))}" for k in NAME_ATTRIBUTES if k == "SeriesDescription" or _text(ds, k)]
    for keyword in ("EchoTime", "RepetitionTime", "InversionTime"):
        value = _number(ds, keyword)
        if value is not None:
            facts.append(f"{keyword} {value:g} ms")
    if _text(ds, "ScanningSequence"):
        facts.append(f"ScanningSequence {_text(ds, 'ScanningSequence')}")
    return f"not a post-contrast T1: {', '.join(facts)} ({'; '.join(why)})"


# --- geometry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    slices: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    slice_spacing: float | None  # mm, measured from ImagePositionPatient; None when not measurable
    thickness: float | None
    normal: np.ndarray
    z_extent_mm: float  # patient z extent of the whole volume

    def model_slices(self) -> int:
        """Slices of the model grid `preprocess.model_grid` would build (an upper bound)."""
        if abs(self.normal[2]) >= math.cos(math.radians(NEAR_AXIAL_DEGREES)):
            return self.slices
        spacings = [*self.pixel_spacing, *([self.slice_spacing] if self.slice_spacing else [])]
        dz = min(max(min(spacings), MODEL_GRID_Z_SPACING_MM[0]), MODEL_GRID_Z_SPACING_MM[1])
        return int(math.floor(self.z_extent_mm / dz)) + 3  # + the head mask's margin step on each side

    def memory_mib(self, size: int) -> float:
        source = self.rows * self.columns * self.slices
        model = size * size * self.model_slices()
        return 4 * (SOURCE_COPIES * source + MODEL_GRID_COPIES * model) / 2**20


def _floats(h: _Header, keyword: str, count: int) -> np.ndarray:
    value = h.ds.get(keyword)
    values = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        numbers = np.array([float(v) for v in values], float)
    except (TypeError, ValueError) as err:
        raise SeriesError(f"{h.path.name}: unreadable {keyword} {value!r} ({err})") from err
    if numbers.shape != (count,):
        raise SeriesError(f"{h.path.name}: {keyword} has {numbers.size} value(s), {count} expected")
    if not np.all(np.isfinite(numbers)):
        raise SeriesError(
            f"{h.path.name}: non-finite {keyword} {_fmt(numbers)} (NaN or infinity); the geometry is unusable"
        )
    return numbers


def _geometry(headers: list[_Header]) -> _Geometry:
    """Parse and check each file's geometry attributes; measure slice spacing and z extent."""
    slices = []
    for h in headers:
        missing = [k for k in (*_GEOMETRY, "Rows", "Columns") if h.ds.get(k) in (None, "")]
        if missing:
            raise SeriesError(f"{h.path.name}: not a usable image, missing geometry: {', '.join(missing)}")
        geometry = (_floats(h, keyword, count) for keyword, count in zip(_GEOMETRY, (3, 6, 2), strict=True))
        slices.append(SliceHeader(h.path, h.ds, *geometry))
        if h.ds.get("SliceThickness") not in (None, ""):
            _floats(h, "SliceThickness", 1)
    check_consistent(slices)  # the loader's own check: one orientation, matrix and pixel spacing
    far = max(slices, key=lambda s: float(np.abs(s.position).max()))
    if float(np.abs(far.position).max()) > MAX_POSITION_MM:
        raise SeriesError(
            f"{far.path.name}: ImagePositionPatient {_fmt(far.position)} lies over {MAX_POSITION_MM / 1000:g} m from "
            "the patient coordinate origin: no scanner's table reaches that far (a unit other than mm?)"
        )
    first = slices[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError(
            f"{first.path.name}: ImageOrientationPatient {_fmt(first.orientation)} is not two orthogonal unit vectors"
        )
    normal /= np.linalg.norm(normal)
    row_spacing, col_spacing = (float(v) for v in first.pixel_spacing)
    rows, columns = int(first.ds.Rows), int(first.ds.Columns)
    depth = np.array([s.position @ normal for s in slices])
    span = float(depth.max() - depth.min())
    slice_spacing = span / (len(depth) - 1) if len(depth) > 1 and span > 0.01 else None
    corners = np.array(
        [
            p + a * (columns - 1) * col_spacing * row_dir + b * (rows - 1) * row_spacing * col_dir
            for p in (slices[int(np.argmin(depth))].position, slices[int(np.argmax(depth))].position)
            for a in (0, 1)
            for b in (0, 1)
        ]
    )
    thickness = float(first.ds.SliceThickness) if first.ds.get("SliceThickness") not in (None, "") else None
    return _Geometry(
        slices=len(headers),
        rows=rows,
        columns=columns,
        pixel_spacing=(row_spacing, col_spacing),
        slice_spacing=slice_spacing,
        thickness=thickness,
        normal=normal,
        z_extent_mm=float(np.ptp(corners[:, 2])),
    )


def _bounds(g: _Geometry, accepts: ModelAccepts, model_size: int) -> list[str]:
    """Every bound of `accepts` the series breaks, as sentences naming the attributes."""
    problems = []
    slices = g.slices
    low, high = accepts.slices
    if slices < low:
        problems.append(
            f"only {slices} slice(s); at least {low} are needed for a 3D volume "
            "(a localizer or a single slice cannot give lesion volumes)"
        )
    elif slices > high:
        problems.append(f"{slices} slices; the model accepts at most {high}")
    low_mm, high_mm = accepts.spacing_mm
    measured = [
        ("PixelSpacing (row)", g.pixel_spacing[0]),
        ("PixelSpacing (column)", g.pixel_spacing[1]),
        ("slice spacing (from ImagePositionPatient)", g.slice_spacing),
        ("SliceThickness", g.thickness),
    ]
    for name, value in measured:
        if value is not None and not (low_mm - 1e-6 <= value <= high_mm + 1e-6):
            problems.append(f"{name} {value:g} mm outside {low_mm:g}-{high_mm:g} mm")
    low_mm, high_mm = accepts.field_of_view_mm
    fov = (g.rows * g.pixel_spacing[0], g.columns * g.pixel_spacing[1])
    if not all(low_mm <= v <= high_mm for v in fov):
        problems.append(
            f"field of view {fov[1]:g} x {fov[0]:g} mm (Columns {g.columns} x PixelSpacing {g.pixel_spacing[1]:g}, "
            f"Rows {g.rows} x PixelSpacing {g.pixel_spacing[0]:g}) outside {low_mm:g}-{high_mm:g} mm"
        )
    voxels = model_size * model_size * g.model_slices()
    if voxels > accepts.max_model_grid_voxels:
        problems.append(
            f"model grid {model_size}x{model_size}x{g.model_slices()} ({voxels / 1e6:.1f} M voxels) exceeds the maximum of "
            f"{accepts.max_model_grid_voxels / 1e6:.1f} M"
        )
    memory = g.memory_mib(model_size)
    if memory > accepts.max_memory_mib:
        problems.append(f"estimated memory {memory / 1024:.1f} GiB exceeds {accepts.max_memory_mib / 1024:.1f} GiB")
    return problems


# --- values ------------------------------------------------------------------------------------


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _shown(value: str) -> str:
    return f"'{value[:64]}'" if value else "empty"


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
