"""How a followed patient's findings evolve from one visit to the next.

Why: to learn "is the effusion new, larger, smaller, stable or resolved since the prior?", a
site needs patients seen more than once whose findings change the way disease does: effusions
and pneumonia mostly clear, nodules mostly sit still or grow slowly, fractures heal, and now and
then something new appears. A course is drawn once per followed patient (from the patient's own
stream), as the findings present at each visit; `changes` and `sizes` read the interval change
and each finding's size off two consecutive visits, for the ground truth.

Works on either kind of finding: drawn radiographs' `cxr_image.Finding` and chest CT's
`chest_ct.CTFinding` (CT studies and DRR radiographs). Sizes move on each finding's own scale:
a nodule's diameter in whole mm, an effusion or pneumothorax small/moderate/large, cardiomegaly
mild/moderate/marked, a consolidation's extent small/moderate/large; a fracture's "size" is its
age (acute, then healed), and healing is reported as stable. Side, zone, lobe, rib and density
persist; where a focal finding sits is fixed by the caller (`anchor_finding`,
`anchor_ct_finding`), so it persists too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import numpy as np

from fedrad.common.findings import FINDINGS
from fedrad.common.interval import CHANGES

from .cxr_image import CARDIAC_DEGREES, CTR_BANDS, SIZES, Finding, cardiac_degree

if TYPE_CHECKING:
    from .chest_ct import CTFinding

F = TypeVar("F", "Finding", "CTFinding")

SCALES: Final[dict[str, tuple[str, ...]]] = {
    "pleural_effusion": SIZES,
    "pneumothorax": SIZES,
    "consolidation": SIZES,
    "cardiomegaly": CARDIAC_DEGREES,
}
"""The graded findings' scales, smallest first (a nodule's is its diameter in mm)."""
FRACTURE_AGES: Final[tuple[str, ...]] = ("acute", "healed")
"""What a fracture's size column holds: healing is not a change of size (reported stable)."""


@dataclass(frozen=True)
class Odds:
    """What becomes of a finding between two visits.

    A present one resolves, grows or shrinks with these chances, else it is stable (a step its
    scale has no room for stays stable too); an absent one appears with chance ``new`` times the
    site's prevalence of the finding, so an ICU's patients develop effusions more often than an
    outpatient clinic's."""

    resolved: float
    larger: float
    smaller: float
    new: float


COURSE_ODDS: Final[dict[str, Odds]] = {
    "pleural_effusion": Odds(resolved=0.35, larger=0.15, smaller=0.25, new=0.30),
    "pneumothorax": Odds(resolved=0.55, larger=0.10, smaller=0.20, new=0.20),
    "consolidation": Odds(resolved=0.45, larger=0.10, smaller=0.25, new=0.30),
    "cardiomegaly": Odds(resolved=0.03, larger=0.10, smaller=0.07, new=0.10),
    "nodule": Odds(resolved=0.05, larger=0.20, smaller=0.05, new=0.15),
    "fracture": Odds(resolved=0.03, larger=0.0, smaller=0.0, new=0.15),
}
"""Effusions, pneumothoraces and consolidation are treated and mostly clear; a heart rarely
changes degree; most nodules are stable and a growing one is the one that matters; a fracture
heals in place (a healed rib stays visible)."""
NODULE_MM: Final[tuple[int, int]] = (3, 30)
"""A followed nodule's diameter stays in this range (mm)."""
GROW_MM: Final[tuple[int, int]] = (2, 5)
"""A growing nodule gains this many mm (2 mm: Fleischner's smallest growth)."""
SHRINK_MM: Final[tuple[int, int]] = (2, 3)
"""A shrinking nodule loses this many mm: at least 2, as a 1 mm difference is two readers'
disagreement on one nodule, not a change (`fedrad.common.interval.NODULE_MARGIN_MM`)."""
NEW_NODULE_MM: Final[tuple[int, int]] = (5, 10)
"""A newly seen nodule is small: its drawn diameter is capped at a draw from this range."""
HEAL_DAYS: Final[int] = 42
"""A rib fracture seen this long after it appeared has healed (callus, no gap)."""
GAP_DAYS: Final[tuple[int, int]] = (14, 400)
"""Days between two visits of a followed patient."""


def draw_gaps(visits: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Days between consecutive visits (``visits - 1`` of them)."""
    lo, hi = GAP_DAYS
    return tuple(int(g) for g in rng.integers(lo, hi + 1, size=max(0, visits - 1)))


def draw_course(
    first: Sequence[F],
    gaps_days: Sequence[int],
    rng: np.random.Generator,
    *,
    sample: Callable[[str, np.random.Generator], F],
    prevalence: Mapping[str, float],
) -> tuple[tuple[F, ...], ...]:
    """The findings at each visit, in FINDINGS order: the first visit's as drawn (nodules to
    whole mm, consolidations given an extent), then one step of `COURSE_ODDS` per gap.
    ``sample`` draws a new finding's details (`sample_finding` or `sample_ct_finding`);
    ``prevalence`` is the site's share of studies with each finding."""
    current = {f.name: _followable(f, rng) for f in first}
    onset = dict.fromkeys(current, 0)
    day = 0
    visits = [_ordered(current)]
    for gap in gaps_days:
        day += int(gap)
        after: dict[str, F] = {}
        for name in FINDINGS:
            f = current.get(name)
            if f is None:
                if rng.random() < COURSE_ODDS[name].new * prevalence.get(name, 0.0):
                    after[name] = _appeared(sample(name, rng), rng)
                    onset[name] = day
                continue
            nxt = _step(f, day - onset[name], rng)
            if nxt is not None:
                after[name] = nxt
        current = after
        visits.append(_ordered(current))
    return tuple(visits)


def changes(prior: Sequence[F], current: Sequence[F]) -> dict[str, str]:
    """Per finding in FINDINGS, its change (one of CHANGES) from ``prior`` to ``current``."""
    before, now = {f.name: f for f in prior}, {f.name: f for f in current}
    out = {}
    for name in FINDINGS:
        a, b = before.get(name), now.get(name)
        if a is None:
            out[name] = "absent" if b is None else "new"
        elif b is None:
            out[name] = "resolved"
        else:
            ra, rb = _rank(a), _rank(b)
            out[name] = "larger" if rb > ra else "smaller" if rb < ra else "stable"
    return out


def sizes(findings: Sequence[F]) -> dict[str, str]:
    """Per finding in FINDINGS, its size on its own scale ("" if absent): nodule diameter in
    mm, a `SCALES` grade, a fracture's `FRACTURE_AGES` entry."""
    out = dict.fromkeys(FINDINGS, "")
    for f in findings:
        if f.name == "nodule":
            out[f.name] = f"{f.size_mm or 0.0:g}"
        elif f.name == "fracture":
            out[f.name] = FRACTURE_AGES[int(f.chronic)]
        else:
            out[f.name] = _grade(f) or ""
    return out


def largest_nodule_mm(course: Sequence[Sequence[F]]) -> float:
    """The largest nodule diameter a course reaches (0 without one): where the nodule is
    placed must hold it at that size."""
    return max((f.size_mm or 0.0 for v in course for f in v if f.name == "nodule"), default=0.0)


# --------------------------------------------------------------------------------------------


def _ordered(found: Mapping[str, F]) -> tuple[F, ...]:
    return tuple(found[n] for n in FINDINGS if n in found)


def _followable(f: F, rng: np.random.Generator) -> F:
    """A first-visit finding with what a course steps on: a nodule in whole mm, a
    consolidation's extent."""
    if f.name == "nodule":
        lo, hi = NODULE_MM
        return _resized(f, float(min(hi, max(lo, round(f.size_mm or 8.0)))))
    if f.name == "consolidation" and f.extent is None:
        return dataclasses.replace(f, extent=SIZES[int(rng.choice(3, p=(0.3, 0.45, 0.25)))])
    return f


def _appeared(f: F, rng: np.random.Generator) -> F:
    """A finding new since the prior visit: a nodule small, a fracture acute."""
    if f.name == "nodule":
        cap = int(rng.integers(NEW_NODULE_MM[0], NEW_NODULE_MM[1] + 1))
        return _followable(_resized(f, float(min(cap, round(f.size_mm or cap)))), rng)
    if f.name == "fracture":
        return dataclasses.replace(f, chronic=False)
    return _followable(f, rng)


def _step(f: F, age_days: int, rng: np.random.Generator) -> F | None:
    """The finding at the next visit (None: resolved); ``age_days`` since it appeared."""
    odds = COURSE_ODDS[f.name]
    u = rng.random()
    if u < odds.resolved:
        return None
    if f.name == "fracture":
        return dataclasses.replace(f, chronic=True) if age_days >= HEAL_DAYS else f
    if u < odds.resolved + odds.larger:
        return _grown(f, +1, rng)
    if u < odds.resolved + odds.larger + odds.smaller:
        return _grown(f, -1, rng)
    return f


def _grown(f: F, direction: int, rng: np.random.Generator) -> F:
    """One step up (+1) or down (-1) its scale; unchanged where the scale has no room."""
    if f.name == "nodule":
        lo, hi = NODULE_MM
        size = f.size_mm or 8.0
        step_lo, step_hi = GROW_MM if direction > 0 else SHRINK_MM
        if not lo <= size + direction * step_lo <= hi:
            return f
        target = size + direction * int(rng.integers(step_lo, step_hi + 1))
        return _resized(f, float(min(hi, max(lo, target))))
    scale = SCALES[f.name]
    i = scale.index(_grade(f) or scale[0]) + direction
    if not 0 <= i < len(scale):
        return f
    return _graded(f, scale[i], rng)


def _grade(f: Finding | CTFinding) -> str | None:
    """A graded finding's place on its `SCALES` scale."""
    if f.name == "consolidation":
        return f.extent
    if isinstance(f, Finding):
        return cardiac_degree(f.ctr or 0.6) if f.name == "cardiomegaly" else f.size
    return f.severity


def _graded(f: F, grade: str, rng: np.random.Generator) -> F:
    """The finding at another grade; a drawn heart gets a ratio within the grade's band."""
    if f.name == "consolidation":
        return dataclasses.replace(f, extent=grade)
    if isinstance(f, Finding):
        if f.name == "cardiomegaly":
            lo, hi = CTR_BANDS[grade]
            return dataclasses.replace(f, ctr=round(float(rng.uniform(lo, hi)), 3))
        return dataclasses.replace(f, size=grade)
    return dataclasses.replace(f, severity=grade)


def _rank(f: Finding | CTFinding) -> float:
    if f.name == "nodule":
        return float(f.size_mm or 0.0)
    if f.name == "fracture":
        return 0.0  # healing is not a change of size
    scale = SCALES[f.name]
    return float(scale.index(_grade(f) or scale[0]))


def _resized(f: F, mm: float) -> F:
    """A nodule at another diameter; a part-solid one's solid core scaled with it."""
    solid = getattr(f, "solid_mm", None)
    if solid is None or not f.size_mm:
        return dataclasses.replace(f, size_mm=mm)
    core = float(np.clip(round(solid * mm / f.size_mm), 1, max(1.0, mm - 1)))
    return dataclasses.replace(f, size_mm=mm, solid_mm=core)


__all__ = [
    "CHANGES",
    "COURSE_ODDS",
    "FRACTURE_AGES",
    "GAP_DAYS",
    "SCALES",
    "Odds",
    "changes",
    "draw_course",
    "draw_gaps",
    "largest_nodule_mm",
    "sizes",
]
