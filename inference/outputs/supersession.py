"""Re-runs: a result of the same source series and model supersedes the earlier one, it never duplicates it.

The one home of how re-runs are told apart from new results. Decisions:

- Each output kind (RTSTRUCT, SR, SEG) of one source series and one model
  (name and version) lives in ONE output series per installation, whose Series
  Instance UID is derived from those four values and the installation's store
  id (`output_series_uid`, a UUID v5 UID under ``2.25``, `inference.uids`;
  `storage.store_identity`). The store id keeps two nodes that see the same
  series (a validation node beside production, two departments sharing a
  PACS) out of each other's series: each revision count and predecessor is
  only known to the node that wrote it. A retried job, a late delivery of more slices
  or a re-sent series lands in the same series as the first result, with new
  SOP Instance UIDs and the next Instance Number. Another model version is
  another series: its result does not replace the older model's, it is a
  different result.
- The new result names the one it replaces (`Predecessor`: the latest object
  written before in the same output series, whoever wrote it): the SR lists it
  in the Predecessor Documents Sequence (PS3.3 C.17.2), the RTSTRUCT in the
  Predecessor Structure Set Sequence (PS3.3 C.8.8.5), and its Structure Set
  Label ends with the revision (``AI GTV r2``, SH keeps 16 characters) while
  the Structure Set Description (ST) says which instance, of when, by which
  job and attempt, it supersedes.
- A re-run that finds no lesion writes no RTSTRUCT (a structure set needs an
  ROI), so nothing would replace the earlier GTVs at a TPS that only takes
  RTSTRUCTs: they would stay its newest structure set. An RTSTRUCT with a
  placeholder ROI would put a misleading structure into the plan, so instead
  such a result is HELD (`unwithdrawn_rtstruct`): a physicist removes the
  earlier structure set at the TPS, then releases (the SR saying "no lesion"
  is sent) or cancels. Only when the result it supersedes had an RTSTRUCT
  (the latest SR and the latest RTSTRUCT come from the same run): after a
  no-lesion result was held once, later no-lesion re-runs are not held again.
- The predecessor is read before inference and the new rows are recorded when
  the run ends; that read-then-write is safe because jobs of one source series
  never run at once (`storage.jobs.claim_next_job`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.dataset import Dataset
from pydicom.uid import UID

from inference.result import ModelIdentity
from inference.uids import new_uid

#: The output kinds that each have their own series per source series and model.
OUTPUT_KINDS = ("RTSTRUCT", "SR", "SEG")


def output_series_uid(source_series_uid: str, model: ModelIdentity, kind: str, installation: str) -> UID:
    """The Series Instance UID of `kind` outputs of `model` on `source_series_uid` written by the
    installation whose store id is `installation`: the same on every re-run there, another elsewhere.

    Raises
    ------
    ValueError
        `kind` is not one of `OUTPUT_KINDS`, or the source series UID or the installation is empty.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
    if not str(source_series_uid):
        raise ValueError("source_series_uid: empty")
    if not installation:
        raise ValueError("installation: empty (the store id of the job store)")
    return new_uid(
        f"output-series\x00{installation}\x00{source_series_uid}\x00{model.name}\x00{model.version}\x00{kind}"
    )


@dataclass(frozen=True)
class Predecessor:
    """The result a new output supersedes: the latest earlier object in the same output series.

    `revision` is that object's place in its series (1: the first result), so the
    new object is revision ``revision + 1``.
    """

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    written_at: datetime
    job_id: int
    attempt: int
    revision: int

    @property
    def next_revision(self) -> int:
        return self.revision + 1

    def reference(self) -> Dataset:
        """The identity highdicom's ``previous_versions`` and the reference sequences need."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds

    def sentence(self) -> str:
        """ "Supersedes <SOP Instance UID> of <time UTC> (job N, attempt K)." for descriptions."""
        when = self.written_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"Supersedes {self.sop_instance_uid} of {when} (job {self.job_id}, attempt {self.attempt})."


def unwithdrawn_rtstruct(lesions: int, predecessors: Mapping[str, Predecessor], earlier_rois: int | None) -> str | None:
    """Why a result with no lesion must be held: the result it supersedes sent an RTSTRUCT that nothing withdraws.

    `predecessors`: by kind, as `write_dicom_outputs` takes them; `earlier_rois`: the number of
    ROIs in the predecessor RTSTRUCT (None when its file can no longer be read). None: no hold.
    """
    rtstruct, sr = predecessors.get("RTSTRUCT"), predecessors.get("SR")
    if lesions or rtstruct is None:
        return None
    if sr is not None and (sr.job_id, sr.attempt) != (rtstruct.job_id, rtstruct.attempt):
        return None  # the result superseded had no lesion either: its hold was the time to decide
    had = f"{earlier_rois} ROI(s)" if earlier_rois is not None else "an RTSTRUCT"
    return (
        f"re-run found no lesion where revision r{rtstruct.revision} had {had}; the earlier RTSTRUCT"
        f" ({rtstruct.sop_instance_uid}) at the TPS is not withdrawn automatically: remove it there,"
        " then release (sends the SR reporting no lesion) or cancel"
    )
