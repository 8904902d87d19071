"""The one place UIDs are created.

Decision: every UID this project creates (phantom studies, RTSTRUCT, SR, SEG
instances and series) is a UUID-derived UID under the root ``2.25`` (ISO/IEC
9834-8, DICOM PS3.5 B.2). It needs no registered organisation root, cannot
collide between departments or hosts, and is at most 44 characters.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

UID_ROOT = "2.25."
_NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4b7e-9a39-1d2f0c5e7a11")


def new_uid(entropy_source: str | None = None) -> UID:
    """A fresh UID under `UID_ROOT`.

    With `entropy_source` the UID is deterministic (UUID v5 of that string),
    used for reproducible phantoms; without it, it is random (UUID v4).
    """
    value = uuid.uuid5(_NAMESPACE, entropy_source) if entropy_source else uuid.uuid4()
    return UID(f"{UID_ROOT}{value.int}")
