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
  positive, false negative of the generated report against the site's own, and its ROUGE-L;
- qa (studies a question was asked about): one, and the share of its answers that were right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedrad.client.training.evaluate import StudyOutputs
from fedrad.common.findings import FINDINGS
from fedrad.common.labeling.labeler import label_report
from fedrad.common.metrics import answer_accuracy, rouge_l_scores
from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.messages import EVAL_FAMILIES

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
            squared += _K + 1  # one confusion cell per finding, its ROUGE-L in [0, 1]
        elif family == "qa":
            squared += 2  # one, its accuracy in [0, 1]
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
        for generated, reference in zip(out.generated, out.references, strict=True):
            pred = np.asarray(label_report(generated).as_vector()) == 1
            true = np.asarray(label_report(reference).as_vector()) == 1
            cells[:, 0] += pred & true
            cells[:, 1] += pred & ~true
            cells[:, 2] += ~pred & true
        rouge = sum(rouge_l_scores(out.generated, out.references))
        sums["report"] = np.concatenate([cells.reshape(-1), [rouge]])
    if "qa" in families:
        per_study: dict[int, list[tuple[str, str]]] = {}
        for study, answer, expected in zip(out.qa_study, out.answers, out.expected, strict=True):
            per_study.setdefault(study, []).append((answer, expected))
        right = sum(
            answer_accuracy([a for a, _ in pairs], [e for _, e in pairs]) or 0.0
            for pairs in per_study.values()
        )
        sums["qa"] = np.array([float(len(per_study)), right])
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
        studies, right = noisy["qa"]
        metrics["qa_accuracy"] = _clip01(right / studies) if studies >= MIN_COUNT else math.nan
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
    cells = np.maximum(sums[:-1].reshape(_K, 3), 0.0)
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
    figures["rouge_l"] = _clip01(sums[-1] / reports) if reports else math.nan
    return figures


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return _clip01(2 * tp / denominator) if denominator >= MIN_COUNT else math.nan
