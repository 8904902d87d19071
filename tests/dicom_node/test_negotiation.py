"""What the Store SCP accepts: SOP classes and transfer syntaxes, in order of preference,
against pynetdicom and DCMTK `storescu` (pydicom's bundled files for the compressed syntaxes)."""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import select

from dicom_node.negotiation import accepted_transfer_syntaxes, refused_transfer_syntaxes
from storage.models import Instance
from tests.dicom_node.conftest import require_tool

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"
MPEG4_AVC_HIGH_41 = "1.2.840.10008.1.2.4.102"
# pydicom's bundled file and the storescu option that proposes its syntax (plus the uncompressed ones)
COMPRESSED_MR = [
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
    ("MR_small_jp2klossless.dcm", "-xv"),
    ("MR_small_RLE.dcm", "-xr"),
]


def negotiate(port: int, *contexts: tuple[str, list[str]]) -> dict[int, tuple[str, str | None]]:
    """Propose `contexts`; per context ID: (abstract syntax, accepted transfer syntax or None)."""
    ae = AE(ae_title="NEGOTIATE")
    ae.add_requested_context(Verification)  # keeps the association up when all others are refused
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return {
            cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]) if cx.result == 0 else None)
            for cx in assoc.accepted_contexts + assoc.rejected_contexts
            if cx.abstract_syntax != Verification
        }
    finally:
        assoc.release()


def test_explicit_vr_little_endian_is_preferred_over_big_endian_and_implicit(start_node):
    node = start_node()
    [(_, chosen)] = negotiate(
        node.address[1], (MRImageStorage, [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian])
    ).values()
    assert chosen == ExplicitVRLittleEndian
    [(_, chosen)] = negotiate(
        node.address[1], (MRImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ).values()
    assert chosen == ExplicitVRLittleEndian


@pytest.mark.parametrize(
    ("proposed", "expected"),
    [
        ([JPEGBaseline8Bit, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        ([JPEG2000, JPEG2000Lossless], JPEG2000Lossless),
        ([JPEGLSNearLossless, RLELossless, ExplicitVRBigEndian], RLELossless),
        ([JPEGBaseline8Bit], JPEGBaseline8Bit),  # offered alone: accepted, and screening decides (lossy evidence)
    ],
)
def test_a_syntax_that_may_be_lossy_is_chosen_only_when_nothing_lossless_is_offered(start_node, proposed, expected):
    """A sender offering a lossy syntax and a lossless one must not be asked to compress lossily on the fly."""
    node = start_node()
    [(_, chosen)] = negotiate(node.address[1], (MRImageStorage, proposed)).values()
    assert chosen == expected


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_a_decodable_compressed_syntax_is_accepted_when_offered_alone(start_node, syntax):
    node = start_node()
    [(_, chosen)] = negotiate(node.address[1], (MRImageStorage, [syntax])).values()
    assert chosen == syntax


@pytest.mark.parametrize("syntax", [JPEG_XL_LOSSLESS, MPEG4_AVC_HIGH_41, DeflatedExplicitVRLittleEndian])
def test_a_syntax_the_node_cannot_decode_is_refused(start_node, syntax):
    node = start_node()
    [(_, chosen)] = negotiate(node.address[1], (MRImageStorage, [syntax])).values()
    assert chosen is None
    assert syntax in refused_transfer_syntaxes() and syntax not in accepted_transfer_syntaxes()


def test_sop_classes_no_job_can_use_are_refused_at_negotiation(start_node):
    node = start_node()
    outcome = negotiate(
        node.address[1],
        (MRImageStorage, [ExplicitVRLittleEndian]),
        (EnhancedMRImageStorage, [ExplicitVRLittleEndian]),
        (LegacyConvertedEnhancedMRImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian]),
    )
    accepted = {abstract for abstract, syntax in outcome.values() if syntax is not None}
    assert accepted == {MRImageStorage}


def test_accepted_sop_classes_are_configurable(start_node):
    node = start_node(DICOM_NODE__NODE__ACCEPTED_SOP_CLASSES='["MRImageStorage", "CTImageStorage"]')
    outcome = negotiate(node.address[1], (CTImageStorage, [ExplicitVRLittleEndian]))
    assert [syntax for _, syntax in outcome.values()] == [ExplicitVRLittleEndian]


@pytest.mark.parametrize(("name", "option"), COMPRESSED_MR)
def test_storescu_sending_a_compressed_syntax_keeps_it(start_node, name, option):
    """storescu proposing the file's compressed syntax: accepted, stored as sent, and decodable."""
    node = start_node()
    source = get_testdata_file(name)
    result = subprocess.run(
        [require_tool("storescu"), option, "-aec", "DICOMNODE", "127.0.0.1", str(node.address[1]), source],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with node.db.session() as session:
        [row] = session.scalars(select(Instance)).all()
    original = pydicom.dcmread(source)
    assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert (pydicom.dcmread(node.store.absolute(row.path)).pixel_array == original.pixel_array).all()
