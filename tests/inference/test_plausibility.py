"""The plausibility gate: its bounds, its reasons, the manifest section, and `infer` exit status 3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from dicom_node.cli import app
from inference.errors import ModelPackageError
from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.package import DEMO_PACKAGE_DIR, MANIFEST_NAME, load_package, save_package
from inference.plausibility import PlausibilityBounds, check_plausibility, uncertain_fraction
from tests.helpers.models import TINY_CONFIG

# 2 x 2 x 5 mm voxels: 20 mm3 each, 50 voxels per cm3.
GEOMETRY = dict(
    shape=(10, 64, 64), row_spacing=2.0, col_spacing=2.0, slice_spacing=5.0, along_row=(1, 0, 0), along_col=(0, 1, 0)
)


@pytest.fixture
def series(geometry_series):
    return geometry_series(**GEOMETRY)


def specks(count: int) -> np.ndarray:
    """`count` single-voxel lesions, none touching another."""
    labels = np.zeros(GEOMETRY["shape"], np.uint16)
    for n in range(count):
        labels[2 * (n // 256) % 10, 2 * ((n // 16) % 16) + 10, 2 * (n % 16) + 10] = n + 1
    return labels


def test_lesion_count_over_the_limit_is_a_reason(series, result_on):
    assert check_plausibility(result_on(series, specks(30)), PlausibilityBounds(), threshold=0.5) == []
    reasons = check_plausibility(result_on(series, specks(31)), PlausibilityBounds(), threshold=0.5)
    assert reasons == ["31 lesions, limit 30"]


def test_total_volume_and_share_of_the_brain(series, result_on):
    labels = np.zeros(GEOMETRY["shape"], np.uint16)
    labels[2:8, 10:40, 10:44] = 1  # 6120 voxels = 122.4 cm3
    result = result_on(series, labels)
    bounds = PlausibilityBounds(max_brain_fraction=None, max_lesion_diameter_mm=None)  # the volume alone
    assert check_plausibility(result, bounds, threshold=0.5) == ["total GTV 122.4 cm3, limit 100 cm3"]

    small = np.zeros(GEOMETRY["shape"], np.uint16)
    small[4, 10:20, 10:20] = 1  # 2.0 cm3
    result = result_on(series, small)
    assert check_plausibility(result, PlausibilityBounds(), threshold=0.5, brain_volume_cm3=1200.0) == []
    (reason,) = check_plausibility(result, PlausibilityBounds(), threshold=0.5, brain_volume_cm3=15.0)
    assert reason == "total GTV 2.0 cm3 is 13.3 % of the brain volume (15 cm3), limit 10 %"
    # Without a brain volume, the head foreground recorded by the pipeline is the reference.
    result.head_volume_cm3 = 12.0
    (reason,) = check_plausibility(result, PlausibilityBounds(), threshold=0.5)
    assert "of the head volume (12 cm3)" in reason
    result.head_volume_cm3 = None
    assert check_plausibility(result, PlausibilityBounds(), threshold=0.5) == []


def test_output_hovering_at_the_threshold_is_uncertain(series, result_on):
    labels = np.zeros(GEOMETRY["shape"], np.uint16)
    labels[4, 10:20, 10:20] = 1
    result = result_on(series, labels)
    probability = np.zeros(GEOMETRY["shape"], np.float32)
    probability[4, 10:20, 10:20] = 0.97  # decisive inside
    probability[4, 9, 10:20] = 0.45  # a rim of 10 voxels at the threshold
    image = sitk.GetImageFromArray(probability)
    image.CopyInformation(series.image)
    result.probability_map = image
    assert uncertain_fraction(probability, 0.5, 0.1) == (10 / 110, 110)
    assert check_plausibility(result, PlausibilityBounds(), threshold=0.5) == []

    probability[4, 10:20, 10:20] = 0.55  # a guess
    image = sitk.GetImageFromArray(probability)
    image.CopyInformation(series.image)
    result.probability_map = image
    (reason,) = check_plausibility(result, PlausibilityBounds(), threshold=0.5)
    assert reason == (
        "100 % of 110 candidate voxels lie within 0.1 of the probability threshold 0.5 (uncertain output), limit 50 %"
    )
    assert check_plausibility(result, PlausibilityBounds(max_uncertain_fraction=None), threshold=0.5) == []


def test_bounds_from_the_manifest_section():
    assert PlausibilityBounds.from_manifest(None) == PlausibilityBounds()
    bounds = PlausibilityBounds.from_manifest({"max_lesions": 5, "max_total_volume_cm3": None})
    assert bounds.max_lesions == 5 and bounds.max_total_volume_cm3 is None
    assert bounds.max_brain_fraction == PlausibilityBounds().max_brain_fraction
    assert PlausibilityBounds.from_manifest(bounds.to_manifest()) == bounds
    for section, message in [
        ({"max_lesion": 5}, "unknown key(s) max_lesion"),
        ({"max_lesions": -1}, "plausibility.max_lesions: must be a positive number"),
        ({"max_lesions": 2.5}, "plausibility.max_lesions: must be a whole number"),
        ({"max_brain_fraction": 10}, "plausibility.max_brain_fraction: is a fraction"),
        ({"uncertain_band": 0.7}, "plausibility.uncertain_band"),
        ({"max_lesions": "30"}, "plausibility.max_lesions: must be a number or null"),
        ([30], "plausibility: must be a JSON object"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            PlausibilityBounds.from_manifest(section)


def test_packages_carry_their_bounds(tmp_path):
    assert load_package(DEMO_PACKAGE_DIR).plausibility == PlausibilityBounds()
    config = MTSANetConfig(**TINY_CONFIG)  # type: ignore[arg-type]
    torch.manual_seed(0)
    package = save_package(MTSANet(config), config, tmp_path, "t", "0", True, plausibility=PlausibilityBounds(7))
    assert package.plausibility.max_lesions == 7
    manifest_path = tmp_path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["plausibility"]  # a package from before the gate: the defaults
    manifest_path.write_text(json.dumps(manifest))
    assert load_package(tmp_path).plausibility == PlausibilityBounds()
    manifest["plausibility"] = {"max_lesions": 0}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="plausibility.max_lesions"):
        load_package(tmp_path)


@pytest.mark.slow
def test_infer_writes_a_held_result_and_exits_3(small_axial_series, firing_model, tmp_path):
    out = tmp_path / "out"
    folder = small_axial_series.files[0].parent
    run = CliRunner().invoke(app, ["infer", str(folder), "--out", str(out), "--model", str(firing_model), "--dicom"])
    assert run.exit_code == 3, run.output
    summary = json.loads((out / "summary.json").read_text())
    reasons = summary["plausibility"]["reasons"]  # a model out of its depth: speckle, and uncertain everywhere
    assert summary["plausibility"]["held"] is True and reasons, summary["plausibility"]
    printed = " ".join(run.output.split())  # Rich wraps long lines
    assert "held:" in printed and all(" ".join(reason.split()) in printed for reason in reasons)
    # written for a look, nothing hidden: the mask, the summary and the DICOM outputs
    assert (out / "mask.nii.gz").is_file()
    assert len(list(out.glob("RTSTRUCT_*.dcm"))) == 1 and len(list(out.glob("SR_*.dcm"))) == 1


def test_a_lesion_longer_than_any_metastasis_is_a_reason(series, result_on):
    """An abdominal series went through as two brain "lesions" 140 mm across; 80 mm is the limit."""
    labels = np.zeros(GEOMETRY["shape"], np.uint16)
    labels[5, 20, 10:50] = 1  # 40 voxels of 2 mm in a row: 78 mm between the outer voxel centres
    assert check_plausibility(result_on(series, labels), PlausibilityBounds(), threshold=0.5) == []
    labels[5, 20, 10:52] = 1
    (reason,) = check_plausibility(result_on(series, labels), PlausibilityBounds(), threshold=0.5)
    assert reason.startswith("a lesion ") and reason.endswith(" mm across, limit 80 mm")


def test_a_brain_larger_than_any_brain_is_a_reason(series, result_on):
    """The brain mask of an abdomen, or of an inverted image, measured 4-6 L: no brain at all."""
    result = result_on(series, np.zeros(GEOMETRY["shape"], np.uint16))
    assert check_plausibility(result, PlausibilityBounds(), threshold=0.5, brain_volume_cm3=1900.0) == []
    (reason,) = check_plausibility(result, PlausibilityBounds(), threshold=0.5, brain_volume_cm3=3954.0)
    assert reason.startswith("brain volume 3954 cm3, limit 2500 cm3: the brain mask did not find a brain")
    none = PlausibilityBounds(max_brain_volume_cm3=None)
    assert check_plausibility(result, none, threshold=0.5, brain_volume_cm3=3954.0) == []
