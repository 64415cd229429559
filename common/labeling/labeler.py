"""Rule-based radiology report labeler: the six findings, per report, from its prose.

Site labels come from report text, as MIMIC-CXR labels come from the CheXpert labeler, so this
module decides what every finding in ``FINDINGS`` is for a study: 1 present, 0 absent (negated,
resolved or never mentioned), -1 uncertain. Per report: sections and sentences (``sections``),
mentions under the written finding definitions (``lexicon``), each mention's status from the
negation / uncertainty engine (``context``), then CheXpert's aggregation (any 1, else any -1,
else 0), with IMPRESSION overriding the body for a finding it mentions. Sides and nodule sizes
feed the training questions. Standard library only, deterministic, never raises on a ``str``.
Conventions and scores: docs/labeler.md, docs/results/labeler.md.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from fedrad.common.findings import ABSENT, FINDINGS, LATERAL_FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.context import SentenceContext, n_words
from fedrad.common.labeling.lexicon import KEYWORDS, MENTION_RES, RELATED_RE
from fedrad.common.labeling.sections import sentences

__all__ = ["ReportLabels", "label_report", "label_reports"]

logger = logging.getLogger(__name__)

_MAX_CHARS: Final[int] = 50_000
"""Longer input is truncated: real reports are a few kB, and the bound keeps latency bounded."""
_SIDE_REACH: Final[int] = 5
"""Words between a side word and the mention it qualifies ("left lower lobe consolidation")."""
_SIZE_REACH: Final[int] = 8
"""Words between a size and its nodule ("nodule in the right upper lobe measuring 8 mm")."""
_MAX_SIZE_MM: Final[float] = 300.0
"""Larger numbers are not nodule sizes (distances, dates misread as sizes)."""

_SIDE_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(?:(?P<left>left)|(?P<right>right)|(?P<both>bilateral(?:ly)?|both|bibasilar|bibasal"
    r"|bi-?apical|bilaterally))\b|(?-i:\b(?P<l>L)\b)|(?-i:\b(?P<r>R)\b)",
    re.IGNORECASE,
)
_SIDE_NAMES: Final[dict[str, str]] = {"left": "left", "l": "left", "right": "right", "r": "right"}
_SIZE_RE: Final[re.Pattern[str]] = re.compile(
    r"(?<![\w.])(\d{1,3}(?:\.\d+)?)\s*(?:(?:x|\u00d7|by)\s*(\d{1,3}(?:\.\d+)?)\s*)?"
    r"(?:(?:x|\u00d7|by)\s*(\d{1,3}(?:\.\d+)?)\s*)?-?\s*(mm|cm|millimet(?:er|re)s?"
    r"|centimet(?:er|re)s?)\b"
)
_INNER_HEDGE_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|questionabl[ey]|perhaps|suspected"
    r"|borderline|equivocal)\b"
)
"""A hedge inside a long mention ("heart size may be mildly enlarged") caps it at uncertain."""


@dataclass(frozen=True)
class ReportLabels:
    """Labels for one report, in the vocabulary of ``fedrad.common.findings``."""

    labels: dict[str, int]
    """Every finding in FINDINGS -> 1 present, 0 absent / negated / not mentioned, -1 uncertain."""
    sides: dict[str, str | None]
    """Every finding -> "left" | "right" | "bilateral" | None, from positive or uncertain
    mentions; cardiomegaly (not lateral) is always None."""
    nodule_size_mm: float | None
    """Largest size stated for a positive or uncertain nodule mention, in mm."""

    def as_vector(self) -> list[int]:
        """Labels in FINDINGS order: the column order of label vectors and the diagnosis head."""
        return [self.labels[f] for f in FINDINGS]


@dataclass(frozen=True)
class _Mention:
    finding: str
    start: int
    end: int
    status: int
    sides: frozenset[str]
    sizes_mm: tuple[float, ...]


@dataclass(frozen=True)
class _Hit:
    """A lexicon match before its status is known."""

    finding: str
    start: int
    end: int
    fixed: int | None
    at_most: int | None
    text: str


def _lower_same_length(text: str) -> str:
    """Lower-case without changing offsets (a few characters lower-case to two)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def _find_mentions(s: str) -> tuple[list[_Hit], list[tuple[int, int]]]:
    """Every mention in a lower-cased sentence, sorted, and the related terms' spans."""
    related = [(m.start(), m.end()) for m in RELATED_RE.finditer(s)]
    hits: list[_Hit] = []
    for finding in FINDINGS:
        if not any(k in s for k in KEYWORDS[finding]):
            continue
        taken = list(related)
        for rx, term in MENTION_RES[finding]:
            for m in rx.finditer(s):
                if any(m.start() < e and st < m.end() for st, e in taken):
                    continue
                taken.append((m.start(), m.end()))
                hits.append(
                    _Hit(finding, m.start(), m.end(), term.status, term.at_most, m.group(0))
                )
    hits.sort(key=lambda h: (h.start, h.end))
    return hits, related


def _sides_near(
    span: tuple[int, int], sides: list[tuple[int, int, str]], blocks: list[tuple[int, int]], s: str
) -> frozenset[str]:
    """Side words just before the mention, else just after; other mentions and terminators
    block the search so "left effusion and right pneumothorax" splits correctly."""

    def blocked(a: int, b: int) -> bool:
        return any(a <= bs and be <= b for bs, be in blocks)

    before = {
        side
        for st, en, side in sides
        if (span[0] <= st and en <= span[1])
        or (en <= span[0] and n_words(s[en : span[0]]) <= _SIDE_REACH and not blocked(en, span[0]))
    }
    if before:
        return frozenset(before)
    after = {
        side
        for st, en, side in sides
        if st >= span[1] and n_words(s[span[1] : st]) <= _SIDE_REACH and not blocked(span[1], st)
    }
    return frozenset(after)


def _size_mm(m: re.Match[str]) -> float | None:
    """Largest dimension of a size match in mm, or None when it cannot be a nodule size."""
    try:
        values = [float(g) for g in m.groups()[:3] if g]
    except ValueError:
        return None
    if not values:
        return None
    unit = m.group(4)
    mm = max(values) * (10.0 if unit.startswith("c") else 1.0)
    return mm if 0.0 < mm <= _MAX_SIZE_MM else None


def _status(hit: _Hit, context: SentenceContext) -> int:
    """A mention's status: its fixed one, else the context's, capped by the term and by a
    hedge inside the mention itself."""
    if hit.fixed is not None:
        return hit.fixed
    status = context.status((hit.start, hit.end))
    if status == PRESENT and hit.at_most is not None:
        status = hit.at_most
    if status == PRESENT and _INNER_HEDGE_RE.search(hit.text):
        status = UNCERTAIN
    return status


def _analyse_sentence(orig: str) -> list[_Mention]:
    """All finding mentions in one sentence, each with its status, sides and sizes."""
    s = _lower_same_length(orig)
    hits, related = _find_mentions(s)
    if not hits:
        return []
    spans = sorted({(h.start, h.end) for h in hits})
    masked = list(s)
    for st, en in [*spans, *related]:
        masked[st:en] = "_" * (en - st)
    context = SentenceContext("".join(masked), spans)

    sides = [
        (m.start(), m.end(), _SIDE_NAMES.get(m.lastgroup or "", "bilateral"))
        for m in _SIDE_RE.finditer(orig)
    ]
    sizes = [(m.start(), m.end(), mm) for m in _SIZE_RE.finditer(s) if (mm := _size_mm(m))]
    # Sizes count as no words when measuring side distance ("mass 3.4 x 5.1 cm in the right").
    unsized = list(s)
    for a, b, _ in sizes:
        unsized[a:b] = "#" * (b - a)
    side_text = "".join(unsized)

    mentions: list[_Mention] = []
    for hit in hits:
        st, en = hit.start, hit.end
        status = _status(hit, context)
        side_set: frozenset[str] = frozenset()
        sizes_mm: tuple[float, ...] = ()
        if status != ABSENT:
            if hit.finding in LATERAL_FINDINGS:
                blocks = [*context.others((st, en)), *context.terms]
                side_set = _sides_near((st, en), sides, blocks, side_text)
                if not side_set and hit.text.endswith(("effusions", "pneumothoraces")):
                    side_set = frozenset({"bilateral"})
            if hit.finding == "nodule":
                sizes_mm = tuple(
                    mm
                    for a, b, mm in sizes
                    if (
                        b <= st
                        and n_words(s[b:st]) <= _SIZE_REACH
                        and not context.terminated(b, st)
                    )
                    or (
                        a >= en
                        and n_words(s[en:a]) <= _SIZE_REACH
                        and not context.terminated(en, a)
                    )
                )
        mentions.append(_Mention(hit.finding, st, en, status, side_set, sizes_mm))
    return mentions


def _aggregate(statuses: Iterable[int]) -> int:
    """CheXpert rule: any positive wins, then any uncertain, else absent."""
    seen = set(statuses)
    if PRESENT in seen:
        return PRESENT
    if UNCERTAIN in seen:
        return UNCERTAIN
    return ABSENT


def _side_of(sides: set[str]) -> str | None:
    if not sides:
        return None
    if "bilateral" in sides or {"left", "right"} <= sides:
        return "bilateral"
    return next(iter(sides))


def label_report(text: str) -> ReportLabels:
    """Label one report; never raises on a ``str`` (non-str input is treated as empty)."""
    if not isinstance(text, str):
        logger.warning(
            "label_report got %s instead of str; labelling it as empty", type(text).__name__
        )
        text = ""
    if len(text) > _MAX_CHARS:
        logger.warning("report of %d characters truncated to %d", len(text), _MAX_CHARS)
        text = text[:_MAX_CHARS]
    by_kind: dict[str, dict[str, list[_Mention]]] = {"findings": {}, "impression": {}}
    for kind, sentence in sentences(text):
        for mention in _analyse_sentence(sentence):
            by_kind[kind].setdefault(mention.finding, []).append(mention)

    labels: dict[str, int] = {}
    sides: dict[str, str | None] = {}
    nodule_size: float | None = None
    for finding in FINDINGS:
        chosen = by_kind["impression"].get(finding) or by_kind["findings"].get(finding) or []
        label = _aggregate(m.status for m in chosen)
        labels[finding] = label
        kept = [m for m in chosen if m.status != ABSENT] if label != ABSENT else []
        # an impression that repeats a finding in short ("Right upper lobe nodule.") keeps
        # the body's detail (size, side) where it states none of its own
        body = [m for m in by_kind["findings"].get(finding, []) if m.status != ABSENT]
        side_words: set[str] = set()
        for m in kept:
            side_words |= m.sides
        if not side_words and kept:
            for m in body:
                side_words |= m.sides
        sides[finding] = _side_of(side_words) if finding in LATERAL_FINDINGS else None
        if finding == "nodule":
            all_sizes = [mm for m in kept for mm in m.sizes_mm]
            if not all_sizes and kept:
                all_sizes = [mm for m in body for mm in m.sizes_mm]
            nodule_size = max(all_sizes) if all_sizes else None
    return ReportLabels(labels=labels, sides=sides, nodule_size_mm=nodule_size)


def mentioned_findings(text: str) -> frozenset[str]:
    """The findings a text names at all, whatever their status ("no effusion" names an
    effusion): what a sentence must lose when it contradicts a decision about them."""
    found: set[str] = set()
    for _, sentence in sentences(text[:_MAX_CHARS] if isinstance(text, str) else ""):
        hits, _ = _find_mentions(_lower_same_length(sentence))
        found.update(hit.finding for hit in hits)
    return frozenset(found)


def label_reports(texts: Iterable[str]) -> list[ReportLabels]:
    """Label many reports in order (the labeler is stateless, so this is a plain map)."""
    return [label_report(t) for t in texts]
