"""The notes that flag where generated text disagrees with the finding head."""

from __future__ import annotations

from fedrad.client.reading.consistency import answer_notes, report_notes
from fedrad.common.findings import FINDINGS


def _head(**probs: float) -> dict[str, float]:
    return {f: probs.get(f, 0.01) for f in FINDINGS}


def test_a_report_that_leaves_out_or_adds_a_finding_is_noted() -> None:
    head = _head(pleural_effusion=0.996, cardiomegaly=0.4)
    notes = report_notes("FINDINGS: No pleural effusion. Small right pneumothorax.", head)
    assert notes == [
        "the report does not state pleural effusion; the finding head gives 0.996",
        "the report states pneumothorax; the finding head gives only 0.010",
    ]
    # agreement (and the head's 'possible' band) is silent
    assert report_notes("Moderate left pleural effusion. Heart size is normal.", head) == []


def test_a_yes_no_answer_against_the_head_is_noted() -> None:
    head = _head(pleural_effusion=0.996, nodule=0.35)
    assert answer_notes("Is there a pleural effusion?", "no", head) == [
        "the answer 'no' disagrees with the finding head (pleural effusion 0.996)"
    ]
    assert answer_notes("Which side is the effusion?", "There is no effusion.", head) == [
        "the answer 'there is no effusion' disagrees with the finding head (pleural effusion 0.996)"
    ]
    assert answer_notes("Is there a pleural effusion?", "Yes.", head) == []
    assert answer_notes("Is there a nodule?", "no", head) == []  # the head is unsure: silent
    assert answer_notes("Which side is the effusion?", "left", head) == []  # not yes / no
    assert answer_notes("Is the heart normal?", "no", head) == []  # no single finding asked
