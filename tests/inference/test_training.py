"""The training loop end to end on tiny phantoms, and the data-folder reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.package import load_package
from inference.synthetic.phantoms import generate_phantom
from inference.training import trainer
from inference.training.config import CROP_DICE_MODES, TrainingConfig
from inference.training.losses import UncertaintyWeightedLoss
from tests.helpers.models import MINIMAL_CONFIG

TINY = MTSANetConfig(**MINIMAL_CONFIG)  # type: ignore[arg-type]
SMALL_PHANTOM = {"matrix": 64, "slices": 16, "orientation": "axial", "n_lesions": 2}


def tiny_case(seed: int) -> trainer.CaseSlices:
    phantom = generate_phantom(seed, **SMALL_PHANTOM)
    rng = np.random.default_rng(seed)
    return trainer.case_slices(
        f"p{seed}", phantom.image, phantom.mask, phantom.genotype, size=64, free_slice_ratio=1.0, rng=rng
    )


def test_case_slices_keep_tumour_and_some_free_slices() -> None:
    case = tiny_case(7)
    has_tumour = case.masks.any(axis=(1, 2))
    assert case.images.dtype == np.float16 and case.images.shape[1:] == (64, 64)
    assert has_tumour.sum() > 0
    assert 1 <= (~has_tumour).sum() <= has_tumour.sum()


@pytest.mark.slow  # trains for an epoch or more
def test_two_epochs_write_a_loadable_package(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    cases = [tiny_case(11), tiny_case(12)]
    train_cases, val_cases = trainer.split_cases(cases, 0.5, seed=0)
    config = TrainingConfig(max_epochs=2, batch_size=4, seed=0, learning_rate=3e-3)
    lines: list[str] = []
    result = trainer.train(
        TINY,
        train_cases,
        val_cases,
        config,
        tmp_path / "pkg",
        name="tiny",
        version="0.0.1",
        is_demo=True,
        data_info={"source": "test"},
        progress=False,
        log=lines.append,
    )
    assert len(result.history) == 2
    first = result.history[0]
    assert first.val_loss == pytest.approx(first.val_gtv_loss + first.val_egfr_loss)  # "joint" is the default
    assert result.history[1].train_loss < result.history[0].train_loss
    assert any(line.startswith("epoch   2") and "val Dice" in line and "s1" in line for line in lines)
    package = load_package(tmp_path / "pkg")
    assert package.is_demo and package.config == TINY
    assert package.training["best_epoch"] == result.best_epoch
    assert package.training["val_cases"] == [val_cases[0].case_id]
    assert len(package.training["history"]) == 2 and package.training["device"] == "cpu"
    package.build_model()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_the_gpu_writes_a_package_that_loads_on_the_cpu(tmp_path: Path) -> None:
    cases = [tiny_case(11), tiny_case(12)]
    config = TrainingConfig(max_epochs=1, batch_size=4, seed=0, crop_size=32, crop_dice="per-crop")
    result = trainer.train(
        TINY,
        cases[:1],
        cases[1:],
        config,
        tmp_path / "pkg",
        name="tiny",
        version="0",
        is_demo=True,
        data_info={},
        progress=False,
        log=lambda _: None,
        device="cuda",
    )
    assert math.isfinite(result.history[0].val_loss) and result.package.training["device"].startswith("cuda")
    model = load_package(tmp_path / "pkg").build_model()
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow  # trains for an epoch or more
def test_time_budget_stops_before_an_epoch_that_would_overrun(tmp_path: Path) -> None:
    cases = [tiny_case(11), tiny_case(12)]
    config = TrainingConfig(max_epochs=50, max_minutes=1e-6, batch_size=8)
    result = trainer.train(
        TINY,
        cases[:1],
        cases[1:],
        config,
        tmp_path / "pkg",
        name="tiny",
        version="0",
        is_demo=True,
        data_info={},
        progress=False,
        log=lambda _: None,
    )
    assert len(result.history) == 1
    assert "time budget" in result.stop_reason


def test_split_is_by_patient_and_seeded() -> None:
    cases = [
        trainer.CaseSlices(f"c{i}", np.zeros((1, 4, 4), np.float16), np.zeros((1, 4, 4), bool), 0) for i in range(10)
    ]
    train_a, val_a = trainer.split_cases(cases, 0.2, seed=3)
    train_b, val_b = trainer.split_cases(cases, 0.2, seed=3)
    assert [c.case_id for c in val_a] == [c.case_id for c in val_b]
    assert len(val_a) == 2 and len(train_a) == 8
    assert not {c.case_id for c in train_a} & {c.case_id for c in val_a}
    with pytest.raises(ValueError, match="at least 2 cases"):
        trainer.split_cases(cases[:1], 0.2, seed=0)


def test_labels_csv_accepts_numbers_and_words(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("case_id,egfr\na,0\nb,Mutant\nc,wild type\nd,1\n", encoding="utf-8")
    assert trainer.read_labels(csv_path) == {"a": 0, "b": 1, "c": 0, "d": 1}
    csv_path.write_text("case_id,egfr\na,maybe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        trainer.read_labels(csv_path)


def write_nifti_case(root: Path, case_id: str, seed: int) -> None:
    phantom = generate_phantom(seed, **SMALL_PHANTOM)
    (root / case_id).mkdir(parents=True)
    sitk.WriteImage(phantom.image, str(root / case_id / "image.nii.gz"))
    sitk.WriteImage(phantom.mask, str(root / case_id / "mask.nii.gz"))


@pytest.mark.slow
def test_folder_of_nifti_cases(tmp_path: Path) -> None:
    write_nifti_case(tmp_path, "case1", 21)
    write_nifti_case(tmp_path, "case2", 22)
    (tmp_path / "labels.csv").write_text("case_id,egfr\ncase1,mutant\ncase2,0\n", encoding="utf-8")
    cases = trainer.folder_cases(tmp_path, size=64, free_slice_ratio=0.5, seed=0, progress=False)
    assert [(c.case_id, c.egfr) for c in cases] == [("case1", 1), ("case2", 0)]
    assert all(c.masks.any() for c in cases)


def test_folder_with_unlabelled_case_is_rejected(tmp_path: Path) -> None:
    write_nifti_case(tmp_path, "case1", 21)
    (tmp_path / "extra").mkdir()
    (tmp_path / "labels.csv").write_text("case_id,egfr\ncase1,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="without an EGFR label: extra"):
        trainer.folder_cases(tmp_path, size=64, free_slice_ratio=0.5, seed=0, progress=False)


@pytest.mark.slow  # trains for an epoch or more
def test_selection_loss_gtv_ignores_the_egfr_term(tmp_path: Path) -> None:
    cases = [tiny_case(11), tiny_case(12)]
    config = TrainingConfig(max_epochs=1, batch_size=8, selection_loss="gtv")
    result = trainer.train(
        TINY,
        cases[:1],
        cases[1:],
        config,
        tmp_path / "pkg",
        name="tiny",
        version="0",
        is_demo=True,
        data_info={},
        progress=False,
        log=lambda _: None,
    )
    record = result.history[0]
    assert record.val_loss == record.val_gtv_loss and record.val_egfr_loss > 0
    with pytest.raises(ValueError, match="selection_loss"):
        TrainingConfig(selection_loss="dice")


def test_augmentation_moves_image_and_mask_together() -> None:
    """A bright square and its mask stay aligned under the random affine."""
    images = torch.full((6, 1, 64, 64), -1.0)
    images[:, :, 20:36, 24:44] = 3.0
    masks = (images > 0).float()
    augmented, augmented_masks = trainer._augment(images, masks, torch.Generator().manual_seed(3))
    assert not torch.equal(augmented_masks, masks)  # something moved
    inside = augmented[augmented_masks > 0]
    outside = augmented[augmented_masks == 0]
    assert inside.mean() > 2.0 and outside.mean() < 0.0
    assert set(torch.unique(augmented_masks).tolist()) <= {0.0, 1.0}


@pytest.mark.slow  # trains for an epoch or more
def test_saved_weights_are_the_moving_average(tmp_path: Path) -> None:
    """With a slow average the saved weights stay near the start; with 0 they are the raw weights."""
    torch.set_num_threads(2)
    cases = [tiny_case(11), tiny_case(12)]
    trainer.seed_everything(0)
    start = MTSANet(TINY).state_dict()

    def distance_from_start(ema_decay: float) -> float:
        config = TrainingConfig(max_epochs=1, batch_size=2, seed=0, learning_rate=3e-3, ema_decay=ema_decay)
        result = trainer.train(
            TINY,
            cases[:1],
            cases[1:],
            config,
            tmp_path / f"ema-{ema_decay}",
            name="tiny",
            version="0",
            is_demo=True,
            data_info={},
            progress=False,
            log=lambda _: None,
        )
        weights = result.package.build_model().state_dict()
        return sum(float((weights[k] - start[k]).abs().sum()) for k in start if start[k].is_floating_point())

    raw, averaged = distance_from_start(0.0), distance_from_start(0.99)
    assert 0 < averaged < raw / 2


def test_ema_decay_must_be_below_one() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        TrainingConfig(ema_decay=1.0)


def test_small_tumour_sections_are_drawn_more_often() -> None:
    masks = torch.zeros(3, 1, 64, 64)
    masks[1, :, :4, :4] = 1  # 16 px: a small section
    masks[2, :, :40, :40] = 1  # 1600 px: a large one
    weights = trainer.slice_weights(masks, max_weight=3.0)
    assert weights.tolist() == [1.0, 3.0, 1.0]  # sqrt(300 / 16) = 4.3, clipped to 3
    config = TrainingConfig(batch_size=3, small_tumour_weight=3.0)
    draws = torch.cat(
        [i for _ in range(200) for i in trainer._epoch_batches(masks, config, torch.Generator().manual_seed(_))]
    )
    counts = torch.bincount(draws, minlength=3).float()
    assert counts[1] / counts[0] == pytest.approx(3.0, rel=0.2)


def test_crops_cut_image_and_mask_together_and_mostly_around_tumour() -> None:
    size, crop = 128, 64
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = (rows * size + cols).float().expand(400, 1, size, size)  # each pixel names its place
    masks = torch.zeros(400, 1, size, size)
    masks[:200, :, 110:114, 4:8] = 1  # a small tumour in a corner; the other 200 slices have none
    cropped, cropped_masks = trainer._crop(images, masks, crop, torch.Generator().manual_seed(0))
    assert cropped.shape == cropped_masks.shape == (400, 1, crop, crop)
    corner_rows, corner_cols = cropped[:, 0, 0, 0] // size, cropped[:, 0, 0, 0] % size
    for i in range(400):  # the crop is a contiguous square, at the same place in the mask
        r, c = int(corner_rows[i]), int(corner_cols[i])
        assert torch.equal(cropped[i], images[i, :, r : r + crop, c : c + crop])
        assert torch.equal(cropped_masks[i], masks[i, :, r : r + crop, c : c + crop])
    on_tumour = (cropped_masks[:200].flatten(1).sum(1) == 16).float().mean()
    assert trainer.CROP_ON_TUMOUR - 0.1 < on_tumour < 0.97  # the rest land anywhere (rarely on it)
    assert cropped_masks[200:].sum() == 0


@pytest.mark.slow  # trains for an epoch or more
def test_crop_steps_train_the_segmentation_on_crops(tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(2)
    cases = [tiny_case(11), tiny_case(12)]
    shapes: list[tuple[int, ...]] = []
    segment = MTSANet.segment
    monkeypatch.setattr(MTSANet, "segment", lambda self, x: shapes.append(tuple(x.shape)) or segment(self, x))
    config = TrainingConfig(max_epochs=1, batch_size=2, seed=0, crop_size=32)
    result = trainer.train(
        TINY,
        cases[:1],
        cases[1:],
        config,
        tmp_path / "pkg",
        name="tiny",
        version="0",
        is_demo=True,
        data_info={},
        progress=False,
        log=lambda _: None,
    )
    steps = -(-len(cases[0].images) // 2)
    assert shapes == [(2 * 4, 1, 32, 32)] * (steps // 2)  # every second step, 4 crops per slice of the batch
    assert math.isfinite(result.history[0].train_loss) and result.package.training["settings"]["crop_size"] == 32
    with pytest.raises(ValueError, match="smaller than input_size"):
        trainer.train(
            TINY,
            cases[:1],
            cases[1:],
            TrainingConfig(crop_size=64),
            tmp_path / "x",
            name="tiny",
            version="0",
            is_demo=True,
            data_info={},
            progress=False,
            log=lambda _: None,
        )
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainingConfig(crop_size=40)


@pytest.mark.slow  # prepares full-size phantoms
def test_phantom_lesion_counts_are_drawn_from_the_range(monkeypatch) -> None:
    asked: list[int | None] = []
    real = trainer.generate_phantom

    styles: list[str] = []

    def small_phantom(seed: int, n_lesions: int | None = None, style: str = "classic"):
        asked.append(n_lesions)
        styles.append(style)
        return real(seed, style=style, **{**SMALL_PHANTOM, "n_lesions": n_lesions or 1})

    monkeypatch.setattr(trainer, "generate_phantom", small_phantom)
    # Seed 40's first four draws are 3, 3, 2, 2: both ends of the range, from as few phantoms as that takes.
    cases = trainer.phantom_cases(4, 40, size=64, free_slice_ratio=0.5, lesions=(2, 3), progress=False)
    assert len(cases) == 4 and asked == [3, 3, 2, 2]
    asked.clear()
    trainer.phantom_cases(2, 40, size=64, free_slice_ratio=0.5, progress=False)
    assert asked == [None, None]  # the generator's own count
    trainer.phantom_cases(1, 40, size=64, free_slice_ratio=0.5, style="randomised", progress=False)
    assert styles == ["classic"] * 6 + ["randomised"]
    with pytest.raises(ValueError, match="lowest <= highest"):
        trainer.phantom_cases(2, 40, size=64, free_slice_ratio=0.5, lesions=(3, 2), progress=False)


@pytest.mark.slow
def test_per_crop_dice_is_what_the_crop_steps_use(monkeypatch) -> None:
    torch.set_num_threads(2)
    case = tiny_case(11)
    data = (torch.from_numpy(case.images), torch.from_numpy(case.masks), torch.full((len(case.images),), case.egfr))
    weights = trainer.slice_weights(data[1], 6.0)
    seen: list[bool] = []
    gtv_loss = trainer.gtv_loss
    monkeypatch.setattr(trainer, "gtv_loss", lambda *a, **k: seen.append(k["per_sample_dice"]) or gtv_loss(*a, **k))
    model, weighting = MTSANet(TINY), UncertaintyWeightedLoss()
    for mode in CROP_DICE_MODES:
        config = TrainingConfig(batch_size=2, crop_size=32, crop_dice=mode)
        loss = trainer._crop_step_loss(model, weighting, data, weights, config, torch.Generator().manual_seed(0))
        assert math.isfinite(loss.item())
    assert seen == [False, True]
    with pytest.raises(ValueError, match="crop_dice"):
        TrainingConfig(crop_dice="per-slice")
    with pytest.raises(ValueError, match="needs crop steps"):
        TrainingConfig(crop_dice="per-crop")


@pytest.mark.slow  # trains for an epoch or more
def test_a_warm_start_begins_from_the_given_weights(tmp_path: Path) -> None:
    """With a vanishing learning rate the saved (averaged) weights stay those the run started from."""
    torch.manual_seed(123)
    start = MTSANet(TINY).state_dict()
    cases = [tiny_case(11), tiny_case(12)]
    config = TrainingConfig(max_epochs=1, batch_size=8, seed=0, learning_rate=1e-12)
    result = trainer.train(
        TINY,
        cases[:1],
        cases[1:],
        config,
        tmp_path / "pkg",
        name="tiny",
        version="0",
        is_demo=True,
        data_info={},
        progress=False,
        log=lambda _: None,
        initial_state=start,
    )
    saved = load_package(result.package.path).build_model().state_dict()
    parameters = [name for name, _ in MTSANet(TINY).named_parameters()]  # batch-norm statistics do move
    for name in parameters:
        torch.testing.assert_close(saved[name], start[name], atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(MTSANet(TINY).state_dict().values(), start.values()))
