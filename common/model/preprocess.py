"""Radiograph or volume -> model tensor, one definition shared by training, evaluation and
inference.

Percentile windowing rather than the header's window: sites set WindowCenter/Width for their own
viewers, and a model trained across vendors needs one intensity scale that does not depend on them.
CT is the exception: Hounsfield units are one scale everywhere, so a fixed window keeps air,
fluid, soft tissue and bone where every scanner puts them. Volumes are put in one orientation
(slices inferior to superior, rows anterior to posterior, columns patient right to left) and
resampled to one grid, whatever the slice thickness and matrix.
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

from fedrad.common.model.config import VOLUME_SHAPE


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels become the model input; its hash names cache entries."""

    image_size: int = 128  # square side fed to the encoder; tiny preset uses 128
    lower_percentile: float = 0.5  # window floor, robust to collimator edges and markers
    upper_percentile: float = 99.5  # window ceiling, robust to burned-in text and implants
    volume_shape: tuple[int, int, int] = VOLUME_SHAPE  # (slices, rows, columns) of a volume
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU: air to cortical bone

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [16, 2048], got {self.image_size}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= lower < upper <= 100")
        if len(self.volume_shape) != 3 or not all(4 <= v <= 512 for v in self.volume_shape):
            raise ValueError("volume_shape must be three sides in [4, 512]")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError("ct_window must be (low, high) with low < high")

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


AXIAL_TOLERANCE = 0.8
"""|normal . z| at least this: an axial (or near-axial, gantry-tilted) volume."""


def canonical_axes(voxels: np.ndarray, orientation: tuple[float, ...]) -> np.ndarray:
    """Slices inferior -> superior, rows anterior -> posterior, columns right -> left (DICOM
    patient coordinates, LPS), by flipping axes; ValueError for a volume that is not axial
    (a sagittal or coronal stack would reach the encoder on its side)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    if abs(normal[2]) < AXIAL_TOLERANCE or abs(row[0]) < AXIAL_TOLERANCE:
        raise ValueError(
            "not an axial volume (slices must cross the body's long axis); sagittal and "
            "coronal series are not read"
        )
    out = voxels
    if normal[2] < 0:  # slices were ordered along the normal, which points down
        out = out[::-1]
    if col[1] < 0:  # rows run posterior -> anterior
        out = out[:, ::-1]
    if row[0] < 0:  # columns run left -> right
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def preprocess_volume(
    voxels: np.ndarray,
    orientation: tuple[float, ...],
    modality: str,
    config: PreprocessConfig,
) -> torch.Tensor:
    """A (1, D, H, W) float32 tensor from a (slices, rows, columns) volume ordered along its
    normal: canonical axes, CT windowed in HU (other modalities by percentile), resampled with
    area averaging (no aliasing of thin slices), z-normalised."""
    volume = canonical_axes(np.asarray(voxels, dtype=np.float32), orientation)
    if modality == "CT":
        low, high = config.ct_window
    else:
        low, high = window(volume, config)
    transform = Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            Resize(spatial_size=config.volume_shape, mode="area"),
            NormalizeIntensity(),
        ]
    )
    out = torch.as_tensor(np.asarray(transform(volume)), dtype=torch.float32)
    return out.reshape(1, *config.volume_shape)
