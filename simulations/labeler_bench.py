"""Measure the report labeler on the radlabels corpus: real report prose the generator never wrote.

radlabels (MIT) ships 1,000 chest radiograph reports with RadGraph-derived present / uncertain /
absent labels for 48 findings, plus the evidence behind each label (which alias fired, with what
status, at which RadGraph token). The package is read as files and never imported: importing it
downloads a model.

Mapping from radlabels findings (and aliases) to ours. A finding of ours is the CheXpert-style
collapse (present > uncertain > absent) of the mapped evidence; no mapped evidence means 0, since
radlabels' "missing key" means "no evidence found", which is our "not mentioned".

* nodule <- ``lung_nodule_or_mass`` (all aliases: nodule, mass, nodular opacity, granuloma,
  lung lesion, tumour). ``lung_lesion`` is skipped: its extra aliases are "cavitation" and
  "lytic lesion" (bone), which are not nodules.
* pleural_effusion <- ``pleural_effusion`` (its aliases include hemothorax and empyema, as ours
  do; pericardial effusion is excluded by radlabels itself).
* cardiomegaly <- ``cardiomegaly``. ``enlarged_cardiomediastinum`` is skipped (a widened
  mediastinum is not an enlarged heart; CheXpert keeps them apart too).
* pneumothorax <- ``pneumothorax``.
* consolidation <- ``consolidation``, ``pneumonia``, ``infiltration`` and those aliases of
  ``air_space_opacity`` that name consolidation, pneumonia, infiltrate or airspace / alveolar
  disease. Skipped: ground-glass, patchy, confluent and parenchymal "opacity" (CheXpert's
  separate "lung opacity" class; an opacity may be atelectasis), ``lung_opacity`` and
  ``atelectasis``. Our consolidation finding covers pneumonia (as the cohort's display name
  says), so pneumonia evidence, including "infection" / "infectious process", counts.
* fracture <- ``fracture_generic``, ``acute_rib_fracture``, ``non_acute_rib_fracture``: old and
  healed fractures are present for us too.

Reference labels come from RadGraph reading the whole report, including the INDICATION
("? pneumonia") that our labeler deliberately ignores. With ``drop_ignored_sections`` (the
default), evidence whose tokens lie in a section the labeler ignores is dropped, so the figures
measure the labeler against its own contract; ``False`` scores against the labels as shipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Final

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeler import ReportLabels, label_reports, section_spans

logger = logging.getLogger(__name__)

_STATUS: Final[dict[str, int]] = {
    "definitely present": PRESENT,
    "uncertain": UNCERTAIN,
    "definitely absent": ABSENT,
}

_AIRSPACE_SKIPPED_ALIASES: Final[frozenset[str]] = frozenset(
    {
        "groundglass opacity",
        "ground-glass opacity",
        "ground glass opacity",
        "ground glass opacities",
        "ground-glass opacities",
        "patchy opacity",
        "patchy opacities",
        "confluent opacity",
        "confluent opacities",
        "parenchymal opacity",
    }
)

RADLABELS_MAPPING: Final[dict[str, tuple[str, ...]]] = {
    "lung_nodule_or_mass": ("nodule",),
    "pleural_effusion": ("pleural_effusion",),
    "cardiomegaly": ("cardiomegaly",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "pneumonia": ("consolidation",),
    "infiltration": ("consolidation",),
    "air_space_opacity": ("consolidation",),
    "fracture_generic": ("fracture",),
    "acute_rib_fracture": ("fracture",),
    "non_acute_rib_fracture": ("fracture",),
}
"""radlabels finding -> our findings; aliases in ``_AIRSPACE_SKIPPED_ALIASES`` do not count."""


def radlabels_samples_dir() -> Path:
    """The bundled corpus directory, located through package metadata without importing it."""
    try:
        dist = metadata.distribution("radlabels")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "radlabels is not installed; install it with "
            "`.venv/bin/pip install --no-deps radlabels==0.2.0` (make install does)"
        ) from exc
    samples = Path(str(dist.locate_file("radlabels/samples")))
    if (
        not (samples / "synthetic_reports").is_dir()
        or not (samples / "synthetic_matches.json").is_file()
    ):
        raise FileNotFoundError(
            f"radlabels is installed but its bundled corpus is missing under {samples}; "
            "reinstall with `.venv/bin/pip install --no-deps --force-reinstall radlabels==0.2.0`"
        )
    return samples


def _token_offsets(original: str, tokenized: str) -> list[int | None]:
    """Character offset in the original report of each RadGraph token (None if not found)."""
    offsets: list[int | None] = []
    cursor = 0
    for token in tokenized.split(" "):
        at = original.find(token, cursor) if token else -1
        if at < 0:
            offsets.append(None)
            continue
        offsets.append(at)
        cursor = at + len(token)
    return offsets


def _collapse(statuses: Sequence[int]) -> int:
    if PRESENT in statuses:
        return PRESENT
    if UNCERTAIN in statuses:
        return UNCERTAIN
    return ABSENT


def _labels_from_matches(
    report: str, entry: dict[str, object], *, drop_ignored_sections: bool
) -> dict[str, int]:
    """Our six labels from one report's radlabels evidence, following RADLABELS_MAPPING."""
    ignored: list[tuple[int, int]] = []
    offsets: list[int | None] = []
    if drop_ignored_sections:
        ignored = [(a, b) for kind, a, b in section_spans(report) if kind == "ignore"]
        offsets = _token_offsets(report, str(entry.get("text", "")))
    statuses: dict[str, list[int]] = {f: [] for f in FINDINGS}
    matches = entry.get("matches", [])
    for match in matches if isinstance(matches, list) else []:
        ours = RADLABELS_MAPPING.get(match.get("disease", ""), ())
        if not ours or match.get("label") not in _STATUS:
            continue
        if match.get("disease") == "air_space_opacity" and (
            match.get("alias") in _AIRSPACE_SKIPPED_ALIASES
        ):
            continue
        if ignored:
            positions = [
                offsets[i]
                for i in match.get("start_ix", [])
                if isinstance(i, int) and 0 <= i < len(offsets) and offsets[i] is not None
            ]
            if positions and any(a <= min(positions) < b for a, b in ignored):
                continue
        for finding in ours:
            statuses[finding].append(_STATUS[match["label"]])
    return {f: _collapse(statuses[f]) for f in FINDINGS}


def load_radlabels(
    samples_dir: Path, *, drop_ignored_sections: bool = True
) -> list[tuple[str, dict[str, int]]]:
    """(report text, labels over our six findings) for every bundled report, sorted by id."""
    reports_dir = samples_dir / "synthetic_reports"
    evidence = json.loads((samples_dir / "synthetic_matches.json").read_text(encoding="utf-8"))
    out: list[tuple[str, dict[str, int]]] = []
    for path in sorted(reports_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        entry = evidence.get(path.stem, {})
        out.append(
            (text, _labels_from_matches(text, entry, drop_ignored_sections=drop_ignored_sections))
        )
    logger.info("loaded %d radlabels reports", len(out))
    return out


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
    from fedrad.client.report_sources import report_csv

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
