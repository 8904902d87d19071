"""How the exporter reads a destination's C-STORE response status: delivered, retry, or stop.

A permanent failure is one the same object sent to the same peer will get
again, so retrying it for `give_up_after_s` (24 h by default) only hides it:
the export fails at once with the reason, the job goes to `failed`, and the
operator re-sends with `dicom-node jobs export` once the cause is fixed.

Decisions (PS3.4 Annex B.2.3 Table B.2-1, PS3.7 Annex C):

- Success (0x0000) and the Warnings (0x0001, 0xB000 coercion, 0xB006 elements
  discarded, 0xB007 data set does not match SOP class): delivered; the peer
  kept the object.
- 0xA7xx *Refused: Out of Resources* and 0x0213 *Resource limitation*: transient.
  The peer's disk or queue is full now; it may not be later.
- 0x0110 *Processing failure*: transient. It is the general "something went
  wrong" status (this node answers it for a storage error other than space).
- 0xA9xx *Data Set does not match SOP Class*, 0xCxxx *Cannot understand*,
  0x0122 *SOP Class not supported*, 0x0124 *Not authorized*, 0x0117 *Invalid
  object instance* and the other 0x01xx/0x02xx refusals of the request itself
  (0x0211 unrecognized operation, 0x0212 mistyped argument, ...): permanent.
  They judge the object or the request, which a retry does not change.
- Anything else (a vendor's private failure code, Cancel): transient, as before
  this module existed; the give-up time still bounds it.
"""

from __future__ import annotations

from pynetdicom.status import code_to_category

RESOURCE_LIMITATION = 0x0213  # PS3.7 C.5.x: the peer is busy, not refusing the object
PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.x: general failure; may pass
PERMANENT_GENERAL = {
    0x0117,  # Invalid object instance
    0x0122,  # Refused: SOP Class not supported
    0x0124,  # Refused: Not authorized
    0x0211,  # Unrecognized operation
    0x0212,  # Mistyped argument
}


def delivered(code: int) -> bool:
    """Whether the peer kept the object (Success or Warning)."""
    return code_to_category(code) in ("Success", "Warning")


def is_permanent(code: int) -> bool:
    """Whether a failure status will come back for the same object, so retrying is pointless."""
    if code in PERMANENT_GENERAL:
        return True
    if code in (RESOURCE_LIMITATION, PROCESSING_FAILURE) or 0xA700 <= code <= 0xA7FF:
        return False
    return 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF


def describe(code: int) -> str:
    """The status as an operator reads it: code, category, and the standard's meaning."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    meaning = (STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or ("", ""))[1]
    return f"0x{code:04X} {code_to_category(code)}" + (f" ({meaning})" if meaning else "")
