"""The current study read beside the patient's prior: checks that the two may be compared, the
interval head's change per finding, and what the report and answers say about it.

A comparison is made only between two scans of one kind whose headers name the same patient
(compared as pseudonyms under a key the reading makes for itself) and whose dates put the prior
strictly first. Anything else leaves the comparison out with the reason, never a comparison
across patients. The change is the interval head's, kept to the finding head's decision on the
current study as the report is; the rule that compares the two studies' finding probabilities
is computed beside it, for the record and for evaluation.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field

import torch

from fedrad.client.ingest.deid import PseudonymKey
from fedrad.common.findings import FINDINGS
from fedrad.common.interval import (
    CHANGES,
    comparison_statement,
    decide_change,
    rule_change,
)
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.tasks import Thresholds, suggestions


@dataclass(frozen=True)
class Identity:
    """Who and when a scan is, as far as comparing two scans needs: the patient's pseudonym
    under a key the reading made for itself (never stored) and the study date, which stays in
    this process (a page states only the interval in days)."""

    patient: str  # "" when the header names no patient
    study_date: dt.date | None


@dataclass(frozen=True)
class Scan:
    """One scan as the reading holds it: the model input, its kind, how it was read, and
    its identity (which never leaves this process)."""

    tensor: torch.Tensor  # (1, 1, S, S) or (1, 1, D, H, W)
    modality: str  # RADIOGRAPH, CT or MR
    description: str  # "radiograph", "CT volume of 133 slices"
    identity: Identity


def reading_key() -> PseudonymKey:
    """The key one reading compares patients under: fresh, held in memory, never stored."""
    return PseudonymKey(secrets.token_bytes(32))


def prior_problem(current: Scan, prior: Scan) -> str | None:
    """Why `prior` cannot be compared with `current`, or None when it can."""
    if prior.modality != current.modality:
        return (
            f"the prior is a {prior.description} and the current study a "
            f"{current.description}: a comparison needs the same kind of scan"
        )
    if not prior.identity.patient or not current.identity.patient:
        which = "prior's" if not prior.identity.patient else "current study's"
        return f"the {which} header names no patient: it cannot be told to be the same patient"
    if prior.identity.patient != current.identity.patient:
        return "the prior belongs to another patient (the patient pseudonyms differ)"
    before, now = prior.identity.study_date, current.identity.study_date
    if before is None or now is None:
        which = "prior's" if before is None else "current study's"
        return f"the {which} header has no study date: the two cannot be put in order"
    if before > now:
        return f"the prior is newer than the current study (by {(before - now).days} days)"
    if before == now:
        return "the prior was taken on the same day as the current study: there is no interval"
    return None


@dataclass(frozen=True)
class Comparison:
    """The comparison with the prior, or why it was left out (`compared` False)."""

    compared: bool
    reason: str | None = None
    days_before: int | None = None
    changes: dict[str, str] = field(default_factory=dict)  # per finding, one of CHANGES
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)  # interval head
    prior_findings: dict[str, float] = field(default_factory=dict)  # the head on the prior
    rule: dict[str, str] = field(default_factory=dict)  # the probability-comparing baseline
    statement: str = ""

    @staticmethod
    def left_out(reason: str) -> Comparison:
        return Comparison(compared=False, reason=reason)


def compare(
    model: RadiologyModel,
    current: Scan,
    prior: Scan,
    *,
    shown: dict[str, float],
    decided: dict[str, int],
    prior_shown: dict[str, float],
    thresholds: Thresholds,
) -> Comparison:
    """The interval head's change per finding between two comparable scans: its most
    probable change among those that agree with the finding head's decisions on both studies
    (`interval.consistent_changes`; a finding uncertain now is stated with a hedge)."""
    problem = prior_problem(current, prior)
    if problem is not None:
        return Comparison.left_out(problem)
    assert prior.identity.study_date is not None and current.identity.study_date is not None
    days = (current.identity.study_date - prior.identity.study_date).days
    [table] = model.interval_change(current.tensor, prior.tensor).tolist()
    probabilities = {
        f: {c: round(p, 4) for c, p in zip(CHANGES, row, strict=True)}
        for f, row in zip(FINDINGS, table, strict=True)
    }
    before = suggestions(prior_shown, thresholds)
    changes = {f: decide_change(probabilities[f], decided[f], before[f]) for f in FINDINGS}
    uncertain = frozenset(f for f in FINDINGS if decided[f] == -1)
    rule = {f: rule_change(prior_shown[f], shown[f], thresholds.present) for f in FINDINGS}
    return Comparison(
        compared=True,
        days_before=days,
        changes=changes,
        probabilities=probabilities,
        prior_findings=prior_shown,
        rule=rule,
        statement=comparison_statement(changes, days, uncertain),
    )
