"""The wording every DICOM output of the engine carries about its status.

Decision: the RTSTRUCT, the SR and the SEG state in the same words that they
are an AI proposal that a qualified clinician must review, and outputs of the
demo model (`ModelIdentity.is_demo`) additionally and prominently that they are
NOT FOR CLINICAL USE (SPEC "No public weights"). Keeping the wording in one
module keeps the objects consistent and lets tests check it.
"""

from __future__ import annotations

from inference.result import ModelIdentity

DEMO_WARNING = "DEMO MODEL - NOT FOR CLINICAL USE"
DEMO_DATA_WARNING = "DEMO MODEL, synthetic data, NOT FOR CLINICAL USE"
REVIEW_NOTICE = "AI-generated proposal; requires review by a qualified clinician"


def short_label(model: ModelIdentity) -> str:
    """A short status label for LO (<= 64 characters) attributes.

    Used for Series Description, Structure Set Label/Description and ROI
    Description (DICOM PS3.5 6.2: LO holds at most 64 characters).
    """
    return DEMO_WARNING if model.is_demo else "AI PROPOSAL - REQUIRES CLINICAL REVIEW"


def structure_set_label(model: ModelIdentity, revision: int = 1) -> str:
    """Structure Set Label (SH, at most 16 characters, DICOM PS3.5 6.2).

    SH cannot hold the full warning, so the label is a short code and the
    Structure Set Name and Description carry `short_label` / `full_statement`.
    A re-run's structure set (`revision` > 1, `inference.outputs.supersession`)
    ends with `` r<revision>``, the code shortened so that the label keeps 16
    characters up to revision 9999.
    """
    if revision < 1 or revision > 9999:
        raise ValueError(f"revision: must be 1..9999, got {revision}")
    if revision == 1:
        return "DEMO-NONCLINICAL" if model.is_demo else "AI GTV PROPOSAL"
    return f"{'DEMO-NONCL' if model.is_demo else 'AI GTV'} r{revision}"


def full_statement(model: ModelIdentity) -> str:
    """The full sentence written into the SR: AI-generated, needs review, demo warning."""
    text = f"{REVIEW_NOTICE}. Produced by {model.name} {model.version}."
    return f"{DEMO_WARNING}. {text} {DEMO_DATA_WARNING}." if model.is_demo else text
