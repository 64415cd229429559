"""Score the report labeler on real prose: radlabels' 1,000 reports, a labelled CSV, a cohort.

How radlabels' findings map onto ours is in `fedrad.common.labeling.radlabels`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.labeler import ReportLabels, label_reports
from fedrad.common.labeling.radlabels import load_radlabels, radlabels_samples_dir

logger = logging.getLogger(__name__)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def evaluate(
    pred: list[ReportLabels], truth: list[dict[str, int]], findings: Sequence[str] = FINDINGS
) -> dict[str, object]:
    """Per finding: 3-class accuracy and positive (1 vs rest) precision / recall / F1; macro
    over `findings` (those the reference labels)."""
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} predictions for {len(truth)} reference label sets")
    per_finding: dict[str, dict[str, float | int]] = {}
    for finding in findings:
        p = [r.labels[finding] for r in pred]
        t = [row.get(finding, ABSENT) for row in truth]
        correct = sum(a == b for a, b in zip(p, t, strict=True))
        tp = sum(a == PRESENT and b == PRESENT for a, b in zip(p, t, strict=True))
        fp = sum(a == PRESENT and b != PRESENT for a, b in zip(p, t, strict=True))
        fn = sum(a != PRESENT and b == PRESENT for a, b in zip(p, t, strict=True))
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_finding[finding] = {
            "accuracy": _ratio(correct, len(t)),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "n_positive": sum(b == PRESENT for b in t),
            "n_uncertain": sum(b == UNCERTAIN for b in t),
            "n_predicted_positive": tp + fp,
        }
    macro = {
        key: sum(float(per_finding[f][key]) for f in findings) / len(findings)
        for key in ("accuracy", "precision", "recall", "f1")
    }
    return {"n": len(truth), "per_finding": per_finding, "macro": macro}


class LabelledReportsError(Exception):
    """A reference-label file that cannot be scored; the message says why in one line."""


_REFERENCE_VALUES: Final[dict[str, int]] = {
    "1": PRESENT,
    "1.0": PRESENT,
    "0": ABSENT,
    "0.0": ABSENT,
    "": ABSENT,  # CheXpert's convention: not mentioned
    "-1": UNCERTAIN,
    "-1.0": UNCERTAIN,
}


def load_labelled_reports(
    path: Path, *, column: str | None = None
) -> tuple[list[tuple[str, dict[str, int]]], tuple[str, ...]]:
    """(report, reference labels) rows of a CSV with a report column and one column per
    finding it labels (named as ours, any case, spaces for underscores: `Pleural Effusion`),
    valued 1 / 0 / -1 (blank = 0); and which of our findings it labels."""
    from fedrad.client.ingest.report_sources import report_csv

    if not Path(path).is_file():
        raise LabelledReportsError(f"no such file: {path}")
    with report_csv(Path(path), column=column, error=LabelledReportsError) as (
        reader,
        columns,
        text_col,
    ):
        labelled = {f: columns[f] for f in FINDINGS if f in columns and columns[f] != text_col}
        if not labelled:
            raise LabelledReportsError(
                f"{path}: no reference column for any of {', '.join(FINDINGS)}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            labels = {}
            for finding, header in labelled.items():
                value = (row.get(header) or "").strip()
                if value not in _REFERENCE_VALUES:
                    raise LabelledReportsError(
                        f"{path}: line {line}, {header} = {value!r} (expects 1, 0, -1 or blank)"
                    )
                labels[finding] = _REFERENCE_VALUES[value]
            rows.append((row.get(text_col) or "", labels))
    if not rows:
        raise LabelledReportsError(f"{path}: no rows")
    return rows, tuple(labelled)


def score_labeler(
    corpus: list[tuple[str, dict[str, int]]], findings: Sequence[str] = FINDINGS
) -> dict[str, object]:
    """Label (report, reference) pairs and score them; adds throughput (reports per second,
    one core)."""
    texts = [text for text, _ in corpus]
    started = time.perf_counter()
    pred = label_reports(texts)
    elapsed = time.perf_counter() - started
    result = evaluate(pred, [labels for _, labels in corpus], findings)
    result["reports_per_s"] = len(texts) / elapsed if elapsed > 0 else float("inf")
    return result


def run_labelled_bench(path: Path, *, column: str | None = None) -> dict[str, object]:
    """The labeler against a user's own reference labels, over the findings they label."""
    rows, findings = load_labelled_reports(path, column=column)
    return score_labeler(rows, findings) | {"findings": list(findings)}


def run_radlabels_bench(
    samples_dir: Path | None = None, *, drop_ignored_sections: bool = True
) -> dict[str, object]:
    """The labeler against radlabels' independent labels of its 1,000 reports."""
    corpus = load_radlabels(
        samples_dir or radlabels_samples_dir(), drop_ignored_sections=drop_ignored_sections
    )
    return score_labeler(corpus) | {"drop_ignored_sections": drop_ignored_sections}


def load_cohort_reports(cohort_dir: Path) -> list[tuple[str, dict[str, int], dict[str, int]]]:
    """(report, labels the prose asserts, labels the image carries) for every synthetic study."""
    import csv

    out: list[tuple[str, dict[str, int], dict[str, int]]] = []
    sites = sorted(p for p in cohort_dir.iterdir() if (p / "ground_truth.csv").is_file())
    if not sites:
        raise FileNotFoundError(f"no site with ground_truth.csv under {cohort_dir}")
    for site in sites:
        with (site / "reports.csv").open(newline="", encoding="utf-8") as handle:
            reports = {r["accession_number"]: r["report"] for r in csv.DictReader(handle)}
        with (site / "ground_truth.csv").open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                asserted = {f: int(row[f"report_{f}"]) for f in FINDINGS}
                image = {f: int(row[f]) for f in FINDINGS}
                out.append((reports[row["accession_number"]], asserted, image))
    return out


def run_cohort_bench(cohort_dir: Path) -> dict[str, object]:
    """The labeler against what each synthetic report asserts, and against the image truth."""
    rows = load_cohort_reports(cohort_dir)
    start = time.perf_counter()
    pred = label_reports([text for text, _, _ in rows])
    seconds = time.perf_counter() - start
    return {
        "reports": len(rows),
        "vs_report_labels": evaluate(pred, [asserted for _, asserted, _ in rows]),
        "vs_image_truth": evaluate(pred, [image for _, _, image in rows]),
        "reports_per_s": len(rows) / seconds if seconds > 0 else None,
    }
