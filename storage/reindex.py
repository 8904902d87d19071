"""Rebuild the job store's rows from the instance files: disaster recovery after losing the database.

`dicom-node store reindex` runs this with the node stopped, against the
(new, empty or restored) database the node will use. Decisions:

- Only `instances/<study>/<series>/<sop>.dcm` becomes instance rows, read
  header only (`stop_before_pixels`); `tmp/`, `conflicts/`, `outputs/` are not
  instances (`outputs/` gives the rows of table `outputs`, below).
- A file whose path has a row is left alone, so a second run adds nothing
  (idempotent); a purged row whose file is back is pointed at it again.
- By default a reindexed series is marked evaluated (`evaluated_at` set, no
  job opened): after losing the database, months of old studies must not go
  through the model and to the TPS again. Only instances received from now on
  make it a new delivery. With `route`, rows are made exactly as when the
  instance arrives (`storage.ingest`): the first instance of a series opens a
  job in `received`, and after the quiet period the series watcher routes it,
  so every reindexed series is processed and delivered again. (A series that
  already has a `received` job, from a restored backup, is left unevaluated
  either way: that job is routed.) The job history itself is gone with the
  database.
- A row whose file is missing (an older backup restored, the file purged by
  retention after it) is marked purged (`purged_at`) and reported, so that a
  later re-send of the instance is stored again instead of answered as a
  duplicate.
- Nothing is deleted. A file that cannot be read, is cut short (`incomplete`:
  a power cut before its data was flushed), or whose UIDs do not match
  its path, or whose series or study UID is indexed already for another study
  or patient (`storage.ingest.IdentityConflict`: the receive refuses it; files
  are indexed in the order of their modification times, so the first received
  keeps its series, provided a restore kept the times (`cp -p`, `rsync -t`);
  the dry run cannot see this), is moved to `unindexed/` (same relative path) and
  reported: left
  under `instances/` without a row, start-up would remove it as a
  never-acknowledged leftover.
- The revision history of the results (table `outputs`, `storage.outputs`) is
  rebuilt from the files the node wrote, `outputs/job-<id>/attempt-<n>/
  <KIND>_<SOP Instance UID>.dcm` (RTSTRUCT, SEG, SR; header and name must
  agree, and the object must name its source series): one row per file, the
  revisions of each output series in Instance Number order, so that the next
  re-run continues the numbering and names its predecessor instead of writing
  r1 again into the same output series. A job whose outputs are on disk but
  whose row is gone is recreated under its own id (`done`, with a reason saying
  that its history is lost; retention counts from the rebuild), on its source
  series (created when its instances are gone too, marked evaluated). Its
  id is thereby taken: a new job never writes into a folder of an old one.
  This happens before the instance walk, so that `route`'s new jobs come after
  them. A job the store still has (a restored backup) gets the rows of its
  later attempts, and its attempt count is raised to the last one on disk.
  Other files under `outputs/` are listed, never moved.
- The store id (`storage.store_identity`) is adopted only after the whole walk,
  so an interrupted reindex leaves start-up refusing (rather than deleting
  the files not yet indexed); run it again. A database that already belongs to
  another data directory is refused.
"""

from __future__ import annotations

import json
import re
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.database import Database
from storage.ingest import (
    IdentityConflict,
    InstanceMeta,
    _commit_row,
    _get_or_create_series,
    _restore_row,
    instance_row,
    refuse_moving,
)
from storage.instance_store import InstanceStore, sha256_file, validate_uid
from storage.models import EventKind, Instance, Job, JobEvent, JobState, Output, Series, utcnow
from storage.store_identity import StoreMismatchError, bind, database_store_id, file_store_id

UNINDEXED_DIR = "unindexed"


@dataclass
class ReindexReport:
    """What one run found and did."""

    files: int = 0  # instance files under instances/
    known: int = 0  # already had their row
    added: int = 0  # rows created (or purged rows restored)
    series: set[str] = field(default_factory=set)  # Series Instance UIDs that got rows
    routed: bool = False  # True: each of `series` has a job in `received` (routed again); False: marked evaluated
    missing: list[str] = field(default_factory=list)  # rows whose file is missing: marked purged
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why); moved to unindexed/
    store_id: str | None = None
    output_files: int = 0  # DICOM files under outputs/job-*/attempt-*/
    outputs_known: int = 0  # already had their `outputs` row
    outputs_added: int = 0  # `outputs` rows created
    output_series: set[str] = field(default_factory=set)  # output series that got rows
    jobs_restored: list[int] = field(default_factory=list)  # job rows recreated for their outputs
    outputs_skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why); left in place


def reindex(
    db: Database,
    store: InstanceStore,
    read_meta: Callable[[Path], InstanceMeta],
    *,
    route: bool = False,
    dry_run: bool = False,
) -> ReindexReport:
    """Create the missing rows for the files under `instances/`, mark rows without a file purged (module doc).

    `read_meta` reads a stored file's header into the values the job store
    keeps (the Store SCP's reading, so rows look as if the instance had just
    arrived). `route`: open jobs so that the series are processed and
    delivered again; else they are marked evaluated. With `dry_run` nothing
    is written or moved."""
    on_disk, in_db = file_store_id(store), database_store_id(db)
    if on_disk and in_db and on_disk != in_db:
        raise StoreMismatchError(
            f"the job store ({db.url_for_humans}) belongs to another data directory (store id {in_db}, "
            f"{store.root} has {on_disk}): reindex into a new, empty database; nothing was changed"
        )
    with db.session() as session:
        known = set(session.scalars(select(Instance.path).where(Instance.purged_at.is_(None))))
    report = ReindexReport(routed=route)
    # Outputs first: their jobs get their own ids back before `route` opens new jobs (module doc).
    outputs = _restore_jobs(db, store, read_meta, _scan_outputs(db, store, report), report, dry_run)
    seen: set[str] = set()
    # In the order received (file times): where two studies claim one series, the first keeps it, as the
    # receive decided (`IdentityConflict`); the later one is moved aside.
    for path in sorted((store.root / "instances").rglob("*.dcm"), key=lambda p: (p.stat().st_mtime_ns, p)):
        report.files += 1
        relative = path.relative_to(store.root).as_posix()
        seen.add(relative)
        if relative in known:
            report.known += 1
            continue
        try:
            cut = incomplete(path)
            if cut is not None:
                raise ValueError(f"incomplete file (cut short, e.g. by a power cut): {cut}")
            meta = read_meta(path)
            expected = store.instance_path(meta.study_uid, meta.series_uid, meta.sop_instance_uid)
            if expected != relative:
                raise ValueError(f"its UIDs place it at {expected}")
        except Exception as exc:  # incomplete or unreadable file, missing or invalid UIDs
            report.unreadable.append((relative, f"{exc.__class__.__name__}: {exc}"))
            if not dry_run:
                store.move(relative, f"{UNINDEXED_DIR}/{relative}")
            continue
        add = _add_row if route else _add_row_evaluated
        try:
            added = dry_run or add(db, meta, relative, sha256_file(path), path.stat().st_size)
        except IdentityConflict as exc:  # a series or study UID another patient's files hold (ingest)
            report.unreadable.append((relative, f"{exc.__class__.__name__}: {exc}"))
            store.move(relative, f"{UNINDEXED_DIR}/{relative}")
            continue
        if not added:
            report.known += 1  # indexed meanwhile (a second reindex, or a node using this database)
            continue
        report.added += 1
        report.series.add(meta.series_uid)
    report.missing = sorted(p for p in known - seen if not store.absolute(p).exists())
    report.outputs_added = len(outputs)
    report.output_series = {o.series_uid for o in outputs}
    if not dry_run:
        _add_outputs(db, outputs)
        _mark_purged(db, report.missing)
        report.store_id = on_disk or in_db or uuid.uuid4().hex
        bind(db, store, report.store_id)
    return report


_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


def incomplete(path: Path) -> str | None:
    """Why the instance file is cut short, or None when every value it declares is whole.

    Why: a file renamed into place whose data a power cut did not flush can be short, and
    pydicom reads such a file without an error (native Pixel Data cut short reads silently; an
    encapsulated one only warns), so reindex would record a damaged instance as good. Read with
    `defer_size` (values are not loaded, only their positions): every top-level element's value
    must end within the file, and the last one at its end (else a cut element header follows);
    pydicom's end-of-file warning for an undefined-length value (encapsulated Pixel Data, no
    delimiter) counts as cut; native Pixel Data must hold Rows x Columns x Samples per Pixel x
    Bits Allocated / 8 x Number of Frames bytes; an image without Pixel Data (a file cut at an
    element boundary before it) is cut. A file cut only in its trailing padding, or in the last
    four bytes of an encapsulated Pixel Data's delimiter, has every value and is not refused;
    neither is a file whose elements are out of tag order, a deflated one (its positions are in
    the inflated stream), nor one whose image size cannot be computed (a malformed value).
    Raises what pydicom raises for a file it cannot read at all. Catching warnings changes
    process-wide state: call it from one thread (reindex runs alone)."""
    size = path.stat().st_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, defer_size=1024)
    for warning in caught:
        if "End of file" in str(warning.message):
            return str(warning.message)
    tags = sorted(ds.keys())
    if not tags:
        return "no data set elements after the file meta information"
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and pydicom.uid.UID(str(syntax)).is_deflated:
        return None  # positions are in the inflated stream, not the file: nothing to compare here
    pixel_length, end, last = None, 0, ""
    for tag in tags:
        if tag == _PADDING:  # trailing padding holds no value: cut there, the instance is whole
            continue
        element = ds.get_item(tag, keep_deferred=True)
        tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
        if tell is None or length is None or length == _UNDEFINED_LENGTH:
            continue  # an undefined-length value: read to its delimiter, or warned about above
        name = f"{element.tag} {keyword_for_tag(tag)}".rstrip()
        if tell + length > size:
            return f"element {name} needs {tell + length} bytes, the file has {size}"
        if tell + length > end:  # elements may be out of tag order: the one that ends last counts
            end, last = tell + length, name
        if tag == _PIXEL_DATA:
            pixel_length = length
    if _PADDING not in ds and 0 < size - end < _LONGEST_ELEMENT_HEADER:
        return f"{size - end} bytes after the last whole element {last} (a cut element header)"
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    image = sop_class is not None and pydicom.uid.UID(str(sop_class)).name.endswith("Image Storage")
    if _PIXEL_DATA not in ds and (image or "Rows" in ds):
        return "no Pixel Data"
    encapsulated = syntax is not None and pydicom.uid.UID(str(syntax)).is_encapsulated
    if pixel_length is not None and not encapsulated:
        expected = _native_pixel_bytes(ds)
        if expected is not None and pixel_length < expected:
            return f"Pixel Data has {pixel_length} bytes, its rows, columns and frames need {expected}"
    return None


# An element header is 8 or 12 bytes: fewer bytes after the last whole value than the longest
# header are one the cut went through (more would have been read as an element and checked).
_LONGEST_ELEMENT_HEADER = 12
_PADDING = 0xFFFCFFFC  # Data Set Trailing Padding


def _native_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    """The bytes native Pixel Data needs, or None where that cannot be judged (a malformed
    value, an unusual layout): a file is never refused on a guess."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        if str(ds.get("PhotometricInterpretation", "")).endswith("_422"):
            samples = 2  # two luminance samples share one pair of chroma samples
        bits = int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    return (bits + 7) // 8


def _add_row(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> bool:
    """The instance's row, as `store_instance` makes it; False when it exists (not purged) already."""
    with db.session() as session:
        existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid))
        purged = existing is not None and existing.purged_at is not None
        if existing is not None and not purged:
            return False
    try:
        if purged:
            refuse_moving(db, meta)  # its file back, unless another series' file claims its UID
            _restore_row(db, meta, relative, digest, size)
        else:
            _commit_row(db, meta, relative, digest, size)
    except IntegrityError:
        return False
    return True


def _add_row_evaluated(db: Database, meta: InstanceMeta, relative: str, digest: str, size: int) -> bool:
    """The instance's row without a new delivery: its series marked evaluated, no job opened (module
    doc), unless the series has a `received` job already. False when the row exists (not purged)."""
    try:
        with db.session() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid))
            if existing is not None and existing.purged_at is None:
                return False
            if existing is not None:  # purged: its file back, unless another series' file claims its UID
                refuse_moving(db, meta)
            series = _get_or_create_series(session, meta)
            now = utcnow()
            if existing is None:
                session.add(instance_row(meta, series, relative, digest, size))
                session.flush()
                series.instance_count = Series.instance_count + 1
            else:  # purged, its file back
                existing.path, existing.sha256, existing.size_bytes = relative, digest, size
                existing.transfer_syntax_uid, existing.purged_at, existing.received_at = (
                    meta.transfer_syntax_uid,
                    None,
                    now,
                )
            session.flush()
            series.last_received_at = now
            receiving = session.scalar(
                select(Job.id).where(Job.series_id == series.id, Job.state == JobState.RECEIVED).limit(1)
            )
            if receiving is None:
                series.evaluated_at = now
    except IntegrityError:
        return False
    return True


def _mark_purged(db: Database, paths: list[str]) -> None:
    """Rows whose file is missing are purged: a re-send then stores the instance again."""
    now = utcnow()
    with db.session() as session:
        for start in range(0, len(paths), 500):
            session.execute(
                update(Instance)
                .where(Instance.path.in_(paths[start : start + 500]), Instance.purged_at.is_(None))
                .values(purged_at=now)
            )


# -- the outputs the node wrote: the revision history of each output series (`storage.outputs`) ----------

#: A file a job's attempt wrote (`InstanceStore.attempt_outputs`; `<KIND>_<SOP Instance UID>.dcm`, as the
#: writers name them). Only such files count: anything else under outputs/ is not the node's output.
_OUTPUT_FILE = re.compile(r"outputs/job-([1-9][0-9]*)/attempt-([1-9][0-9]*)/(RTSTRUCT|SEG|SR)_([0-9.]{1,64})\.dcm")
#: What the worker writes beside the DICOM outputs of an attempt (`inference.pipeline.write_offline_outputs`).
SUMMARY_FILE = "summary.json"
#: The order an attempt writes (and exports) its objects in: its rows keep it (`attempt_outputs`).
_WRITING_ORDER = ("RTSTRUCT", "SEG", "SR")
_OUTPUT_KEYWORDS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceNumber",
    "PatientID",
    "PatientName",
    "StudyDate",
    "AccessionNumber",
    "ReferencedFrameOfReferenceSequence",  # RTSTRUCT: the contoured series
    "CurrentRequestedProcedureEvidenceSequence",  # SR: the series it reports on
    "ReferencedSeriesSequence",  # SEG: the segmented series
]


@dataclass(frozen=True)
class OutputFile:
    """One object a job's attempt wrote, read back from its file: what its `outputs` row holds."""

    path: str  # relative to the data directory
    job_id: int
    attempt: int
    kind: str
    study_uid: str
    series_uid: str  # the output series
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int  # its revision in the output series
    source_series_uid: str  # the series the job ran on
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    accession_number: str | None
    written_at: datetime

    @property
    def order(self) -> tuple[int, int, int, int]:
        """Rows are added in this order: the revisions of each output series in turn, and within an
        attempt the writing order (the row ids say both)."""
        return (_WRITING_ORDER.index(self.kind), self.instance_number, self.job_id, self.attempt)


def read_output_file(store: InstanceStore, relative: str) -> OutputFile:
    """The identity of an output file the node wrote. Raises `ValueError` (saying why) for anything else:
    a name the writers do not make, a header that does not match its name, no source series."""
    found = _OUTPUT_FILE.fullmatch(relative)
    if found is None:
        raise ValueError("not named as the node names its outputs (outputs/job-N/attempt-K/<KIND>_<UID>.dcm)")
    job_id, attempt, kind, uid = int(found[1]), int(found[2]), found[3], found[4]
    path = store.absolute(relative)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_OUTPUT_KEYWORDS)
    except (OSError, InvalidDicomError) as exc:
        raise ValueError(f"cannot be read: {exc}") from None
    if ds.get("SOPInstanceUID") != uid or ds.get("Modality") != kind:
        raise ValueError(f"its header ({ds.get('Modality')}, {ds.get('SOPInstanceUID')}) does not match its name")
    source = _source_series_uid(ds, kind)
    values = [ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPClassUID"), source]
    for value, what in zip(values, ("Study", "Series", "SOP Class", "source Series"), strict=True):
        validate_uid(str(value or ""), f"{what} UID")
    number = ds.get("InstanceNumber")
    if number is None or int(number) < 1:
        raise ValueError("no Instance Number (the revision in its output series)")
    name = ds.get("PatientName")
    return OutputFile(
        path=relative,
        job_id=job_id,
        attempt=attempt,
        kind=kind,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=uid,
        sop_class_uid=str(ds.SOPClassUID),
        instance_number=int(number),
        source_series_uid=str(source),
        patient_id=ds.get("PatientID") or None,
        patient_name=str(name) if name else None,
        study_date=ds.get("StudyDate") or None,
        accession_number=ds.get("AccessionNumber") or None,
        # Written atomically and fsync'd once (`write_durably`): the file's time is when the attempt wrote it
        # (the header's creation time is local time without an offset).
        written_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
    )


def _source_series_uid(ds: Dataset, kind: str) -> str | None:
    """The series the object was made from, as each writer references it."""
    try:
        if kind == "RTSTRUCT":
            study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            return study.RTReferencedSeriesSequence[0].SeriesInstanceUID
        if kind == "SR":
            return ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
        return ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    except (AttributeError, IndexError) as exc:
        raise ValueError(f"no reference to its source series ({exc})") from None


def _scan_outputs(db: Database, store: InstanceStore, report: ReindexReport) -> list[OutputFile]:
    """The output files whose `outputs` row is missing."""
    with db.session() as session:
        known = set(session.scalars(select(Output.sop_instance_uid)))
    found = []
    for path in sorted((store.root / "outputs").glob("job-*/attempt-*/*.dcm")):
        relative = path.relative_to(store.root).as_posix()
        report.output_files += 1
        try:
            output = read_output_file(store, relative)
        except ValueError as exc:
            report.outputs_skipped.append((relative, str(exc)))
            continue
        if output.sop_instance_uid in known:
            report.outputs_known += 1
            continue
        found.append(output)
    return found


def _restore_jobs(
    db: Database,
    store: InstanceStore,
    read_meta: Callable[[Path], InstanceMeta],
    outputs: list[OutputFile],
    report: ReindexReport,
    dry_run: bool,
) -> list[OutputFile]:
    """The job row of each job whose outputs are on disk but not in the job store, under its own id (module
    doc); the outputs that can be added (those of a job the store knows of another series are not)."""
    by_job: dict[int, list[OutputFile]] = {}
    for output in outputs:
        by_job.setdefault(output.job_id, []).append(output)
    usable = []
    for job_id, files in sorted(by_job.items()):
        sources = sorted({f.source_series_uid for f in files})
        attempts = max(f.attempt for f in files)
        with db.session() as session:
            job = session.get(Job, job_id)
            if job is not None and sources != [job.series_uid]:
                why = f"job {job_id} in the job store ran on series {job.series_uid}, this file names another"
                report.outputs_skipped += [(f.path, why) for f in files]
                continue
            if job is None and len(sources) != 1:
                why = f"the outputs of job {job_id} name {len(sources)} source series"
                report.outputs_skipped += [(f.path, why) for f in files]
                continue
            if job is None and not dry_run:
                try:  # raised before the job adds anything to the session
                    _restore_job(session, store, read_meta, job_id, files)
                except IdentityConflict as exc:
                    report.outputs_skipped += [(f.path, str(exc)) for f in files]
                    continue
            usable += files
            if job is None:
                report.jobs_restored.append(job_id)
            elif job.attempts < attempts and not dry_run:  # a backup older than its last attempts:
                job.attempts = attempts  # its next attempt must not write into an existing attempt's folder
    if not dry_run:  # also when an interrupted earlier run already restored the jobs
        _after_explicit_ids(db)
    return sorted(usable, key=lambda o: o.order)


def _restore_job(
    session: Session,
    store: InstanceStore,
    read_meta: Callable[[Path], InstanceMeta],
    job_id: int,
    files: list[OutputFile],
) -> None:
    """A `done` job under `job_id` on the outputs' source series (created when missing, as its instances
    would create it, and marked evaluated): its history is lost, its revisions are not."""
    first = files[0]
    series = _get_or_create_series(session, _source_meta(store, read_meta, first))
    if series.id is None:  # no row yet: evaluated, so only instances received from now on are a new delivery
        now = utcnow()
        series.first_received_at = series.last_received_at = series.evaluated_at = now
        session.flush()
    attempts = max(f.attempt for f in files)
    reason = (
        f"rebuilt by store reindex from outputs/job-{job_id}/ (the job store was lost): its history, destinations"
        " and whether its outputs were delivered are not known"
    )
    job = Job(
        id=job_id,
        series=series,
        study_uid=first.study_uid,
        series_uid=first.source_series_uid,
        patient_id=first.patient_id,
        state=JobState.DONE,
        reason=reason,
        attempts=attempts,
        output_dir=store.attempt_outputs(job_id, attempts).relative_to(store.root).as_posix(),
        summary=_summary(store, job_id, attempts, files),
        created_at=min(f.written_at for f in files),
        finished_at=utcnow(),  # retention counts from the rebuild, not from the lost run
    )
    session.add(job)
    session.add(JobEvent(job=job, kind=EventKind.STATE, state=JobState.DONE, message=reason))


def _summary(store: InstanceStore, job_id: int, attempt: int, files: list[OutputFile]) -> dict:
    """The job's summary as its last attempt recorded it: its `summary.json` (lesions, EGFR, brain volume;
    left out when unreadable) and the objects it wrote (`jobs show`, the web view's files and overlay)."""
    try:
        summary = json.loads((store.attempt_outputs(job_id, attempt) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    last = sorted((f for f in files if f.attempt == attempt), key=lambda f: f.order)
    summary["outputs"] = [(f.sop_instance_uid, f.sop_class_uid, f.path) for f in last]
    return summary


def _source_meta(store: InstanceStore, read_meta: Callable[[Path], InstanceMeta], output: OutputFile) -> InstanceMeta:
    """What the series row of the output's source series is made from: a stored instance of it when one is
    on disk (the row it would get from that instance), else the output's own header (the writers copy the
    patient and study from the source; the series' modality and description are then unknown)."""
    # The series folder, from validated UIDs (`instance_path`; the SOP Instance UID only completes the call).
    folder = (
        store.root / store.instance_path(output.study_uid, output.source_series_uid, output.sop_instance_uid)
    ).parent
    for path in sorted(folder.glob("*.dcm")):
        try:
            meta = read_meta(path)
        except Exception:  # the instance walk reports it
            continue
        if meta.series_uid == output.source_series_uid:
            return meta
    return InstanceMeta(
        sop_instance_uid=output.sop_instance_uid,  # carried, not stored: only study and series values are used
        sop_class_uid=output.sop_class_uid,
        study_uid=output.study_uid,
        series_uid=output.source_series_uid,
        transfer_syntax_uid="",
        patient_id=output.patient_id,
        patient_name=output.patient_name,
        study_date=output.study_date,
        accession_number=output.accession_number,
    )


def _after_explicit_ids(db: Database) -> None:
    """PostgreSQL's id sequence does not see rows inserted with an id: the next job must come after them
    (SQLite takes the largest id + 1 anyway)."""
    if db.engine.dialect.name != "postgresql":
        return
    with db.session() as session:
        sequence = session.scalar(text("SELECT pg_get_serial_sequence('jobs', 'id')"))
        last, called = session.execute(text(f"SELECT last_value, is_called FROM {sequence}")).one()
        handed_out = last if called else last - 1  # a fresh sequence hands out `last_value` next
        highest = session.scalar(text("SELECT max(id) FROM jobs")) or 0
        if highest > handed_out:  # never backwards: ids already handed out stay used
            session.execute(text("SELECT setval(:sequence, :value)"), {"sequence": sequence, "value": highest})


def _add_outputs(db: Database, outputs: list[OutputFile]) -> None:
    """The `outputs` rows, in `OutputFile.order` (one transaction: a revision history is added whole)."""
    with db.session() as session:
        for output in outputs:
            session.add(
                Output(
                    job_id=output.job_id,
                    attempt=output.attempt,
                    kind=output.kind,
                    study_uid=output.study_uid,
                    series_uid=output.series_uid,
                    sop_instance_uid=output.sop_instance_uid,
                    sop_class_uid=output.sop_class_uid,
                    path=output.path,
                    created_at=output.written_at,
                )
            )
