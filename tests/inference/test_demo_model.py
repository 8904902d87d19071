"""The committed demo model, through the full DICOM pipeline, on phantoms it never trained on.

Seeds 90000-90007 (8 phantoms) were fixed before demo model 0.2.0 was trained
(on seeds 1000-1095) and evaluated; they are a regression guard for the
committed package. The model card's main figures come from 20 other phantoms
(seeds 95000-95019) that no model was run on before the final evaluation.
"""

from __future__ import annotations

import pytest
import torch

from inference.evaluation import evaluate_package
from inference.model_package import DEMO_PACKAGE_DIR, load_package

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
    assert evaluation["lesions"] >= 8
    assert evaluation["lesion_dice_mean"] >= 0.80, evaluation
