"""Rule-based radiology report labeler (NegEx / CheXpert-labeler style), standard library only.

Site labels come from report text, as MIMIC-CXR labels come from the CheXpert labeler, so this
module decides what every finding in ``FINDINGS`` is for a study: 1 present, 0 absent (negated,
resolved or never mentioned), -1 uncertain. It is deterministic and never raises on a ``str``.
Per report: sections (INDICATION and the like dropped; IMPRESSION overrides the rest for what it
mentions), sentences, mentions from a synonym lexicon, NegEx-style trigger scope (the nearer of
a negation and an uncertainty cue wins), then CheXpert's aggregation (any 1, else any -1, else
0). The conventions for ambiguous phrasings ("no definite X", resolution, old fractures,
hedges), pinned by tests/common/test_labeler.py, and the labeler's scores:
docs/results/labeler.md.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from fedrad.common.findings import ABSENT, FINDINGS, LATERAL_FINDINGS, PRESENT, UNCERTAIN

logger = logging.getLogger(__name__)

_MAX_CHARS: Final[int] = 50_000
"""Longer input is truncated: real reports are a few kB, and the bound keeps latency bounded."""

_PRE_REACH: Final[int] = 6
"""Words a pre-trigger may skip before its first mention ("no definite evidence of ... X")."""
_POST_REACH: Final[int] = 6
"""Words between a mention and its post-trigger ("X previously seen at the apex has resolved")."""
_LIST_REACH: Final[int] = 4
"""Words between two list items that share one trigger ("no effusion, or focal consolidation")."""
_CLOSE_REACH: Final[int] = 3
"""A "?" or a hypothetical cue only qualifies a mention close to it ("? pneumonia",
"effusion?", "sensitivity to detect a pneumothorax")."""
_SIDE_REACH: Final[int] = 5
"""Words between a side word and the mention it qualifies ("left lower lobe consolidation")."""
_SIZE_REACH: Final[int] = 8
"""Words between a size and its nodule ("nodule in the right upper lobe measuring 8 mm")."""
_WINDOW_CHARS: Final[int] = 300
"""Triggers further than this from a mention are never tried (keeps long sentences linear)."""
_MAX_SENTENCE_CHARS: Final[int] = 1_000
"""Longer "sentences" (unpunctuated dumps) are cut at whitespace into pieces of this size."""
_MAX_SIZE_MM: Final[float] = 300.0
"""Larger numbers are not nodule sizes (distances, dates misread as sizes)."""

SectionKind = Literal["findings", "impression", "ignore"]
_TriggerKind = Literal[
    "pseudo", "neg_pre", "neg_post", "neg_both", "hypo", "unc_pre", "unc_post", "unc_both", "term"
]
"""Trigger families; a literal "?" is one more ("q"), matched outside the word triggers."""


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


# --------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------

_HEART = (
    r"(?:heart(?: size)?|cardiac (?:silhouette|size|shadow|contours?|diameter)"
    r"|size of the (?:heart|cardiac silhouette)|heart shadow)"
)
_HEART_OR_CM = rf"(?:{_HEART}|cardiomediastinal (?:silhouette|contours?|size))"
_NOT_FILLER = (
    r"(?!(?:not|no|normal|top|upper|high|borderline|with|without|and|but|of|in|on|from"
    r"|which|there)\b)"
)

# (pattern, fixed status or None). Within a finding, earlier patterns win overlapping spans, so
# fixed-status phrases come before the generic mention patterns.
_LEXICON: Final[dict[str, list[tuple[str, int | None]]]] = {
    "nodule": [
        (r"\bnodul(?:e|es|i)\b", None),
        (r"\bnodular (?:[\w-]+ ){0,3}?(?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)\b", None),
        (r"\bmass[- ]?like (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)\b", None),
        (r"\bmicronodul(?:e|es|ar)\b", None),
        (
            r"(?<!mediastinal )(?<!soft tissue )(?<!breast )(?<!thyroid )(?<!neck )(?<!abdominal )"
            r"\bmass(?:es)?\b(?! effect| in the (?:\w+ )?(?:mediastinum|neck|abdomen|breast))",
            None,
        ),
        (r"\b(?:calcified )?granulom(?:a|as|ata)\b", None),
        (r"\b(?:lung|pulmonary|parenchymal|cavitary|cavitating|spiculated|coin) lesions?\b", None),
        (r"\b(?:lung|pulmonary) (?:tumou?rs?|neoplasms?|metastas[ie]s)\b", None),
    ],
    "pleural_effusion": [
        (
            r"\b(?:sharp|clear|normal) (?:(?:left|right|bilateral|lateral|posterior) )*"
            r"costophrenic (?:angles?|sulc(?:us|i))\b",
            ABSENT,
        ),
        (
            r"\bcostophrenic (?:angles?|sulc(?:us|i)) (?:(?:are|is|remain|remains|appear|appears"
            r"|now|again) )*(?:sharp(?:ly defined)?|clear|preserved|normal)\b",
            ABSENT,
        ),
        (r"(?<!pericardial )(?<!joint )(?<!pericardial or )\beffusions?\b", None),
        (r"\bpleural (?:fluid|collections?)\b", None),
        (r"\bfluid (?:with)?in the (?:(?:left|right) )?pleural (?:space|cavity)\b", None),
        (r"\b(?:hydrothora(?:x|ces)|ha?emothora(?:x|ces)|empyemas?)\b", None),
        (
            r"\bblunt(?:ing|ed)(?: of)?(?: the)?(?: (?:left|right|bilateral|both|lateral"
            r"|posterior))* costophrenic (?:angles?|sulc(?:us|i))\b",
            None,
        ),
        (r"\bcostophrenic (?:angles? |sulc(?:us|i) )?(?:\w+ ){0,3}?blunt(?:ing|ed)\b", None),
        (r"\bmeniscus\b", None),
        (r"\b(?:layering (?:pleural )?fluid|fluid layering)\b", None),
    ],
    "cardiomegaly": [
        (
            r"\b(?:borderline|top[- ]normal|upper[- ]normal|high[- ]normal)"
            r"(?: \w+){0,2}? (?:cardiomegaly|heart|cardiac)\b",
            UNCERTAIN,
        ),
        (
            rf"\b{_HEART}(?: \w+){{0,3}}? (?:(?:at |in |within )?(?:the )?"
            r"(?:top|upper|high)(?: limits?| range| end)?(?: of)?(?:[- ]normal)|borderline)\b",
            UNCERTAIN,
        ),
        (
            rf"\bnormal(?:[- ]sized?)? {_HEART_OR_CM}\b",
            ABSENT,
        ),
        (
            rf"\b{_HEART_OR_CM}(?: {_NOT_FILLER}\w+){{0,4}}? (?:(?:is |are )?normal|within normal"
            r" limits|unremarkable|(?:is |are )?not enlarged)\b",
            ABSENT,
        ),
        (r"\bcardiomegaly\b", None),
        (r"\b(?:cardiac|heart)(?: and mediastinal)?(?: silhouettes?)? enlargement\b", None),
        (r"\benlargement of the cardiac (?:and mediastinal )?silhouettes?\b", None),
        (
            r"\benlarge(?:d|ment of the|ment of) (?:\w+ )?"
            r"(?:heart|cardiac (?:silhouette|size|shadow))",
            None,
        ),
        (
            r"\b(?:increased|large|globular|dilated) "
            r"(?:heart|cardiac silhouette|(?:heart|cardiac) size)\b",
            None,
        ),
        (
            rf"\b{_HEART}(?: {_NOT_FILLER}\w+){{0,5}}? (?:enlarged|enlargement|increased|large)\b",
            None,
        ),
    ],
    "pneumothorax": [
        (r"\b(?:hydro)?pneumothora(?:x|ces)\b", None),
        (r"\bptx\b|\bpneumo\b", None),
        (r"\bpleural air\b|\bair in the (?:(?:left|right) )?pleural space\b", None),
        (r"\bvisceral pleural (?:line|edge|margin)\b", None),
    ],
    "consolidation": [
        (
            r"\b(?:the )?lungs (?:(?:are|is|remain|remains|appear|appears|now|again|otherwise"
            r"|essentially) )*clear\b",
            ABSENT,
        ),
        (r"\bclear lungs\b", ABSENT),
        (r"\bconsolidat(?:ion|ions|ive|ed)\b", None),
        (r"\b(?:broncho)?pneumonias?\b", None),
        (r"\binfiltrat(?:e|es|ion|ive)\b", None),
        (
            r"\bair[- ]?space (?:opacit(?:y|ies|ification)|disease|process|consolidation"
            r"|infiltrat(?:e|es)|densit(?:y|ies))\b",
            None,
        ),
        (r"\balveolar (?:opacit(?:y|ies)|infiltrat(?:e|es)|consolidation|filling)\b", None),
        (r"\bair bronchograms?\b", None),
        (r"(?<!granulomatous )\b(?:infection|infectious (?:process|etiology|disease))\b", None),
        (r"\blobar (?:opacit(?:y|ies|ification)|densit(?:y|ies))\b", None),
    ],
    "fracture": [
        (
            r"(?<!lead )(?<!wire )\bfractur(?:e|es|ed|ing)\b(?! (?:of (?:the |a |one |two )?)?"
            r"(?:(?!and\b|with\b|or\b)\w+ ){0,3}?(?:wires?|leads?)\b)",
            None,
        ),
        (r"\bfxs?\b", None),
        (r"\brib deformit(?:y|ies)\b", None),
        (r"\bcortical (?:break|disruption|step[- ]off)s?\b", None),
        (r"\bcallus(?: formation)?\b", None),
    ],
}

_MENTION_RES: Final[dict[str, list[tuple[re.Pattern[str], int | None]]]] = {
    finding: [(re.compile(p), status) for p, status in pats] for finding, pats in _LEXICON.items()
}
_KEYWORDS: Final[dict[str, tuple[str, ...]]] = {
    "nodule": ("nodul", "mass", "granulom", "lesion", "tumo", "neoplasm", "metasta"),
    "pleural_effusion": (
        "effusion",
        "pleural",
        "thora",
        "empyema",
        "costophrenic",
        "meniscus",
        "fluid",
    ),
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac", "cardiomediastinal"),
    "pneumothorax": ("pneumo", "ptx", "pleural", "visceral"),
    "consolidation": (
        "lung",
        "consolidat",
        "pneumonia",
        "infiltrat",
        "air",
        "alveolar",
        "lobar",
        "infecti",
    ),
    "fracture": ("fractur", "fx", "deformit", "cortical", "callus"),
}
"""Every lexicon pattern contains one of its finding's keywords: a substring test is far cheaper
than the patterns, and most sentences mention nothing (tubes, lines, comparisons)."""

# --------------------------------------------------------------------------------------------
# Context triggers
# --------------------------------------------------------------------------------------------

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
        r"|improvement|difference)",
        r"without (?:\w+ ){0,2}?(?:change|changes|increase|worsening|progression)",
        r"not (?:\w+ )?(?:changed|increased|worsened|improved|different)",
        r"(?:near(?:ly)?|almost|largely|mostly|partial(?:ly)?|incomplete(?:ly)?|not"
        r" (?:completely|fully|entirely)|near[- ]complete|near[- ]total)"
        r" (?:resolved|resolution|cleared|clearing)",
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
        r"suggest(?:s|ed|ing|ive of)?",
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
        r"(?:has |have )?(?:been )?ruled out",
        rf"(?:is |are )?no longer (?:\w+ )?{_SEEN}",
        r"(?:has |have )?(?:been )?removed",
        r"(?:is |are )gone|(?:has |have )disappeared",
    ],
    # Resolution reads both ways: "resolved pneumothorax", "the effusion has resolved".
    "neg_both": [
        r"(?:has |have |had )?(?:now |since |completely |entirely |fully )?(?:resolved|cleared)",
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
        r"no|without|neither|nor|never",
        r"negative for|free of|absence of|mistaken for",
        r"no (?:\w+ )?(?:evidence|signs?|findings?) (?:of|for|to suggest)",
        r"(?:interval |complete |total )?resolution of|no longer|removal of",
        r"clearing of|clearance of",
    ],
    "term": [
        r"but|however|although|though|which|whereas|while|yet|nevertheless|otherwise",
        r"aside from|apart from|except(?: for)?|other than|with the exception of|besides",
        r"and (?=(?:the|there|this|these|now)\b)",
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
_ADJACENT_RE: Final[re.Pattern[str]] = re.compile(r"^(?:versus|vs|and/or)")
_ADJACENT_FORWARD_RE: Final[re.Pattern[str]] = re.compile(r"^(?:small|minimal|trace|tiny|mild|if)")
"""Forward only: "small if any bilateral effusions", but not "effusion is small if any,
alongside the displaced fractures"; backward, "pneumothorax small, on the left, if any"."""


def _reach(trig: _Trigger, *, forward: bool) -> int:
    """How many words a trigger may skip to reach its nearest mention."""
    if trig.kind in ("q", "hypo"):
        return _CLOSE_REACH
    if _ADJACENT_RE.match(trig.text) or (
        forward and (trig.kind == "neg_both" or _ADJACENT_FORWARD_RE.match(trig.text))
    ):
        return _ADJACENT_REACH
    return _PRE_REACH if forward else _POST_REACH


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
_SPACE_RE: Final[re.Pattern[str]] = re.compile(r"\s+")
_SIDE_NAMES: Final[dict[str, str]] = {"left": "left", "l": "left", "right": "right", "r": "right"}
_CONNECTOR_RE: Final[re.Pattern[str]] = re.compile(r",|/|\b(?:and|or|nor)\b|^\W*$")
_VERB_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(?:is|are|was|were|has|have|had|remains?|appears?|seen|noted|persists?|unchanged|stable"
    r"|new|increased|decreased|improved|worsened|again|there|demonstrates?|shows?)\b"
)

# --------------------------------------------------------------------------------------------
# Sections and sentences
# --------------------------------------------------------------------------------------------

_IGNORED_HEADERS = (
    "indications?|clinical indications?|history|clinical history|patient history|history of"
    " present illness|clinical information|clinical data|clinical details|clinical notes?"
    "|clinical question|reason for (?:exam|examination|study|request|referral)|referral reason"
    "|comparisons?|comparison study|technique|examination|exam|study|procedure|reference exams?"
    "|notifications?|type of (?:exam|examination|study)|views?|prior studies|priors?|clinical"
)
_IMPRESSION_HEADERS = "impressions?|conclusions?|summary|opinion|assessment|diagnosis"
_FINDINGS_HEADERS = (
    "findings(?: and impression)?|findings/impression|finding|report|wet read(?: version #?\\d+)?"
    "|interpretation|results?|observations?"
)
_KNOWN_HEADER_RE: Final[re.Pattern[str]] = re.compile(
    rf"(?:^|(?<=[.\n]))[ \t]*(?:(?P<ignore>{_IGNORED_HEADERS})|(?P<impression>"
    rf"{_IMPRESSION_HEADERS})|(?P<findings>{_FINDINGS_HEADERS}))[ \t]*:",
    re.IGNORECASE,
)
_CAPS_HEADER_RE: Final[re.Pattern[str]] = re.compile(r"(?m)^[ \t]*[A-Z][A-Z0-9 ,/&()#'-]{2,80}:")
_BLANK_LINE_RE: Final[re.Pattern[str]] = re.compile(r"\n[ \t]*\n")
_SENTENCE_SPLIT_RE: Final[re.Pattern[str]] = re.compile(
    r"(?<=[.!])(?<!\bvs\.)(?<!\bVs\.)(?<!\bDr\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bapprox\.)\s+"
    r"|(?<=\?)\s+(?=[A-Z(])|\n[ \t]*\n\s*|\n\s*(?=(?:\d{1,2}[.)]|[-*\u2022])\s)"
)
_SIDE_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(?:(?P<left>left)|(?P<right>right)|(?P<both>bilateral(?:ly)?|both|bibasilar|bibasal"
    r"|bi-?apical|bilaterally))\b|(?-i:\b(?P<l>L)\b)|(?-i:\b(?P<r>R)\b)",
    re.IGNORECASE,
)
_SIZE_RE: Final[re.Pattern[str]] = re.compile(
    r"(?<![\w.])(\d{1,3}(?:\.\d+)?)\s*(?:(?:x|\u00d7|by)\s*(\d{1,3}(?:\.\d+)?)\s*)?"
    r"(?:(?:x|\u00d7|by)\s*(\d{1,3}(?:\.\d+)?)\s*)?-?\s*(mm|cm|millimet(?:er|re)s?"
    r"|centimet(?:er|re)s?)\b"
)


def section_spans(text: str) -> list[tuple[SectionKind, int, int]]:
    """Cut a report into (kind, start, end) parts; text before any header counts as findings.

    Public so that benchmarks can tell which part of a report a reference label came from.
    """
    cuts: list[tuple[int, int, SectionKind]] = []
    for m in _KNOWN_HEADER_RE.finditer(text):
        kind: SectionKind = "findings"
        if m.group("ignore"):
            kind = "ignore"
        elif m.group("impression"):
            kind = "impression"
        cuts.append((m.start(), m.end(), kind))
    for m in _CAPS_HEADER_RE.finditer(text):
        if not any(s <= m.start() < e for s, e, _ in cuts):
            cuts.append((m.start(), m.end(), "findings"))
    cuts.sort()
    spans: list[tuple[SectionKind, int, int]] = []
    pos, kind = 0, "findings"
    for start, end, next_kind in [*cuts, (len(text), len(text), "findings")]:
        if kind == "ignore":
            # An ignored section ends at a blank line that follows its content, so prose that
            # follows "INDICATION: ..." without a header of its own is still read.
            body = text[pos:start]
            lead = len(body) - len(body.lstrip())
            blank = _BLANK_LINE_RE.search(body, lead)
            cut = pos + blank.end() if blank is not None else start
            spans.append(("ignore", pos, cut))
            spans.append(("findings", cut, start))
        else:
            spans.append((kind, pos, start))
        pos, kind = end, next_kind
    return [(k, a, b) for k, a, b in spans if text[a:b].strip()]


# --------------------------------------------------------------------------------------------
# Mention analysis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mention:
    finding: str
    start: int
    end: int
    status: int
    sides: frozenset[str]
    sizes_mm: tuple[float, ...]


@dataclass(frozen=True)
class _Trigger:
    kind: str
    start: int
    end: int
    text: str


def _lower_same_length(text: str) -> str:
    """Lower-case without changing offsets (a few characters lower-case to two)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def _n_words(text: str) -> int:
    return len(_WORD_RE.findall(text))


def _list_link(gap: str) -> bool:
    """Two mentions read as items of one list: short gap, a connector, no new clause."""
    return (
        _n_words(gap) <= _LIST_REACH
        and _CONNECTOR_RE.search(gap) is not None
        and _VERB_RE.search(gap) is None
    )


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


def _reaches_forward(
    trig: _Trigger, target: tuple[int, int], spans: list[tuple[int, int]], s: str
) -> bool:
    """A pre-trigger reaches a mention: near enough, or through a list of mentions."""
    between = _between(spans, trig.end, target[0])
    first = between[0] if between else target
    if _n_words(s[trig.end : first[0]]) > _reach(trig, forward=True):
        return False
    chain = [*between, target]
    return all(_list_link(s[a[1] : b[0]]) for a, b in itertools.pairwise(chain))


def _reaches_backward(
    trig: _Trigger, target: tuple[int, int], spans: list[tuple[int, int]], s: str
) -> bool:
    """A post-trigger reaches a mention before it, directly or back through a list."""
    between = _between(spans, target[1], trig.start)
    last = between[-1] if between else target
    if _n_words(s[last[1] : trig.start]) > _reach(trig, forward=False):
        return False
    chain = [target, *between]
    return all(_list_link(s[a[1] : b[0]]) for a, b in itertools.pairwise(chain))


def _applies(
    t: _Trigger,
    span: tuple[int, int],
    others: list[tuple[int, int]],
    s: str,
    terminated: Callable[[int, int], bool],
) -> bool:
    """Whether a trigger reaches a mention from before or after it, within one clause."""
    st, en = span
    if t.end <= st:
        return (
            t.kind in _PRE_KINDS
            and st - t.end <= _WINDOW_CHARS
            and not terminated(t.end, st)
            and _reaches_forward(t, span, others, s)
        )
    return (
        t.start >= en
        and t.kind in _POST_KINDS
        and t.start - en <= _WINDOW_CHARS
        and not terminated(en, t.start)
        and _reaches_backward(t, span, others, s)
    )


def _resolve(negs: list[tuple[int, _Trigger]], uncs: list[tuple[int, _Trigger]]) -> int:
    """Status from the triggers reaching a mention: the nearer of negation and uncertainty."""
    if not negs and not uncs:
        return PRESENT
    if not uncs:
        return ABSENT
    if not negs:
        return UNCERTAIN
    nearest_neg = min(d for d, _ in negs)
    nearest_unc = min(d for d, _ in uncs)
    return ABSENT if nearest_neg < nearest_unc else UNCERTAIN


def _negated_cue(
    cue: _Trigger, triggers: list[_Trigger], terminated: Callable[[int, int], bool], s: str
) -> bool:
    """An evidential cue under a negation ("no consolidation to suggest pneumonia") negates."""
    if _EVIDENTIAL_RE.match(cue.text) is None:
        return False
    return any(
        t.kind == "neg_pre"
        and t.end <= cue.start
        and not terminated(t.end, cue.start)
        and _n_words(s[t.end : cue.start]) <= _PRE_REACH
        for t in triggers
    )


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
        or (en <= span[0] and _n_words(s[en : span[0]]) <= _SIDE_REACH and not blocked(en, span[0]))
    }
    if before:
        return frozenset(before)
    after = {
        side
        for st, en, side in sides
        if st >= span[1] and _n_words(s[span[1] : st]) <= _SIDE_REACH and not blocked(span[1], st)
    }
    return frozenset(after)


def _find_mentions(s: str) -> list[tuple[str, int, int, int | None, str]]:
    """(finding, start, end, fixed status, text) for every lexicon hit, sorted by position."""
    raw: list[tuple[str, int, int, int | None, str]] = []
    for finding in FINDINGS:
        if not any(k in s for k in _KEYWORDS[finding]):
            continue
        taken: list[tuple[int, int]] = []
        for rx, fixed in _MENTION_RES[finding]:
            for m in rx.finditer(s):
                if any(m.start() < e and st < m.end() for st, e in taken):
                    continue
                taken.append((m.start(), m.end()))
                raw.append((finding, m.start(), m.end(), fixed, m.group(0)))
    raw.sort(key=lambda r: (r[1], r[2]))
    return raw


def _analyse_sentence(orig: str) -> list[_Mention]:
    """All finding mentions in one sentence, each with its status, sides and sizes."""
    s = _lower_same_length(orig)
    raw = _find_mentions(s)
    if not raw:
        return []
    spans = sorted({(r[1], r[2]) for r in raw})
    masked = list(s)
    for st, en in spans:
        masked[st:en] = "_" * (en - st)
    ms = "".join(masked)

    triggers = [
        _Trigger(m.lastgroup or "term", m.start(), m.end(), m.group(0))
        for m in _TRIGGER_RE.finditer(ms)
    ]
    terms = [(t.start, t.end) for t in triggers if t.kind == "term"]
    active = [t for t in triggers if t.kind not in ("term", "pseudo")]

    def terminated(a: int, b: int) -> bool:
        i = bisect.bisect_left(terms, (a, -1))
        return i < len(terms) and terms[i][1] <= b

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
    for finding, st, en, fixed, text in raw:
        span = (st, en)
        others = [sp for sp in spans if not (sp[0] < en and st < sp[1])]
        status = fixed
        if status is None:
            negs: list[tuple[int, _Trigger]] = []
            uncs: list[tuple[int, _Trigger]] = []
            for t in active:
                if _applies(t, span, others, ms, terminated):
                    before = t.end <= st
                    neg = t.kind in _NEG_KINDS or (
                        before and _negated_cue(t, triggers, terminated, ms)
                    )
                    (negs if neg else uncs).append((st - t.end if before else t.start - en, t))
            status = _resolve(negs, uncs)
        side_set: frozenset[str] = frozenset()
        sizes_mm: tuple[float, ...] = ()
        if status != ABSENT:
            if finding in LATERAL_FINDINGS:
                side_set = _sides_near(span, sides, [*others, *terms], side_text)
                if not side_set and text.endswith(("effusions", "pneumothoraces")):
                    side_set = frozenset({"bilateral"})
            if finding == "nodule":
                sizes_mm = tuple(
                    mm
                    for a, b, mm in sizes
                    if (b <= st and _n_words(s[b:st]) <= _SIZE_REACH and not terminated(b, st))
                    or (a >= en and _n_words(s[en:a]) <= _SIZE_REACH and not terminated(en, a))
                )
        mentions.append(_Mention(finding, st, en, status, side_set, sizes_mm))
    return mentions


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


def _pieces(sentence: str) -> list[str]:
    """A sentence, cut at spaces into pieces of at most _MAX_SENTENCE_CHARS characters."""
    pieces = []
    while len(sentence) > _MAX_SENTENCE_CHARS:
        cut = sentence.rfind(" ", 0, _MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else _MAX_SENTENCE_CHARS
        pieces.append(sentence[:cut])
        sentence = sentence[cut:].lstrip()
    pieces.append(sentence)
    return pieces


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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
    for kind, start, end in section_spans(text):
        if kind == "ignore":
            continue
        for sentence in _SENTENCE_SPLIT_RE.split(text[start:end]):
            if not sentence or sentence.isspace():
                continue
            for piece in _pieces(_SPACE_RE.sub(" ", sentence).strip()):
                for mention in _analyse_sentence(piece):
                    by_kind[kind].setdefault(mention.finding, []).append(mention)

    labels: dict[str, int] = {}
    sides: dict[str, str | None] = {}
    nodule_size: float | None = None
    for finding in FINDINGS:
        chosen = by_kind["impression"].get(finding) or by_kind["findings"].get(finding) or []
        label = _aggregate(m.status for m in chosen)
        labels[finding] = label
        kept = [m for m in chosen if m.status != ABSENT] if label != ABSENT else []
        side_words: set[str] = set()
        for m in kept:
            side_words |= m.sides
        sides[finding] = _side_of(side_words) if finding in LATERAL_FINDINGS else None
        if finding == "nodule":
            all_sizes = [mm for m in kept for mm in m.sizes_mm]
            nodule_size = max(all_sizes) if all_sizes else None
    return ReportLabels(labels=labels, sides=sides, nodule_size_mm=nodule_size)


def label_reports(texts: Iterable[str]) -> list[ReportLabels]:
    """Label many reports in order (the labeler is stateless, so this is a plain map)."""
    return [label_report(t) for t in texts]
