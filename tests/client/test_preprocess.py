"""Preprocessing: fixed-size, normalised, aspect-preserving, and insensitive to intensity scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrad.common.model.preprocess import PreprocessConfig, preprocess


def test_shape_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    out = preprocess(rng.random((300, 200)).astype(np.float32) * 4000, PreprocessConfig(64))
    assert out.shape == (1, 64, 64)
    assert out.dtype == torch.float32
    assert abs(float(out.mean())) < 1e-3
    assert abs(float(out.std()) - 1.0) < 0.05


def test_intensity_scale_and_offset_do_not_matter() -> None:
    rng = np.random.default_rng(1)
    img = rng.random((128, 128)).astype(np.float32)
    a = preprocess(img * 1000, PreprocessConfig(32))
    b = preprocess(img * 16 + 300, PreprocessConfig(32))
    assert torch.allclose(a, b, atol=1e-3)


def test_aspect_is_kept_by_padding() -> None:
    img = np.ones((100, 50), dtype=np.float32)
    img[0, 0] = 0  # not blank
    out = preprocess(img, PreprocessConfig(32))
    # the right quarter on each side is padding: constant
    assert float(out[0, :, -4:].std()) == pytest.approx(0.0, abs=1e-6)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(image_size=4)
    with pytest.raises(ValueError):
        PreprocessConfig(lower_percentile=60, upper_percentile=40)
