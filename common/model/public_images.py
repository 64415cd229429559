"""A public, labelled chest-radiograph set for pretraining the image encoder once, non-privately.

A real federation would start from an encoder pretrained on a public chest X-ray collection
(CheXpert, MIMIC-CXR, NIH ChestX-ray14); none ships offline, so the open generator plays that
part: images drawn in a seed namespace no cohort uses (no site's image can equal one of these),
on every site profile's detector, each finding present independently with the same probability
so rare findings are not starved. The labels are what was drawn, the way a curated public set
carries curated labels. DP then only has to train what sits on top (projector, head, adapters)
instead of paying noise on a from-scratch encoder; see DESIGN.md's note on public pretraining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fedrad.common.findings import FINDINGS
from fedrad.common.metrics import finding_auroc, macro
from fedrad.common.model.config import ModelConfig
from fedrad.common.model.encoder import ImageEncoder
from fedrad.common.model.preprocess import PreprocessConfig, preprocess

if TYPE_CHECKING:
    from fedrad.common.synthetic.cxr_image import Detector
    from fedrad.common.synthetic.site_profiles import SiteProfile

logger = logging.getLogger(__name__)

PUBLIC_SEED_NAMESPACE = 99  # cohorts use spawn key 1: no public draw can equal a site's
PUBLIC_IMAGE_STREAM = (
    1  # spawn key under the public namespace: text uses (99, i), images (99, 1, i)
)
PROFILES_DRAWN = 8  # detector/anatomy profiles the public set spans (the 4 base ones + 4 variants)


@dataclasses.dataclass(frozen=True)
class EncoderRecipe:
    images: int = 4000  # public images drawn
    render_size: int = 256  # longest side drawn; the model sees image_size after preprocessing
    finding_rate: float = 0.25  # each finding present independently with this probability
    steps: int = 1200  # supervised pretraining steps (BCE on the six findings)
    batch_size: int = 32
    lr: float = 2e-3
    held_out_fraction: float = 0.1  # measured, not trained on: recorded next to the weights
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 20 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("the encoder recipe needs >= 20 images, >= 1 step and batch >= 1")
        if not 0.0 < self.finding_rate < 1.0 or not 0.0 < self.held_out_fraction < 0.5:
            raise ValueError("finding_rate must be in (0, 1) and held_out_fraction in (0, 0.5)")


def drawing_geometry(profile: SiteProfile, render_size: int) -> tuple[int, int, float, Detector]:
    """(rows, cols, spacing mm, detector) of a public drawing whose longest side is
    `render_size`: the profile's field of view, its detector in display orientation (as a
    site's loader hands pixels to preprocessing), its quantum noise per pixel scaled as if
    drawn at the profile's native matrix and averaged down to this one."""
    scale = render_size / max(profile.rows, profile.cols)
    rows, cols = max(8, round(profile.rows * scale)), max(8, round(profile.cols * scale))
    spacing = profile.pixel_spacing_mm * profile.rows / rows
    native = max(profile.rows, profile.cols)
    detector = dataclasses.replace(
        profile.detector,
        monochrome1=False,
        noise=profile.detector.noise * min(1.0, render_size / native),
    )
    return rows, cols, spacing, detector


def _draw(args: tuple[int, int, int, float, int]) -> tuple[np.ndarray, np.ndarray]:
    """One public image (float16, 1 x S x S, preprocessed as a site would) and its labels."""
    from fedrad.common.synthetic.cxr_image import (
        render_chest,
        sample_anatomy,
        sample_devices,
        sample_finding,
        to_stored,
    )
    from fedrad.common.synthetic.site_profiles import profile_for_site

    index, seed, render_size, finding_rate, image_size = args
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(PUBLIC_SEED_NAMESPACE, PUBLIC_IMAGE_STREAM, index))
    )
    profile = profile_for_site(index % PROFILES_DRAWN)
    names = tuple(f for f in FINDINGS if rng.random() < finding_rate)
    view = "AP" if rng.random() < profile.ap_fraction else "PA"
    findings = tuple(sample_finding(n, rng) for n in names)
    devices = sample_devices(rng, rate=profile.device_rate) if view == "AP" else ()
    anatomy = sample_anatomy(rng, sex="M" if rng.random() < 0.5 else "F", view=view)
    rows, cols, spacing, detector = drawing_geometry(profile, render_size)
    img = render_chest(
        anatomy, findings, rows=rows, cols=cols, spacing_mm=spacing, view=view, rng=rng,
        devices=devices,
    )  # fmt: skip
    pixels = to_stored(img, detector, spacing_mm=spacing, rng=rng)
    tensor = preprocess(pixels, PreprocessConfig(image_size=image_size))
    labels = np.array([f in names for f in FINDINGS], dtype=np.float32)
    return tensor.numpy().astype(np.float16), labels


def draw_public_images(
    recipe: EncoderRecipe,
    image_size: int,
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, S, S) float16 images and (N, 6) labels, drawn in parallel, same bytes every time."""
    tasks = [
        (i, recipe.seed, recipe.render_size, recipe.finding_rate, image_size)
        for i in range(recipe.images)
    ]
    return draw_labelled(_draw, tasks, workers=workers, progress=progress, chunksize=32)


def draw_labelled(
    draw: Callable[[Any], tuple[np.ndarray, np.ndarray]],
    tasks: list[Any],
    *,
    workers: int | None,
    progress: Callable[[int], None] | None,
    chunksize: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` over `tasks` in worker processes, in task order: the stacked scans and labels."""
    workers = max(1, workers or (os.cpu_count() or 1))
    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results: Iterator[tuple[np.ndarray, np.ndarray]] = map(draw, tasks)
        else:
            # spawn, not fork: the parent already holds torch's OpenMP threads (fork deadlocks)
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            )
            results = pool.map(draw, tasks, chunksize=chunksize)
        for item in results:
            drawn.append(item)
            if progress is not None:
                progress(len(drawn))
    scans = torch.from_numpy(np.stack([d[0] for d in drawn]))
    labels = torch.from_numpy(np.stack([d[1] for d in drawn]))
    return scans, labels


def pretrain_encoder(
    config: ModelConfig,
    recipe: EncoderRecipe,
    *,
    progress: Callable[[int], None] | None = None,
    drawing: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> tuple[ImageEncoder, dict[str, object]]:
    """The encoder trained on the public set, and what it measured on the held-out part."""
    images, labels = draw_public_images(
        recipe, config.image_size, workers=workers, progress=drawing
    )
    n_held = max(1, int(len(images) * recipe.held_out_fraction))
    torch.manual_seed(recipe.seed)
    encoder = ImageEncoder(config)
    measured = train_with_probe(
        encoder,
        (images[n_held:], labels[n_held:]),
        (images[:n_held], labels[:n_held]),
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        progress=progress,
    )
    logger.info("public encoder: held-out macro AUROC %s", measured["held_out_macro_auroc"])
    return encoder, {"held_out_images": n_held, **measured}


def train_with_probe(
    encoder: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int], None] | None = None,
    eval_batch: int = 32,
) -> dict[str, object]:
    """Supervised pretraining of an encoder (2-D or 3-D) through a linear probe on its pooled
    features (BCE on the six findings, warm-up then cosine decay); returns the loss and the
    probe's per-finding AUROC on the held-out part. Leaves the encoder in eval mode."""
    train_x, train_y = train
    held_x, held_y = held
    probe = nn.Linear(encoder.pooled_channels, len(FINDINGS))  # type: ignore[arg-type]
    params = list(encoder.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 2%
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = torch.Generator().manual_seed(seed)
    encoder.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (batch_size,), generator=order)
        _, pooled = encoder(train_x[idx].float())
        loss = F.binary_cross_entropy_with_logits(probe(pooled), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1)
    encoder.eval()
    with torch.no_grad():
        chunks = [held_x[i : i + eval_batch].float() for i in range(0, len(held_x), eval_batch)]
        scores = torch.cat([torch.sigmoid(probe(encoder(x)[1])) for x in chunks])
    per_finding = finding_auroc(scores.numpy(), held_y.numpy())
    return {
        "pretrain_loss": {"first": losses[0], "last": float(np.mean(losses[-20:]))},
        "held_out_auroc": per_finding,
        "held_out_macro_auroc": macro(per_finding),
    }
