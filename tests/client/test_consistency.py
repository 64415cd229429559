"""The notes that flag where the final report or answer still disagrees with the finding head."""

from __future__ import annotations

from fedrad.client.reading.consistency import answer_notes, report_notes
from fedrad.common.findings import FINDINGS
from fedrad.common.grounding import GroundedAnswer
from fedrad.common.labeling.labeler import label_report

NONE = dict.fromkeys(FINDINGS, 0)


def _head(**probs: float) -> dict[str, float]:
    return {f: probs.get(f, 0.01) for f in FINDINGS}


def test_a_report_read_otherwise_than_the_decisions_is_noted() -> None:
    head = _head(pleural_effusion=0.996, cardiomegaly=0.4)
    decisions = NONE | {"pleural_effusion": 1, "cardiomegaly": -1}
    read = label_report("FINDINGS: No pleural effusion. Small right pneumothorax.")
    notes = report_notes(read, decisions, head)
    assert notes == [
        "the report reads pleural effusion as absent; the finding head decides present (0.996)",
        "the report reads cardiomegaly as absent; the finding head decides uncertain (0.400)",
        "the report reads pneumothorax as present; the finding head decides absent (0.010)",
    ]
    agreeing = "Moderate left pleural effusion. The heart may be enlarged."
    assert report_notes(label_report(agreeing), decisions, head) == []


def test_an_answer_against_the_decision_or_the_report_is_noted() -> None:
    decisions = NONE | {"pleural_effusion": 1}
    report = label_report("Left pleural effusion.")
    wrong = GroundedAnswer("presence", "pleural_effusion", "no", "no", "finding head")
    assert answer_notes(wrong, decisions, report) == [
        "the answer 'no' is not the finding head's decision on pleural effusion"
    ]
    right = GroundedAnswer("presence", "pleural_effusion", "yes", "yes", "finding head")
    assert answer_notes(right, decisions, report) == []
    side = GroundedAnswer("side", "pleural_effusion", "right", "right", "language model")
    assert answer_notes(side, decisions, report) == [
        "the answer 'right' is not the side the report states (left)"
    ]
    unknown = GroundedAnswer(None, None, "cannot answer", "cannot answer", "none")
    assert answer_notes(unknown, decisions, report) == []
