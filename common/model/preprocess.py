"""Radiograph -> model tensor, one definition shared by training, evaluation and inference.

Percentile windowing rather than the header's window: sites set WindowCenter/Width for their own
viewers, and a model trained across vendors needs one intensity scale that does not depend on them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    NormalizeIntensity,
    Resize,
    ScaleIntensityRange,
    SpatialPad,
)


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels become the model input; its hash names cache entries."""

    image_size: int = 128  # square side fed to the encoder; tiny preset uses 128
    lower_percentile: float = 0.5  # window floor, robust to collimator edges and markers
    upper_percentile: float = 99.5  # window ceiling, robust to burned-in text and implants

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [16, 2048], got {self.image_size}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= lower < upper <= 100")

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def build_transform(config: PreprocessConfig, *, low: float, high: float) -> Compose:
    """Window [low, high] to [0, 1], keep aspect (longest side to size, pad), z-normalise."""
    size = config.image_size
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            Resize(spatial_size=size, size_mode="longest", mode="area"),
            SpatialPad(spatial_size=(size, size), mode="constant"),
            NormalizeIntensity(),
        ]
    )


def window(image: np.ndarray, config: PreprocessConfig) -> tuple[float, float]:
    """Percentile window; the full range when the percentiles coincide (a mostly flat image)."""
    low, high = np.percentile(image, [config.lower_percentile, config.upper_percentile])
    if high <= low:
        low, high = float(image.min()), float(image.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def preprocess(pixels: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """A (1, S, S) float32 tensor from a 2-D display-oriented image."""
    image = np.ascontiguousarray(pixels, dtype=np.float32)
    low, high = window(image, config)
    out = build_transform(config, low=low, high=high)(image)
    tensor = torch.as_tensor(np.asarray(out), dtype=torch.float32)
    return tensor.reshape(1, config.image_size, config.image_size)
