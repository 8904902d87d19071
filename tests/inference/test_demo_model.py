"""The committed demo model, through the full DICOM pipeline, on phantoms it never trained on.

A regression guard, not the accuracy claim. Seeds 90000-90007 (8 phantoms,
13 lesions >= 5 mm) were fixed before demo models 0.2.0 and 0.3.0 were
trained (on seeds 1000-1063 and 1000-1095); there 0.3.0 scores lesion Dice
mean 0.762, median 0.927, 11 of 13 lesions found, no false-positive lesion,
and the bounds below sit just under those figures (one more missed lesion
fails the test; 0.2.0 fails it with 10 of 13 found and mean 0.711, 0.1.0 with
median 0.850 and 2 false-positive lesions). The accuracy figures are in
inference/model/shipped/mtsa-demo/MODEL_CARD.md: 0.797 on the 40 test phantoms,
0.783 over the 80 phantoms of its four evaluation sets, so the Dice >= 0.80
goal is not met in general.
"""

from __future__ import annotations

import pytest
import torch

from inference.evaluation.evaluate import evaluate_package
from inference.model.package import DEMO_PACKAGE_DIR, load_package

TEST_SEEDS = range(90000, 90008)


@pytest.fixture(scope="module")
def evaluation() -> dict:
    torch.set_num_threads(2)
    summary, _ = evaluate_package(load_package(DEMO_PACKAGE_DIR), TEST_SEEDS, device="cpu", progress=False)
    return summary


def test_demo_package_is_marked_as_demo() -> None:
    package = load_package(DEMO_PACKAGE_DIR)
    assert package.is_demo
    assert "NOT FOR CLINICAL USE" in package.identity.display
    model_card = (DEMO_PACKAGE_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "demo model, synthetic data, not for clinical use" in model_card.lower()


def test_demo_model_segments_lesions_of_5_mm_and_more(evaluation: dict) -> None:
    assert evaluation["lesions"] == 13
    assert evaluation["lesion_detection_rate"] >= 0.84, evaluation
    assert evaluation["lesion_dice_mean"] >= 0.74, evaluation
    assert evaluation["lesion_dice_median"] >= 0.90, evaluation
    assert evaluation["false_positive_lesions"] == 0, evaluation
