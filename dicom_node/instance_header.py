"""The header elements the job store keeps, and how a received or stored instance's are read.

One place for both, because the Store SCP (on arrival) and `dicom-node store
reindex` (from the stored file) must read the same values the same way.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

# The elements the job store keeps (`store_scp.instance_meta`); all precede Pixel Data.
HEADER_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def read_header(path: str | Path) -> Dataset:
    """The header elements of a Part 10 file, parsed no further than Pixel Data; raises what pydicom raises."""
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
