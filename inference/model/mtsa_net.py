"""MTSA-Net (after Zhou et al., J Transl Med 2023): one 2D network, two tasks.

A multi-scale-attention (MSA) encoder feeds a U-Net decoder that segments the
gross tumour volume (GTV) of brain metastases and a hybrid CNN-Transformer head
that predicts the slice's EGFR mutation status. The width is a parameter so the
paper-sized model (`width=32`) and the small demo model (`width=8`) are the same
code.

Decisions where the paper (and SPEC.md) leave room, recorded here on purpose:

- Down-sampling between encoder stages: 2x2 max-pooling (as in U-Net). It adds
  no parameters and keeps the stage blocks the only learned part of the encoder.
- Stage channels: `[w, 2w, 4w, 8w, 16w]` at 384, 192, 96, 48, 24 px.
- Encoder stage: Conv3x3-BN-ReLU, then the MSA module. The MSA module is
  ``Att = Conv1x1(Conv3x3(F) + sum_k Strip_k(DWConv5x5(F)))``, ``Out = Att * F``.
  "Conv3x3" is a full (not depth-wise) convolution, because the paper names the
  depth-wise one explicitly elsewhere; DWConv is depth-wise 5x5 (as in SegNeXt's
  MSCA, from which the module derives); each branch is a depth-wise k x 1 then a
  depth-wise 1 x k convolution, k = 5, 7, 11. No sigmoid on `Att`: the paper's
  formula has none, and neither has MSCA.
- Decoder up stage: ConvTranspose2d(kernel 2, stride 2) halving the channels,
  concatenation with the encoder skip of the same size, Conv3x3-BN-ReLU. A final
  Conv1x1 gives one GTV logit per pixel (sigmoid at use). Its bias starts at
  `log(p / (1 - p))` with p = `GTV_PRIOR` = 0.01 (the prior-probability
  initialisation of Lin et al. 2017, the focal-loss paper): metastases cover
  well under 1 % of a slice, so a start at p = 0.5 everywhere would spend the
  first epochs only learning to be quiet on background (the pooled soft Dice
  is swamped by 150,000 pixels at 0.5). Initialisation only; the architecture
  is unchanged and trained weights overwrite it.
- EGFR head: a Conv3x3-BN-ReLU block on the 24x24 bottleneck; patch embedding by
  a conv with kernel = stride = 6 (identical to a linear projection of each
  flattened 6x6 patch), giving 16 tokens on a 4x4 grid; learned position
  embeddings; `transformer_depth` pre-norm blocks (LayerNorm -> multi-head
  self-attention -> residual, LayerNorm -> GELU feed-forward -> residual); a
  final LayerNorm; global average pooling over the tokens (no class token);
  an MLP (Linear-GELU-Dropout-Linear) to 2 logits, softmax over
  {wild type, mutant} at use. The patch grid is always 4x4, so `input_size`
  must be a multiple of 64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from inference.model.config import DOWNSAMPLING, N_STAGES, PATCH_GRID, MTSANetConfig

STRIP_KERNELS = (5, 7, 11)
DEPTHWISE_KERNEL = 5
GTV_PRIOR = 0.01  # initial GTV probability of every pixel (see the module docstring)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3-BN-ReLU, the basic block of every stage."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MSAModule(nn.Module):
    """Multi-scale attention: `Att = Conv1x1(Conv3x3(F) + sum_k Strip_k(DWConv(F)))`, `Out = Att * F`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, channels, 3, padding=1)
        self.depthwise = nn.Conv2d(channels, channels, DEPTHWISE_KERNEL, padding=DEPTHWISE_KERNEL // 2, groups=channels)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, (k, 1), padding=(k // 2, 0), groups=channels),
                nn.Conv2d(channels, channels, (1, k), padding=(0, k // 2), groups=channels),
            )
            for k in STRIP_KERNELS
        )
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = self.depthwise(features)
        attention = self.local(features)
        for branch in self.branches:
            attention = attention + branch(context)
        return self.mix(attention) * features


class MSABlock(nn.Sequential):
    """One encoder stage: Conv3x3-BN-ReLU followed by an MSA module."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(conv_bn_relu(in_channels, out_channels), MSAModule(out_channels))


class UpStage(nn.Module):
    """Decoder stage: transposed conv (stride 2), concat skip, Conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.fuse = conv_bn_relu(2 * out_channels, out_channels)

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(features), skip], dim=1))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: MHSA and a GELU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens + self.feed_forward(self.norm2(tokens))


class EgfrHead(nn.Module):
    """Hybrid CNN-Transformer classifier on the bottleneck: 16 patch tokens -> 2 logits."""

    def __init__(self, config: MTSANetConfig) -> None:
        super().__init__()
        channels = config.stage_channels[-1]
        patch = config.bottleneck_size // PATCH_GRID
        dim = config.transformer_dim
        self.conv = conv_bn_relu(channels, channels)
        self.patch_embedding = nn.Conv2d(channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, PATCH_GRID * PATCH_GRID, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(
            *(
                TransformerBlock(dim, config.transformer_heads, config.transformer_mlp_dim, config.dropout)
                for _ in range(config.transformer_depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Sequential(
            nn.Linear(dim, config.classifier_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden, 2),
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(self.conv(bottleneck)).flatten(2).transpose(1, 2)
        tokens = self.blocks(self.dropout(tokens + self.position))
        return self.classifier(self.norm(tokens).mean(dim=1))


class MTSANet(nn.Module):
    """MSA encoder, U-Net GTV decoder and CNN-Transformer EGFR head.

    `forward(x)` takes `(B, 1, S, S)` with `S = config.input_size` and returns
    `(gtv_logits (B, 1, S, S), egfr_logits (B, 2))`; logits, not probabilities,
    so the losses can use the numerically stable log-sum-exp forms.
    """

    def __init__(self, config: MTSANetConfig | None = None) -> None:
        super().__init__()
        self.config = config or MTSANetConfig()
        channels = self.config.stage_channels
        self.encoder = nn.ModuleList(MSABlock(c_in, c_out) for c_in, c_out in zip((1, *channels[:-1]), channels))
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList(UpStage(channels[i + 1], channels[i]) for i in reversed(range(N_STAGES - 1)))
        self.gtv_out = nn.Conv2d(channels[0], 1, 1)
        assert self.gtv_out.bias is not None  # Conv2d has a bias unless bias=False
        nn.init.constant_(self.gtv_out.bias, math.log(GTV_PRIOR / (1.0 - GTV_PRIOR)))
        self.egfr_head = EgfrHead(self.config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.input_size
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] != (size, size):
            raise ValueError(f"expected input of shape (B, 1, {size}, {size}), got {tuple(x.shape)}")
        skips = self._encode(x)
        bottleneck = skips[-1]
        return self._decode(skips), self.egfr_head(bottleneck)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """GTV logits only, for `(B, 1, H, W)` with H and W multiples of 16 (training crops).

        The encoder and decoder are fully convolutional; only the EGFR head needs the
        full `input_size` slice. The deployed model always runs `forward` on full slices.
        """
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % DOWNSAMPLING or x.shape[3] % DOWNSAMPLING:
            raise ValueError(
                f"expected input of shape (B, 1, H, W) with H, W multiples of {DOWNSAMPLING}, got {tuple(x.shape)}"
            )
        return self._decode(self._encode(x))

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's stage outputs, finest first; the last one is the bottleneck."""
        skips = []
        features = x
        for index, stage in enumerate(self.encoder):
            if index:
                features = self.pool(features)
            features = stage(features)
            skips.append(features)
        return skips

    def _decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        features = skips[-1]
        for up_stage, skip in zip(self.decoder, reversed(skips[:-1])):
            features = up_stage(features, skip)
        return self.gtv_out(features)
