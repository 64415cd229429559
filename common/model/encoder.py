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


def residual_stages(config: ModelConfig, *, spatial_dims: int) -> nn.Sequential:
    """The config's residual stages in 2-D or 3-D: one unit per (width, stride)."""
    stages: list[nn.Module] = []
    in_ch = 1
    for out_ch, stride in zip(config.encoder_channels, config.encoder_strides, strict=True):
        stages.append(
            ResidualUnit(
                spatial_dims=spatial_dims,
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
    return nn.Sequential(*stages)


class ImageEncoder(nn.Module):
    """(B, 1, S, S) image -> (B, grid*grid, C) tokens and (B, 2C) pooled features.

    Pooled features are mean and max over the map: the max keeps small focal findings (a
    nodule, a fracture step-off) that averaging over the whole chest dilutes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.stages = residual_stages(config, spatial_dims=2)
        self.pool = nn.AdaptiveAvgPool2d(config.prefix_grid)
        self.out_channels = config.encoder_channels[-1]
        self.pooled_channels = 2 * self.out_channels

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.stages(images)
        tokens = self.pool(fmap).flatten(2).transpose(1, 2)
        pooled = torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)
        return tokens, pooled


class VolumeEncoder(nn.Module):
    """(B, 1, D, H, W) volume -> (B, grid*grid, C) tokens and (B, 2C) pooled features.

    The same residual stages in 3-D. Tokens pool the map to 2 (inferior, superior) x 2
    (anterior, posterior) x grid*grid/4 (right to left) cells, so the language model can tell
    a lower-lobe finding from an upper one and a right from a left; the pooled features have
    the 2-D encoder's width, so the finding heads read either."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.stages = residual_stages(config, spatial_dims=3)
        self.pool = nn.AdaptiveAvgPool3d((2, 2, config.num_prefix_tokens // 4))
        self.out_channels = config.encoder_channels[-1]
        self.pooled_channels = 2 * self.out_channels

    def forward(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.stages(volumes)
        tokens = self.pool(fmap).flatten(2).transpose(1, 2)
        pooled = torch.cat([fmap.mean(dim=(2, 3, 4)), fmap.amax(dim=(2, 3, 4))], dim=1)
        return tokens, pooled
