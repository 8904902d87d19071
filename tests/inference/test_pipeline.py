"""run_series and the offline outputs: plumbing, geometry and timings, not accuracy.

An untrained tiny MTSA-Net package checks the real chain; an "oracle" predictor
(the phantom's true mask on the model grid) checks that lesions come back on the
source grid where they were, whatever the acquisition orientation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from typer.testing import CliRunner

from dicom_node.cli import app
from inference.errors import InferenceError, SeriesError, SeriesRefused
from inference.imaging import preprocess
from inference.imaging.postprocess import extract_lesions
from inference.imaging.screening import NamePatterns
from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.package import ModelPackage, save_package
from inference.pipeline import run_series, write_offline_outputs
from inference.result import EgfrCall
from tests.helpers.models import TINY_CONFIG

STAGES = ["screen", "load", "brain mask", "preprocess", "model", "postprocess"]


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """An untrained, small MTSA-Net package (64x64 input)."""
    config = MTSANetConfig(**TINY_CONFIG)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return save_package(
        MTSANet(config),
        config,
        tmp_path_factory.mktemp("tiny-package"),
        name="tiny-test",
        version="0.0.1",
        is_demo=True,
    )


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch):
    """`use(phantom)`: the model predicts the phantom's true mask (mutant 0.9 on tumour slices).

    `use(phantom, extra)` adds the detections `extra(model_input)` (bool, model grid) to it.
    """

    def use(phantom, extra=None) -> None:
        captured: list[preprocess.ModelInput] = []
        real_prepare = preprocess.prepare_model_input

        def prepare(*args, **kwargs):
            captured.append(real_prepare(*args, **kwargs))
            return captured[-1]

        def predict(model, slices, **kwargs):
            truth = preprocess.to_model_grid(phantom.mask, captured[-1], nearest=True) > 0
            if extra is not None:
                truth |= extra(captured[-1])
            mutant = np.where(truth.any(axis=(1, 2)), 0.9, 0.1).astype(np.float32)
            return truth.astype(np.float32), mutant

        monkeypatch.setattr(preprocess, "prepare_model_input", prepare)
        monkeypatch.setattr("inference.model.predictor.predict_slices", predict)

    return use


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    """Same grid up to the decimal rounding of the DICOM geometry strings."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.slow
def test_run_series_plumbing_with_an_untrained_package(small_axial_series, tiny_package):
    result = run_series(small_axial_series.files, tiny_package, device="cpu")
    assert_same_grid(result.label_map, result.series.image)
    assert_same_grid(result.probability_map, result.series.image)
    assert result.label_map.GetPixelID() == sitk.sitkUInt16
    assert list(result.timings_s)[:2] == STAGES[:2] and set(STAGES) <= set(result.timings_s)
    assert all(seconds >= 0 for seconds in result.timings_s.values())
    assert result.timings_s["preprocess: n4"] <= result.timings_s["preprocess"]
    assert result.model == tiny_package.identity
    labels = sitk.GetArrayFromImage(result.label_map)
    assert sorted(int(v) for v in np.unique(labels) if v) == [lesion.label for lesion in result.lesions]
    assert (result.egfr.call is EgfrCall.NOT_ASSESSABLE) == (not result.lesions)


@pytest.mark.slow
def test_run_series_is_deterministic(small_axial_series, tiny_package):
    first = run_series(small_axial_series.files, tiny_package, device="cpu")
    second = run_series(small_axial_series.files, tiny_package, device="cpu")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(first.probability_map), sitk.GetArrayFromImage(second.probability_map)
    )
    assert first.egfr == second.egfr


@pytest.mark.slow  # runs the pipeline on several series
def test_a_worker_builds_the_network_once_and_reuses_it(small_axial_series, tiny_package, monkeypatch):
    from dicom_node.worker import ModelRegistry

    built_here = run_series(small_axial_series.files, tiny_package, device="cpu")
    registry = ModelRegistry()
    package, network = registry.network(str(tiny_package.path), "cpu")
    again, same = registry.network(str(tiny_package.path), "cpu")
    assert again is package and same is network

    def rebuild(*_args, **_kwargs):
        raise AssertionError("the network was built again")

    monkeypatch.setattr(ModelPackage, "build_model", rebuild)
    for _ in range(2):  # two jobs on the cached network, each as if it had built its own
        cached = run_series(small_axial_series.files, package, model=network)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(cached.probability_map), sitk.GetArrayFromImage(built_here.probability_map)
        )
        assert cached.egfr == built_here.egfr
    with pytest.raises(ValueError, match="not both"):
        run_series(small_axial_series.files, package, model=network, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "orientation"), [(7, "axial"), (34, "sagittal"), (30, "oblique")], ids=["axial", "sagittal", "oblique"]
)
def test_oracle_lesions_come_back_where_they_were(phantom_series, tiny_package, oracle, seed, orientation):
    series = phantom_series(seed, orientation=orientation, matrix=96, slices=24, slice_spacing=3.5, n_lesions=3)
    oracle(series.phantom)
    result = run_series(series.files, tiny_package, device="cpu")
    truth = sitk.GetArrayFromImage(series.phantom.mask)
    predicted = sitk.GetArrayFromImage(result.label_map)
    assert_same_grid(result.label_map, series.phantom.mask)
    voxel_mm3 = float(np.prod(series.phantom.mask.GetSpacing()))
    kept = [label for label in range(1, truth.max() + 1) if (truth == label).sum() * voxel_mm3 >= 40]
    assert len(result.lesions) >= len(kept) >= 1
    for label in kept:
        overlap = np.unique(predicted[truth == label])
        (match,) = [v for v in overlap if v]  # one predicted lesion per true lesion
        found, true = predicted == match, truth == label
        dice = 2 * (found & true).sum() / (found.sum() + true.sum())
        assert dice > 0.8, (label, dice)
    assert result.egfr.call is EgfrCall.MUTANT and result.egfr.mutant_probability == pytest.approx(0.9)


def scalp_and_field_of_view_edge(image: sitk.Image):
    """`extra` for the oracle: the outer 3 pixels of the head (scalp) and of the source volume (FOV edge)."""

    def rims(model_input: preprocess.ModelInput) -> np.ndarray:
        head = preprocess.to_model_grid(preprocess.head_mask(image), model_input) > 0
        ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(image)
        volume = preprocess.to_model_grid(ones, model_input) > 0
        in_plane = np.ones((1, 7, 7), bool)
        return (head & ~ndimage.binary_erosion(head, in_plane)) | (volume & ~ndimage.binary_erosion(volume, in_plane))

    return rims


@pytest.mark.slow
def test_detections_outside_the_brain_are_never_reported(phantom_series, tiny_package, oracle):
    series = phantom_series(7, orientation="axial", matrix=96, slices=24, slice_spacing=3.5, n_lesions=3)
    oracle(series.phantom)
    clean = run_series(series.files, tiny_package, device="cpu")
    oracle(series.phantom, scalp_and_field_of_view_edge(series.phantom.image))
    result = run_series(series.files, tiny_package, device="cpu")
    brain = sitk.GetArrayFromImage(result.brain_mask) > 0
    labels = sitk.GetArrayFromImage(result.label_map)
    assert result.lesions and not labels[~brain].any()
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(clean.label_map))
    everywhere = sitk.Cast(result.probability_map >= 0, sitk.sitkUInt8)
    _, unmasked = extract_lesions(result.probability_map, brain_mask=everywhere, threshold=0.5, min_volume_mm3=20.0)
    assert len(unmasked) > len(result.lesions)  # the rims were there to be found


def test_a_model_output_that_is_not_finite_fails_without_a_retry(small_axial_series, tiny_package, monkeypatch):
    """NaN from the model (pixel values it cannot read) is the same on every retry: an
    `InferenceError` the worker records as failed, not an internal error retried 3 times."""

    def nan(model, slices, **kwargs):
        return np.full(slices.shape, np.nan, np.float32), np.full(len(slices), np.nan, np.float32)

    monkeypatch.setattr("inference.model.predictor.predict_slices", nan)
    with pytest.raises(InferenceError, match=r"the model's output is not finite \(NaN or infinity\)"):
        run_series(small_axial_series.files, tiny_package, device="cpu")


def test_series_errors_propagate(small_axial_series, tiny_package):
    files = list(small_axial_series.files)
    del files[5]
    with pytest.raises(SeriesError, match="missing slice"):
        run_series(files, tiny_package, device="cpu")


def test_series_the_package_does_not_accept_is_refused_before_loading(
    small_axial_series, tiny_package, edited_series, monkeypatch
):
    t2 = edited_series(
        small_axial_series.files, SeriesDescription="T2 TSE", EchoTime="98", RepetitionTime="6000", ProtocolName=None
    )
    monkeypatch.setattr("inference.pipeline.load_series", lambda files: pytest.fail("loaded a refused series"))
    with pytest.raises(SeriesRefused, match="not a post-contrast T1: .*SeriesDescription 'T2 TSE', EchoTime 98 ms"):
        run_series(t2, tiny_package, device="cpu")
    with pytest.raises(SeriesRefused, match="matches 'gd' \\(the rule refuses it\\)"):
        run_series(small_axial_series.files, tiny_package, device="cpu", names=NamePatterns(refuse=("gd",)))


def test_offline_outputs(small_axial_series, tiny_package, oracle, tmp_path):
    oracle(small_axial_series.phantom)
    result = run_series(small_axial_series.files, tiny_package, device="cpu")
    summary = write_offline_outputs(result, tmp_path / "out")
    mask = sitk.ReadImage(str(tmp_path / "out" / "mask.nii.gz"))
    assert_same_grid(mask, result.series.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(result.label_map))
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["series"]["series_instance_uid"] == result.series.datasets[0].SeriesInstanceUID
    description = result.series.datasets[0].SeriesDescription
    assert summary["screening"] == (
        f"post-contrast T1: SeriesDescription '{description}' names T1; ContrastBolusAgent 'GADOBUTROL 0.1 mmol/kg'"
    )
    assert summary["model"] == {
        "name": "tiny-test",
        "version": "0.0.1",
        "is_demo": True,
        "display": tiny_package.identity.display,
    }
    assert [lesion["name"] for lesion in summary["lesions"]] == [f"GTV_{i + 1}" for i in range(len(result.lesions))]
    assert summary["lesions"][0]["volume_cm3"] > 0 and summary["lesions"][0]["max_diameter_mm"] > 0
    assert summary["egfr"] == {"call": "mutant", "mutant_probability": 0.9, "slices_used": result.egfr.slices_used}
    assert set(STAGES) <= set(summary["timings_s"])


# --- dicom-node infer ----------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, ["infer", *args])


@pytest.mark.slow
def test_infer_command_writes_outputs_and_a_summary(small_axial_series, tiny_package, oracle, tmp_path):
    oracle(small_axial_series.phantom)
    folder = Path(small_axial_series.files[0]).parent
    out = tmp_path / "out"
    result = invoke(str(folder), "--out", str(out), "--model", str(tiny_package.path), "--device", "cpu", "--dicom")
    assert result.exit_code == 0, result.output
    assert "GTV_1" in result.output and "EGFR:" in result.output and "Stage timings" in result.output
    assert "NOT FOR CLINICAL USE" in result.output
    assert (out / "mask.nii.gz").is_file() and (out / "summary.json").is_file()
    assert any(p.name.startswith("RTSTRUCT") for p in out.iterdir())


def test_infer_command_bad_series_is_one_red_line(small_axial_series, tiny_package, copy_series):
    files = copy_series(small_axial_series.files)
    files[5].unlink()
    result = invoke(str(files[0].parent), "--out", str(files[0].parent / "out"), "--model", str(tiny_package.path))
    assert result.exit_code == 2
    assert "error: missing slice(s)" in result.output and "Traceback" not in result.output


def test_infer_command_refused_series_exits_2_with_the_reason(small_axial_series, tiny_package, edited_series):
    files = edited_series(small_axial_series.files, SeriesDescription="AX T2 FLAIR", ContrastBolusAgent=None)
    out = files[0].parent / "out"
    result = invoke(str(files[0].parent), "--out", str(out), "--model", str(tiny_package.path))
    assert result.exit_code == 2
    assert "error: not a post-contrast T1: ContrastBolusAgent empty, SeriesDescription 'AX T2 FLAIR'" in result.output
    assert "names FLAIR" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_infer_command_applies_a_rules_screening_names(small_axial_series, tiny_package, tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[[rules]]\nname = "brain"\n[rules.screening]\nrefuse = ["mprage"]\n', encoding="utf-8")
    folder = str(Path(small_axial_series.files[0]).parent)
    common = [folder, "--out", str(tmp_path / "out"), "--model", str(tiny_package.path), "--config", str(config)]
    result = invoke(*common, "--rule", "brain")
    assert result.exit_code == 2
    assert "SeriesDescription 'T1 MPRAGE +Gd' matches 'mprage' (the rule refuses it)" in result.output
    result = invoke(*common, "--rule", "other")
    assert result.exit_code == 2 and "no routing rule named 'other' (configured: brain)" in result.output
    assert not (tmp_path / "out").exists()


def test_infer_command_missing_model_package(small_axial_series, tmp_path):
    folder = Path(small_axial_series.files[0]).parent
    result = invoke(str(folder), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-such-package"))
    assert result.exit_code == 2
    assert "model package directory" in result.output and "Traceback" not in result.output
