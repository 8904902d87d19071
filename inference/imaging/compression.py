"""Lossy compression: which transfer syntaxes can lose information, and whether a received image did.

Why: the demo model was trained and evaluated on images never compressed
lossily. A PACS that archives lossily, or a sender that compresses on the fly
to a lossy syntax the receiver accepted, changes the intensities and edges the
model contours; nothing then says how far the contours can be believed. So the
node prefers every lossless syntax at negotiation (`dicom_node.negotiation`),
and screening refuses an image that was compressed lossily
(`inference.imaging.screening`) unless the model package accepts it.

Evidence of loss (PS3.3 C.7.6.1.1.5), first found wins:
- Lossy Image Compression (0028,2110) "01" ("has been subjected to lossy
  compression", at any time, by any system);
- a transfer syntax whose codec is always lossy (JPEG baseline and extended:
  DCT; the MPEG family);
- the first frame's codestream (`codestream_loss`), for every JPEG 2000,
  HTJ2K, JPEG-LS and JPEG lossless syntax, because encoders do not always set
  Lossy Image Compression (pydicom's `compress` leaves it unset) and a stream
  can break its syntax's promise: a JPEG 2000 coding style (COD or COC, in the
  main header or any tile-part header, inside a JP2 wrapper or not) with the
  irreversible 9-7 wavelet; a JPEG-LS scan with NEAR > 0; a JPEG lossless scan
  with a point transform (Al > 0: low bits dropped).

Not detectable from a header: a reversible JPEG 2000 stream truncated to a
rate. That one needs the Lossy Image Compression the standard requires of its
encoder. The codestream check reads the whole file (compressed: a few hundred
kB per slice, and only for those syntaxes).
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
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
)

ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, *MPEGTransferSyntaxes})
MAY_BE_LOSSY = ALWAYS_LOSSY | {JPEG2000, JPEG2000MC, HTJ2K, JPEGLSNearLossless}  # negotiated last
JPEG_2000_FAMILY = frozenset(
    {JPEG2000, JPEG2000Lossless, JPEG2000MC, JPEG2000MCLossless, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL}
)
JPEG_LS = frozenset({JPEGLSLossless, JPEGLSNearLossless})
JPEG_LOSSLESS = frozenset({JPEGLossless, JPEGLosslessSV1})
# JPEG 2000 markers: start of codestream, image size, coding style (default, per component), tile-part
_SOC, _SIZ, _COD, _COC, _SOT, _SOD = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF90, 0xFF93
_SOI, _SOS = 0xFFD8, 0xFFDA  # JPEG and JPEG-LS: start of image, start of scan
_IRREVERSIBLE_9_7 = 0


def lossy_evidence(path: Path, ds: pydicom.Dataset) -> str | None:
    """Why the image in `path` is known to be lossy-compressed, or None. `ds`: its header (with the file
    meta, without Pixel Data); the pixel data are read only for a syntax with a codestream to check."""
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        details = ", ".join(
            f"{keyword} {value}"
            for keyword in ("LossyImageCompressionMethod", "LossyImageCompressionRatio")
            if (value := ds.get(keyword)) not in (None, "")
        )
        return "LossyImageCompression 01" + (f" ({details})" if details else "")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return None
    if syntax in ALWAYS_LOSSY:
        return f"TransferSyntaxUID {syntax} ({syntax.name}, always lossy)"
    if syntax in JPEG_2000_FAMILY | JPEG_LS | JPEG_LOSSLESS:
        try:
            return codestream_loss(pydicom.dcmread(path))
        except Exception:  # noqa: BLE001 - an unreadable stream is no evidence; the loader names it
            return None
    return None


def codestream_loss(ds: pydicom.Dataset) -> str | None:
    """Whether the first frame of `ds` (read with its Pixel Data) was encoded lossily, from its
    codestream's headers (module doc); None when lossless or not a syntax checked here."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds or not syntax.is_encapsulated:
        return None
    frames = int(ds.get("NumberOfFrames") or 1)
    first = next(generate_frames(ds.PixelData, number_of_frames=frames), b"")
    named = f"TransferSyntaxUID {syntax} ({syntax.name})"
    if syntax in JPEG_2000_FAMILY:
        if _IRREVERSIBLE_9_7 in _jpeg2000_transforms(_jp2_codestream(first)):
            return f"{named} with the irreversible 9-7 wavelet (lossy)"
    elif syntax in JPEG_LS:
        near = _first_scan_byte(first, after_components=0)
        if near:
            return f"{named} with NEAR {near} (lossy)"
    elif syntax in JPEG_LOSSLESS:
        approximation = _first_scan_byte(first, after_components=2)  # Ss, Se, then Ah:Al
        if approximation is not None and approximation & 0x0F:
            return f"{named} with point transform {approximation & 0x0F} (low bits dropped: lossy)"
    return None


def _marker_segments(stream: bytes, at: int, stop: int) -> tuple[list[tuple[int, bytes]], int]:
    """The (marker, content) segments of a JPEG / JPEG 2000 header from `at` up to and including the
    `stop` marker, and where the walk ended. A malformed header ends the walk early."""
    found = []
    while at + 4 <= len(stream):
        marker, length = struct.unpack_from(">HH", stream, at)
        if marker >> 8 != 0xFF or length < 2:
            break
        found.append((marker, stream[at + 4 : at + 2 + length]))
        at += 2 + length
        if marker == stop:
            break
    return found, at


def _jp2_codestream(stream: bytes) -> bytes:
    """The codestream itself: `stream`, or the content of a JP2 file's `jp2c` box (not DICOM, but seen)."""
    if stream[:2] == struct.pack(">H", _SOC):
        return stream
    at = 0
    while at + 8 <= len(stream):
        length, kind = struct.unpack_from(">I4s", stream, at)
        header = 8
        if length == 1 and at + 16 <= len(stream):
            length, header = struct.unpack_from(">Q", stream, at + 8)[0], 16
        if kind == b"jp2c":
            return stream[at + header : at + length] if length else stream[at + header :]
        if length < header:
            break
        at += length
    return b""


def _jpeg2000_transforms(stream: bytes) -> set[int]:
    """The wavelet transform of every COD and COC, in the main header and in each tile-part header."""
    if stream[:2] != struct.pack(">H", _SOC):
        return set()
    segments, at = _marker_segments(stream, 2, stop=_SOT)
    siz = dict(segments).get(_SIZ, b"")
    component_bytes = 2 if len(siz) >= 36 and struct.unpack_from(">H", siz, 34)[0] >= 257 else 1  # Csiz
    transforms = _transforms(segments, component_bytes)
    start = at - 12  # the first SOT segment (marker, Lsot 10, content) the walk stopped after
    while segments and segments[-1][0] == _SOT:
        tile_part_length = struct.unpack_from(">I", segments[-1][1], 2)[0]  # Isot(2), then Psot
        tile_header, _ = _marker_segments(stream, start + 12, stop=_SOD)
        transforms |= _transforms(tile_header, component_bytes)
        if tile_part_length == 0:  # the last tile-part runs to the end of the codestream
            break
        start += tile_part_length
        segments, _ = _marker_segments(stream, start, stop=_SOT)
        segments = segments[:1] if segments and segments[0][0] == _SOT else []
    return transforms


def _transforms(segments: list[tuple[int, bytes]], component_bytes: int) -> set[int]:
    """COD: Scod, progression, layers(2), MCT, then SPcod; COC: Ccoc, Scoc, then SPcoc. SPcod/SPcoc:
    levels, code-block width, height, style, transform."""
    found = set()
    for marker, content in segments:
        index = {_COD: 9, _COC: component_bytes + 5}.get(marker)
        if index is not None and len(content) > index:
            found.add(content[index])
    return found


def _first_scan_byte(stream: bytes, after_components: int) -> int | None:
    """A byte of the first JPEG / JPEG-LS scan header (SOS): Ns, (Ci, Ti) per component, then
    `after_components` bytes on (JPEG-LS: 0 is NEAR; JPEG lossless: 2 is Ah:Al)."""
    if stream[:2] != struct.pack(">H", _SOI):
        return None
    segments, _ = _marker_segments(stream, 2, stop=_SOS)
    sos = dict(segments).get(_SOS)
    if not sos:
        return None
    index = 1 + 2 * sos[0] + after_components
    return sos[index] if len(sos) > index else None
