"""Evaluation metrics from well-kept libraries: AUROC (scikit-learn), BLEU-4 (sacrebleu), ROUGE-L
(rouge-score); clinical efficacy is the labeler applied to generated and reference reports, as
report-generation papers do with the CheXpert labeler, and report-head agreement the labeler
applied to generated reports against the head's own decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sklearn.metrics import roc_auc_score

from fedrad.common.findings import FINDINGS
from fedrad.common.grounding import disagreements, placeholder_rate, repeated_ngram_rate
from fedrad.common.labeling.labeler import label_report
from fedrad.common.tasks import normalise_answer


def finding_auroc(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Per-finding AUROC over studies whose label is certain (0/1); None if one class only."""
    out: dict[str, float | None] = {}
    for j, finding in enumerate(FINDINGS):
        keep = labels[:, j] >= 0
        y = labels[keep, j]
        if y.size == 0 or y.min() == y.max():
            out[finding] = None
        else:
            out[finding] = float(roc_auc_score(y, probabilities[keep, j]))
    return out


def macro(values: dict[str, float | None]) -> float | None:
    present = [v for v in values.values() if v is not None and math.isfinite(v)]
    return float(np.mean(present)) if present else None


def clinical_efficacy(generated: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """Precision/recall/F1 of findings (1 = positive, 0/-1 = not) extracted from both texts;
    undefined (None) without any generated report."""
    if not generated:
        return {"precision": None, "recall": None, "f1": None, "macro_f1": None, "per_finding": {}}
    pred = np.array([label_report(t).as_vector() for t in generated]) == 1
    true = np.array([label_report(t).as_vector() for t in references]) == 1
    per: dict[str, dict[str, float]] = {}
    for j, finding in enumerate(FINDINGS):
        per[finding] = _prf(pred[:, j], true[:, j])
    micro = _prf(pred.reshape(-1), true.reshape(-1))
    macro_f1 = macro({f: v["f1"] for f, v in per.items() if true[:, FINDINGS.index(f)].any()})
    return {
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1": micro["f1"],
        "macro_f1": macro_f1,
        "per_finding": per,
    }


def _prf(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(pred & true))
    fp = float(np.sum(pred & ~true))
    fn = float(np.sum(~pred & true))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}


def bleu4(generated: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus BLEU-4 in [0, 1] (sacrebleu's standard 13a tokenisation); None without text."""
    if not generated:
        return None
    return float(BLEU().corpus_score(list(generated), [list(references)]).score) / 100.0


def rouge_l_scores(generated: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each generated text against its reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [
        scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generated, references, strict=True)
    ]


def rouge_l(generated: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F-measure; None without text."""
    if not generated:
        return None
    return float(np.mean(rouge_l_scores(generated, references)))


def answer_accuracy(answers: Sequence[str], references: Sequence[str]) -> float | None:
    if not answers:
        return None
    hits = [
        normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, references, strict=True)
    ]
    return float(np.mean(hits))


def head_agreement(
    generated: Sequence[str],
    decisions: Sequence[dict[str, int]],
    sides: Sequence[dict[str, str | None]] | None = None,
) -> dict[str, float | None]:
    """Per finding, the share of reports whose labeler reading (present, uncertain, absent;
    and the side, where both state one) is the heads' decision for that study; `macro` is
    their mean. None without reports."""
    if not generated:
        return {"macro": None, **dict.fromkeys(FINDINGS)}
    side_rows = sides if sides is not None else [None] * len(generated)
    wrong = [
        set(disagreements(label_report(t), d, s))
        for t, d, s in zip(generated, decisions, side_rows, strict=True)
    ]
    per: dict[str, float | None] = {
        f: float(np.mean([f not in w for w in wrong])) for f in FINDINGS
    }
    return {"macro": macro(per), **per}


def degeneration(generated: Sequence[str]) -> dict[str, float | None]:
    """Mean share of repeated word 4-grams and of placeholder words ("___") per report."""
    if not generated:
        return {"repeated_4gram": None, "placeholders": None}
    return {
        "repeated_4gram": float(np.mean([repeated_ngram_rate(t) for t in generated])),
        "placeholders": float(np.mean([placeholder_rate(t) for t in generated])),
    }


def accuracy_by_kind(
    answers: Sequence[str], references: Sequence[str], kinds: Sequence[str]
) -> dict[str, float | None]:
    """Answer accuracy per question kind ("presence", "side", "size")."""
    out: dict[str, float | None] = {}
    for kind in ("presence", "side", "size"):
        pairs = [(a, r) for a, r, k in zip(answers, references, kinds, strict=True) if k == kind]
        out[kind] = answer_accuracy([a for a, _ in pairs], [r for _, r in pairs])
    return out
