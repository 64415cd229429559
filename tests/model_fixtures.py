"""Tiny models and examples for tests: a config small enough that a DP step takes milliseconds."""

from __future__ import annotations

import numpy as np
import torch

from fedrad.client.ingest.dataset import SiteStudies, TrainingExamples
from fedrad.client.ingest.site_data import CachedStudy
from fedrad.common.findings import FINDINGS
from fedrad.common.model.checkpoint import build_model
from fedrad.common.model.config import ModelConfig, preset
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.model.tokenizer import train_tokenizer

CORPUS = [
    "FINDINGS: Small left pleural effusion. No pneumothorax. Heart size is normal.",
    "IMPRESSION: 8 mm nodule in the right upper lobe. No consolidation.",
    "indication: cough\nreport: The lungs are clear. No acute fracture.",
    "question: Is there a pleural effusion?\nanswer: yes no possibly left right bilateral",
]


def micro_config(**overrides: object) -> ModelConfig:
    base = dict(
        image_size=32,
        encoder_channels=(8, 16),
        encoder_strides=(2, 2),
        prefix_grid=2,
        vocab_size=300,
        lm_layers=1,
        lm_heads=2,
        lm_dim=32,
        max_positions=96,
        max_prompt_tokens=24,
        max_target_tokens=48,
        lora_rank=4,
        norm_groups=4,
        volume_shape=(8, 16, 16),
    )
    base.update(overrides)
    return preset("tiny", **base)  # type: ignore[arg-type]


def micro_model(seed: int = 0, **overrides: object) -> RadiologyModel:
    torch.manual_seed(seed)
    config = micro_config(**overrides)
    tokenizer = train_tokenizer(CORPUS * 5, vocab_size=config.vocab_size)
    return build_model(config, tokenizer)


def micro_studies(
    n: int = 12,
    size: int = 32,
    seed: int = 0,
    *,
    ct_every: int = 0,
    volume_shape: tuple[int, int, int] = (8, 16, 16),
    patients: int = 0,
) -> SiteStudies:
    """`n` studies of random pixels; with `ct_every` k, every k-th one is a CT volume; with
    `patients` p, study i belongs to patient i % p and is taken on day i (so each patient's
    studies of one kind follow each other), and its report grades the effusion."""
    rng = np.random.default_rng(seed)
    studies, images = [], []
    for i in range(n):
        labels = {f: int(rng.integers(0, 2)) for f in FINDINGS}
        sides = {f: ("left" if labels[f] and f != "cardiomegaly" else None) for f in FINDINGS}
        studies.append(
            CachedStudy(
                study_id=f"s{i:03d}",
                image_file=f"images/s{i:03d}.npy",
                report="FINDINGS: Small left pleural effusion. No pneumothorax.",
                indication="cough",
                labels=labels,
                sides=sides,
                nodule_size_mm=8.0 if labels["nodule"] else None,
                view="PA",
                modality="CT" if ct_every and i % ct_every == 0 else "radiograph",
                patient=f"p{i % patients}" if patients else "",
                day=i if patients else None,
                sizes={"pleural_effusion": float(1 + i % 3)} if labels["pleural_effusion"] else {},
            )
        )
        shape = (1, *volume_shape) if studies[-1].modality == "CT" else (1, size, size)
        images.append(rng.standard_normal(shape).astype(np.float16))
    return SiteStudies(studies, images)


def micro_examples(
    model: RadiologyModel, n: int = 12, seed: int = 0, *, ct_every: int = 0, patients: int = 0
) -> TrainingExamples:
    studies = micro_studies(
        n,
        model.config.image_size,
        seed,
        ct_every=ct_every,
        volume_shape=model.config.volume_shape,
        patients=patients,
    )
    return TrainingExamples(studies, model.tokenizer, model.config, seed=seed)
