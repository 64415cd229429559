"""Negation, uncertainty and resolution around a mention: a NegEx / ConText engine.

A mention's status comes from the cues around it in its sentence: pre-triggers ("no", "free
of", "possible"), post-triggers ("is not seen", "has resolved", "cannot be excluded"),
bidirectional ones ("versus", "unlikely"), pseudo-triggers consumed first because they look like
negation but keep the finding ("no change in", "nearly resolved"), and termination terms that end
a scope ("but", "however", ";"). A trigger's scope runs through a coordinated list ("the lungs are
clear of A, B or C", "A, B and C are not seen"), item by item across commas, and stops at a new
clause. The nearer of a negation and an uncertainty cue wins. Designs followed: NegEx (Chapman et
al. 2001), ConText (Harkema et al. 2009) and the CheXpert labeler's pre-negation uncertainty; the
conventions are in docs/labeler.md and pinned by tests/common/test_labeler.py.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass
from typing import Final, Literal

from fedrad.common.findings import ABSENT, PRESENT, UNCERTAIN

_PRE_REACH: Final[int] = 6
"""Words a pre-trigger may skip before its first list item ("no definite evidence of ... X")."""
_POST_REACH: Final[int] = 6
"""Words between a mention and its post-trigger ("X previously seen at the apex has resolved")."""
_ITEM_WORDS: Final[int] = 4
"""Words in one list item that is not a mention ("no consolidation, suspicious pulmonary
opacity, large pleural effusion, or pneumothorax"): a longer stretch is a new clause."""
_BACK_ITEM_WORDS: Final[int] = 3
"""Backward, a cue reaches past short items only ("pneumothorax or pneumomediastinum is not
seen", "pneumothorax small, on the left, if any"), and back across a comma only when it follows
the comma directly: in "effusions and consolidation, superimposed infection cannot be excluded"
the cue is about the infection."""
_CLOSE_REACH: Final[int] = 3
"""A "?" or a hypothetical cue only qualifies a mention close to it ("? pneumonia",
"effusion?", "sensitivity to detect a pneumothorax")."""
_WINDOW_CHARS: Final[int] = 300
"""Triggers further than this from a mention are never tried (keeps long sentences linear)."""

_TriggerKind = Literal[
    "pseudo", "neg_pre", "neg_post", "neg_both", "hypo", "unc_pre", "unc_post", "unc_both", "term"
]
"""Trigger families; a literal "?" is one more ("q"), matched outside the word triggers."""

_SEEN = (
    r"(?:seen|identified|present|visualized|visualised|appreciated|evident|demonstrated|noted"
    r"|detected|visible|apparent|observed|shown|depicted)"
)
_TRIGGERS: Final[dict[_TriggerKind, list[str]]] = {
    # Consumed first; they look like negation or resolution but keep the finding.
    "pseudo": [
        r"not only",
        r"(?:absent|absence of|no) (?:peripheral )?(?:lung|pulmonary|vascular) markings",
        r"(?:lung|pulmonary|vascular) markings (?:are |is )?(?:absent|not seen)",
        r"(?:(?:most |more |less )?(?:probabl[ey]|likely)|possibly) (?:\w+ )?"
        r"(?:unchanged|stable|similar|improved|improving|increased|increasing|decreased"
        r"|decreasing|worse|worsened|worsening|smaller|larger|accentuated|exaggerated)",
        r"no (?:\w+ ){0,2}?(?:change|changes|increase|decrease|worsening|progression"
        r"|improvement|difference|enlargement|growth)",
        r"without (?:\w+ ){0,2}?(?:change|changes|increase|worsening|progression)",
        r"not (?:\w+ )?(?:changed|increased|worsened|improved|different)",
        r"(?:near(?:ly)?|almost|largely|mostly|partial(?:ly)?|incomplete(?:ly)?|not"
        r" (?:completely|fully|entirely)|near[- ]complete|near[- ]total)"
        r" (?:completely |entirely |fully )?(?:resolved|resolution|cleared|clearing)",
        r"gram[- ]negative",
        r"no longer (?:\w+ )?(?:intubated|requires?|needs?)",
    ],
    "unc_post": [
        r"(?:can ?not|could not|can't|may not|not|cannot) (?:\w+ ){0,2}?(?:be )?(?:excluded"
        r"|ruled out)",
        r"(?:is|are|be|remains?) (?:\w+ )?(?:difficult|hard) to (?:exclude|rule out)",
        r"(?:is|are|remains?) (?:also |still |more |less )?(?:thought |felt |considered )?"
        r"(?:possible|likely|probable|suspected"
        r"|questioned|questionable|favored|favoured|considered|a consideration|a possibility"
        r"|in the differential|equivocal|borderline|uncertain|indeterminate)"
        r"(?=\s*(?:[.,;:)?]|$)|\s(?:and|but|or|although|though|which|given|in|on|at|with|since|as"
        r"|if|versus|vs|bilaterally|again)\b)",
        r"(?:may|might|could) (?:also |still )?(?:be )?(?:present|seen|exist)",
        r"(?:is|are) presumed|(?:is|are) (?:\w+ )?(?:difficult|hard) to (?:identify|see|assess)",
        r"impossible to (?:say|exclude|tell)",
        r"likely present",
        r"(?:cannot|can not|could not) be (?:\w+ )?(?:assessed|evaluated)",
    ],
    "unc_pre": [
        r"(?:can ?not|could not|can't|cannot|unable to|difficult to|hard to|does not|do not"
        r"|not) (?:\w+ )?(?:exclude|rule out)",
        r"possibl[ey]|probabl[ey]|likely|maybe|perhaps|may|might|could",
        r"questionabl[ey]|question of|questioned|question|if there (?:is|are|were)(?: any)?",
        r"suspicious (?:for|of)|suspicion (?:for|of)|suspect(?:ed)?",
        r"concern(?:ing)? (?:for|of)|worrisome (?:for|of)|to indicate",
        r"suggest(?:s|ed|ing|ive of|ion of)?",
        r"consider(?:ed|ing)?|differential (?:diagnosis )?(?:includes?|of)",
        r"equivocal|borderline|indeterminate|uncertain|unclear",
        r"possibility (?:of|for)|presum(?:ed|ably|ptive)|potential(?:ly)?",
        r"rule out|r/o|raises? (?:the )?(?:possibility|question|concern) (?:of|for)",
    ],
    "unc_both": [
        r"versus|vs\b\.?|and/or|(?:(?:small|minimal|trace|tiny|mild),? )?if (?:any|present)"
    ],
    "neg_post": [
        rf"(?:is |are |was |were )?not (?:\w+ )?{_SEEN}",
        r"(?:is |are )?absent",
        # a checklist answer: "Pneumothorax: none."
        rf":\s*(?:none|no|negative|absent|nil)(?: {_SEEN})?(?=\s*(?:[.,;]|$))",
        rf":\s*not (?:\w+ )?{_SEEN}",
        r"(?:has |have )?(?:been )?(?:ruled out|excluded)",
        rf"(?:is |are )?no longer (?:\w+ )?{_SEEN}",
        r"(?:has |have )?(?:been )?removed",
        r"(?:is |are )gone|(?:has |have )disappeared",
    ],
    # Resolution reads both ways: "resolved pneumothorax", "the effusion has resolved".
    "neg_both": [
        r"(?:has |have |had )?(?:now |since |completely |entirely |fully )?(?:resolved|cleared)",
        r"(?:is |are |very |highly )?unlikely",
    ],
    # Not an assertion at all: "sensitivity to detect pneumothorax is diminished".
    "hypo": [
        r"(?:to )?detect(?:ion of)?|sensitivity (?:for|to)|(?:to )?(?:evaluate|assess|look|screen)"
        r" for|evaluation (?:for|of)|assessment (?:for|of)",
        r"(?:limits?|limiting|limited) (?:the )?(?:evaluation|assessment|detection|sensitivity)"
        r"(?: (?:for|of))?",
        r"simulat(?:e|es|ing)|mimic(?:s|king)?|rather than",
    ],
    "neg_pre": [
        r"no|nil|without|w/o|neither|nor|never",
        r"negative for|free of|clear of|absence of|mistaken for",
        r"no (?:\w+ ){0,2}?(?:evidence|signs?|findings?|features?) (?:of|for|to suggest)",
        r"(?:does|do|did) not (?:\w+ )?(?:show|demonstrate|reveal|display)|fails? to"
        r" (?:show|demonstrate|reveal)",
        r"(?:interval |complete |total )?resolution of|no longer|removal of",
        r"clearing of|clearance of",
    ],
    "term": [
        r"but|however|although|though|which|whereas|while|yet|nevertheless|otherwise",
        r"aside from|apart from|except(?: for)?|other than|with the exception of|besides",
        r"and (?=(?:the|there|this|these|now|a|an)\b)",
        r"(?:in addition|additionally)",
    ],
}
_RAW_TERMS: Final[tuple[str, ...]] = (r";", r":(?!\d)")
"""Punctuation terminators, used without word boundaries (a colon in "4:45" is no boundary)."""
_EVIDENTIAL_RE: Final[re.Pattern[str]] = re.compile(
    r"^(?:suggest|concern|worrisome|suspicious|suspicion|to indicate)"
)
_PRE_KINDS: Final[frozenset[str]] = frozenset(
    {"neg_pre", "neg_both", "hypo", "unc_pre", "unc_both", "q"}
)
_POST_KINDS: Final[frozenset[str]] = frozenset(
    {"neg_post", "neg_both", "unc_post", "unc_both", "q"}
)
_NEG_KINDS: Final[frozenset[str]] = frozenset({"neg_pre", "neg_post", "neg_both", "hypo"})
_ADJACENT_REACH: Final[int] = 2
"""Reach of triggers that only qualify an adjacent mention: "resolved pneumothorax" (while "the
effusion has resolved, small pneumothorax persists" keeps the pneumothorax), "atelectasis versus
pneumonia" (while in "consolidation at the left base, atelectasis versus pneumonia" the
consolidation itself is certain), "collapse and/or consolidation"."""
_RESOLVED_REACH: Final[int] = 4
"""Forward, "resolved" / "cleared" / "unlikely" reach a mention in the same phrase ("cleared
right lower lobe consolidation"), never across a comma or a list."""
_ADJACENT_RE: Final[re.Pattern[str]] = re.compile(r"^(?:versus|vs|and/or)")
_ADJACENT_FORWARD_RE: Final[re.Pattern[str]] = re.compile(r"^(?:small|minimal|trace|tiny|mild|if)")
"""Forward only: "small if any bilateral effusions", but not "effusion is small if any,
alongside the displaced fractures"; backward, "pneumothorax small, on the left, if any"."""


def _wrap(fragment: str) -> str:
    """Word boundaries around a word fragment, so "no" never fires inside "nodule"."""
    return rf"\b(?:{fragment})\b"


def _build_trigger_re() -> re.Pattern[str]:
    """One alternation, kinds in priority order; at one position the first kind listed wins."""
    order: list[_TriggerKind] = [
        "pseudo",
        "unc_post",
        "unc_pre",
        "unc_both",
        "neg_post",
        "neg_both",
        "hypo",
        "neg_pre",
        "term",
    ]
    parts = []
    for kind in order:
        alts = [_wrap(a) for frag in _TRIGGERS[kind] for a in _split_top_level(frag)]
        if kind == "term":
            alts.extend(_RAW_TERMS)
        parts.append(f"(?P<{kind}>{'|'.join(alts)})")
    parts.append(r"(?P<q>\?)")
    return re.compile("|".join(parts))


def _split_top_level(fragment: str) -> list[str]:
    """Split a fragment on its top-level '|' so each alternative gets its own boundaries."""
    out, depth, start = [], 0, 0
    i, in_class = 0, False
    while i < len(fragment):
        ch = fragment[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(fragment[start:i])
            start = i + 1
        i += 1
    out.append(fragment[start:])
    return out


_TRIGGER_RE: Final[re.Pattern[str]] = _build_trigger_re()
_WORD_RE: Final[re.Pattern[str]] = re.compile(r"\w+")
_CONNECTOR_SPLIT_RE: Final[re.Pattern[str]] = re.compile(r",|/|\b(?:and|or|nor|as well as)\b")
_COMMA_RE: Final[re.Pattern[str]] = re.compile(r"[,/]")
_VERB_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(?:is|are|was|were|has|have|had|remains?|appears?|seen|noted|persists?|unchanged|stable"
    r"|new|increased|decreased|improved|worsened|again|there|demonstrates?|shows?)\b"
)
"""Words that open a new clause between two list items ("no effusion, stable cardiomegaly");
after "or" / "nor" an item is always one more alternative ("no pneumothorax or new effusion")."""


@dataclass(frozen=True)
class Trigger:
    """One cue in a sentence, by family (``_TriggerKind`` or "q")."""

    kind: str
    start: int
    end: int
    text: str


def n_words(text: str) -> int:
    """Words in a stretch of text (a masked mention counts as one)."""
    return len(_WORD_RE.findall(text))


def _items(gap: str) -> list[tuple[str, bool]]:
    """A gap cut at its list connectors: (segment, follows "or"/"nor")."""
    out: list[tuple[str, bool]] = []
    pos, disjunct = 0, False
    for m in _CONNECTOR_SPLIT_RE.finditer(gap):
        out.append((gap[pos : m.start()], disjunct))
        disjunct = m.group(0) in ("or", "nor")
        pos = m.end()
    out.append((gap[pos:], disjunct))
    return out


def _list_items_ok(segments: list[tuple[str, bool]]) -> bool:
    """Every segment reads as one list item: short, and no new clause unless after "or"."""
    return all(
        n_words(seg) <= _ITEM_WORDS and (disjunct or _VERB_RE.search(seg) is None)
        for seg, disjunct in segments
    )


def list_link(gap: str) -> bool:
    """Two mentions read as items of one list: joined by a connector, no new clause between."""
    segments = _items(gap)
    if len(segments) == 1:
        return gap.strip(" _") == ""
    return _list_items_ok(segments)


def _lead_ok(gap: str, reach: int, *, forward: bool) -> bool:
    """From a trigger to the first (or, backward, last) mention it governs: the stretch next to
    the trigger within reach, and any list items beyond it short and clause-free."""
    segments = _items(gap)
    if len(segments) == 1:
        return n_words(gap) <= reach
    if reach < _PRE_REACH:
        # "atelectasis versus consolidation", "resolved pneumothorax": adjacent only.
        return False
    near, rest = (segments[0], segments[1:]) if forward else (segments[-1], segments[:-1])
    if not forward and (
        (n_words(near[0]) > 0 and _COMMA_RE.search(gap) is not None)
        or any(n_words(seg) > _BACK_ITEM_WORDS for seg, _ in rest)
    ):
        return False
    return n_words(near[0]) <= reach and _list_items_ok(rest)


def _reach(trig: Trigger, *, forward: bool) -> int:
    """How many words a trigger may skip to reach its nearest mention."""
    if trig.kind in ("q", "hypo"):
        return _CLOSE_REACH
    if forward and trig.kind == "neg_both":
        return _RESOLVED_REACH
    if _ADJACENT_RE.match(trig.text) or (forward and _ADJACENT_FORWARD_RE.match(trig.text)):
        return _ADJACENT_REACH
    return _PRE_REACH if forward else _POST_REACH


def _between(spans: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """Mention spans lying wholly inside [a, b); ``spans`` is sorted by start."""
    lo = bisect.bisect_left(spans, (a, -1))
    out = []
    for sp in spans[lo:]:
        if sp[0] >= b:
            break
        if sp[1] <= b:
            out.append(sp)
    return out


class SentenceContext:
    """The cues of one sentence, whose mentions are masked: ask it for a mention's status."""

    def __init__(self, masked: str, spans: list[tuple[int, int]]) -> None:
        self._s = masked
        self._spans = spans
        self.triggers = [
            Trigger(m.lastgroup or "term", m.start(), m.end(), m.group(0))
            for m in _TRIGGER_RE.finditer(masked)
        ]
        self.terms = [(t.start, t.end) for t in self.triggers if t.kind == "term"]
        self._active = [t for t in self.triggers if t.kind not in ("term", "pseudo")]

    def terminated(self, a: int, b: int) -> bool:
        """Whether a termination term lies wholly inside [a, b)."""
        i = bisect.bisect_left(self.terms, (a, -1))
        return i < len(self.terms) and self.terms[i][1] <= b

    def others(self, span: tuple[int, int]) -> list[tuple[int, int]]:
        """The sentence's mention spans that do not overlap ``span``."""
        st, en = span
        return [sp for sp in self._spans if not (sp[0] < en and st < sp[1])]

    def status(self, span: tuple[int, int]) -> int:
        """PRESENT, ABSENT or UNCERTAIN for the mention at ``span``."""
        st, en = span
        others = self.others(span)
        negs: list[int] = []
        uncs: list[int] = []
        for t in self._active:
            if not self._applies(t, span, others):
                continue
            before = t.end <= st
            neg = t.kind in _NEG_KINDS or (before and self._negated_cue(t))
            (negs if neg else uncs).append(st - t.end if before else t.start - en)
        if not negs and not uncs:
            return PRESENT
        if not uncs:
            return ABSENT
        if not negs:
            return UNCERTAIN
        return ABSENT if min(negs) < min(uncs) else UNCERTAIN

    def _applies(self, t: Trigger, span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
        """Whether a trigger reaches a mention from before or after it, within one clause."""
        st, en = span
        s = self._s
        if t.end <= st:
            if t.kind not in _PRE_KINDS or st - t.end > _WINDOW_CHARS:
                return False
            if self.terminated(t.end, st):
                return False
            between = _between(others, t.end, st)
            first = between[0] if between else span
            chain = [*between, span]
        else:
            if t.start < en or t.kind not in _POST_KINDS or t.start - en > _WINDOW_CHARS:
                return False
            if self.terminated(en, t.start):
                return False
            between = _between(others, en, t.start)
            first = between[-1] if between else span
            chain = [span, *between]
        forward = t.end <= st
        lead = s[t.end : first[0]] if forward else s[first[1] : t.start]
        if not _lead_ok(lead, _reach(t, forward=forward), forward=forward):
            return False
        return all(list_link(s[a[1] : b[0]]) for a, b in itertools.pairwise(chain))

    def _negated_cue(self, cue: Trigger) -> bool:
        """An evidential cue under a negation ("no consolidation to suggest pneumonia") negates."""
        if _EVIDENTIAL_RE.match(cue.text) is None:
            return False
        return any(
            t.kind == "neg_pre"
            and t.end <= cue.start
            and not self.terminated(t.end, cue.start)
            and n_words(self._s[t.end : cue.start]) <= _PRE_REACH
            for t in self.triggers
        )
