"""The three jobs as text: prompts, questions and the answers derived from a study's labels.

Answers come from the labeler's reading of the site's own report (labels, sides, nodule size), so
a site can train question answering without any extra annotation, and the same functions score
answers at evaluation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from fedrad.common.findings import (
    DISPLAY_NAMES,
    FINDINGS,
    LATERAL_FINDINGS,
    LATERAL_ORDER,
    SIDES,
)
from fedrad.common.labeling.labeler import mentioned_findings

REPORT_PROMPT: Final[str] = "report:"
PROMPT_FORMAT: Final[int] = 2
"""1: a "suggested:" line naming present and possible findings; 2: the findings line below.
Checkpoints record it: a model is only ever served with the prompt it was trained on."""
SUGGEST_THRESHOLD: Final[float] = 0.5  # probability at which a finding is decided present
POSSIBLE_THRESHOLD: Final[float] = 0.3  # ... and uncertain ("possible")
DETAIL_PROBABILITY: Final[float] = 0.5
"""How often a training prompt also carries the nodule size the site's report states. Sides
are always carried (inference states the side head's); no head measures a nodule, so at
inference the prompt has no size, and the model must learn to write one from the image."""
STATUS_WORDS: Final[dict[int, str]] = {1: "present", 0: "absent", -1: "uncertain"}

SHORT_NAMES: Final[dict[str, str]] = {
    "nodule": "nodule",
    "pleural_effusion": "effusion",
    "cardiomegaly": "cardiomegaly",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "fracture": "fracture",
}


QuestionKind = Literal["presence", "side", "size"]


@dataclass(frozen=True)
class QuestionAnswer:
    kind: QuestionKind
    finding: str
    question: str
    answer: str


def context_text(indication: str) -> str:
    """The clinical question the referrer asked: read with the image for every task."""
    clean = " ".join(indication.split())
    return f"indication: {clean}\n" if clean else "indication: none\n"


def findings_line(
    decisions: dict[str, int],
    sides: dict[str, str | None] | None = None,
    nodule_size_mm: float | None = None,
) -> str:
    """The findings prompt: every finding in FINDINGS order with its status, and its side (or
    the nodule's size) where known. The format is public and fixed (PROMPT_FORMAT): training
    fills it from the labels of the site's own report, inference from the head's decisions."""
    parts = []
    for finding in FINDINGS:
        decision = decisions[finding]
        words = [SHORT_NAMES[finding], STATUS_WORDS[decision]]
        if decision != 0 and sides and sides.get(finding):
            words.append(str(sides[finding]))
        if finding == "nodule" and decision != 0 and nodule_size_mm is not None:
            words.append(f"{nodule_size_mm:g} mm")
        parts.append(" ".join(words))
    return f"findings: {'; '.join(parts)}\n"


def report_prompt(
    decisions: dict[str, int],
    sides: dict[str, str | None] | None = None,
    nodule_size_mm: float | None = None,
) -> str:
    """Diagnosis-driven report prompt (as in PromptMRG): the findings, then the report."""
    return f"{findings_line(decisions, sides, nodule_size_mm)}{REPORT_PROMPT}"


def qa_prompt(
    decisions: dict[str, int],
    question: str,
    sides: dict[str, str | None] | None = None,
    nodule_size_mm: float | None = None,
) -> str:
    """Questions are answered after the same findings line."""
    return f"{findings_line(decisions, sides, nodule_size_mm)}{question_prompt(question)}"


@dataclass(frozen=True)
class Thresholds:
    """Where a head probability becomes a decision; a site may set its own."""

    present: float = SUGGEST_THRESHOLD
    possible: float = POSSIBLE_THRESHOLD

    def __post_init__(self) -> None:
        if not 0.0 < self.possible <= self.present < 1.0:
            raise ValueError("thresholds need 0 < possible <= present < 1")


def suggestions(
    probabilities: dict[str, float], thresholds: Thresholds | None = None
) -> dict[str, int]:
    """Head probabilities -> 1 (present), -1 (uncertain), 0 (absent) per finding."""
    t = thresholds or Thresholds()
    return {
        f: 1 if p >= t.present else (-1 if p >= t.possible else 0) for f, p in probabilities.items()
    }


def side_table(rows: Sequence[Sequence[float]]) -> dict[str, dict[str, float]]:
    """The side head's output for one study, (lateral findings x sides), as a mapping."""
    return {
        finding: {side: float(p) for side, p in zip(SIDES, row, strict=True)}
        for finding, row in zip(LATERAL_ORDER, rows, strict=True)
    }


def head_sides(
    side_probabilities: dict[str, dict[str, float]], decisions: dict[str, int]
) -> dict[str, str | None]:
    """The side head's most probable side for each lateral finding decided present or
    possible; None where the finding is absent."""
    return {
        f: max(p, key=lambda side: p[side]) if decisions.get(f, 0) != 0 else None
        for f, p in side_probabilities.items()
    }


def question_prompt(question: str) -> str:
    return f"question: {' '.join(question.split())}\nanswer:"


_SIZE_QUESTION_RE: Final[re.Pattern[str]] = re.compile(
    r"\bhow (?:large|big|small|wide)\b|\bsizes?\b|\bmeasur|\bdiameter\b|\bdimensions?\b"
    r"|\bhow many (?:mm|cm|millimet|centimet)",
    re.IGNORECASE,
)
_SIDE_QUESTION_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(?:which|what) (?:side|lung|hemithorax)\b|\bleft or right\b|\bright or left\b"
    r"|\blateralit|\bon which\b|\bwhere\b|\bside\b",
    re.IGNORECASE,
)
_PRESENCE_QUESTION_RE: Final[re.Pattern[str]] = re.compile(
    r"^\s*(?:is|are|was|were|does|do|did|has|have|any|can|could|should|would)\b"
    r"|\b(?:present|evidence|seen|visible|shown|show|signs?)\b",
    re.IGNORECASE,
)


def question_kind(question: str) -> tuple[QuestionKind, str] | None:
    """(kind, finding) of a question about exactly one finding, or None: a size question is
    about a nodule, a side question about a finding that has a side, and a presence question
    about any finding; a question of no known kind is not guessed at."""
    named = mentioned_findings(question)
    if len(named) != 1:
        return None
    [finding] = named
    if _SIZE_QUESTION_RE.search(question):
        return ("size", finding) if finding == "nodule" else None
    if _SIDE_QUESTION_RE.search(question):
        return ("side", finding) if finding in LATERAL_FINDINGS else None
    if _PRESENCE_QUESTION_RE.search(question):
        return "presence", finding
    return None


def presence_answer(label: int) -> str:
    return {1: "yes", 0: "no", -1: "possibly"}[label]


def all_questions(
    labels: dict[str, int], sides: dict[str, str | None], nodule_size_mm: float | None
) -> list[QuestionAnswer]:
    """Every question this study can answer, with its reference answer."""
    out: list[QuestionAnswer] = []
    for finding in FINDINGS:
        name = DISPLAY_NAMES[finding]
        article = "an" if name[0] in "aeiou" else "a"
        question = (
            "Is there cardiomegaly?" if finding == "cardiomegaly" else f"Is there {article} {name}?"
        )
        out.append(QuestionAnswer("presence", finding, question, presence_answer(labels[finding])))
    for finding in sorted(LATERAL_FINDINGS):
        short = SHORT_NAMES[finding]
        if labels[finding] == 0:
            answer = f"there is no {short}"
        else:
            answer = sides.get(finding) or "not stated"
        out.append(QuestionAnswer("side", finding, f"Which side is the {short}?", answer))
    if labels["nodule"] == 0:
        size_answer = "there is no nodule"
    elif nodule_size_mm is None:
        size_answer = "not stated"
    else:
        size_answer = f"{nodule_size_mm:g} mm"
    out.append(QuestionAnswer("size", "nodule", "How large is the nodule?", size_answer))
    return out


def sample_question(
    labels: dict[str, int],
    sides: dict[str, str | None],
    nodule_size_mm: float | None,
    rng: random.Random,
) -> QuestionAnswer:
    """One question, favouring those about findings the study has (the informative ones)."""
    questions = all_questions(labels, sides, nodule_size_mm)
    weights = [
        3.0 if labels[q.finding] != 0 else (1.0 if q.kind == "presence" else 0.3) for q in questions
    ]
    return rng.choices(questions, weights=weights, k=1)[0]


def normalise_answer(text: str) -> str:
    """Answers compare after lower-casing, trimming punctuation and collapsing spaces."""
    text = text.lower().strip()
    text = re.sub(r"[^\w\s.]", " ", text)
    text = re.sub(r"\s+", " ", text).strip(" .")
    return text
