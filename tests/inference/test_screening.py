"""Input screening: real phantom series with realistic vendor headers, refused or accepted
from the headers alone, each reason naming the DICOM attributes it rests on."""

from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from inference.errors import SeriesError, SeriesRefused
from inference.imaging import preprocess
from inference.imaging.compression import codestream_loss, lossy_evidence
from inference.imaging.screening import NamePatterns, screen_series
from inference.imaging.volume_loader import load_series
from inference.model.accepts import ModelAccepts

# Sequence parameters as the three vendors' consoles write them for each kind of series.
SIEMENS = {"Manufacturer": "SIEMENS"}
GE = {"Manufacturer": "GE MEDICAL SYSTEMS"}
PHILIPS = {"Manufacturer": "Philips Medical Systems"}
MPRAGE = {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "RepetitionTime": "2300",
          "EchoTime": "2.32", "InversionTime": "900", "FlipAngle": "8"}  # fmt: skip
SPGR = {"ScanningSequence": "GR", "SequenceVariant": ["SS", "SK"], "RepetitionTime": "8.2", "EchoTime": "3.2",
        "InversionTime": "450", "FlipAngle": "12"}  # fmt: skip
TFE = {"ScanningSequence": "GR", "SequenceVariant": "SP", "RepetitionTime": "8.1", "EchoTime": "3.7", "FlipAngle": "8"}
T1_SE = {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "RepetitionTime": "550", "EchoTime": "12"}
T2_TSE = {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"], "RepetitionTime": "6000", "EchoTime": "98"}
FLAIR = {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "RepetitionTime": "9000",
         "EchoTime": "81", "InversionTime": "2500"}  # fmt: skip
DWI = {"ScanningSequence": ["SE", "EP"], "SequenceVariant": ["SK", "SP"], "RepetitionTime": "5300", "EchoTime": "89"}
NO_AGENT = {"ContrastBolusAgent": None}

ACCEPTED = {
    "siemens-mprage-gd": {
        **SIEMENS,
        **MPRAGE,
        **NO_AGENT,
        "SeriesDescription": "t1_mprage_tra_Gd",
        "ProtocolName": "t1_mprage_tra_Gd",
    },  # fmt: skip
    "ge-bravo-post": {**GE, **SPGR, "SeriesDescription": "AX T1 POST", "ContrastBolusAgent": "MULTIHANCE"},
    "ge-t1-se-gd": {**GE, **T1_SE, **NO_AGENT, "SeriesDescription": "T1 SE +GD"},
    "philips-tfe-c": {**PHILIPS, **TFE, **NO_AGENT, "SeriesDescription": "3D T1W TFE +C"},
    "agent-only": {**PHILIPS, **TFE, "SeriesDescription": "sT1W_3D_TFE", "ContrastBolusAgent": "Gadovist 1.0"},
}
REFUSED = {
    "siemens-t2": (
        {**SIEMENS, **T2_TSE, **NO_AGENT, "SeriesDescription": "T2 TSE"},
        [
            "not a post-contrast T1: ContrastBolusAgent empty, SeriesDescription 'T2 TSE', EchoTime 98 ms",
            "EchoTime 98 ms is above the 30 ms of a T1",
            "names T2",
        ],
    ),  # fmt: skip
    "siemens-flair-with-agent": (
        {**SIEMENS, **FLAIR, "SeriesDescription": "t2_tirm_tra_dark-fluid", "ContrastBolusAgent": "Dotarem"},
        ["ContrastBolusAgent 'Dotarem'", "InversionTime 2500 ms nulls fluid (FLAIR)", "names T2"],
    ),
    "siemens-dwi": (
        {**SIEMENS, **DWI, **NO_AGENT, "SeriesDescription": "ep2d_diff_3scan_trace_p2"},
        [
            "ScanningSequence SE\\EP (",
            "ScanningSequence EP is echo planar",
            "SeriesDescription 'ep2d_diff_3scan_trace_p2' names diffusion",
        ],
    ),
    "siemens-mprage-no-contrast": (
        {**SIEMENS, **MPRAGE, **NO_AGENT, "SeriesDescription": "t1_mprage_sag_p2_iso"},
        ["no contrast: ContrastBolusAgent empty and no contrast name"],
    ),
    "ge-t2": (
        {**GE, **T2_TSE, **NO_AGENT, "SeriesDescription": "AX T2 FRFSE", "RepetitionTime": "4000", "EchoTime": "102"},
        ["EchoTime 102 ms", "SeriesDescription 'AX T2 FRFSE' names T2"],
    ),
    "ge-flair": (
        {**GE, **FLAIR, **NO_AGENT, "SeriesDescription": "AX T2 FLAIR"},
        ["InversionTime 2500 ms", "names T2"],
    ),
    "ge-dwi": (
        {**GE, **DWI, **NO_AGENT, "SeriesDescription": "AX DWI ASSET b1000"},
        ["ScanningSequence SE\\EP", "names diffusion"],
    ),
    "ge-t1-pre": (
        {**GE, **T1_SE, **NO_AGENT, "SeriesDescription": "AX T1 PRE"},
        ["SeriesDescription 'AX T1 PRE' names pre-contrast"],
    ),
    "ge-t1-flair-post": (  # T1-weighted by its parameters, but a FLAIR: not what the model was trained on
        {
            **GE,
            **T1_SE,
            "SeriesDescription": "AX T1 FLAIR +C",
            "RepetitionTime": "2200",
            "InversionTime": "860",
            "ContrastBolusAgent": "GAD",
        },  # fmt: skip
        ["SeriesDescription 'AX T1 FLAIR +C' names FLAIR"],
    ),
    "philips-t2": (
        {**PHILIPS, **T2_TSE, **NO_AGENT, "SeriesDescription": "T2W_TSE", "RepetitionTime": "3000", "EchoTime": "80"},
        ["EchoTime 80 ms", "names T2"],
    ),
    "philips-flair": (
        {**PHILIPS, **FLAIR, **NO_AGENT, "SeriesDescription": "FLAIR_longTR", "RepetitionTime": "11000"},
        ["RepetitionTime 11000 ms is above the 3000 ms of a T1", "names FLAIR"],
    ),
    "philips-dwi": (
        {**PHILIPS, **DWI, **NO_AGENT, "SeriesDescription": "DWI_SSh b1000"},
        ["names diffusion"],
    ),
    "philips-t1-pre": (
        {**PHILIPS, **TFE, **NO_AGENT, "SeriesDescription": "T1W_3D_TFE pre"},
        ["names pre-contrast"],
    ),
    "nothing-said": (
        {**NO_AGENT, "SeriesDescription": None, "EchoTime": None, "RepetitionTime": None},
        ["SeriesDescription empty", "no T1 weighting", "no contrast"],
    ),
}


@pytest.fixture
def series(small_axial_series, edited_series) -> list[Path]:
    """The phantom's files (96x96, 20 slices of 4 mm) without its ProtocolName and InversionTime, so
    that each vendor header set below is judged on its own values, not on the phantom's MPRAGE names."""
    return edited_series(list(small_axial_series.files), ProtocolName=None, InversionTime=None)


def test_the_phantoms_the_node_sends_are_accepted(small_axial_series):
    screened = screen_series(small_axial_series.files)
    assert screened.slices == 20 and screened.model_grid == (384, 384, 20)
    assert "ContrastBolusAgent 'GADOBUTROL 0.1 mmol/kg'" in screened.contrast and "names T1" in screened.contrast
    assert 0 < screened.memory_mib < 100


@pytest.mark.parametrize("headers", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_post_contrast_t1_is_accepted(series, edited_series, headers):
    screened = screen_series(edited_series(series, **headers))
    assert screened.contrast.startswith("post-contrast T1: ")


@pytest.mark.parametrize(("headers", "reasons"), REFUSED.values(), ids=REFUSED.keys())
def test_other_series_are_refused_naming_the_attributes(series, edited_series, headers, reasons):
    with pytest.raises(SeriesRefused) as refused:
        screen_series(edited_series(series, **headers))
    message = str(refused.value)
    assert message.startswith("not a post-contrast T1: ContrastBolusAgent ")
    for reason in reasons:
        assert reason in message, message


def test_a_rule_names_its_own_t1ce_and_refuses_its_own(series, edited_series):
    files = edited_series(series, **TFE, **NO_AGENT, SeriesDescription="T1 PRE-OP +C")
    with pytest.raises(SeriesRefused, match="'T1 PRE-OP \\+C' names pre-contrast"):
        screen_series(files)
    screened = screen_series(files, names=NamePatterns(accept=(r"^t1 pre-op \+c$",)))
    assert "matches '^t1 pre-op \\\\+c$' (the rule accepts it)" in screened.contrast
    with pytest.raises(SeriesRefused, match="SeriesDescription 'T1 MPRAGE \\+Gd' matches 'mprage' \\(the rule refuses"):
        screen_series(series, names=NamePatterns(refuse=("mprage",)))
    t2 = edited_series(series, **T2_TSE, SeriesDescription="T2 TSE")
    with pytest.raises(SeriesRefused, match="EchoTime 98 ms"):  # parameters beat a rule's names
        screen_series(t2, names=NamePatterns(accept=("t2 tse",)))


def test_a_model_for_any_contrast_and_other_modalities(series, edited_series):
    t2 = edited_series(series, **T2_TSE, SeriesDescription="T2 TSE")
    assert "not checked" in screen_series(t2, ModelAccepts(contrast="any")).contrast
    with pytest.raises(SeriesRefused, match="Modality 'CT': the model accepts MR only"):
        screen_series(edited_series(series, Modality="CT"))


# --- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("ImagePositionPatient", ["-100", "NaN", "20"]),
        ("ImageOrientationPatient", ["1", "0", "0", "0", "nan", "0"]),
        ("PixelSpacing", ["NaN", "2.4"]),
        ("SliceThickness", "inf"),
    ],
)
def test_non_finite_geometry_fails_naming_attribute_and_file(series, edited_series, keyword, value):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that NaN is not a valid DS
        files = edited_series(series, indices=[6], **{keyword: value})
        with pytest.raises(SeriesError, match=f"IM_0007.dcm: non-finite {keyword}") as failed:
            screen_series(files)
        assert not isinstance(failed.value, SeriesRefused)  # a defective series fails, it is not "rejected"
        if keyword != "SliceThickness":  # the loader does not use SliceThickness
            with pytest.raises(SeriesError, match=f"IM_0007.dcm: non-finite {keyword}"):
                load_series(files)  # defence in depth


def _sagittal_16x16x8_with_1000mm_pixels(series: list[Path], out: Path) -> list[Path]:
    """The review's example, with pixel data no decoder can read (JPEG lossless syntax, raw garbage)."""
    out.mkdir()
    paths = []
    for k, source in enumerate(series[:8]):
        ds = pydicom.dcmread(source)
        ds.Rows = ds.Columns = 16
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{-4 + k:g}", "-8000", "8000"]
        ds.PixelSpacing = ["1000", "1000"]
        ds.SliceThickness = "1"
        ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream " * 30])
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        paths.append(out / source.name)
        ds.save_as(paths[-1], enforce_file_format=False)
    return paths


def test_absurd_spacing_is_refused_on_grid_size_before_any_pixel_is_decoded(series, tmp_path):
    files = _sagittal_16x16x8_with_1000mm_pixels(series, tmp_path / "sag")
    with pytest.raises(SeriesError, match="cannot be decoded"):
        load_series(files)  # the pixel data really is undecodable ...
    with pytest.raises(SeriesRefused) as refused:
        screen_series(files)  # ... and screening never touches it
    message = str(refused.value)
    assert message.startswith("outside what the model accepts: ")
    assert "PixelSpacing (row) 1000 mm outside 0.1-10 mm" in message
    assert "field of view 16000 x 16000 mm" in message
    assert "model grid 384x384x15003 (2212.3 M voxels) exceeds the maximum of 75.5 M" in message
    assert "estimated memory 24.7 GiB exceeds 4.0 GiB" in message
    assert "decod" not in message


def test_files_of_two_series_fail(series, edited_series):
    files = edited_series(series, indices=[19], SeriesInstanceUID="1.2.826.0.1.3680043.8.498.7")
    with pytest.raises(SeriesError, match=r"files from 2 series \(one series per job\): .* \(19 files\)"):
        screen_series(files)


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID", "FrameOfReferenceUID"])
def test_mixed_identity_in_one_series_fails(series, edited_series, keyword):
    value = "SECRET-ID-42" if keyword == "PatientID" else "1.2.826.0.1.3680043.8.498.99"
    files = edited_series(series, indices=range(12, 20), **{keyword: value})
    with pytest.raises(SeriesError, match=f"mixed {keyword} in one series") as failed:
        screen_series(files)
    if keyword == "PatientID":
        assert "SECRET" not in str(failed.value) and "12 and 8 files" in str(failed.value)
    else:
        assert value in str(failed.value)


def test_slice_count_and_field_of_view_bounds(series):
    with pytest.raises(SeriesRefused, match=r"only 5 slice\(s\); at least 8 are needed"):
        screen_series(series[:5])
    with pytest.raises(SeriesRefused, match="20 slices; the model accepts at most 12"):
        screen_series(series, ModelAccepts(slices=(8, 12)))
    with pytest.raises(SeriesRefused, match=r"field of view [\d.]+ x [\d.]+ mm \(Columns 96 x PixelSpacing"):
        screen_series(series, ModelAccepts(field_of_view_mm=(300.0, 500.0)))
    with pytest.raises(SeriesRefused, match="slice spacing \\(from ImagePositionPatient\\) 4 mm outside 0.5-3 mm"):
        screen_series(series, ModelAccepts(spacing_mm=(0.5, 3.0)))


@pytest.mark.slow
def test_grid_estimate_bounds_the_grid_the_pipeline_builds(phantom_series):
    """Sagittal and oblique: the estimate (volume z extent) is at least the real grid (head z extent)."""
    for seed, orientation in ((34, "sagittal"), (30, "oblique")):
        phantom = phantom_series(seed, orientation=orientation, matrix=96, slices=24, slice_spacing=3.5, n_lesions=3)
        estimated = screen_series(phantom.files).model_grid
        image = load_series(phantom.files).image
        grid, aligned = preprocess.model_grid(image, preprocess.head_mask(image), 384)
        assert not aligned
        real = grid.GetSize()
        assert estimated[:2] == real[:2] and real[2] <= estimated[2] <= 2 * real[2], (estimated, real)


def test_a_series_without_a_frame_of_reference_fails_before_the_model_runs(series, edited_series):
    """The RTSTRUCT's contours are defined in the images' frame of reference: without one the
    job used to run the model three times and fail in the writer with an internal error."""
    files = edited_series(series, FrameOfReferenceUID=None)
    with pytest.raises(SeriesError, match=r"no FrameOfReferenceUID in 20 of 20 files"):
        screen_series(files)


def test_a_multi_frame_object_is_named_as_such_not_as_one_slice(series, edited_series):
    files = edited_series(series, indices=[0], NumberOfFrames="60")[:1]
    with pytest.raises(SeriesError, match=r"multi-frame image .* send the classic single-frame MR series"):
        screen_series(files)


@pytest.mark.parametrize("value", ["PALETTE COLOR", "RGB", None])
def test_an_image_that_is_not_greyscale_fails(series, edited_series, value):
    files = edited_series(series, PhotometricInterpretation=value)
    with pytest.raises(SeriesError, match=r"PhotometricInterpretation .*an MR image is greyscale"):
        screen_series(files)


def test_mixed_photometric_interpretation_fails(series, edited_series):
    files = edited_series(series, indices=range(10, 20), PhotometricInterpretation="MONOCHROME1")
    with pytest.raises(SeriesError, match=r"mixed PhotometricInterpretation in one series"):
        screen_series(files)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"PatientID": None}, "no PatientID: the outputs could not be matched to the patient"),
        ({"PatientID": ""}, "no PatientID"),
        ({"PatientID": "X" * 65}, "PatientID is longer than DICOM allows (64 characters)"),
        ({"PatientName": "Doe^John\x1b\x00"}, "PatientName contains control characters"),
        (
            {"SpecificCharacterSet": "ISO_IR 192", "PatientName": b"M\xfcller^J\xf6rg"},
            "PatientName holds bytes that are not text in the declared SpecificCharacterSet (ISO_IR 192)",
        ),
    ],
    ids=["absent-id", "empty-id", "long-id", "control-characters", "latin1-bytes-declared-utf8"],
)
def test_an_identity_the_outputs_cannot_carry_faithfully_fails(series, edited_series, changes, why):
    """The RTSTRUCT and SR copy the patient's identity for the TPS to match: an outside tester's
    series delivered altered, invalid or empty identities."""
    with pytest.raises(SeriesError, match=re.escape(why)) as failed:
        screen_series(edited_series(series, **changes))
    assert "Doe" not in str(failed.value) and "ller" not in str(failed.value)  # identities are never shown


def test_the_identity_of_every_file_is_checked_not_only_the_first(series, edited_series):
    """The outputs copy the identity of whichever file sorts first in space, not in the folder."""
    files = edited_series(series, indices=[5], PatientName="Doe^John\x1b\x00")
    with pytest.raises(SeriesError, match="PatientName contains control characters"):
        screen_series(files)


# --- lossy compression (inference.imaging.compression) -----------------------------------------------


def _compressed(files: list[Path], out: Path, syntax: str, **options: object) -> list[Path]:
    """Copies of `files` encoded in `syntax` by pydicom's own encoders (a generator nobody here wrote);
    pydicom leaves LossyImageCompression unset, as some senders do."""
    out.mkdir()
    paths = []
    for source in files:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, **options)
        paths.append(out / source.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.parametrize(
    ("syntax", "options", "why"),
    [
        (JPEG2000, {"j2k_psnr": [60]}, r"JPEG 2000 Image Compression\) with the irreversible 9-7 wavelet"),
        (JPEGLSNearLossless, {"jls_error": 2}, r"with NEAR 2 \(lossy\)"),
    ],
    ids=["jpeg2000-irreversible", "jpeg-ls-near-2"],
)
def test_a_series_encoded_lossily_without_saying_so_is_refused(series, tmp_path, syntax, options, why):
    files = _compressed(series, tmp_path / "lossy", syntax, **options)
    assert "LossyImageCompression" not in pydicom.dcmread(files[0], stop_before_pixels=True)
    with pytest.raises(SeriesRefused, match=rf"lossy-compressed images in 20 of 20 files .*{why}"):
        screen_series(files)
    screen_series(files, ModelAccepts(lossy_compressed=True))  # a package validated on lossy images


@pytest.mark.parametrize(
    ("syntax", "options"),
    [(JPEG2000Lossless, {}), (JPEGLSNearLossless, {"jls_error": 0}), (JPEGLSLossless, {}), (RLELossless, {})],
    ids=["jpeg2000-lossless", "jpeg-ls-near-0", "jpeg-ls-lossless", "rle"],
)
def test_a_losslessly_compressed_series_is_accepted(series, tmp_path, syntax, options):
    screen_series(_compressed(series, tmp_path / "lossless", syntax, **options))


def test_an_image_once_compressed_lossily_is_refused_even_uncompressed(series, edited_series):
    """A PACS that archived lossily sends the decompressed image: only LossyImageCompression says so."""
    files = edited_series(
        series,
        indices=[7],
        LossyImageCompression="01",
        LossyImageCompressionRatio="12.5",
        LossyImageCompressionMethod="ISO_15444_1",
    )
    with pytest.raises(SeriesRefused) as refused:
        screen_series(files)
    assert str(refused.value).startswith(
        "lossy-compressed images in 1 of 20 files (e.g. IM_0008.dcm: LossyImageCompression 01 "
        "(LossyImageCompressionMethod ISO_15444_1, LossyImageCompressionRatio 12.5))"
    )
    screen_series(edited_series(series, LossyImageCompression="00"))  # "00": never lossy


def test_an_always_lossy_syntax_is_refused_from_the_header(series, tmp_path):
    """JPEG baseline is lossy whatever the stream says: the header decides, no pixel is read."""
    out = tmp_path / "baseline"
    out.mkdir()
    files = []
    for source in series:
        ds = pydicom.dcmread(source)
        ds.PixelData = encapsulate([b"\xff\xd8 not read \xff\xd9"])
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        files.append(out / source.name)
        ds.save_as(files[-1], enforce_file_format=False)
    with pytest.raises(SeriesRefused, match=r"TransferSyntaxUID 1\.2\.840\.10008\.1\.2\.4\.50 \(JPEG Baseline"):
        screen_series(files)


def test_pydicoms_own_lossy_jpeg2000_file_is_evidence():
    """pydicom's bundled JPEG2000.dcm (irreversible wavelet, LossyImageCompression 01) and its lossless
    MR: the evidence read from files another toolkit wrote."""
    lossy = Path(get_testdata_file("JPEG2000.dcm"))
    assert lossy_evidence(lossy, pydicom.dcmread(lossy, stop_before_pixels=True)).startswith("LossyImageCompression 01")
    assert codestream_loss(pydicom.dcmread(lossy)).endswith("with the irreversible 9-7 wavelet (lossy)")
    lossless = Path(get_testdata_file("MR_small_jp2klossless.dcm"))
    assert lossy_evidence(lossless, pydicom.dcmread(lossless, stop_before_pixels=True)) is None


def _with_stream(syntax: str, stream: bytes) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelData = encapsulate([stream])
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _first_frame(syntax: str, **options: object) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.compress(syntax, **options)
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def test_lossless_jpeg2000_under_the_syntax_that_may_be_lossy_is_not_refused():
    """A reversible stream labelled 1.2.840.10008.1.2.4.91 (what many archives write): lossless."""
    assert codestream_loss(_with_stream(JPEG2000, _first_frame(JPEG2000Lossless))) is None


def test_an_irreversible_wavelet_is_found_wherever_the_stream_declares_it():
    """An outside review's cases: the 9-7 wavelet in a JP2 wrapper (with FF 4F bytes in an earlier box),
    in a per-component COC after a reversible COD, in a tile-part COD, and under the lossless-only syntax."""
    lossless, lossy = _first_frame(JPEG2000Lossless), _first_frame(JPEG2000, j2k_cr=[10])
    jp2 = _box(b"jP  ", b"\r\n\x87\n") + _box(b"xml ", b"<x>\xff\x4f\x00\x05</x>") + _box(b"jp2c", lossy)
    first_tile = lossless.find(b"\xff\x90")
    coc = b"\xff\x53" + struct.pack(">H", 9) + bytes([0, 0, 5, 4, 4, 0, 0])  # component 0, transform 0
    cod = bytearray(lossless[lossless.find(b"\xff\x52") :][:14])
    cod[13] = 0  # the tile's own COD: transform 0
    start_of_data = lossless.find(b"\xff\x93")
    for syntax, stream in [
        (JPEG2000, jp2),
        (JPEG2000, lossless[:first_tile] + coc + lossless[first_tile:]),
        (JPEG2000, lossless[:start_of_data] + bytes(cod) + lossless[start_of_data:]),
        (JPEG2000Lossless, lossy),  # a stream that breaks its syntax's promise
    ]:
        assert codestream_loss(_with_stream(syntax, stream)).endswith("with the irreversible 9-7 wavelet (lossy)")


def test_a_jpeg_lossless_point_transform_is_lossy():
    """pydicom's bundled JPEG lossless file, as written (Al 0), then with its scan's point transform set."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    assert codestream_loss(ds) is None
    stream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sos = stream.find(b"\xff\xda")
    components = stream[sos + 4]
    stream[sos + 4 + 1 + 2 * components + 2] |= 0x02  # Ah:Al, Al = 2
    assert codestream_loss(_with_stream(ds.file_meta.TransferSyntaxUID, bytes(stream))).endswith(
        "with point transform 2 (low bits dropped: lossy)"
    )


def test_a_manifest_says_lossy_compressed_with_a_boolean():
    assert ModelAccepts.from_manifest({"lossy_compressed": True}).lossy_compressed
    with pytest.raises(ValueError, match="accepts.lossy_compressed must be true or false"):
        ModelAccepts.from_manifest({"lossy_compressed": "yes"})
