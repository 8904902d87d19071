"""Synthetic phantoms: determinism, geometry, lesions, genotype, and valid DICOM files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicom_node.cli import app
from inference.synthetic.phantoms import Phantom, generate_phantom, write_phantom_series, write_phantom_truth

SMALL = {"matrix": 64, "slices": 16}


def test_same_seed_same_phantom_and_other_seed_another():
    a, b = generate_phantom(3, **SMALL), generate_phantom(3, **SMALL)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(b.image))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a.mask), sitk.GetArrayViewFromImage(b.mask))
    assert (a.genotype, a.lesion_diameters_mm, a.orientation) == (b.genotype, b.lesion_diameters_mm, b.orientation)
    c = generate_phantom(4, **SMALL)
    assert not np.array_equal(sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(c.image))


def test_an_override_does_not_reshuffle_the_other_draws():
    drawn = generate_phantom(5, matrix=96, slices=20)
    forced = generate_phantom(5, matrix=96, slices=20, orientation="coronal")
    assert forced.orientation == "coronal"
    assert forced.image.GetSpacing() == drawn.image.GetSpacing()
    assert forced.genotype == drawn.genotype and len(forced.lesion_diameters_mm) <= 4


@pytest.mark.parametrize(
    ("orientation", "normal_axis"), [("axial", 2), ("sagittal", 0), ("coronal", 1), ("oblique", None)]
)
def test_orientation_sets_the_direction_cosines(orientation, normal_axis):
    phantom = generate_phantom(8, orientation=orientation, **SMALL)
    direction = np.array(phantom.image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(np.cross(direction[:, 0], direction[:, 1]), direction[:, 2], atol=1e-9)
    normal = np.abs(direction[:, 2])
    if normal_axis is None:
        assert normal.max() < 0.999  # a real oblique
    else:
        assert normal[normal_axis] == pytest.approx(1.0)
    assert phantom.orientation == orientation


def test_geometry_keywords_are_honoured():
    phantom = generate_phantom(9, orientation="axial", matrix=80, slices=24, pixel_spacing=2.5, slice_spacing=5.0)
    assert phantom.image.GetSize() == (80, 80, 24)
    assert phantom.image.GetSpacing() == pytest.approx((2.5, 2.5, 5.0))
    assert phantom.image.GetPixelID() == sitk.sitkFloat32 and phantom.mask.GetPixelID() == sitk.sitkUInt8


@pytest.mark.slow
def test_random_geometry_stays_in_the_documented_ranges():
    for seed in range(10, 16):
        phantom = generate_phantom(seed, n_lesions=0)
        size, spacing = phantom.image.GetSize(), phantom.image.GetSpacing()
        assert size[0] == size[1] and 160 <= size[0] <= 256 and 30 <= size[2] <= 80
        assert 0.7 <= spacing[0] <= 1.6 and 1.0 <= spacing[2] <= 5.0


def test_mask_is_a_label_map_of_the_lesions_on_the_image_grid():
    phantom = generate_phantom(12, orientation="axial", matrix=192, slices=60, slice_spacing=2.0, n_lesions=4)
    for get in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection, sitk.Image.GetSize):
        assert get(phantom.mask) == get(phantom.image)
    labels = sitk.GetArrayFromImage(phantom.mask)
    count = len(phantom.lesion_diameters_mm)
    assert count >= 1 and set(np.unique(labels)) <= set(range(count + 1))
    assert all(3.0 <= d <= 30.0 for d in phantom.lesion_diameters_mm)
    assert len(phantom.lesion_kinds) == count and set(phantom.lesion_kinds) <= {"solid", "ring"}


def test_lesions_enhance_against_the_brain():
    phantom = generate_phantom(
        13, orientation="axial", matrix=192, slices=60, slice_spacing=2.0, n_lesions=2, genotype=1
    )
    image = sitk.GetArrayFromImage(phantom.image)
    labels = sitk.GetArrayFromImage(phantom.mask)
    brain = image[(labels == 0) & (image > 300)]
    for label in range(1, len(phantom.lesion_diameters_mm) + 1):
        if phantom.lesion_kinds[label - 1] == "solid" and (labels == label).sum() > 50:
            assert np.median(image[labels == label]) > 1.2 * np.median(brain)


def test_genotype_drives_the_enhancement_pattern():
    kinds = {0: [], 1: []}
    for seed in range(20, 26):
        for genotype in (0, 1):
            kinds[genotype] += generate_phantom(seed, n_lesions=4, genotype=genotype, **SMALL).lesion_kinds
    solid_share = {g: k.count("solid") / len(k) for g, k in kinds.items()}
    assert solid_share[1] >= 0.7 and solid_share[0] <= 0.3, solid_share


@pytest.mark.slow
def test_stored_genotype_has_some_label_noise():
    phantoms = [generate_phantom(seed, **SMALL) for seed in range(60)]
    flips = sum(phantom.genotype != _true_genotype(phantom) for phantom in phantoms)
    assert 1 <= flips <= 15


def _true_genotype(phantom: Phantom) -> int:
    """The genotype behind the lesion pattern: forcing it reproduces the same lesions (of `phantom`, not drawn again)."""
    for genotype in (0, 1):
        if generate_phantom(phantom.seed, genotype=genotype, **SMALL).lesion_kinds == phantom.lesion_kinds:
            return genotype
    raise AssertionError("unreachable")


def test_asking_for_many_slices_gives_thin_slices_covering_the_brain():
    phantom = generate_phantom(14, orientation="axial", matrix=32, slices=176, n_lesions=0)  # benchmark: matrix 512
    assert phantom.image.GetSize() == (32, 32, 176)
    assert 0.8 <= phantom.image.GetSpacing()[2] <= 1.0


def test_written_series_is_valid_mr_with_exact_geometry(small_axial_series):
    phantom, files = small_axial_series.phantom, small_axial_series.files
    assert len(files) == phantom.image.GetSize()[2]
    datasets = [pydicom.dcmread(f) for f in files]
    first = datasets[0]
    assert first.SOPClassUID == pydicom.uid.MRImageStorage and first.Modality == "MR"
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(files)
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}) == 1
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, len(files) + 1))
    assert first.PixelSpacing == [pytest.approx(v) for v in phantom.image.GetSpacing()[1::-1]]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == pytest.approx(4.0)
    stored = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    np.testing.assert_array_equal(stored, np.round(sitk.GetArrayViewFromImage(phantom.image)))
    for k in (0, len(files) - 1):
        position = [float(v) for v in datasets[k].ImagePositionPatient]
        assert position == pytest.approx(phantom.image.TransformIndexToPhysicalPoint((0, 0, k)), abs=1e-5)
    assert first.SpecificCharacterSet == "ISO_IR 100" and first.PatientName == "PHANTOM^DEMO"


def test_written_series_reads_back_in_simpleitk_with_the_same_geometry(phantom_series):
    series = phantom_series(15, orientation="oblique", **SMALL)
    image = sitk.ReadImage([str(f) for f in series.files])
    np.testing.assert_allclose(image.GetOrigin(), series.phantom.image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), series.phantom.image.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), series.phantom.image.GetSpacing(), atol=1e-4)


def test_uids_are_reproducible_and_non_ascii_names_are_utf8(tmp_path):
    phantom = generate_phantom(16, **SMALL)
    a = write_phantom_series(phantom, tmp_path / "a", patient_name="Müller^Zoë")
    b = write_phantom_series(phantom, tmp_path / "b", patient_name="Müller^Zoë")
    first_a, first_b = pydicom.dcmread(a[0]), pydicom.dcmread(b[0])
    assert first_a.SOPInstanceUID == first_b.SOPInstanceUID and first_a.SOPInstanceUID.startswith("2.25.")
    assert first_a.SpecificCharacterSet == "ISO_IR 192"
    assert str(first_a.PatientName) == "Müller^Zoë"
    other = write_phantom_series(phantom, tmp_path / "c", patient_id="OTHER")
    assert pydicom.dcmread(other[0]).StudyInstanceUID != first_a.StudyInstanceUID


def test_truth_files(tmp_path):
    phantom = generate_phantom(17, n_lesions=2, **SMALL)
    mask_path, brain_path, json_path = write_phantom_truth(phantom, tmp_path)
    mask = sitk.ReadImage(str(mask_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(phantom.mask))
    np.testing.assert_allclose(mask.GetDirection(), phantom.mask.GetDirection(), atol=1e-6)
    assert nib.load(mask_path).shape == phantom.mask.GetSize()
    truth = json.loads(json_path.read_text())
    assert truth["genotype"] == phantom.genotype and truth["lesion_diameters_mm"] == phantom.lesion_diameters_mm
    assert "no clinical meaning" in truth["genotype_meaning"]
    brain = sitk.ReadImage(str(brain_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(brain), sitk.GetArrayFromImage(phantom.brain))
    assert truth["look"]["style"] == "classic" and truth["look"]["skull"] is True


def test_phantom_command_writes_series_and_truth(tmp_path):
    result = CliRunner().invoke(
        app, ["phantom", str(tmp_path), "--seed", "40", "--count", "2", "--matrix", "48", "--slices", "10"]
    )
    assert result.exit_code == 0, result.output
    for seed in (40, 41):
        folder = tmp_path / f"phantom-{seed}"
        assert len(list((folder / "dicom").glob("*.dcm"))) == 10
        assert all((folder / name).is_file() for name in ("mask.nii.gz", "brain.nii.gz", "truth.json"))
        assert f"phantom {seed}:" in result.output


def test_phantom_command_rejects_an_unknown_orientation(tmp_path):
    result = CliRunner().invoke(app, ["phantom", str(tmp_path), "--orientation", "diagonal"])
    assert result.exit_code == 2
