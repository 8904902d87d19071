"""MTSA-Net shapes, parameter counts and the architecture's contract."""

from __future__ import annotations

import pytest
import torch

from inference.model.config import MTSANetConfig
from inference.model.mtsa_net import MSAModule, MTSANet
from tests.helpers.models import MINIMAL_CONFIG

TINY = MTSANetConfig(**MINIMAL_CONFIG)  # type: ignore[arg-type]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_msa_module_parameter_count_by_hand() -> None:
    c = 4
    local = 9 * c * c + c  # full Conv3x3 with bias
    depthwise = 25 * c + c  # depth-wise 5x5
    strips = sum(2 * (k * c + c) for k in (5, 7, 11))  # k x 1 then 1 x k, depth-wise
    mix = c * c + c  # Conv1x1
    assert n_params(MSAModule(c)) == local + depthwise + strips + mix


def test_msa_module_multiplies_attention_with_input() -> None:
    module = MSAModule(3)
    features = torch.zeros(1, 3, 16, 16)
    assert torch.equal(module(features), features)  # Att * 0 = 0 whatever Att is


@pytest.mark.slow
def test_paper_sized_model_shapes_and_size() -> None:
    model = MTSANet(MTSANetConfig()).eval()
    assert model.config.stage_channels == (32, 64, 128, 256, 512)
    assert model.config.bottleneck_size == 24
    assert 10_000_000 < n_params(model) < 25_000_000
    with torch.inference_mode():
        gtv, egfr = model(torch.randn(1, 1, 384, 384))
    assert gtv.shape == (1, 1, 384, 384)
    assert egfr.shape == (1, 2)


def test_egfr_head_sees_sixteen_patch_tokens() -> None:
    model = MTSANet(MTSANetConfig(width=8, transformer_dim=16, transformer_heads=2))
    head = model.egfr_head
    assert head.patch_embedding.kernel_size == (6, 6) and head.patch_embedding.stride == (6, 6)
    assert head.position.shape == (1, 16, 16)
    tokens = head.patch_embedding(head.conv(torch.randn(1, 128, 24, 24)))
    assert tokens.shape[2:] == (4, 4)


def test_width_scales_the_same_code() -> None:
    small, large = MTSANet(TINY), MTSANet(MTSANetConfig(**{**TINY.to_dict(), "width": 4}))
    assert n_params(large) > 2 * n_params(small)
    gtv, egfr = small(torch.randn(2, 1, 64, 64))
    assert gtv.shape == (2, 1, 64, 64) and egfr.shape == (2, 2)


@pytest.mark.slow
def test_both_heads_receive_gradients() -> None:
    model = MTSANet(TINY)
    gtv, egfr = model(torch.randn(2, 1, 64, 64))
    (gtv.mean() + egfr.mean()).backward()
    assert model.gtv_out.weight.grad.abs().sum() > 0
    assert model.egfr_head.classifier[-1].weight.grad.abs().sum() > 0
    assert model.encoder[0][0][0].weight.grad.abs().sum() > 0


def test_wrong_input_size_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, 64, 64\)"):
        MTSANet(TINY)(torch.randn(1, 1, 128, 128))


@pytest.mark.parametrize(
    "changes, message",
    [({"input_size": 100}, "multiple of 64"), ({"transformer_heads": 3}, "divisible"), ({"width": 0}, "width")],
)
def test_invalid_config_is_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MTSANetConfig(**{**TINY.to_dict(), **changes})


def test_config_round_trip_and_unknown_keys() -> None:
    assert MTSANetConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown"):
        MTSANetConfig.from_dict({**TINY.to_dict(), "depth": 3})


@pytest.mark.slow
def test_segment_is_the_gtv_path_of_forward_and_takes_crops() -> None:
    model = MTSANet(TINY).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        gtv, _ = model(x)
        assert torch.equal(model.segment(x), gtv)
        assert model.segment(torch.randn(3, 1, 32, 48)).shape == (3, 1, 32, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.segment(torch.randn(1, 1, 40, 32))
