"""Lossy compression: which transfer syntaxes can lose information, and whether a received image did.

Why: the demo model was trained and evaluated on images never compressed
lossily. A PACS that archives lossily, or a sender that compresses on the fly
to a lossy syntax the receiver accepted, changes the intensities and edges the
model contours; nothing then says how far the contours can be believed. So the
node prefers every lossless syntax at negotiation (`dicom_node.negotiation`),
and screening refuses an image that was compressed lossily
(`inference.imaging.screening`) unless the model package accepts it.

Evidence of loss (PS3.3 C.7.6.1.1.5): Lossy Image Compression (0028,2110) "01"
("has been subjected to lossy compression", at any time, by any system), or a
transfer syntax whose codec is always lossy (JPEG baseline and extended: DCT;
MPEG family). JPEG-LS near-lossless, JPEG 2000 and HTJ2K may be lossless or
not, and encoders do not always say which (pydicom's `compress` leaves Lossy
Image Compression unset), so the first frame's codestream header is read
(`codestream_loss`): a JPEG 2000 / HTJ2K coding style (COD) with the
irreversible 9-7 wavelet, or a JPEG-LS scan with NEAR > 0, is lossy. (A
reversible JPEG 2000 stream truncated to a rate is lossy too and cannot be
told from its header; that one needs the Lossy Image Compression the standard
requires of its encoder.)
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.encaps import generate_frames
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
)

ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, *MPEGTransferSyntaxes})
JPEG_2000_FAMILY = frozenset({JPEG2000, JPEG2000MC, HTJ2K})
MAY_BE_LOSSY = ALWAYS_LOSSY | JPEG_2000_FAMILY | {JPEGLSNearLossless}
_SOC, _COD, _SOT = 0xFF4F, 0xFF52, 0xFF90  # JPEG 2000 markers: start of codestream, coding style, tile
_SOI, _SOS = 0xFFD8, 0xFFDA  # JPEG(-LS) markers: start of image, start of scan
_IRREVERSIBLE_9_7 = 0


def lossy_evidence(path: Path, ds: pydicom.Dataset) -> str | None:
    """Why the image in `path` is known to be lossy-compressed, or None. `ds`: its header (with the file
    meta, without Pixel Data); the pixel data are read only for a syntax that may be either."""
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        method = ds.get("LossyImageCompressionMethod")
        ratio = ds.get("LossyImageCompressionRatio")
        details = ", ".join(
            f"{keyword} {value}"
            for keyword, value in (("LossyImageCompressionMethod", method), ("LossyImageCompressionRatio", ratio))
            if value not in (None, "")
        )
        return "LossyImageCompression 01" + (f" ({details})" if details else "")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return None
    if syntax in ALWAYS_LOSSY:
        return f"TransferSyntaxUID {syntax} ({syntax.name}, always lossy)"
    if syntax in MAY_BE_LOSSY:
        try:
            return codestream_loss(pydicom.dcmread(path))
        except Exception:  # noqa: BLE001 - an unreadable stream is no evidence; the loader names it
            return None
    return None


def codestream_loss(ds: pydicom.Dataset) -> str | None:
    """Whether the first frame of `ds` (read with its Pixel Data) was encoded lossily, from its
    codestream header (module doc); None when lossless or not a syntax that may be either."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax not in MAY_BE_LOSSY or syntax in ALWAYS_LOSSY or "PixelData" not in ds:
        return None
    frames = int(ds.get("NumberOfFrames") or 1)
    first = next(generate_frames(ds.PixelData, number_of_frames=frames), b"")
    if syntax in JPEG_2000_FAMILY:
        transform = _jpeg2000_transform(first)
        if transform == _IRREVERSIBLE_9_7:
            return f"TransferSyntaxUID {syntax} ({syntax.name}) with the irreversible 9-7 wavelet (lossy)"
        return None
    near = _jpeg_ls_near(first)
    if near:
        return f"TransferSyntaxUID {syntax} ({syntax.name}) with NEAR {near} (lossy)"
    return None


def _segments(stream: bytes, start: int, stop_markers: set[int]) -> dict[int, bytes]:
    """The marker segments of a JPEG / JPEG 2000 header from `start`, by marker, up to a stop marker
    (included). Malformed headers end the walk: what was found so far is returned."""
    found: dict[int, bytes] = {}
    at = start
    while at + 4 <= len(stream):
        marker, length = struct.unpack_from(">HH", stream, at)
        if marker >> 8 != 0xFF or length < 2:
            break
        found.setdefault(marker, stream[at + 4 : at + 2 + length])
        if marker in stop_markers:
            break
        at += 2 + length
    return found


def _jpeg2000_transform(stream: bytes) -> int | None:
    """SPcod's transformation byte of the main header's COD (0: 9-7 irreversible, 1: 5-3 reversible)."""
    soc = stream.find(struct.pack(">H", _SOC))  # a JP2 wrapper (not DICOM, but seen) puts boxes before it
    if soc < 0:
        return None
    cod = _segments(stream, soc + 2, {_COD, _SOT}).get(_COD)
    # Scod(1), progression(1), layers(2), MCT(1), levels(1), block width(1), height(1), style(1), transform(1)
    return cod[9] if cod is not None and len(cod) > 9 else None


def _jpeg_ls_near(stream: bytes) -> int | None:
    """The NEAR parameter of the first JPEG-LS scan (0: lossless)."""
    if stream[:2] != struct.pack(">H", _SOI):
        return None
    sos = _segments(stream, 2, {_SOS}).get(_SOS)
    if sos is None or not sos:
        return None
    components = sos[0]
    index = 1 + 2 * components  # Ns, then (Ci, Tmi) per component, then NEAR
    return sos[index] if len(sos) > index else None
