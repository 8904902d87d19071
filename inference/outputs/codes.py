"""Coded concepts of the Structured Report: standard codes and our private scheme.

Standard codes are used wherever one exists (DICOM PS3.16):

- SCT 118565006 "Volume", SCT 81827009 "Diameter" with derivation SCT 56851009
  "Maximum" (CID 7464), SCT 14799000 "Neoplasm, metastatic" (finding type),
  SCT 12738006 "Brain" (finding site);
- LN 24590-2 "MR Brain" (procedure reported);
- UCUM "cm3", "mm" and "1" (dimensionless probability);
- DCM 121007 "Device" (observer type), DCM 111001/111003 "Algorithm Name" /
  "Algorithm Version" (TID 4019, written by highdicom's `AlgorithmIdentification`);
- UMLS C0034375 "Qualitative Evaluations" (the TID 1500 container for free-text
  statements).

No standard code exists for an image-based EGFR mutation-status *prediction* or
for the AI-review statement, so these use the private coding scheme
``99DICOMNODE`` (PS3.16 8.2: private designators start with "99"), declared in
the Coding Scheme Identification Sequence of every SR we write:

=============  =========================================================
Code value     Code meaning
=============  =========================================================
EGFR-STATUS    EGFR mutation status, predicted from imaging
EGFR-PMUT      EGFR mutant probability, predicted from imaging
EGFR-MUT       EGFR mutant
EGFR-WT        EGFR wild type
EGFR-NA        EGFR status not assessable
AI-STATEMENT   AI-generated result statement
=============  =========================================================
"""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference.result import EgfrCall

PRIVATE_SCHEME = "99DICOMNODE"
PRIVATE_SCHEME_NAME = "dicom-node private codes for AI results"
PRIVATE_SCHEME_ORGANISATION = "dicom-node project"

VOLUME = Code("118565006", "SCT", "Volume")
DIAMETER = Code("81827009", "SCT", "Diameter")
MAXIMUM = Code("56851009", "SCT", "Maximum")
METASTATIC_NEOPLASM = Code("14799000", "SCT", "Neoplasm, metastatic")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
BRAIN = Code("12738006", "SCT", "Brain")
MR_BRAIN = Code("24590-2", "LN", "MR Brain")
DEVICE = Code("121007", "DCM", "Device")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
CUBIC_CENTIMETRE = Code("cm3", "UCUM", "cubic centimeter")
MILLIMETRE = Code("mm", "UCUM", "millimeter")
NO_UNITS = Code("1", "UCUM", "no units")


class PrivateCode(enum.Enum):
    """Concepts of the private ``99DICOMNODE`` scheme: (code value, code meaning)."""

    EGFR_STATUS = ("EGFR-STATUS", "EGFR mutation status, predicted from imaging")
    EGFR_MUTANT_PROBABILITY = ("EGFR-PMUT", "EGFR mutant probability, predicted from imaging")
    EGFR_MUTANT = ("EGFR-MUT", "EGFR mutant")
    EGFR_WILD_TYPE = ("EGFR-WT", "EGFR wild type")
    EGFR_NOT_ASSESSABLE = ("EGFR-NA", "EGFR status not assessable")
    AI_STATEMENT = ("AI-STATEMENT", "AI-generated result statement")

    @property
    def code(self) -> Code:
        """The concept as a pydicom `Code`."""
        value, meaning = self.value
        return Code(value, PRIVATE_SCHEME, meaning)


_EGFR_CALL_CODES = {
    EgfrCall.MUTANT: PrivateCode.EGFR_MUTANT,
    EgfrCall.WILD_TYPE: PrivateCode.EGFR_WILD_TYPE,
    EgfrCall.NOT_ASSESSABLE: PrivateCode.EGFR_NOT_ASSESSABLE,
}


def egfr_call_code(call: EgfrCall) -> Code:
    """The coded value of a patient-level EGFR call."""
    return _EGFR_CALL_CODES[EgfrCall(call)].code


def egfr_call_from_code(value: str) -> EgfrCall:
    """The EGFR call a private code value stands for (inverse of `egfr_call_code`)."""
    for call, private in _EGFR_CALL_CODES.items():
        if private.value[0] == value:
            return call
    raise ValueError(f"value: {value!r} is not an EGFR call code of {PRIVATE_SCHEME}")


def coding_scheme_identification() -> Dataset:
    """Coding Scheme Identification Sequence item declaring ``99DICOMNODE`` (PS3.3 C.12.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANISATION
    return item
