"""Named DIMSE status codes the node returns (PS3.4 B.2.3, PS3.7 C). No magic numbers in logic."""

from __future__ import annotations

SUCCESS = 0x0000
# Storage Service Class failures (PS3.4 Table B.2-1)
OUT_OF_RESOURCES = 0xA700  # refused: disk full / below the free-space threshold
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000  # invalid UIDs, unreadable header, UIDs/PatientID contradicting the stored series
# General failure (PS3.7 C.4): storage error other than space
PROCESSING_FAILURE = 0x0110
