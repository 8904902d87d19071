"""Slice-wise inference: shapes, probabilities, determinism, device choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MTSANet
from inference.model.predictor import DEVICE_ENV_VAR, predict_slices, select_device
from tests.helpers.models import MINIMAL_CONFIG

TINY = MTSANetConfig(**MINIMAL_CONFIG)  # type: ignore[arg-type]


@pytest.fixture
def model() -> MTSANet:
    torch.manual_seed(2)
    return MTSANet(TINY)


@pytest.fixture
def slices() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 64, 64)).astype(np.float32)


def test_shapes_dtypes_and_ranges(model: MTSANet, slices: np.ndarray) -> None:
    gtv, mutant = predict_slices(model, slices, batch_size=2, device="cpu")
    assert gtv.shape == (5, 64, 64) and gtv.dtype == np.float32
    assert mutant.shape == (5,) and mutant.dtype == np.float32
    assert ((gtv >= 0) & (gtv <= 1)).all() and ((mutant >= 0) & (mutant <= 1)).all()


def test_matches_the_model_in_eval_mode(model: MTSANet, slices: np.ndarray) -> None:
    gtv, mutant = predict_slices(model, slices, batch_size=8, device="cpu")
    model.eval()
    with torch.no_grad():
        gtv_logits, egfr_logits = model(torch.from_numpy(slices)[:, None])
    np.testing.assert_allclose(gtv, torch.sigmoid(gtv_logits)[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mutant, torch.softmax(egfr_logits, 1)[:, 1].numpy(), rtol=1e-5, atol=1e-6)


def test_same_input_same_output(model: MTSANet, slices: np.ndarray) -> None:
    model.train()  # dropout would make repeated calls differ if eval mode were not enforced
    first = predict_slices(model, slices, batch_size=2, device="cpu")
    second = predict_slices(model, slices, batch_size=2, device="cpu")
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_batch_size_does_not_change_results_beyond_float_noise(model: MTSANet, slices: np.ndarray) -> None:
    one = predict_slices(model, slices, batch_size=1, device="cpu")
    all_at_once = predict_slices(model, slices, batch_size=5, device="cpu")
    np.testing.assert_allclose(one[0], all_at_once[0], atol=1e-5)


def test_empty_and_wrong_inputs(model: MTSANet) -> None:
    gtv, mutant = predict_slices(model, np.zeros((0, 64, 64), np.float32), device="cpu")
    assert gtv.shape == (0, 64, 64) and mutant.shape == (0,)
    with pytest.raises(ValueError, match=r"\(n, 64, 64\)"):
        predict_slices(model, np.zeros((2, 32, 32), np.float32), device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        predict_slices(model, np.zeros((1, 64, 64), np.float32), batch_size=0, device="cpu")


def test_select_device_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV_VAR, "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV_VAR, "auto")
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("CPU") == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
        select_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_gpu_is_an_error() -> None:
    for choice in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match="no such CUDA device"):
            select_device(choice)
