"""Write the DICOM results of one inference run: RTSTRUCT, SR and (opt-in) SEG files.

The one call the node's worker and `dicom-node infer --dicom` use. Decisions:

- File names are ``<KIND>_<SOPInstanceUID>.dcm``; the UID is checked to be a
  valid UID (digits and dots, at most 64 characters) before it becomes a path.
- Files are DICOM Part 10 (preamble, File Meta Information, Explicit VR Little
  Endian), written with ``enforce_file_format=True`` to a temporary name and
  renamed, so a reader never sees a half-written file.
- No lesions: an RT Structure Set needs at least one ROI (and a SEG at least
  one segment), so neither is written (logged as ``dicom_outputs.skipped``);
  the SR is still written, it reports zero lesions and EGFR "not assessable".
- The SR lists the RTSTRUCT and SEG written with it as pertinent other evidence.
- The RTSTRUCT is checked against what planning systems are known to reject
  (`tps_compat`) before anything is written; a problem raises `ValueError`.
- Each kind goes into its stable output series (`supersession.output_series_uid`
  of the source series, the model and the installation), with new SOP Instance
  UIDs on every run; `predecessors` (the worker finds them in the job store)
  make a re-run's objects name the ones they replace. Without an installation
  (`dicom-node infer --dicom`, no job store) each run gets new series UIDs.
- The SEG is opt-in (``include_seg``): SPEC promises RTSTRUCT + SR to the
  destinations, and a TPS that does not accept Segmentation Storage would fail
  the export of the whole job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.dataset import Dataset

from inference.outputs.rtstruct import build_rtstruct
from inference.outputs.seg import build_seg
from inference.outputs.sr import build_sr
from inference.outputs.supersession import OUTPUT_KINDS, Predecessor, output_series_uid
from inference.outputs.tps_compat import check_tps_compatible
from inference.result import InferenceResult
from inference.uids import new_uid
from storage.instance_store import InvalidUIDError, validate_uid, write_durably

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WrittenOutput:
    """One written DICOM output, with the identity the exporter needs (no re-read of the file)."""

    kind: str
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str


def output_series_uids(result: InferenceResult, installation: str) -> dict[str, str]:
    """The output series of each kind for `result`'s source series and model on the installation
    with store id `installation` (the same on every re-run there)."""
    source = str(result.series.datasets[0].SeriesInstanceUID)
    return {kind: output_series_uid(source, result.model, kind, installation) for kind in OUTPUT_KINDS}


def write_dicom_outputs(
    result: InferenceResult,
    out_dir: Path,
    *,
    include_seg: bool = False,
    roi_name_prefix: str = "",
    predecessors: Mapping[str, Predecessor] | None = None,
    installation: str | None = None,
) -> list[WrittenOutput]:
    """Build and write the RTSTRUCT and SEG (when there are lesions) and the SR of `result`.

    Parameters
    ----------
    result : inference.result.InferenceResult
        The inference result on its source series.
    out_dir : pathlib.Path
        Directory to write into; created when missing.
    include_seg : bool
        Also write a DICOM Segmentation of the lesions.
    roi_name_prefix : str
        Put before each RTSTRUCT ROI name (``[outputs] roi_name_prefix``), e.g. ``AI_``.
    predecessors : mapping of str to Predecessor, or None
        By kind, the latest object already written in that kind's output series
        (`output_series_uids`): the new one supersedes it.
    installation : str or None
        The store id of the node's job store (`storage.store_identity`): the
        output series are those of this installation. None (no job store):
        new series UIDs, and no `predecessors` may be given.

    Returns
    -------
    list of WrittenOutput
        The written files in the order RTSTRUCT, SEG, SR (those written), with their UIDs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = dict(predecessors or {})
    if installation is None:
        if before:
            raise ValueError("predecessors: need the installation whose output series they belong to")
        series = {kind: str(new_uid()) for kind in OUTPUT_KINDS}
    else:
        series = output_series_uids(result, installation)
    written, related = [], []
    if result.lesions:
        rtstruct = build_rtstruct(
            result,
            roi_name_prefix=roi_name_prefix,
            series_instance_uid=series["RTSTRUCT"],
            supersedes=before.get("RTSTRUCT"),
        )
        check_tps_compatible(rtstruct, result.series.datasets)
        related.append(rtstruct)
        if include_seg:
            seg_before = before.get("SEG")
            related.append(
                build_seg(
                    result,
                    series_instance_uid=series["SEG"],
                    instance_number=seg_before.next_revision if seg_before else 1,
                )
            )
        written += [write_dataset(ds, out_dir, str(ds.Modality)) for ds in related]
    else:
        log.warning(
            "dicom_outputs.skipped",
            outputs="RTSTRUCT" + (", SEG" if include_seg else ""),
            reason="no lesions found; an RT Structure Set needs at least one ROI",
            series_uid=str(result.series.datasets[0].SeriesInstanceUID),
        )
    sr = build_sr(result, related=related, series_instance_uid=series["SR"], supersedes=before.get("SR"))
    written.append(write_dataset(sr, out_dir, "SR"))
    return written


def write_dataset(ds: Dataset, out_dir: Path, kind: str) -> WrittenOutput:
    """Write `ds` as ``<kind>_<SOPInstanceUID>.dcm`` (DICOM Part 10), atomically and fsync'd.

    Raises
    ------
    ValueError
        `kind` is not an upper-case word or the SOP Instance UID is not a valid UID.
    """
    if not re.fullmatch(r"[A-Z]+", kind):
        raise ValueError(f"kind: {kind!r} must be an upper-case word such as 'RTSTRUCT'")
    try:
        uid = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
    except InvalidUIDError as exc:
        raise ValueError(f"ds: {exc}") from None
    path = Path(out_dir) / f"{kind}_{uid}.dcm"
    write_durably(path, lambda handle: ds.save_as(handle, enforce_file_format=True))
    return WrittenOutput(
        kind=kind,
        path=path,
        sop_instance_uid=uid,
        sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )
