"""What a site releases about the global model on its held-out split: figures computed from
counts that carry Gaussian noise, charged to the site's ledger like a training round.

Every held-out study adds a vector of bounded contributions to a set of sums (the counts behind
AUROC, clinical efficacy, ROUGE-L and answer accuracy); adding or removing one study moves the
sums by at most `sensitivity` in L2 norm. The sums get N(0, (sigma * sensitivity)^2) noise per
coordinate, a Gaussian mechanism with noise multiplier sigma that the ledger records as one
step at sample rate 1. The figures are post-processing of the noised sums, so they cost
nothing more. Per family (`EVAL_FAMILIES`), a study contributes:

- auroc: per finding with a certain label, one count in a (label, score bin) histogram;
  AUROC from the histograms (ties within a bin count half);
- report (studies a report was generated for): per finding, one of true positive, false
  positive, false negative of the generated report against the site's own, and one if the
  report agrees with the heads' decision (status and side); its ROUGE-L, repeated 4-gram
  share and placeholder share;
- qa (studies a question was asked about): one, and the share of its answers that were right;
  the same two per question kind (presence, side, size) the study was asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedrad.client.training.evaluate import StudyOutputs
from fedrad.common.findings import FINDINGS
from fedrad.common.grounding import (
    disagreements,
    placeholder_rate,
    repeated_ngram_rate,
    report_target,
)
from fedrad.common.labeling.labeler import label_report
from fedrad.common.metrics import answer_accuracy, rouge_l_scores
from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.messages import EVAL_FAMILIES

QA_KINDS: Final[tuple[str, ...]] = ("presence", "side", "size")
SCORE_BINS: Final[int] = 10  # AUROC resolution: more bins, more noise in every count
MIN_COUNT: Final[float] = 0.5  # a noised count below this is taken as none (figure undefined)
_K = len(FINDINGS)


def sensitivity(families: Sequence[str]) -> float:
    """L2 bound on one study's contribution to the released sums."""
    squared = 0.0
    for family in families:
        if family == "auroc":
            squared += _K  # one histogram count per finding
        elif family == "report":
            # one confusion cell and one agreement per finding; ROUGE-L, repeated 4-grams,
            # placeholders, each in [0, 1]
            squared += 2 * _K + 3
        elif family == "qa":
            squared += 2 * (1 + len(QA_KINDS))  # one and an accuracy, overall and per kind
        else:
            raise ValueError(f"unknown evaluation family {family!r}")
    return math.sqrt(squared)


@dataclass(frozen=True)
class Release:
    """The released figures and the mechanism that protected them."""

    metrics: dict[str, float]  # keys of EVAL_FAMILIES for the families released (NaN: none)
    noise_multiplier: float  # 0.0: released exactly (a run without DP)
    sensitivity: float


def contribution_sums(out: StudyOutputs, families: Sequence[str]) -> dict[str, np.ndarray]:
    """The exact sums, per family (what the noise is added to)."""
    sums: dict[str, np.ndarray] = {}
    if "auroc" in families:
        hist = np.zeros((_K, 2, SCORE_BINS))
        bins = np.minimum((out.probabilities * SCORE_BINS).astype(int), SCORE_BINS - 1)
        for i in range(out.labels.shape[0]):
            for k in range(_K):
                label = int(out.labels[i, k])
                if label in (0, 1):
                    hist[k, label, bins[i, k]] += 1
        sums["auroc"] = hist
    if "report" in families:
        cells = np.zeros((_K, 3))  # true positive, false positive, false negative
        agree = np.zeros(_K)
        for generated, reference, decided, sides in zip(
            out.generated, out.references, out.decisions, out.sides, strict=True
        ):
            read = label_report(generated)
            pred = np.asarray(read.as_vector()) == 1
            true = np.asarray(label_report(reference).as_vector()) == 1
            cells[:, 0] += pred & true
            cells[:, 1] += pred & ~true
            cells[:, 2] += ~pred & true
            wrong = set(disagreements(read, decided, sides))
            agree += np.asarray([f not in wrong for f in FINDINGS])
        targets = [report_target(r) for r in out.references]
        rouge = sum(rouge_l_scores(out.generated, targets))
        repeats = sum(repeated_ngram_rate(t) for t in out.generated)
        placeholders = sum(placeholder_rate(t) for t in out.generated)
        sums["report"] = np.concatenate([cells.reshape(-1), agree, [rouge, repeats, placeholders]])
    if "qa" in families:
        per_study: dict[int, list[tuple[str, str, str]]] = {}
        for study, answer, expected, kind in zip(
            out.qa_study, out.answers, out.expected, out.qa_kind, strict=True
        ):
            per_study.setdefault(study, []).append((answer, expected, kind))
        qa = np.zeros(2 * (1 + len(QA_KINDS)))  # (studies, right) overall, then per kind
        for triples in per_study.values():
            for slot, kind in enumerate((None, *QA_KINDS)):
                pairs = [(a, e) for a, e, k in triples if kind is None or k == kind]
                if pairs:
                    qa[2 * slot] += 1.0
                    qa[2 * slot + 1] += answer_accuracy(*zip(*pairs, strict=True)) or 0.0
        sums["qa"] = qa
    return sums


def release(
    out: StudyOutputs,
    families: Sequence[str],
    *,
    noise_multiplier: float,
    randomness: MechanismRandomness,
) -> Release:
    """Noises the sums (std `noise_multiplier * sensitivity`) and derives the figures."""
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError("noise_multiplier must be finite and >= 0")
    bound = sensitivity(families)
    std = noise_multiplier * bound
    noisy = {
        family: exact + randomness.gaussian(exact.size, std).numpy().reshape(exact.shape)
        for family, exact in contribution_sums(out, families).items()
    }
    metrics: dict[str, float] = {}
    if "auroc" in noisy:
        per = [_auroc(noisy["auroc"][k, 1], noisy["auroc"][k, 0]) for k in range(_K)]
        for finding, value in zip(FINDINGS, per, strict=True):
            metrics[f"auroc_{finding}"] = value
        present = [v for v in per if not math.isnan(v)]
        metrics["macro_auroc"] = float(np.mean(present)) if present else math.nan
    if "report" in noisy:
        metrics.update(_report_figures(noisy["report"], len(out.generated)))
    if "qa" in noisy:
        for slot, key in enumerate(("qa_accuracy", *(f"qa_{k}_accuracy" for k in QA_KINDS))):
            studies, right = noisy["qa"][2 * slot : 2 * slot + 2]
            metrics[key] = _clip01(right / studies) if studies >= MIN_COUNT else math.nan
    expected = set().union(*(EVAL_FAMILIES[f] for f in families))
    assert set(metrics) == expected, "every released family's figures, nothing else"
    return Release(metrics, noise_multiplier, bound)


def _clip01(value: float) -> float:
    return float(min(max(value, 0.0), 1.0))


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC of binned scores: P(score_pos > score_neg) + P(same bin) / 2."""
    pos, neg = np.maximum(positive, 0.0), np.maximum(negative, 0.0)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos < MIN_COUNT or n_neg < MIN_COUNT:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return _clip01(float(np.sum(pos * (below + neg / 2)) / (n_pos * n_neg)))


def _report_figures(sums: np.ndarray, reports: int) -> dict[str, float]:
    """Clinical efficacy (micro and macro F1, precision, recall) and mean ROUGE-L."""
    cells = np.maximum(sums[: 3 * _K].reshape(_K, 3), 0.0)
    agree, (rouge, repeats, placeholders) = sums[3 * _K : 4 * _K], sums[4 * _K :]
    tp, fp, fn = cells.sum(axis=0)
    figures = {
        "ce_precision": _clip01(tp / (tp + fp)) if tp + fp >= MIN_COUNT else math.nan,
        "ce_recall": _clip01(tp / (tp + fn)) if tp + fn >= MIN_COUNT else math.nan,
    }
    figures["ce_f1"] = _f1(tp, fp, fn)
    per_finding = [_f1(*cells[k]) for k in range(_K) if cells[k, 0] + cells[k, 2] >= MIN_COUNT]
    present = [v for v in per_finding if not math.isnan(v)]
    figures["ce_macro_f1"] = float(np.mean(present)) if present else math.nan
    # the number of reports is public (the first eval_reports studies of a known split)

    def share(total: float) -> float:
        return _clip01(total / reports) if reports else math.nan

    figures["rouge_l"] = share(rouge)
    figures["report_head_agreement"] = share(float(np.mean(agree)))
    figures["repeated_4gram"] = share(repeats)
    figures["placeholders"] = share(placeholders)
    return figures


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return _clip01(2 * tp / denominator) if denominator >= MIN_COUNT else math.nan
