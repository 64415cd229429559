"""Cross-checks between the model's three outputs for one scan, shown beside them.

The report and the answer are generated text; the finding probabilities come from the
classifier head. A small or DP-trained language model can write a report that leaves out what
the head sees, or answer "no" where the head says 0.99. Nothing is overwritten: the reader gets
each disagreement as a note, found by running the site's own report labeler over the text.
"""

from __future__ import annotations

from fedrad.common.findings import DISPLAY_NAMES, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.labeler import label_report
from fedrad.common.tasks import normalise_answer, suggestions

PRESENCE_ANSWERS = {"yes": PRESENT, "no": 0, "possibly": UNCERTAIN}


def report_notes(report: str, findings: dict[str, float]) -> list[str]:
    """Findings the head suggests that the report does not state, and findings the report
    states that the head does not even call possible (`tasks.suggestions` draws both lines)."""
    stated, head = label_report(report).labels, suggestions(findings)
    notes = []
    for finding in FINDINGS:
        name, p = DISPLAY_NAMES[finding], findings[finding]
        if head[finding] == PRESENT and stated[finding] == 0:
            notes.append(f"the report does not state {name}; the finding head gives {p:.3f}")
        elif stated[finding] == PRESENT and head[finding] == 0:
            notes.append(f"the report states {name}; the finding head gives only {p:.3f}")
    return notes


def answer_notes(question: str, answer: str, findings: dict[str, float]) -> list[str]:
    """A yes / no / possibly answer about one finding, against the head's probability."""
    said_text = normalise_answer(answer)
    said = 0 if said_text.startswith("there is no ") else PRESENCE_ANSWERS.get(said_text)
    asked = [f for f, label in label_report(question).labels.items() if label != 0]
    if said is None or len(asked) != 1:
        return []  # not a presence question about one finding: nothing to compare
    finding = asked[0]
    head = suggestions(findings)[finding]
    if said == head or UNCERTAIN in (said, head):
        return []
    return [
        f"the answer '{said_text}' disagrees with the finding head "
        f"({DISPLAY_NAMES[finding]} {findings[finding]:.3f})"
    ]
