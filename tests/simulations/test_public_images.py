"""The public image set and the encoder pretrained on it: reproducible, labelled, cached, and
installed frozen in the foundation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedrad.common.model.config import preset
from fedrad.common.model.foundation import (
    FoundationRecipe,
    build_foundation,
    build_foundation_encoder,
)
from fedrad.common.model.public_images import EncoderRecipe, draw_public_images, pretrain_encoder
from fedrad.common.stage_progress import showing_progress

SMALL = EncoderRecipe(images=24, steps=3, batch_size=4, render_size=96)
CONFIG = preset("tiny", image_size=64, encoder_channels=(8, 16), encoder_strides=(2, 2))


def test_public_images_are_reproducible_preprocessed_and_labelled() -> None:
    images, labels = draw_public_images(SMALL, 64, workers=1)
    again, again_labels = draw_public_images(SMALL, 64, workers=2)
    assert images.shape == (24, 1, 64, 64) and labels.shape == (24, 6)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert set(labels.unique().tolist()) <= {0.0, 1.0} and labels.sum() > 0
    # z-normalised like a site's preprocessing, image by image
    assert abs(float(images[0].float().mean())) < 0.05
    other, _ = draw_public_images(EncoderRecipe(images=24, seed=1), 64, workers=1)
    assert not torch.equal(images, other)


def test_pretraining_reports_held_out_auroc_per_finding() -> None:
    encoder, measured = pretrain_encoder(CONFIG, SMALL, workers=1)
    assert measured["held_out_images"] == 2
    assert set(measured["held_out_auroc"]) == {
        "nodule",
        "pleural_effusion",
        "cardiomegaly",
        "pneumothorax",
        "consolidation",
        "fracture",
    }
    assert not encoder.training


@pytest.mark.slow
def test_foundation_installs_the_cached_public_encoder_frozen(tmp_path: Path) -> None:
    recipe = FoundationRecipe(
        corpus_reports=40, steps=2, batch_size=4, public_images=24, encoder_steps=3, volume_steps=0
    )
    model, _ = build_foundation(CONFIG, recipe=recipe, cache_root=tmp_path)
    assert model.config.freeze_encoder and model.config.extra["public_encoder"]
    assert not any(n.startswith("encoder.") for n in model.trainable_state())
    cached = build_foundation_encoder(CONFIG, recipe.encoder_recipe(), cache_root=tmp_path)
    assert cached.name == model.config.extra["public_encoder"]
    again, _ = build_foundation(CONFIG, recipe=recipe, cache_root=tmp_path, seed=1)
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, again.encoder.state_dict()[name])  # same cached weights
    scratch, _ = build_foundation(
        CONFIG, recipe=FoundationRecipe(**{**recipe.__dict__, "encoder_steps": 0}),
        cache_root=tmp_path,
    )  # fmt: skip
    assert not scratch.config.freeze_encoder
    assert any(n.startswith("encoder.") for n in scratch.trainable_state())


def test_the_one_time_build_reports_each_stage_to_whoever_listens(tmp_path: Path) -> None:
    seen: dict[str, tuple[int, int]] = {}

    def report(stage: str, done: int, total: int) -> None:
        seen[stage] = (done, total)

    with showing_progress(report):
        build_foundation_encoder(CONFIG, SMALL, cache_root=tmp_path)
    assert sorted(seen.values()) == [(3, 3), (24, 24)]  # every step and every image, in full
    seen.clear()
    build_foundation_encoder(CONFIG, SMALL, cache_root=tmp_path / "again")  # nobody listening
    assert not seen
