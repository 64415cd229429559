"""Cross-checks between the model's three outputs for one scan, shown beside them.

The report and the answer are grounded in the head's decisions (`common/grounding.py`), so
these checks should find nothing; they stay as the reader's guarantee. The site's own report
labeler reads the final report back, and any finding it reads differently from the head's
decision, or an answer that differs from the decision or the report, becomes a note.
"""

from __future__ import annotations

from fedrad.common.findings import DISPLAY_NAMES
from fedrad.common.grounding import GroundedAnswer, disagreements
from fedrad.common.labeling.labeler import ReportLabels
from fedrad.common.tasks import STATUS_WORDS, presence_answer


def report_notes(
    read: ReportLabels,
    decisions: dict[str, int],
    findings: dict[str, float],
    sides: dict[str, str | None] | None = None,
) -> list[str]:
    """Each finding the labeler read in the report (`read`) with another status than the
    head's, or on another side than the side head's."""
    notes = []
    for f in disagreements(read, decisions, sides):
        name, stated = DISPLAY_NAMES[f], read.labels[f]
        if stated != decisions[f]:
            notes.append(
                f"the report reads {name} as {STATUS_WORDS[stated]}; the finding head "
                f"decides {STATUS_WORDS[decisions[f]]} ({findings[f]:.3f})"
            )
        else:
            notes.append(
                f"the report puts {name} on the {read.sides[f]}; the side head says "
                f"{(sides or {}).get(f)}"
            )
    return notes


def answer_notes(
    answer: GroundedAnswer, decisions: dict[str, int], report: ReportLabels
) -> list[str]:
    """A presence answer that is not the head's decision, or a side of a finding the head
    calls present or possible that is not the side the report states."""
    finding = answer.finding
    if finding is None:
        return []
    name = DISPLAY_NAMES[finding]
    if answer.kind == "presence" and answer.value != presence_answer(decisions[finding]):
        return [f"the answer '{answer.value}' is not the finding head's decision on {name}"]
    stated = report.sides.get(finding)
    if answer.kind == "side" and decisions[finding] != 0 and stated not in (None, answer.value):
        return [f"the answer '{answer.value}' is not the side the report states ({stated})"]
    return []
