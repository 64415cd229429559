"""The three jobs as text: prompts, questions and the answers derived from a study's labels.

Answers come from the labeler's reading of the site's own report (labels, sides, nodule size), so
a site can train question answering without any extra annotation, and the same functions score
answers at evaluation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Final

from fedrad.common.findings import DISPLAY_NAMES, FINDINGS, LATERAL_FINDINGS

REPORT_PROMPT: Final[str] = "report:"
SUGGEST_THRESHOLD: Final[float] = 0.5  # probability at which a finding is suggested as present
POSSIBLE_THRESHOLD: Final[float] = 0.3  # ... and as possible

_SHORT_NAMES: Final[dict[str, str]] = {
    "nodule": "nodule",
    "pleural_effusion": "effusion",
    "cardiomegaly": "cardiomegaly",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "fracture": "fracture",
}


@dataclass(frozen=True)
class QuestionAnswer:
    kind: str  # "presence" | "side" | "size"
    finding: str
    question: str
    answer: str


def context_text(indication: str) -> str:
    """The clinical question the referrer asked: read with the image for every task."""
    clean = " ".join(indication.split())
    return f"indication: {clean}\n" if clean else "indication: none\n"


def suggestion_line(suggested: dict[str, int]) -> str:
    """The findings the diagnosis head suggests, as text the LM reads before its task."""
    items = [
        ("possible " if suggested[f] == -1 else "") + DISPLAY_NAMES[f]
        for f in FINDINGS
        if suggested[f] != 0
    ]
    return f"suggested: {', '.join(items) if items else 'no finding'}\n"


def report_prompt(suggested: dict[str, int]) -> str:
    """Diagnosis-driven report prompt (as in PromptMRG): suggestions, then the report.
    Training uses the labels read from the site's report, inference the head's own
    suggestions, so the report, the answers and the suggestions agree."""
    return f"{suggestion_line(suggested)}{REPORT_PROMPT}"


def qa_prompt(suggested: dict[str, int], question: str) -> str:
    """Questions are answered after the same suggestions line."""
    return f"{suggestion_line(suggested)}{question_prompt(question)}"


def suggestions(probabilities: dict[str, float]) -> dict[str, int]:
    """Head probabilities -> 1 (suggested), -1 (possible), 0 per finding."""
    return {
        f: 1 if p >= SUGGEST_THRESHOLD else (-1 if p >= POSSIBLE_THRESHOLD else 0)
        for f, p in probabilities.items()
    }


def question_prompt(question: str) -> str:
    return f"question: {' '.join(question.split())}\nanswer:"


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
        short = _SHORT_NAMES[finding]
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
