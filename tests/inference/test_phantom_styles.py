"""Phantom styles: the held-out looks stay held out, and each randomised setting shows in the image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicom_node.cli import app
from inference.synthetic.phantoms import _ring_core_fraction, _ring_probability, generate_phantom
from inference.synthetic.styles import (
    ORIENTATIONS,
    RANDOMISED,
    STYLES,
    TRAINING_GM_MAX,
    TRAINING_STYLES,
    UNSEEN,
    Style,
    draw_look,
    is_held_out,
)
from inference.training.trainer import phantom_cases

TINY = {"matrix": 48, "slices": 12}


@pytest.mark.parametrize("name", TRAINING_STYLES)
def test_a_training_style_never_draws_a_held_out_look(name: str) -> None:
    style = STYLES[name]
    for seed in range(3000):
        orientation = ORIENTATIONS[seed % 4]
        look = draw_look(np.random.default_rng([seed, 4]), style, orientation, 0.03)
        assert not is_held_out(look, orientation), (seed, look)
        assert look.gm_ratio <= TRAINING_GM_MAX


def test_the_randomised_style_draws_each_part_of_the_held_out_combination_alone() -> None:
    """Held out is the combination, not its parts: training sees stripped, masked and oblique series."""
    looks = [draw_look(np.random.default_rng([seed, 4]), RANDOMISED, "oblique", 0.03) for seed in range(400)]
    assert any(not look.skull for look in looks) and any(look.zero_margins for look in looks)
    assert not any(not look.skull and look.zero_margins for look in looks)  # never together on an oblique
    axial = [draw_look(np.random.default_rng([seed, 4]), RANDOMISED, "axial", 0.03) for seed in range(400)]
    assert any(not look.skull and look.zero_margins for look in axial)


def test_every_unseen_look_is_held_out() -> None:
    for seed in range(500):
        look = draw_look(np.random.default_rng([seed, 4]), UNSEEN, "oblique", 0.03)
        assert is_held_out(look, "oblique") and look.gm_ratio > TRAINING_GM_MAX


def test_a_held_out_style_cannot_be_built_with_held_out_contrast() -> None:
    with pytest.raises(ValueError, match="grey/white"):
        dataclasses.replace(RANDOMISED, gm_ratio=(0.7, 0.9))


def test_training_refuses_the_unseen_style(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--out", str(tmp_path), "--phantoms", "2", "--phantom-style", "unseen", "--max-epochs", "1"]
    )
    assert result.exit_code == 2 and "--phantom-style must be one of classic, randomised" in result.output


def test_the_training_library_refuses_the_unseen_style_too() -> None:
    with pytest.raises(ValueError, match="training phantoms are drawn from classic, randomised, not 'unseen'"):
        phantom_cases(1, 0, size=64, free_slice_ratio=1.0, style="unseen", progress=False)


def test_an_unknown_style_is_named() -> None:
    with pytest.raises(ValueError, match="unknown phantom style 'synthseg'; known: classic, randomised, unseen"):
        generate_phantom(1, style="synthseg", **TINY)


def test_a_randomised_phantom_is_deterministic_and_records_its_look() -> None:
    a, b = generate_phantom(21, style="randomised", **TINY), generate_phantom(21, style="randomised", **TINY)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(b.image))
    assert a.look == b.look and a.look.style == "randomised"
    classic = generate_phantom(21, **TINY)
    assert classic.look.style == "classic" and classic.look.skull and not classic.look.zero_margins
    assert a.image.GetSize() == classic.image.GetSize()


def test_unseen_phantoms_are_skull_stripped_oblique_and_zero_outside_the_field_of_view() -> None:
    phantom = generate_phantom(3, style="unseen", matrix=96, slices=24)
    image = sitk.GetArrayFromImage(phantom.image)
    brain = sitk.GetArrayFromImage(phantom.brain).astype(bool)
    assert phantom.orientation == "oblique"
    assert brain.sum() > 0.05 * brain.size
    assert np.all(image[~brain] == 0)  # skull-stripped: not even noise outside the brain
    assert image[brain].mean() > 300
    top, bottom, left, right = (round(m * 96) for m in phantom.look.margins)
    assert max(top, bottom, left, right) >= 5
    assert np.all(image[:, :top] == 0) and np.all(image[:, 96 - bottom :] == 0)
    assert np.all(image[:, :, :left] == 0) and np.all(image[:, :, 96 - right :] == 0)
    lesions = sitk.GetArrayFromImage(phantom.mask) > 0
    for truth in (lesions, brain):  # what the field of view cuts off is not truth either
        assert not truth[:, :top].any() and not truth[:, :, 96 - right :].any()


def test_a_full_head_phantom_has_signal_outside_the_brain_and_lesions_inside_it() -> None:
    phantom = generate_phantom(12, orientation="axial", matrix=96, slices=30, slice_spacing=4.0, n_lesions=3)
    image = sitk.GetArrayFromImage(phantom.image)
    brain = sitk.GetArrayFromImage(phantom.brain).astype(bool)
    lesions = sitk.GetArrayFromImage(phantom.mask) > 0
    assert (image[~brain] > 500).sum() > 1000  # scalp
    assert lesions.any() and np.all(brain[lesions])


@pytest.mark.slow
def test_lesion_appearance_follows_size() -> None:
    """Mostly solid when small, mostly rings when large, some small rings (clinical pattern)."""
    assert _ring_probability(5.0, 0) < 0.2 and _ring_probability(25.0, 0) > 0.8
    assert _ring_probability(7.0, 1) < _ring_probability(7.0, 0)
    small, large = [], []
    for seed in range(40):
        phantom = generate_phantom(seed, style="randomised", n_lesions=4, **TINY)
        for diameter, kind in zip(phantom.lesion_diameters_mm, phantom.lesion_kinds, strict=True):
            if diameter < 8:
                small.append(kind == "ring")
            elif diameter >= 15:
                large.append(kind == "ring")
    assert len(small) >= 20 and len(large) >= 10
    assert 0 < np.mean(small) < 0.35 and np.mean(large) > 0.45


def test_a_large_ring_has_a_rim_of_several_mm() -> None:
    rng = np.random.default_rng(0)
    for radius in (6.0, 10.0, 15.0):
        rims = [(1 - _ring_core_fraction(rng, radius)) * radius for _ in range(200)]
        assert min(rims) >= 0.15 * radius - 1e-9 and max(rims) <= 5.0 + 1e-9
        assert np.mean(rims) >= 2.0


def test_written_headers_read_as_a_post_contrast_t1(small_axial_series) -> None:
    ds = pydicom.dcmread(small_axial_series.files[0])
    assert ds.ContrastBolusAgent and ds.ContrastBolusRoute == "IV"
    assert ds.SeriesDescription == "T1 MPRAGE +Gd"
    assert list(ds.ScanningSequence) == ["GR", "IR"] and "MP" in ds.SequenceVariant
    assert float(ds.RepetitionTime) == 2300 and float(ds.EchoTime) < 5
    assert float(ds.InversionTime) == 900 and float(ds.FlipAngle) == 8


def test_style_names_are_unique_and_styles_are_frozen() -> None:
    assert set(STYLES) == {"classic", "randomised", "unseen"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        RANDOMISED.skull_p = 1.0  # type: ignore[misc]
    assert isinstance(UNSEEN, Style) and not UNSEEN.hold_out
