"""Training examples from a site's prepared cache: one study -> one example, as fixed-size tensors.

One example per study is the privacy unit of record-level DP-SGD, so a study never yields several
examples in one step: each draw picks one task at random (the report, or one question). Tensors
are fixed-size tuples because Opacus' Poisson loader rebuilds empty batches from shapes.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from fedrad.client.ingest.site_data import CachedStudy, load_cached_image, load_manifest
from fedrad.common.findings import FINDINGS, LATERAL_ORDER, SIDES
from fedrad.common.grounding import report_target
from fedrad.common.interval import CHANGES, report_changes
from fedrad.common.modality import RADIOGRAPH, modality_code
from fedrad.common.model.config import ModelConfig
from fedrad.common.tasks import (
    DETAIL_PROBABILITY,
    context_text,
    qa_prompt,
    report_prompt,
    sample_question,
)

REPORT_TASK_PROBABILITY = 0.5


@dataclass(frozen=True)
class SiteStudies:
    """Cached studies of one site with their scans loaded (small: a 128 px float16 image or a
    32 x 64 x 64 float16 volume each)."""

    studies: list[CachedStudy]
    images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.studies)

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(s.modality for s in self.studies)

    def of_modalities(self, volume_modalities: tuple[str, ...]) -> SiteStudies:
        """The radiographs and the volumes of `volume_modalities` (those the model reads): a
        site's MR studies wait, prepared, for a model that reads MR."""
        kinds = {RADIOGRAPH, *volume_modalities}
        return self.subset([i for i, s in enumerate(self.studies) if s.modality in kinds])

    def by_modality(self) -> dict[str, list[int]]:
        """Row indices per modality, in order: inference batches one kind of scan at a time."""
        out: dict[str, list[int]] = {}
        for i, study in enumerate(self.studies):
            out.setdefault(study.modality, []).append(i)
        return out

    @staticmethod
    def from_manifest(manifest: Path) -> SiteStudies:
        studies = load_manifest(manifest)
        return SiteStudies(studies, [load_cached_image(manifest, s) for s in studies])

    def subset(self, indices: list[int]) -> SiteStudies:
        return SiteStudies([self.studies[i] for i in indices], [self.images[i] for i in indices])

    def priors(self) -> list[int | None]:
        """Per study, the row of the same patient's most recent earlier study of the same
        modality, or None. Patients are linked by the keyed pseudonym only; a study with no
        pseudonym or date has no prior and is nobody's prior."""
        by_patient: dict[tuple[str, str], list[int]] = {}
        for i, study in enumerate(self.studies):
            if study.patient and study.day is not None:
                by_patient.setdefault((study.patient, study.modality), []).append(i)
        out: list[int | None] = [None] * len(self.studies)
        for rows in by_patient.values():
            rows.sort(key=lambda i: (self.studies[i].day, self.studies[i].study_id))
            for before, row in itertools.pairwise(rows):
                if self.studies[before].day != self.studies[row].day:  # same day: no order
                    out[row] = before
        return out


def split_held_out(
    studies: SiteStudies, *, fraction: float = 0.2
) -> tuple[SiteStudies, SiteStudies]:
    """A deterministic split by hashed patient pseudonym (the study id where the patient is
    unknown): the same studies are held out in every run, and a patient's studies all fall on
    one side, so a held-out study's prior was never trained on as a study of its own.

    Patients whose hash falls below `fraction` are held out, in hash order, up to
    ceil(fraction x studies) studies (the first one always): pseudonyms are keyed, and on a
    small site a few patients with several studies each could otherwise take most of it. With
    two or more studies each side keeps at least one, so a site can always be evaluated and
    still train; only a site whose studies all belong to one patient splits that patient.
    """
    groups: dict[str, list[int]] = {}
    for i, study in enumerate(studies.studies):
        groups.setdefault(study.patient or f"study:{study.study_id}", []).append(i)
    bucket = {
        key: int(hashlib.sha256(key.removeprefix("study:").encode()).hexdigest()[:8], 16)
        / 0xFFFFFFFF
        for key in groups
    }
    order = sorted(groups, key=lambda k: (bucket[k], k))
    n = len(studies)
    cap = math.ceil(fraction * n)
    held: list[int] = []
    for key in order:
        rows = groups[key]
        if held and (bucket[key] >= fraction or len(held) + len(rows) > cap):
            break
        held.extend(rows)
    if len(order) == 1:  # one patient holds every study: split that patient's studies
        held = held[:1]
    if n < 2:
        held = []
    chosen = set(held)
    train = [i for i in range(n) if i not in chosen]
    return studies.subset(train), studies.subset(sorted(held))


def encode_context(tokenizer: PreTrainedTokenizerBase, indication: str, limit: int) -> list[int]:
    ids = tokenizer(context_text(indication), add_special_tokens=False)["input_ids"]
    return ids[:limit]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, indication: str, task_prompt: str, limit: int
) -> tuple[list[int], int]:
    """Context ids + task ids (truncated to `limit`) and the index of the last context token."""
    task = tokenizer(task_prompt, add_special_tokens=False)["input_ids"]
    context = encode_context(tokenizer, indication, max(1, limit - len(task)))
    return (context + task)[:limit], len(context) - 1


def finding_targets(labels: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE targets and mask: uncertain (-1) labels are left out of the loss, not guessed."""
    values = [labels[f] for f in FINDINGS]
    target = torch.tensor([1.0 if v == 1 else 0.0 for v in values])
    mask = torch.tensor([0.0 if v == -1 else 1.0 for v in values])
    return target, mask


def side_targets(labels: dict[str, int], sides: dict[str, str | None]) -> torch.Tensor:
    """Side-head targets: the index in SIDES of the side the report states for each lateral
    finding it calls present or possible; -1 (left out of the loss) otherwise."""
    return torch.tensor(
        [
            SIDES.index(side) if labels[f] != 0 and (side := sides.get(f)) in SIDES else -1
            for f in LATERAL_ORDER
        ],
        dtype=torch.long,
    )


def interval_targets(prior: CachedStudy | None, current: CachedStudy) -> torch.Tensor:
    """Per finding, the index in CHANGES of the change the two reports state (-1: unknown,
    or no prior)."""
    if prior is None:
        return torch.full((len(FINDINGS),), -1, dtype=torch.long)
    changes = report_changes(prior.labels, prior.sizes, current.labels, current.sizes)
    return torch.tensor(
        [CHANGES.index(c) if (c := changes[f]) is not None else -1 for f in FINDINGS],
        dtype=torch.long,
    )


class TrainingExamples(Dataset):
    """Tuples (image, volume, modality, input_ids, attention_mask, target_mask, ctx_index,
    findings, mask, side targets, prior image, prior volume, interval targets).

    Every row carries both scan slots so a batch can mix radiographs and volumes: the slot of
    the other kind holds zeros (the model never reads it); a site without volumes carries a
    1-voxel placeholder rather than a full empty volume. The prior slots hold the same
    patient's previous study of the same modality (zeros without one); the interval targets
    are the change its two reports state per finding (index in CHANGES; -1 unknown or no
    prior)."""

    def __init__(
        self,
        studies: SiteStudies,
        tokenizer: PreTrainedTokenizerBase,
        config: ModelConfig,
        *,
        seed: int,
    ) -> None:
        self.studies = studies
        self.tokenizer = tokenizer
        self.config = config
        self.rng = random.Random(seed)
        self.length = config.max_prompt_tokens + config.max_target_tokens
        self.image_shape = (1, config.image_size, config.image_size)
        has_volumes = any(s.modality != RADIOGRAPH for s in studies.studies)
        self.volume_shape = (1, *config.volume_shape) if has_volumes else (1, 1, 1, 1)
        shapes = {
            img.shape
            for s, img in zip(studies.studies, studies.images, strict=True)
            if s.modality != RADIOGRAPH
        }
        if shapes - {self.volume_shape}:
            raise ValueError(
                f"volumes were prepared at {sorted(shapes)[0][1:]} but the model reads "
                f"{config.volume_shape}: prepare the site again for this model"
            )
        self.prior_rows = studies.priors()
        self.interval = [
            interval_targets(studies.studies[p] if p is not None else None, study)
            for p, study in zip(self.prior_rows, studies.studies, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        study = self.studies.studies[index]
        sides = study.sides  # inference states the side head's sides
        size = study.nodule_size_mm if self.rng.random() < DETAIL_PROBABILITY else None
        if self.rng.random() < REPORT_TASK_PROBABILITY:
            task_prompt = report_prompt(study.labels, sides, size)
            target = report_target(study.report)
        else:
            qa = sample_question(study.labels, study.sides, study.nodule_size_mm, self.rng)
            task_prompt, target = qa_prompt(study.labels, qa.question, sides, size), qa.answer
        prompt, ctx_index = encode_prompt(
            self.tokenizer, study.indication, task_prompt, self.config.max_prompt_tokens
        )
        words = self.tokenizer(" " + " ".join(target.split()), add_special_tokens=False)
        target_ids = [
            *words["input_ids"][: self.config.max_target_tokens - 1],
            self.tokenizer.eos_token_id,
        ]
        ids = prompt + target_ids
        pad = self.length - len(ids)
        input_ids = torch.tensor(ids + [self.tokenizer.pad_token_id] * pad, dtype=torch.long)
        attention = torch.tensor([1] * len(ids) + [0] * pad, dtype=torch.long)
        target_mask = torch.tensor(
            [False] * len(prompt) + [True] * len(target_ids) + [False] * pad, dtype=torch.bool
        )
        image, volume = self._slots(index)
        prior = self.prior_rows[index]
        if prior is None:
            prior_image = torch.zeros(self.image_shape)
            prior_volume = torch.zeros(self.volume_shape)
        else:
            prior_image, prior_volume = self._slots(prior)
        findings, mask = finding_targets(study.labels)
        return (
            image,
            volume,
            torch.tensor(modality_code(study.modality)),
            input_ids,
            attention,
            target_mask,
            torch.tensor(ctx_index),
            findings,
            mask,
            side_targets(study.labels, study.sides),
            prior_image,
            prior_volume,
            self.interval[index],
        )

    def _slots(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image slot, volume slot) of a study: its scan in its kind's slot, zeros in the
        other."""
        scan = torch.from_numpy(self.studies.images[row].astype(np.float32))
        if self.studies.studies[row].modality == RADIOGRAPH:
            return scan, torch.zeros(self.volume_shape)
        return torch.zeros(self.image_shape), scan
