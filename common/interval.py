"""Interval change between a patient's prior study and the current one: the vocabulary, what
a site reads from its two reports, a rule baseline, and the sentence a report states.

A site has no annotation of change, only reports. Each report states what it sees now (and
the size of an effusion, a pneumothorax, a nodule or a heart); comparing the two reports'
readings gives the change the interval head trains on, with no extra annotation. A persisting
finding whose size one of the reports leaves unstated has no known change and stays out of
the loss rather than being guessed "stable".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from fedrad.common.findings import ABSENT, DISPLAY_NAMES, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.labeler import ReportLabels, mentioned_findings
from fedrad.common.labeling.sections import sentences

CHANGES: Final[tuple[str, ...]] = ("absent", "new", "resolved", "larger", "smaller", "stable")
"""Per finding, from the prior to the current study ("absent": absent at both). Order is the
interval head's class order: checkpoints depend on it."""
PERSISTING: Final[frozenset[str]] = frozenset({"larger", "smaller", "stable"})
SEVERITY: Final[dict[str, dict[str, float]]] = {
    "pleural_effusion": {"trace": 0.5, "tiny": 0.5, "small": 1, "moderate": 2, "large": 3},
    "pneumothorax": {"tiny": 0.5, "small": 1, "moderate": 2, "large": 3},
    "cardiomegaly": {"mild": 1, "moderate": 2, "marked": 3, "severe": 3},
}
"""The words reports grade a finding by, on one ordinal scale per finding."""
NODULE_MARGIN_MM: Final[float] = 1.5
"""A nodule is larger or smaller when its stated diameter moved by at least this much: below
the 2 mm Fleischner calls growth, above the ~1 mm two readers differ by on the same nodule."""
SCALED: Final[frozenset[str]] = frozenset({"nodule", *SEVERITY})
"""Findings with a size: their persistence is larger, smaller or stable. The others (a
consolidation, a fracture) persist as "stable"."""
RULE_MARGIN: Final[float] = 0.15
"""The rule baseline calls a persisting finding larger or smaller when its probability moved
by at least this much (the head knows presence, not size: this is the most a rule can do)."""

_SEVERITY_RE: Final[dict[str, re.Pattern[str]]] = {
    f: re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) for f, words in SEVERITY.items()
}


def stated_sizes(report: str, labels: ReportLabels) -> dict[str, float]:
    """The size each present finding's report states: the nodule's diameter (mm) as the
    labeler reads it, and for graded findings the largest grade word in a sentence that names
    the finding (and no other graded finding, so "small effusion and large heart" is not
    read as a large effusion). Findings the report leaves ungraded are absent from the map."""
    out: dict[str, float] = {}
    if labels.labels.get("nodule") == PRESENT and labels.nodule_size_mm is not None:
        out["nodule"] = float(labels.nodule_size_mm)
    for _, sentence in sentences(report):
        named = mentioned_findings(sentence) & SEVERITY.keys()
        if len(named) != 1:
            continue
        [finding] = named
        if labels.labels.get(finding) != PRESENT:
            continue
        grades = [SEVERITY[finding][m.lower()] for m in _SEVERITY_RE[finding].findall(sentence)]
        if grades:
            out[finding] = max(out.get(finding, 0.0), max(grades))
    return out


def report_changes(
    prior: Mapping[str, int],
    prior_sizes: Mapping[str, float],
    current: Mapping[str, int],
    current_sizes: Mapping[str, float],
) -> dict[str, str | None]:
    """Per finding, the change from the prior report's reading to the current one's; None
    where it is not known (an uncertain label, or a persisting graded finding one report
    leaves ungraded)."""
    out: dict[str, str | None] = {}
    for f in FINDINGS:
        before, now = prior[f], current[f]
        if UNCERTAIN in (before, now):
            out[f] = None
        elif before == ABSENT:
            out[f] = "absent" if now == ABSENT else "new"
        elif now == ABSENT:
            out[f] = "resolved"
        elif f not in SCALED:
            out[f] = "stable"
        elif f in prior_sizes and f in current_sizes:
            out[f] = size_change(f, prior_sizes[f], current_sizes[f])
        else:
            out[f] = None
    return out


def size_change(finding: str, before: float, now: float) -> str:
    margin = NODULE_MARGIN_MM if finding == "nodule" else 0.5
    if now - before >= margin:
        return "larger"
    if before - now >= margin:
        return "smaller"
    return "stable"


def rule_change(p_prior: float, p_current: float, threshold: float) -> str:
    """The baseline the interval head is measured against: each study read alone by the
    finding head, the two decisions compared, the probability's move standing in for size."""
    before, now = p_prior >= threshold, p_current >= threshold
    if not before:
        return "new" if now else "absent"
    if not now:
        return "resolved"
    if p_current - p_prior >= RULE_MARGIN:
        return "larger"
    if p_prior - p_current >= RULE_MARGIN:
        return "smaller"
    return "stable"


def consistent_changes(decided_now: int, decided_before: int | None = None) -> tuple[str, ...]:
    """The changes that agree with the finding head's decisions: on the current study
    (present: new, larger, smaller, stable; absent: absent, resolved; uncertain: any but
    absent, stated with a hedge) and, when given, on the prior (present before: not new;
    absent before: new or absent; uncertain before: no constraint). Whether a finding is new or
    resolved is then the head's call on each study, and the interval head says how a finding
    present in both changed."""
    if decided_now == UNCERTAIN:
        options: tuple[str, ...] = CHANGES[1:]
    elif decided_now == PRESENT:
        options = ("new", *sorted(PERSISTING, key=CHANGES.index))
    else:
        options = ("absent", "resolved")
    if decided_before == PRESENT:
        options = tuple(c for c in options if c not in ("new", "absent"))
    elif decided_before == ABSENT:
        options = tuple(c for c in options if c in ("new", "absent"))
    return tuple(c for c in CHANGES if c in options)


def decide_change(probabilities: Mapping[str, float], decided_now: int, decided_before: int) -> str:
    """The change the reading states: the interval head's most probable change among those
    that agree with the finding head's decisions on the two studies."""
    return max(consistent_changes(decided_now, decided_before), key=lambda c: probabilities[c])


_PHRASES: Final[dict[str, str]] = {
    "new": "is new",
    "larger": "is larger",
    "smaller": "is smaller",
    "stable": "is unchanged",
    "resolved": "has resolved",
}
_HEDGED: Final[dict[str, str]] = {
    "new": "may be new",
    "larger": "may be larger",
    "smaller": "may be smaller",
    "stable": "may be unchanged",
    "resolved": "may have resolved",
}


def comparison_statement(
    changes: Mapping[str, str],
    days_before: int | None,
    uncertain: frozenset[str] = frozenset(),
) -> str:
    """What the report's COMPARISON section states: the prior's age and every finding that
    is present in either study, in FINDINGS order; a finding the head is `uncertain` about
    now is stated with a hedge, as the report states it as possible."""
    when = f"Prior study {days_before} days earlier." if days_before is not None else ""
    parts = [
        f"{DISPLAY_NAMES[f][0].upper()}{DISPLAY_NAMES[f][1:]} "
        f"{(_HEDGED if f in uncertain else _PHRASES)[c]}."
        for f in FINDINGS
        if (c := changes.get(f, "absent")) != "absent"
    ]
    body = " ".join(parts) if parts else "No finding in either study."
    return f"{when} {body}".strip()


_INTERVAL_QUESTION_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(since the (?:prior|previous|last)|compared (?:with|to)|interval|new,|"
    r"changed?|progress(?:ed|ion)?|resolved?|grown|larger|smaller|stable)\b",
    re.IGNORECASE,
)


def interval_question(question: str) -> str | None:
    """The finding an interval question asks about ("Is the effusion new, larger, smaller,
    stable or resolved since the prior?"), or None when it is not one (or names no single
    finding)."""
    if not _INTERVAL_QUESTION_RE.search(question):
        return None
    named = mentioned_findings(question)
    if len(named) != 1:
        return None
    return next(iter(named))
