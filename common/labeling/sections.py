"""Report structure for the labeler: sections and sentences.

A report's INDICATION, HISTORY, COMPARISON and TECHNIQUE are questions and context, not findings
("rule out pneumothorax"), and its IMPRESSION overrides the body for what it mentions, so the
labeler reads a report section by section and sentence by sentence. ``section_spans`` is public
so that benchmarks can tell which part of a report a reference label came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final, Literal

SectionKind = Literal["findings", "impression", "ignore"]

_MAX_SENTENCE_CHARS: Final[int] = 1_000
"""Longer "sentences" (unpunctuated dumps) are cut at whitespace into pieces of this size."""

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


_SPACE_RE: Final[re.Pattern[str]] = re.compile(r"\s+")


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


def sentences(text: str) -> Iterator[tuple[SectionKind, str]]:
    """(section kind, sentence) for every sentence the labeler reads, whitespace collapsed;
    ignored sections are skipped."""
    for kind, start, end in section_spans(text):
        if kind == "ignore":
            continue
        for sentence in _SENTENCE_SPLIT_RE.split(text[start:end]):
            if not sentence or sentence.isspace():
                continue
            for piece in _pieces(_SPACE_RE.sub(" ", sentence).strip()):
                yield kind, piece
