"""A public, labelled chest CT set for pretraining the volume encoder once, non-privately.

As with the radiograph encoder (`public_images.py`), a real federation would start from a CT
encoder pretrained on public data (LIDC-IDRI, LUNA16); none ships offline, so the open chest
CT generator (`common/synthetic/chest_ct.py`: one real CT, warped per patient, findings
inserted where they belong) plays that part, in a seed namespace no cohort uses. Each finding
is present independently with the same probability; the labels are what was inserted. DP then
trains only the CT projector on top, and the encoder never travels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch

from fedrad.common.findings import FINDINGS
from fedrad.common.model.config import ModelConfig
from fedrad.common.model.encoder import VolumeEncoder
from fedrad.common.model.preprocess import PreprocessConfig, preprocess_volume
from fedrad.common.model.public_images import (
    PUBLIC_SEED_NAMESPACE,
    draw_labelled,
    train_with_probe,
)

logger = logging.getLogger(__name__)

PUBLIC_VOLUME_STREAM = 2  # spawn key under the public namespace: images use 1, volumes 2
AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class VolumeRecipe:
    volumes: int = 480  # public volumes drawn
    render_grid: tuple[int, int, int] = (64, 128, 128)  # drawn at (the cohort's grid)
    finding_rate: float = 0.3  # each finding present independently with this probability
    steps: int = 400  # supervised pretraining steps (BCE on the six findings)
    batch_size: int = 16
    lr: float = 2e-3
    held_out_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.volumes < 20 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("the volume recipe needs >= 20 volumes, >= 1 step and batch >= 1")
        if not 0.0 < self.finding_rate < 1.0 or not 0.0 < self.held_out_fraction < 0.5:
            raise ValueError("finding_rate must be in (0, 1) and held_out_fraction in (0, 0.5)")


def _draw(args: tuple[int, int, tuple[int, int, int], float, tuple[int, int, int]]) -> tuple:
    """One public volume (float16, 1 x D x H x W, preprocessed as a site would) and labels."""
    from fedrad.common.synthetic.chest_ct import reference_ct, render_ct, sample_ct_finding

    index, seed, grid, finding_rate, shape = args
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(PUBLIC_SEED_NAMESPACE, PUBLIC_VOLUME_STREAM, index))
    )
    names = tuple(f for f in FINDINGS if rng.random() < finding_rate)
    findings = tuple(sample_ct_finding(n, rng) for n in names)
    noise = float(rng.uniform(8.0, 30.0))  # dose differs between scanners and protocols
    hu = render_ct(reference_ct(grid), findings, rng, noise_hu=noise)
    tensor = preprocess_volume(hu, AXIAL, "CT", PreprocessConfig(volume_shape=shape))
    labels = np.array([f in names for f in FINDINGS], dtype=np.float32)
    return tensor.numpy().astype(np.float16), labels


def draw_public_volumes(
    recipe: VolumeRecipe,
    shape: tuple[int, int, int],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, D, H, W) float16 volumes and (N, 6) labels, same bytes every time."""
    tasks = [
        (i, recipe.seed, recipe.render_grid, recipe.finding_rate, shape)
        for i in range(recipe.volumes)
    ]
    return draw_labelled(_draw, tasks, workers=workers, progress=progress, chunksize=8)


def pretrain_volume_encoder(
    config: ModelConfig,
    recipe: VolumeRecipe,
    *,
    progress: Callable[[int], None] | None = None,
    drawing: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> tuple[VolumeEncoder, dict[str, object]]:
    """The volume encoder trained on the public set, and what it measured on the held-out
    part (per-finding AUROC of a linear probe on its pooled features)."""
    volumes, labels = draw_public_volumes(
        recipe, config.volume_shape, workers=workers, progress=drawing
    )
    n_held = max(1, int(len(volumes) * recipe.held_out_fraction))
    torch.manual_seed(recipe.seed)
    encoder = VolumeEncoder(config)
    measured = train_with_probe(
        encoder,
        (volumes[n_held:], labels[n_held:]),
        (volumes[:n_held], labels[:n_held]),
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        progress=progress,
        eval_batch=16,
    )
    logger.info("public volume encoder: held-out macro AUROC %s", measured["held_out_macro_auroc"])
    return encoder, {"held_out_volumes": n_held, **measured}
