"""Evaluation of the model on held-out studies: diagnosis AUROC, report quality, answers.

References are what a site has: its own reports and the labels the labeler reads from them
(uncertain labels are left out of AUROC). Only aggregate figures come out of here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fedrad.client.ingest.dataset import SiteStudies, encode_context, encode_prompt
from fedrad.common.findings import FINDINGS
from fedrad.common.metrics import (
    answer_accuracy,
    bleu4,
    clinical_efficacy,
    finding_auroc,
    macro,
    rouge_l,
)
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import all_questions, qa_prompt, report_prompt, suggestions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32
    max_reports: int = 64  # reports generated (the slow part); AUROC always uses every study
    max_questions: int = 128
    num_beams: int = 1
    max_new_tokens: int | None = None  # default: the model's max_target_tokens


def _images(studies: SiteStudies, idx: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([studies.images[i] for i in idx]).astype(np.float32))


@dataclass(frozen=True)
class StudyOutputs:
    """What the model said about each held-out study, beside the site's own references.

    Per-study values never leave the site: `evaluate` reduces them to aggregate figures, and
    `private_evaluation` to noised counts.
    """

    probabilities: np.ndarray  # (studies, findings) diagnosis-head probabilities
    labels: np.ndarray  # (studies, findings) the labeler's labels of the site's reports
    report_index: list[int]  # the studies a report was generated for
    generated: list[str]  # one report per study in report_index
    references: list[str]  # the site's own report for each of them
    qa_study: list[int]  # the study each question was asked about
    answers: list[str]
    expected: list[str]  # the answer the study's labels give
    seconds: float


def study_outputs(model: RadiologyModel, studies: SiteStudies, config: EvalConfig) -> StudyOutputs:
    """Runs the model on every study (diagnosis), the first `max_reports` (reports) and the
    first `max_questions` questions, in study order."""
    start = time.perf_counter()
    model.eval()
    tok = model.tokenizer
    limit = model.config.max_prompt_tokens
    n = len(studies)
    if n == 0:
        raise ValueError("no studies to evaluate")
    probs = []
    for lo in range(0, n, config.batch_size):
        idx = list(range(lo, min(n, lo + config.batch_size)))
        contexts = [encode_context(tok, studies.studies[i].indication, limit) for i in idx]
        probs.append(model.finding_probabilities(_images(studies, idx), contexts).numpy())
    probabilities = np.concatenate(probs)
    labels = np.array([[s.labels[f] for f in FINDINGS] for s in studies.studies])
    suggested = [suggestions(dict(zip(FINDINGS, row, strict=True))) for row in probabilities]

    max_new = config.max_new_tokens or model.config.max_target_tokens
    report_idx = list(range(min(n, config.max_reports)))
    generated: list[str] = []
    for lo in range(0, len(report_idx), config.batch_size):
        idx = report_idx[lo : lo + config.batch_size]
        prompts = [
            encode_prompt(
                tok,
                studies.studies[i].indication,
                report_prompt(suggested[i]),
                limit,
            )[0]
            for i in idx
        ]
        generated += model.generate(
            _images(studies, idx), prompts, max_new_tokens=max_new, num_beams=config.num_beams
        )
    references = [studies.studies[i].report for i in report_idx]

    qa_items = []
    for i, study in enumerate(studies.studies):
        for qa in all_questions(study.labels, study.sides, study.nodule_size_mm):
            if qa.kind == "presence" or study.labels[qa.finding] != 0:
                qa_items.append((i, qa))
    qa_items = qa_items[: config.max_questions]
    answers: list[str] = []
    for lo in range(0, len(qa_items), config.batch_size):
        chunk = qa_items[lo : lo + config.batch_size]
        prompts = [
            encode_prompt(
                tok, studies.studies[i].indication, qa_prompt(suggested[i], qa.question), limit
            )[0]
            for i, qa in chunk
        ]
        answers += model.generate(
            _images(studies, [i for i, _ in chunk]), prompts, max_new_tokens=8, num_beams=1
        )
    return StudyOutputs(
        probabilities=probabilities,
        labels=labels,
        report_index=report_idx,
        generated=generated,
        references=references,
        qa_study=[i for i, _ in qa_items],
        answers=answers,
        expected=[qa.answer for _, qa in qa_items],
        seconds=time.perf_counter() - start,
    )


def evaluate(model: RadiologyModel, studies: SiteStudies, config: EvalConfig) -> dict[str, object]:
    """Exact aggregate metrics, for a party that owns the studies (centralized baselines,
    benchmarks); per-study outputs never leave this function. A federated site releases
    `private_evaluation.release` instead."""
    out = study_outputs(model, studies, config)
    auroc = finding_auroc(out.probabilities, out.labels)
    ce = clinical_efficacy(out.generated, out.references)
    result = {
        "n_studies": len(studies),
        "n_reports": len(out.generated),
        "n_questions": len(out.answers),
        "macro_auroc": macro(auroc),
        "auroc": auroc,
        "ce_f1": ce["f1"],
        "ce_macro_f1": ce["macro_f1"],
        "ce_precision": ce["precision"],
        "ce_recall": ce["recall"],
        "bleu4": bleu4(out.generated, out.references),
        "rouge_l": rouge_l(out.generated, out.references),
        "qa_accuracy": answer_accuracy(out.answers, out.expected),
        "eval_seconds": out.seconds,
    }
    logger.info(
        "evaluated %d studies: macro AUROC %s, CE F1 %s, BLEU-4 %s",
        len(studies),
        *(_fmt(result[key]) for key in ("macro_auroc", "ce_f1", "bleu4")),
    )
    return result


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"
