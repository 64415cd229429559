"""Score the report labeler: radlabels' real prose, the phrase suite, a labelled CSV, a cohort.

How radlabels' findings map onto ours, and its development / held-out split, are in
`fedrad.common.labeling.radlabels`. The phrase suite (``labeler_suite.csv`` beside this module,
shipped as package data) holds short cases labelled under the written finding definitions, each
with a kind (negation, look-alike, ...) so that the errors left can be read by kind.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.labeler import ReportLabels, label_reports
from fedrad.common.labeling.radlabels import Split, load_radlabels, radlabels_samples_dir

logger = logging.getLogger(__name__)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def evaluate(
    pred: list[ReportLabels], truth: list[dict[str, int]], findings: Sequence[str] = FINDINGS
) -> dict[str, object]:
    """Per finding: 3-class accuracy, positive (1 vs rest) precision / recall / F1, and F1 of
    "mentioned" (1 or -1 vs 0); macro over `findings` (those the reference labels)."""
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
        # "Mentioned at all": present or uncertain against absent, blind to hedge conventions.
        m_tp = sum(a != ABSENT and b != ABSENT for a, b in zip(p, t, strict=True))
        m_fp = sum(a != ABSENT and b == ABSENT for a, b in zip(p, t, strict=True))
        m_fn = sum(a == ABSENT and b != ABSENT for a, b in zip(p, t, strict=True))
        per_finding[finding] = {
            "accuracy": _ratio(correct, len(t)),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "f1_mentioned": _ratio(2 * m_tp, 2 * m_tp + m_fp + m_fn),
            "n_positive": sum(b == PRESENT for b in t),
            "n_uncertain": sum(b == UNCERTAIN for b in t),
            "n_predicted_positive": tp + fp,
        }
    macro = {
        key: sum(float(per_finding[f][key]) for f in findings) / len(findings)
        for key in ("accuracy", "precision", "recall", "f1", "f1_mentioned")
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


def timed_labels(texts: Sequence[str]) -> tuple[list[ReportLabels], float]:
    """Our labels for ``texts`` and the seconds they took (one core)."""
    started = time.perf_counter()
    pred = label_reports(texts)
    return pred, time.perf_counter() - started


def _score(
    pred: list[ReportLabels],
    seconds: float,
    truth: list[dict[str, int]],
    findings: Sequence[str] = FINDINGS,
) -> dict[str, object]:
    result = evaluate(pred, truth, findings)
    result["reports_per_s"] = len(pred) / seconds if seconds > 0 else float("inf")
    return result


def score_labeler(
    corpus: list[tuple[str, dict[str, int]]], findings: Sequence[str] = FINDINGS
) -> dict[str, object]:
    """Label (report, reference) pairs and score them; adds throughput (reports per second,
    one core)."""
    pred, seconds = timed_labels([text for text, _ in corpus])
    return _score(pred, seconds, [labels for _, labels in corpus], findings)


def run_labelled_bench(path: Path, *, column: str | None = None) -> dict[str, object]:
    """The labeler against a user's own reference labels, over the findings they label."""
    rows, findings = load_labelled_reports(path, column=column)
    return score_labeler(rows, findings) | {"findings": list(findings)}


def run_radlabels_bench(
    samples_dir: Path | None = None, *, drop_ignored_sections: bool = True, split: Split = "all"
) -> dict[str, object]:
    """The labeler against radlabels' independent labels of its reports: both halves by
    default, ``split="heldout"`` for the half it was not developed against."""
    corpus = load_radlabels(
        samples_dir or radlabels_samples_dir(),
        drop_ignored_sections=drop_ignored_sections,
        split=split,
    )
    return score_labeler(corpus) | {"drop_ignored_sections": drop_ignored_sections, "split": split}


DEFAULT_SUITE: Final[Path] = Path(__file__).resolve().parent / "labeler_suite.csv"
"""The phrase suite, shipped beside this module (package data in an installed fedrad); its
errors were read while the labeler was built."""
HELDOUT_SUITE: Final[Path] = Path(__file__).resolve().parent / "labeler_suite_heldout.csv"
"""Whole reports written apart from the phrase suite and scored once, never read to develop
the labeler."""
SUITE_COLUMNS: Final[tuple[str, ...]] = ("case", "kind", "source", "report", *FINDINGS)
_SUITE_VALUES: Final[dict[str, int]] = {"1": PRESENT, "0": ABSENT, "-1": UNCERTAIN}


@dataclass(frozen=True)
class SuiteCase:
    """One phrase-suite case: its id, kind (what it tests), source, report and six labels."""

    case: str
    kind: str
    source: str
    report: str
    labels: dict[str, int]


def load_phrase_suite(path: Path = DEFAULT_SUITE) -> list[SuiteCase]:
    """The phrase suite's cases, every finding labelled 1 / 0 / -1 (no blanks: each case is
    written to the definitions for all six); ``LabelledReportsError`` says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise LabelledReportsError(f"no such file: {path} (the labeler's phrase suite)")
    cases: list[SuiteCase] = []
    seen: set[str] = set()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in SUITE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise LabelledReportsError(
                    f"{path}: missing column(s) {', '.join(missing)} "
                    f"(expects {','.join(SUITE_COLUMNS)})"
                )
            for line, row in enumerate(reader, start=2):
                cases.append(_suite_case(path, line, row, seen))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelledReportsError(f"{path}: not a UTF-8 CSV ({exc})") from exc
    if not cases:
        raise LabelledReportsError(f"{path}: no cases")
    return cases


def _suite_case(path: Path, line: int, row: dict[str, str | None], seen: set[str]) -> SuiteCase:
    """One row as a case; one-line errors naming the line."""
    if None in row:  # csv.DictReader files surplus fields under None
        raise LabelledReportsError(f"{path}: line {line} has more fields than the header")
    values = {key: (row.get(key) or "").strip() for key in SUITE_COLUMNS}
    for key in ("case", "kind", "report"):
        if not values[key]:
            raise LabelledReportsError(f"{path}: line {line}, {key} is empty")
    if values["case"] in seen:
        raise LabelledReportsError(f"{path}: line {line}, case {values['case']!r} repeats")
    seen.add(values["case"])
    bad = [f"{f} = {values[f]!r}" for f in FINDINGS if values[f] not in _SUITE_VALUES]
    if bad:
        raise LabelledReportsError(f"{path}: line {line}, {', '.join(bad)} (expects 1, 0 or -1)")
    return SuiteCase(
        case=values["case"],
        kind=values["kind"],
        source=values["source"],
        report=row.get("report") or "",
        labels={f: _SUITE_VALUES[values[f]] for f in FINDINGS},
    )


def suite_errors(
    cases: Sequence[SuiteCase], pred: Sequence[ReportLabels]
) -> tuple[dict[str, dict[str, int]], list[dict[str, object]]]:
    """Per kind {"n": cases, "errors": wrong finding labels, "cases_wrong"}, and every wrong
    label as {"case", "kind", "finding", "expected", "got"}: the errors left, listed by kind."""
    if len(cases) != len(pred):
        raise ValueError(f"{len(pred)} predictions for {len(cases)} suite cases")
    per_kind: dict[str, dict[str, int]] = {}
    errors: list[dict[str, object]] = []
    for case, labels in zip(cases, pred, strict=True):
        kind = per_kind.setdefault(case.kind, {"n": 0, "errors": 0, "cases_wrong": 0})
        kind["n"] += 1
        wrong = [f for f in FINDINGS if labels.labels[f] != case.labels[f]]
        kind["errors"] += len(wrong)
        kind["cases_wrong"] += bool(wrong)
        errors.extend(
            {
                "case": case.case,
                "kind": case.kind,
                "finding": f,
                "expected": case.labels[f],
                "got": labels.labels[f],
            }
            for f in wrong
        )
    return dict(sorted(per_kind.items())), errors


def run_suite_bench(path: Path = DEFAULT_SUITE) -> dict[str, object]:
    """The labeler against the phrase suite: the usual scores, plus ``per_kind`` and
    ``errors`` (see ``suite_errors``)."""
    cases = load_phrase_suite(path)
    pred, seconds = timed_labels([c.report for c in cases])
    per_kind, errors = suite_errors(cases, pred)
    result = _score(pred, seconds, [c.labels for c in cases])
    return result | {"suite": str(path), "per_kind": per_kind, "errors": errors}


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
    pred, seconds = timed_labels([text for text, _, _ in rows])
    return {
        "reports": len(rows),
        "vs_report_labels": evaluate(pred, [asserted for _, asserted, _ in rows]),
        "vs_image_truth": evaluate(pred, [image for _, _, image in rows]),
        "reports_per_s": len(rows) / seconds if seconds > 0 else None,
    }
