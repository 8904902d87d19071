"""What the Store SCP accepts at association negotiation: SOP classes and transfer syntaxes.

Decisions:
- SOP classes: Verification, plus `node.accepted_sop_classes` (default MR
  Image Storage only). Anything else is refused per presentation context
  (abstract syntax not supported), so data the node will never process is
  never answered with Success. Multi-frame MR (Enhanced, Enhanced Color,
  Legacy Converted Enhanced) cannot be configured: no job could use it.
- Transfer syntaxes: only those the node can decode at inference time.
  pynetdicom picks, per context, the first of *our* list that the requestor
  proposed, so the order is the preference: Explicit VR Little Endian first
  (what DCMTK `storescp` picks, and the only syntax a DCMTK `storescu` can
  decompress JPEG-LS/JPEG 2000/RLE to), then every lossless compressed syntax a
  pydicom pixel decoder is installed for (JPEG lossless, JPEG-LS lossless,
  JPEG 2000 and HTJ2K lossless-only, RLE), then Implicit VR Little Endian and
  Explicit VR Big Endian, and last the syntaxes that may be lossy (JPEG
  baseline/extended, JPEG-LS near-lossless, JPEG 2000, HTJ2K;
  `inference.imaging.compression`): a sender offering a lossy syntax and an
  uncompressed one must not be asked to compress lossily on the fly (a series
  that arrives lossy anyway is refused at screening). Refused: Deflated Explicit VR Little Endian (pydicom inflates the
  whole data set in memory without a bound: a 300 kB transfer became 300 MiB),
  and every syntax without a decoder (JPEG XL, MPEG-2/4, H.264, HEVC, JPIP,
  JPEG 2000 Part 2, SMPTE 2110, Deflated Image Frame).
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES

from inference.imaging.compression import MAY_BE_LOSSY

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
REFUSED_TRANSFER_SYNTAXES = frozenset({DeflatedExplicitVRLittleEndian})


def _decodable(syntax: UID) -> bool:
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom has no decoder for it at all
        return False


def accepted_transfer_syntaxes() -> list[str]:
    """The node's transfer syntaxes in order of preference (see module doc)."""
    compressed = [
        str(uid)
        for uid in map(UID, ALL_TRANSFER_SYNTAXES)
        if uid.is_compressed and uid not in REFUSED_TRANSFER_SYNTAXES and _decodable(uid)
    ]
    lossless = [uid for uid in compressed if uid not in MAY_BE_LOSSY]
    lossy = [uid for uid in compressed if uid in MAY_BE_LOSSY]
    return [str(ExplicitVRLittleEndian), *lossless, str(ImplicitVRLittleEndian), str(ExplicitVRBigEndian), *lossy]


def refused_transfer_syntaxes() -> list[str]:
    """Every syntax pynetdicom knows that the node refuses (for the conformance statement and tests)."""
    accepted = set(accepted_transfer_syntaxes())
    return [str(uid) for uid in ALL_TRANSFER_SYNTAXES if uid not in accepted]
