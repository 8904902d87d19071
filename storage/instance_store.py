"""The on-disk instance store: durable, atomic writes under UID-validated paths.

Decisions:
- A file becomes visible only complete: it is written to a temporary name in
  the same file system, fsync'd, renamed into place, and its directory fsync'd.
  A crash leaves at worst a `*.partial` file in `tmp/`, which start-up removes.
- A received instance is written once: it streams into an `IncomingFile` in
  `tmp/` as it arrives (hashed and counted on the way, never held whole in
  memory) and that same file is renamed into place.
- A received instance is renamed into place first, then the file and its
  directory are fsync'd concurrently, while the caller commits its row
  (`place_syncing`): one storage flush round for all three instead of two or
  three in a row. Success is reported only after all of them. A crash in
  between leaves a file without a row, which start-up removes
  (`remove_unreferenced`), or a committed row whose file a power cut left
  short: `storage.ingest` says how that is repaired and never used. Files no
  row will point at (conflicts, outputs) keep the order file fsync, rename,
  directory fsync (`write_durably`, `keep`).
- Nothing from a dataset becomes a path unless it passes `validate_uid`
  (digits and dots, <= 64 characters, no empty or leading-zero components),
  so `..`, separators or over-long values can never escape the data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

# The fsyncs of placed files and their directories (`IncomingFile.place_syncing`): two per
# C-STORE in flight, sized for the concurrent associations of one node, each waiting on its own.
_FSYNCS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fsync")

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUIDError(ValueError):
    """A value used as a UID (and so as a path component) is not a valid UID.

    `summary`: the message without the offending value, for the sender (a C-STORE's Error Comment
    has 64 characters of the default repertoire); the message, with the value, is for the log.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message


def validate_uid(value: object, what: str) -> str:
    """Return `value` as a str if it is a valid DICOM UID (PS3.5 9.1), else raise."""
    text = str(value) if value is not None else ""
    if not text:
        raise InvalidUIDError(f"{what} is missing")
    if len(text) > 64:
        raise InvalidUIDError(f"{what} is longer than 64 characters ({len(text)})")
    if not _UID_RE.match(text):
        shown = text if len(text) <= 64 else text[:61] + "..."
        raise InvalidUIDError(
            f"{what} {shown!r} is not a valid UID (digits and dots only)", f"{what} is not a valid UID"
        )
    return text


def write_durably(target: Path, write: Callable[[BinaryIO], object], tmp_dir: Path | None = None) -> None:
    """Make `target` appear complete or not at all, and survive a power cut once this returns.

    `write(handle)` fills a temporary file in `tmp_dir` (default: beside the
    target, same file system), which is fsync'd, renamed into place, and the
    directory fsync'd. Used for received instances and for the node's outputs,
    whose export rows are committed only after this returns.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = (tmp_dir or target.parent) / f"{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_close(handle: BinaryIO) -> None:
    with handle:
        os.fsync(handle.fileno())


class PendingSync:
    """The fsyncs of a file renamed into place, running; `wait` returns once the file is durable."""

    def __init__(self, target: Path, file: Future[None] | None, directory: Future[None]) -> None:
        self.target = target
        self._syncs = [f for f in (file, directory) if f is not None]

    def wait(self, remove_on_failure: bool = True) -> None:
        """Block until both fsyncs finished; on a failure the error is raised, and the file removed
        unless the caller must first take back a row that names it (`remove_on_failure=False`)."""
        errors = [exc for future in self._syncs if (exc := future.exception()) is not None]
        if errors:
            if remove_on_failure:
                self.target.unlink(missing_ok=True)
            raise errors[0]


class IncomingFile:
    """A file being received into `tmp/`: hashed and counted while written, then moved into place or discarded."""

    def __init__(self, tmp_dir: Path, header: bytes = b"") -> None:
        self.path = tmp_dir / f"{uuid.uuid4().hex}.partial"
        self._handle: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed by finish/discard
        self._hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None
        self.write(header)

    def write(self, chunk: bytes | memoryview) -> None:
        """Append; a storage error (disk full) is kept for `finish` to raise, later writes are dropped.

        Writes happen in the network reader's thread, which must not die of it: the
        sender gets its failure status when the whole data set has arrived."""
        if self.error is not None:
            return
        if self._handle is None:
            raise ValueError(f"{self.path} is already finished")
        try:
            self._handle.write(chunk)
        except OSError as exc:
            self.error = exc
            self.discard()
            return
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def complete(self) -> None:
        """Flush to the operating system (readable by path, not yet durable); raises a write error."""
        if self.error is not None:
            raise self.error
        if self._handle is not None:
            try:
                self._handle.flush()
            except OSError as exc:
                self.error = exc
                self.discard()
                raise

    def finish(self) -> None:
        """Flush, fsync and close; the bytes are on disk (not yet under their name). Idempotent.

        Raises the storage error met while writing, if any."""
        if self.error is not None:
            raise self.error
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                with handle:
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                self.error = exc
                self.discard()
                raise

    def move_to(self, target: Path) -> None:
        """Durably rename into `target` (fsync'd file, rename, fsync'd directory)."""
        self.finish()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        self.path = target
        _fsync_dir(target.parent)

    def place(self, target: Path) -> None:
        """Rename into `target`, then fsync the file and the directory concurrently (module doc).

        For a file whose row is committed only after this returns: until then a
        crash leaves at worst an unreferenced file, removed at start-up. On error
        the file is removed from `target` and the error raised."""
        self.place_syncing(target).wait()

    def place_syncing(self, target: Path) -> PendingSync:
        """Rename into `target` and start the fsyncs of the file and its directory; `wait()` for them.

        The caller commits the file's row meanwhile, so the row's flush and the
        file's overlap (module doc), and reports success only after both."""
        self.complete()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        self.path = target
        handle, self._handle = self._handle, None
        if handle is None:  # already fsync'd (`finish`): the directory only
            return PendingSync(target, None, _FSYNCS.submit(_fsync_dir, target.parent))
        return PendingSync(target, _FSYNCS.submit(_fsync_close, handle), _FSYNCS.submit(_fsync_dir, target.parent))

    def discard(self) -> None:
        """Drop a file that was not moved into place (duplicate, refused, or an aborted transfer).

        Never raises for the close (disk full: the buffered bytes cannot be written, and need not be):
        `write` calls it in the network reader's thread, which must not die of it."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(OSError):
                handle.close()
        if self.path.suffix == ".partial":
            with contextlib.suppress(OSError):  # what stays in tmp/ is removed at start-up
                self.path.unlink(missing_ok=True)


class InstanceStore:
    """Files under `root`: `instances/<study>/<series>/<sop>.dcm`, `outputs/`, `tmp/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.tmp_dir = self.root / "tmp"
        for folder in (self.root, self.tmp_dir, self.root / "instances", self.root / "outputs"):
            folder.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The relative path of an instance, built from validated UIDs only."""
        parts = [
            validate_uid(study_uid, "Study Instance UID"),
            validate_uid(series_uid, "Series Instance UID"),
            validate_uid(sop_uid, "SOP Instance UID") + ".dcm",
        ]
        return "/".join(["instances", *parts])

    def job_outputs(self, job_id: int) -> Path:
        """Every attempt's outputs of one job: `outputs/job-<id>/` (retention removes it whole)."""
        return self.root / "outputs" / f"job-{int(job_id)}"

    def attempt_outputs(self, job_id: int, attempt: int) -> Path:
        """One attempt's outputs, `outputs/job-<id>/attempt-<n>/`: a retried job never mixes its results."""
        return self.job_outputs(job_id) / f"attempt-{int(attempt)}"

    def conflicts(self, sop_instance_uid: str) -> Path:
        """Re-sent content that differed from the stored instance: `conflicts/<SOP Instance UID>/`."""
        return self.root / "conflicts" / validate_uid(sop_instance_uid, "SOP Instance UID")

    def absolute(self, relative: str) -> Path:
        """Absolute path of a stored file; refuses anything outside the root."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidUIDError(f"path {relative!r} escapes the data directory")
        return path

    def incoming(self, header: bytes = b"") -> IncomingFile:
        """A new file in `tmp/` to stream a received instance into, starting with `header`."""
        return IncomingFile(self.tmp_dir, header)

    def keep(self, incoming: IncomingFile, relative: str) -> None:
        """Durably move a received file to `relative` (validated to stay under the root)."""
        incoming.move_to(self.absolute(relative))

    def place(self, incoming: IncomingFile, relative: str) -> None:
        """Move a received file to `relative` for a row committed next (`IncomingFile.place`)."""
        incoming.place(self.absolute(relative))

    def place_syncing(self, incoming: IncomingFile, relative: str) -> PendingSync:
        """Move a received file to `relative`, its fsyncs running while the caller commits its row."""
        return incoming.place_syncing(self.absolute(relative))

    def sync(self, relative: str) -> None:
        """fsync a stored file and its directory: one a crashed process may have left unflushed
        behind its committed row is made durable before a re-send of it is answered."""
        path = self.absolute(relative)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        _fsync_dir(path.parent)

    def sync_all(self) -> None:
        """Flush every file system's dirty data (`sync`), at start-up: the files of rows a crashed
        process committed while their fsyncs ran (`storage.ingest._place_and_commit`) are still
        only in the page cache after a process crash (not a power cut); now they are durable."""
        os.sync()

    def remove(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)

    def move(self, source: str, target: str) -> None:
        """Durably rename one stored file to another relative path (both validated to stay under the root)."""
        src, dst = self.absolute(source), self.absolute(target)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        _fsync_dir(dst.parent)
        if src.parent != dst.parent:
            _fsync_dir(src.parent)

    def keep_copy(self, source: str, target: str) -> None:
        """Durably make `target` hold `source`'s content, `source` left in place (a `replace` keeps
        the previous version so). A hard link (no bytes copied), else a copy fsync'd; either way
        `target` appears whole, in one rename, and its directory is fsync'd."""
        src, dst = self.absolute(source), self.absolute(target)
        dst.parent.mkdir(parents=True, exist_ok=True)
        partial = self.tmp_dir / f"{uuid.uuid4().hex}.partial"
        try:
            os.link(src, partial)
        except OSError:  # no hard links here (file system, permissions): copy
            with open(src, "rb") as handle:
                write_durably(dst, lambda out: shutil.copyfileobj(handle, out), self.tmp_dir)
            return
        try:
            os.replace(partial, dst)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(dst.parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete instance files without a row: written, then the process died before
        the commit, so never acknowledged (the sender re-sends them)."""
        removed = 0
        for path in (self.root / "instances").rglob("*.dcm"):
            if path.relative_to(self.root).as_posix() not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def remove_partials(self) -> int:
        """Delete leftovers of interrupted writes; return how many were removed."""
        removed = 0
        for leftover in self.tmp_dir.glob("*.partial"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed


def sha256_file(path: Path) -> str:
    """Hex sha256 of a stored file, streamed (audits, tests)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
