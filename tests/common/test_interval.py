"""Interval change as a site reads it from two reports, the rule baseline, and the words."""

from __future__ import annotations

import pytest

from fedrad.common.findings import FINDINGS
from fedrad.common.interval import (
    comparison_statement,
    consistent_changes,
    interval_question,
    report_changes,
    rule_change,
    stated_sizes,
)
from fedrad.common.labeling.labeler import label_report


def _read(text: str) -> tuple[dict[str, int], dict[str, float]]:
    labels = label_report(text)
    return labels.labels, stated_sizes(text, labels)


def test_sizes_are_read_per_finding_and_not_across_findings() -> None:
    text = (
        "FINDINGS: Small right pleural effusion. There is a 9 mm nodule in the right upper "
        "lobe. Moderate cardiomegaly.\nIMPRESSION: Small effusion. Marked cardiomegaly."
    )
    _, sizes = _read(text)
    assert sizes["nodule"] == 9.0
    assert sizes["pleural_effusion"] == 1.0
    assert sizes["cardiomegaly"] == 3.0  # the larger grade stated
    _, mixed = _read("FINDINGS: Small pleural effusion with a large pneumothorax.")
    assert "pleural_effusion" not in mixed and "pneumothorax" not in mixed  # one sentence, two


def test_a_growing_nodule_and_a_resolved_effusion() -> None:
    before = _read("FINDINGS: 5 mm nodule in the left lower lobe. Small left pleural effusion.")
    after = _read("FINDINGS: 9 mm nodule in the left lower lobe. No pleural effusion.")
    changes = report_changes(before[0], before[1], after[0], after[1])
    assert changes["nodule"] == "larger"
    assert changes["pleural_effusion"] == "resolved"
    assert changes["pneumothorax"] == "absent"


def test_unknown_change_is_left_out_not_guessed() -> None:
    before = _read("FINDINGS: Left pleural effusion.")  # ungraded
    after = _read("FINDINGS: Small left pleural effusion. Possible pneumothorax.")
    changes = report_changes(before[0], before[1], after[0], after[1])
    assert changes["pleural_effusion"] is None
    assert changes["pneumothorax"] is None  # uncertain now
    assert set(changes) == set(FINDINGS)


def test_new_and_stable() -> None:
    before = _read("FINDINGS: Small right pleural effusion. Right rib fracture.")
    after = _read("FINDINGS: Small right pleural effusion. Right rib fracture. Right pneumothorax.")
    changes = report_changes(before[0], before[1], after[0], after[1])
    assert changes["pleural_effusion"] == "stable"
    assert changes["fracture"] == "stable"
    assert changes["pneumothorax"] == "new"


@pytest.mark.parametrize(
    ("before", "now", "expected"),
    [
        (0.1, 0.2, "absent"),
        (0.2, 0.8, "new"),
        (0.8, 0.1, "resolved"),
        (0.55, 0.9, "larger"),
        (0.9, 0.6, "smaller"),
        (0.7, 0.75, "stable"),
    ],
)
def test_rule(before: float, now: float, expected: str) -> None:
    assert rule_change(before, now, 0.5) == expected


def test_consistent_changes_follow_the_current_decision() -> None:
    assert consistent_changes(1) == ("new", "larger", "smaller", "stable")
    assert consistent_changes(0) == ("absent", "resolved")
    assert consistent_changes(1, 1) == ("larger", "smaller", "stable")
    assert consistent_changes(0, 1) == ("resolved",)
    assert consistent_changes(1, 0) == ("new",) and consistent_changes(0, -1) == (
        "absent",
        "resolved",
    )


def test_the_statement_is_ignored_by_the_labeler_in_its_section() -> None:
    statement = comparison_statement({"pleural_effusion": "resolved", "nodule": "larger"}, 40)
    assert statement.startswith("Prior study 40 days earlier.")
    assert "Pleural effusion has resolved." in statement
    report = f"FINDINGS: 9 mm right nodule.\n\nCOMPARISON: {statement}"
    assert label_report(report).labels["pleural_effusion"] == 0


def test_interval_questions() -> None:
    q = "Is the effusion new, larger, smaller, stable or resolved since the prior?"
    assert interval_question(q) == "pleural_effusion"
    assert interval_question("Has the nodule grown since the previous study?") == "nodule"
    assert interval_question("Is there a pleural effusion?") is None
    assert interval_question("Has anything changed since the prior?") is None  # no finding
