"""The committed demo model, through the full DICOM pipeline, on phantoms it never trained on.

A regression guard, not the accuracy claim. Seeds 90000-90007 (8 classic-style
phantoms, 13 lesions >= 5 mm) were fixed before demo models 0.2.0, 0.3.0 and
0.4.0 were trained (on seeds from 1000). There 0.4.0 scores lesion Dice mean
0.693, median 0.856, 10 of 13 lesions found, no false-positive lesion. 0.4.0 is
below 0.3.0 on this classic set (0.762, median 0.927, 11 of 13): it was
fine-tuned for the randomised and unseen styles, where 0.3.0 predicted 66-89
false-positive lesions per case. The accuracy figures, by style and against
issue 12's goals, are in inference/model/shipped/mtsa-demo/MODEL_CARD.md.

The test runs three of those eight (`TEST_SEEDS`), chosen for what they cover per
model slice (the cost is the model on 384 x 384 axial slices, about 1060 slices for
all eight, 291 for these): one coronal, one sagittal, one axial acquisition; 6
lesions >= 5 mm, 5 found (Dice 0.86-0.98) and one of 7 mm missed; a lesion under
5 mm left out of the scores. 0.4.0 scores lesion Dice mean 0.785, median 0.948,
5 of 6 found, no false-positive lesion; the bounds sit just under those figures
(one more missed lesion fails the test). Per seed (0.4.0): 90000 coronal, 1 of 1
found (a 3.6 mm one not counted); 90001 sagittal, 4 of 4; 90006 axial, 0 of 1.
`inference.evaluation` (the `evaluate` command) still scores all eight for the model card.
No seed of the eight has an axial lesion 0.4.0 finds (90006's is its only one), so this
guard covers axial acquisitions for false positives only, as the eight did; the model's
axial detection is in the model card's 40-phantom evaluation, not in a test.
"""

from __future__ import annotations

import pytest
import torch

from inference.evaluation.evaluate import evaluate_package
from inference.model.package import DEMO_PACKAGE_DIR, load_package

TEST_SEEDS = (90000, 90001, 90006)  # of the regression set 90000-90007, see the module docstring


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


@pytest.mark.slow  # runs the demo model on 3 phantoms
def test_demo_model_segments_lesions_of_5_mm_and_more(evaluation: dict) -> None:
    assert evaluation["phantoms"] == 3 and evaluation["lesions"] == 6
    assert evaluation["lesion_detection_rate"] >= 0.83, evaluation  # 5 of 6
    assert evaluation["lesion_dice_mean"] >= 0.77, evaluation
    assert evaluation["lesion_dice_median"] >= 0.93, evaluation
    assert evaluation["false_positive_lesions"] == 0, evaluation
    assert evaluation["false_positives_outside_brain"] == 0, evaluation
