"""Evaluation of the model on held-out studies: diagnosis AUROC, report quality, answers.

References are what a site has: its own reports and the labels the labeler reads from them
(uncertain labels are left out of AUROC). Only aggregate figures come out of here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fedrad.client.ingest.dataset import SiteStudies, encode_context, encode_prompt
from fedrad.client.training.interval_evaluation import interval_evaluation
from fedrad.common.findings import FINDINGS
from fedrad.common.grounding import (
    CANDIDATES,
    GroundedReport,
    ground_answer,
    ground_report,
    needs_language_model,
    report_target,
    tidy_report,
)
from fedrad.common.labeling.labeler import label_report
from fedrad.common.metrics import (
    accuracy_by_kind,
    answer_accuracy,
    bleu4,
    clinical_efficacy,
    degeneration,
    finding_auroc,
    head_agreement,
    macro,
    rouge_l,
)
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import (
    all_questions,
    head_sides,
    qa_prompt,
    report_prompt,
    side_table,
    suggestions,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32
    max_reports: int = 64  # reports generated (the slow part); AUROC always uses every study
    max_questions: int = 128  # asked about the studies a report was written for
    num_beams: int = 1
    candidates: int = CANDIDATES  # report candidates re-ranked against the head (beams)
    max_new_tokens: int | None = None  # default: the model's max_target_tokens


T = TypeVar("T")


def by_scan_kind(
    studies: SiteStudies, idx: list[int], run: Callable[[torch.Tensor, list[int]], list[T]]
) -> list[T]:
    """`run(scans, positions)` over the rows of `idx` one kind of scan at a time (radiographs
    and volumes do not stack), its per-row results put back in `idx` order."""
    out: list[T | None] = [None] * len(idx)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, i in enumerate(idx):
        groups.setdefault(studies.images[i].shape, []).append(k)
    for positions in groups.values():
        scans = np.stack([studies.images[idx[k]] for k in positions]).astype(np.float32)
        for k, value in zip(positions, run(torch.from_numpy(scans), positions), strict=True):
            out[k] = value
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class StudyOutputs:
    """What the model said about each held-out study, beside the site's own references.

    Per-study values never leave the site: `evaluate` reduces them to aggregate figures, and
    `private_evaluation` to noised counts.
    """

    probabilities: np.ndarray  # (studies, findings) diagnosis-head probabilities
    labels: np.ndarray  # (studies, findings) the labeler's labels of the site's reports
    report_index: list[int]  # the studies a report was generated for
    generated: list[str]  # the grounded report for each study in report_index
    first_candidates: list[str]  # the model's own best candidate, tidied, before grounding
    sources: list[str]  # "generated" | "repaired" | "template", per report
    decisions: list[dict[str, int]]  # the head's decisions for each study in report_index
    sides: list[dict[str, str | None]]  # the side head's side for each of them
    references: list[str]  # the site's own report for each of them
    qa_study: list[int]  # the study each question was asked about
    qa_kind: list[str]  # "presence" | "side" | "size"
    answers: list[str]  # the grounded short answers
    expected: list[str]  # the answer the study's labels give
    seconds: float


def study_outputs(model: RadiologyModel, studies: SiteStudies, config: EvalConfig) -> StudyOutputs:
    """Runs the model on every study (diagnosis), the first `max_reports` (reports) and the
    first `max_questions` questions about those, in study order, through the same grounded
    path a site's reader uses (`common/grounding.py`)."""
    start = time.perf_counter()
    model.eval()
    tok = model.tokenizer
    limit = model.config.max_prompt_tokens
    n = len(studies)
    if n == 0:
        raise ValueError("no studies to evaluate")
    probs, side_probs = [], []
    for lo in range(0, n, config.batch_size):
        idx = list(range(lo, min(n, lo + config.batch_size)))
        contexts = [encode_context(tok, studies.studies[i].indication, limit) for i in idx]
        rows = by_scan_kind(
            studies,
            idx,
            lambda scans, pos, contexts=contexts: list(
                zip(*model.diagnose(scans, [contexts[k] for k in pos]), strict=True)
            ),
        )
        probs.append(np.stack([p.numpy() for p, _ in rows]))
        side_probs.append(np.stack([s.numpy() for _, s in rows]))
    probabilities = np.concatenate(probs)
    labels = np.array([[s.labels[f] for f in FINDINGS] for s in studies.studies])
    per_study = [dict(zip(FINDINGS, map(float, row), strict=True)) for row in probabilities]
    decided = [suggestions(p) for p in per_study]
    side_tables = [side_table(rows) for rows in np.concatenate(side_probs)]
    sides = [head_sides(t, d) for t, d in zip(side_tables, decided, strict=True)]

    max_new = config.max_new_tokens or model.config.max_target_tokens
    report_idx = list(range(min(n, config.max_reports)))
    grounded: list[GroundedReport] = []
    first: list[str] = []
    # candidates x beams rows per batch: keep the beam batch near `batch_size`
    step = max(1, config.batch_size // max(config.candidates, config.num_beams))
    for lo in range(0, len(report_idx), step):
        idx = report_idx[lo : lo + step]
        prompts = [
            encode_prompt(
                tok, studies.studies[i].indication, report_prompt(decided[i], sides[i]), limit
            )[0]
            for i in idx
        ]
        rows = by_scan_kind(
            studies,
            idx,
            lambda scans, pos, prompts=prompts: model.generate_candidates(
                scans,
                [prompts[k] for k in pos],
                max_new_tokens=max_new,
                candidates=config.candidates,
                num_beams=config.num_beams,
            ),
        )
        for i, candidates in zip(idx, rows, strict=True):
            grounded.append(ground_report(candidates, decided[i], sides[i]))
            first.append(tidy_report(candidates[0]))
    references = [studies.studies[i].report for i in report_idx]

    qa_items = []
    for i in report_idx:
        study = studies.studies[i]
        for qa in all_questions(study.labels, study.sides, study.nodule_size_mm):
            if qa.kind == "presence" or study.labels[qa.finding] != 0:
                qa_items.append((i, qa))
    qa_items = qa_items[: config.max_questions]
    position = {study: k for k, study in enumerate(report_idx)}
    read = {i: label_report(grounded[position[i]].text) for i in {i for i, _ in qa_items}}
    asking = [
        (i, qa)
        for i, qa in qa_items
        if needs_language_model(qa.question, decided[i], read[i], side_tables[i])
    ]
    model_answers: dict[tuple[int, str], str] = {}
    for lo in range(0, len(asking), config.batch_size):
        chunk = asking[lo : lo + config.batch_size]
        prompts = [
            encode_prompt(
                tok,
                studies.studies[i].indication,
                qa_prompt(decided[i], qa.question, sides[i]),
                limit,
            )[0]
            for i, qa in chunk
        ]
        said = by_scan_kind(
            studies,
            [i for i, _ in chunk],
            lambda scans, pos, prompts=prompts: model.generate(
                scans, [prompts[k] for k in pos], max_new_tokens=8, num_beams=1
            ),
        )
        model_answers.update({(i, qa.question): a for (i, qa), a in zip(chunk, said, strict=True)})
    answers = [
        ground_answer(
            qa.question,
            decided[i],
            per_study[i],
            read[i],
            model_answers.get((i, qa.question)),
            side_tables[i],
        ).value
        for i, qa in qa_items
    ]
    return StudyOutputs(
        probabilities=probabilities,
        labels=labels,
        report_index=report_idx,
        generated=[g.text for g in grounded],
        first_candidates=first,
        sources=[g.source for g in grounded],
        decisions=[decided[i] for i in report_idx],
        sides=[sides[i] for i in report_idx],
        references=references,
        qa_study=[i for i, _ in qa_items],
        qa_kind=[qa.kind for _, qa in qa_items],
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
    targets = [report_target(r) for r in out.references]  # text overlap: like with like
    agree = head_agreement(out.generated, out.decisions, out.sides)
    by_kind = accuracy_by_kind(out.answers, out.expected, out.qa_kind)
    worn = degeneration(out.generated)
    n_reports = len(out.generated)
    result = {
        "n_studies": len(studies),
        "n_reports": n_reports,
        "n_questions": len(out.answers),
        "macro_auroc": macro(auroc),
        "auroc": auroc,
        "ce_f1": ce["f1"],
        "ce_macro_f1": ce["macro_f1"],
        "ce_precision": ce["precision"],
        "ce_recall": ce["recall"],
        "bleu4": bleu4(out.generated, targets),
        "rouge_l": rouge_l(out.generated, targets),
        "report_head_agreement": agree["macro"],
        "head_agreement": {f: agree[f] for f in FINDINGS},
        "first_candidate_agreement": head_agreement(out.first_candidates, out.decisions, out.sides)[
            "macro"
        ],
        "first_candidate_ce_f1": clinical_efficacy(out.first_candidates, out.references)["f1"],
        **{
            f"reports_{source}": (out.sources.count(source) / n_reports if n_reports else None)
            for source in ("generated", "repaired", "template")
        },
        "repeated_4gram": worn["repeated_4gram"],
        "placeholders": worn["placeholders"],
        "qa_accuracy": answer_accuracy(out.answers, out.expected),
        "qa_presence_accuracy": by_kind["presence"],
        "qa_side_accuracy": by_kind["side"],
        "qa_size_accuracy": by_kind["size"],
        "interval": interval_evaluation(model, studies),
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
