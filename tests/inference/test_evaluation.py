"""Lesion matching and the evaluation summary on hand-made masks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inference.evaluation.evaluate import (
    PhantomScore,
    equivalent_diameter_mm,
    evaluate_package,
    goals_met,
    lesion_scores,
    summarise,
    threshold_sweep,
)
from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.package import ModelPackage, save_package
from tests.helpers.models import MINIMAL_CONFIG


def test_equivalent_diameter_of_a_sphere_volume() -> None:
    voxels = round(4 / 3 * math.pi * 5**3)  # sphere of radius 5 mm in 1 mm voxels
    assert equivalent_diameter_mm(voxels, (1, 1, 1)) == pytest.approx(10.0, abs=0.01)
    assert equivalent_diameter_mm(1, (2, 2, 2)) == pytest.approx((6 * 8 / math.pi) ** (1 / 3))


def test_lesions_matched_by_overlap() -> None:
    truth = np.zeros((10, 20, 20), np.uint8)
    truth[2:6, 2:6, 2:6] = 1  # 64 voxels, found exactly
    truth[2:6, 10:14, 10:14] = 2  # 64 voxels, half found
    truth[7:9, 16:18, 16:18] = 3  # missed
    predicted = np.zeros_like(truth)
    predicted[2:6, 2:6, 2:6] = 1
    predicted[2:6, 10:14, 10:12] = 2
    predicted[8, 0, 0] = 3  # a false positive somewhere else
    scores = lesion_scores(5, truth, predicted, (1, 1, 1))
    assert [s.label for s in scores] == [1, 2, 3]
    assert scores[0].dice == 1.0 and scores[0].detected
    assert scores[1].dice == pytest.approx(2 * 32 / (32 + 64))
    assert scores[2].dice == 0.0 and not scores[2].detected
    assert scores[0].diameter_mm == pytest.approx(equivalent_diameter_mm(64, (1, 1, 1)), abs=0.01)


def test_summary_filters_small_lesions_and_unassessable_egfr() -> None:
    big = lesion_scores(1, np.pad(np.ones((6, 6, 6), np.uint8), 2), np.pad(np.ones((6, 6, 6), np.uint8), 2), (1, 1, 1))
    small = lesion_scores(1, np.pad(np.ones((1, 1, 1), np.uint8), 2), np.zeros((5, 5, 5), np.uint8), (1, 1, 1))
    common = {"orientation": "axial", "dice": 0.9, "precision": 1.0, "recall": 0.8, "false_positive_lesions": 0}
    scores = [
        PhantomScore(
            seed=1, genotype=1, egfr_call="mutant", egfr_probability=0.9, hd95_mm=2.0, lesions=big + small, **common
        ),
        PhantomScore(seed=2, genotype=0, egfr_call="mutant", egfr_probability=0.6, hd95_mm=math.inf, **common),
        PhantomScore(seed=3, genotype=0, egfr_call="not assessable", egfr_probability=None, hd95_mm=4.0, **common),
    ]
    summary = summarise(scores)
    assert summary["lesions"] == 1 and summary["lesion_dice_mean"] == 1.0  # the 1-voxel lesion is < 5 mm
    assert summary["hd95_mm_median"] == 3.0 and summary["hd95_infinite"] == 1
    assert summary["egfr_assessable"] == 2
    assert summary["egfr_accuracy"] == 0.5 and summary["egfr_auc"] == 1.0


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    config = MTSANetConfig(**MINIMAL_CONFIG)
    torch.manual_seed(0)
    return save_package(MTSANet(config), config, tmp_path_factory.mktemp("pkg"), "tiny", "0", is_demo=True)


SMALL = {"matrix": 64, "slices": 16, "orientation": "axial", "n_lesions": 1}


@pytest.fixture
def search_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A brain mask covering the whole volume, for the sweep's extremes.

    With the real mask, "everything above threshold -1" is one detection lying
    mostly outside the brain, which is dropped whole (tested in test_postprocess).
    """

    def everywhere(image: sitk.Image) -> sitk.Image:
        mask = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
        mask.CopyInformation(image)
        return mask

    monkeypatch.setattr("inference.pipeline.brain_mask", everywhere)


@pytest.mark.slow
def test_evaluation_runs_the_dicom_pipeline(tiny_package: ModelPackage) -> None:
    summary, scores = evaluate_package(tiny_package, [31], device="cpu", progress=False, phantom_options=SMALL)
    assert summary["phantoms"] == 1 and len(scores) == 1
    assert scores[0].seed == 31 and scores[0].lesions  # the truth lesion was found in the phantom
    assert math.isfinite(scores[0].dice)  # a patient Dice was computed (NaN would mean no comparison)


@pytest.mark.slow
def test_threshold_sweep_extremes(tiny_package: ModelPackage, search_everywhere: None) -> None:
    results = threshold_sweep(tiny_package, [31], [-1.0, 1.0], device="cpu", progress=False, phantom_options=SMALL)
    default = tiny_package.min_lesion_volume_mm3
    assert list(results) == [(-1.0, default), (1.0, default)]
    assert results[(1.0, default)]["lesion_detection_rate"] == 0.0  # nothing is above probability 1
    assert results[(-1.0, default)]["voxel_recall_mean"] == 1.0  # everything is above -1
    assert not any(key.startswith("egfr") for key in results[(1.0, default)])


def test_threshold_sweep_over_minimum_volumes(tiny_package: ModelPackage, search_everywhere: None) -> None:
    # at threshold -1 the whole head is one component: a floor above the volume's size drops it
    results = threshold_sweep(
        tiny_package, [31], [-1.0], min_volumes_mm3=[0.0, 1e12], device="cpu", progress=False, phantom_options=SMALL
    )
    assert results[(-1.0, 0.0)]["voxel_recall_mean"] == 1.0
    assert results[(-1.0, 1e12)]["voxel_recall_mean"] == 0.0
    with pytest.raises(ValueError, match="no minimum volumes"):
        threshold_sweep(tiny_package, [31], [0.5], min_volumes_mm3=[], progress=False)


def test_summary_reports_sensitivity_for_lesions_of_10_mm_and_false_positives_per_case() -> None:
    def cube(side: int, found: bool) -> list:
        truth = np.pad(np.ones((side, side, side), np.uint8), 2)
        return lesion_scores(1, truth, truth if found else np.zeros_like(truth), (1, 1, 1))

    common = {"orientation": "axial", "genotype": 0, "egfr_call": "wild type", "egfr_probability": 0.1}
    common |= {"dice": 0.5, "hd95_mm": 1.0, "precision": 1.0, "recall": 0.5}
    scores = [
        PhantomScore(seed=1, lesions=cube(12, True) + cube(12, False), false_positive_lesions=3, **common),
        PhantomScore(
            seed=2, lesions=cube(12, True) + cube(6, False), false_positive_lesions=0, **common
        ),  # 6 mm cube: 7.4 mm sphere
    ]
    scores[0] = dataclasses.replace(scores[0], false_positives_outside_brain=2)
    summary = summarise(scores)
    assert summary["lesions_at_least_10mm"] == 3 and summary["sensitivity_at_least_10mm"] == pytest.approx(2 / 3, 1e-3)
    assert summary["false_positive_lesions_per_case"] == 1.5 and summary["false_positives_outside_brain"] == 2
    checks = dict(goals_met("unseen", summary))
    assert checks == {
        "lesion_dice_mean >= 0.75": False,
        "sensitivity_at_least_10mm >= 0.9": False,
        "false_positive_lesions_per_case <= 0.5": False,
        "false_positives_outside_brain <= 0": False,
    }


@pytest.mark.slow
def test_a_false_positive_over_the_background_counts_as_outside_the_brain(
    tiny_package: ModelPackage, search_everywhere: None
) -> None:
    """At threshold -1 the whole grid is one predicted lesion (the node's brain mask switched off, so the
    evaluation's own count is tested); with no true lesion it is a false positive, outside the brain."""
    options = {**SMALL, "n_lesions": 0, "style": "unseen"}
    results = threshold_sweep(tiny_package, [32], [-1.0, 1.0], device="cpu", progress=False, phantom_options=options)
    everything, nothing = (results[(t, tiny_package.thresholds.get("min_lesion_volume_mm3", 20.0))] for t in (-1, 1))
    assert everything["false_positive_lesions"] == 1 and everything["false_positives_outside_brain"] == 1
    assert nothing["false_positive_lesions"] == 0 and nothing["false_positives_outside_brain"] == 0


def test_evaluation_on_a_style_records_it(tiny_package: ModelPackage) -> None:
    _, scores = evaluate_package(
        tiny_package, [33], device="cpu", progress=False, phantom_options={**SMALL, "style": "randomised"}
    )
    assert scores[0].style == "randomised"
    assert 0 <= scores[0].false_positives_outside_brain <= scores[0].false_positive_lesions
