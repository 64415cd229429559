"""The image encoder: MONAI residual units with GroupNorm and no in-place ops.

Why not MONAI's ResNet: it keeps BatchNorm in its blocks (Opacus forbids it) and adds residuals
in place (Opacus' hooks fail on that). MONAI's ResidualUnit returns `conv(x) + residual(x)` and
takes the norm and activation we ask for, so stacking those gives a DP-compatible encoder.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from fedrad.common.model.config import ModelConfig


class ImageEncoder(nn.Module):
    """(B, 1, S, S) image -> (B, grid*grid, C) tokens and (B, 2C) pooled features.

    Pooled features are mean and max over the map: the max keeps small focal findings (a
    nodule, a fracture step-off) that averaging over the whole chest dilutes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        in_ch = 1
        for out_ch, stride in zip(config.encoder_channels, config.encoder_strides, strict=True):
            stages.append(
                ResidualUnit(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    strides=stride,
                    kernel_size=3,
                    subunits=config.encoder_subunits,
                    act=("relu", {"inplace": False}),
                    norm=("group", {"num_groups": min(config.norm_groups, out_ch)}),
                )
            )
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(config.prefix_grid)
        self.out_channels = in_ch
        self.pooled_channels = 2 * in_ch

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.stages(images)
        tokens = self.pool(fmap).flatten(2).transpose(1, 2)
        pooled = torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)
        return tokens, pooled
