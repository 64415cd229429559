"""Reports and answers kept to the head's decisions: tidying, re-ranking, repair, templates."""

from __future__ import annotations

import itertools

import pytest

from fedrad.common.findings import FINDINGS, LATERAL_FINDINGS
from fedrad.common.grounding import (
    CANNOT_ANSWER,
    MAX_SENTENCES,
    disagreements,
    ground_answer,
    ground_report,
    needs_language_model,
    placeholder_rate,
    repeated_ngram_rate,
    report_target,
    template_report,
    template_sentence,
    tidy_report,
)
from fedrad.common.labeling.labeler import label_report
from fedrad.common.tasks import question_kind

NONE = dict.fromkeys(FINDINGS, 0)
HEAD = dict.fromkeys(FINDINGS, 0.01)

# The demo's final report before this change: repeated sections, placeholders, an indication.
GARBLED = (
    "EXAMINATION: CHEST (PORTABLE AP) INDICATION: ___ year old man with chest COMPARISON: "
    "Chest radiograph ___ ___ year old woman COMPARISON: None. FINDINGS: The cardiac "
    "silhouette is within normal limits. There is no pneumothorax. There is right lung base "
    "consolidation. There is no pneumothorax. IMPRESSION: Right effusion. ___ ___ ___."
)


@pytest.mark.parametrize("side", [None, "left", "right", "bilateral"])
@pytest.mark.parametrize("size", [None, 8.0, 12.5])
def test_every_template_reads_back_as_its_decisions(side: str | None, size: float | None) -> None:
    """All 729 decision vectors, with and without sides and a size: the labeler agrees."""
    sides = {f: side for f in LATERAL_FINDINGS}
    for combo in itertools.product((1, 0, -1), repeat=len(FINDINGS)):
        decisions = dict(zip(FINDINGS, combo, strict=True))
        read = label_report(template_report(decisions, sides, size))
        assert read.labels == decisions
        for finding in LATERAL_FINDINGS:
            if decisions[finding] != 0 and side is not None:
                assert read.sides[finding] == side
        if decisions["nodule"] != 0 and size is not None:
            assert read.nodule_size_mm == size


def test_template_sentences_are_plain_clinical_text() -> None:
    assert template_sentence("pleural_effusion", 1, "left") == "Left pleural effusion."
    assert (
        template_sentence("nodule", -1, "right", 8.0)
        == "Possible right pulmonary nodule measuring 8 mm."
    )
    assert template_sentence("cardiomegaly", 1, "left") == "Cardiomegaly."  # no side
    assert template_sentence("fracture", 0) == "No rib fracture."
    assert template_report(NONE).endswith("IMPRESSION: No acute cardiopulmonary abnormality.")


def test_tidy_keeps_findings_and_impression_once_without_placeholder_runs() -> None:
    tidy = tidy_report(GARBLED)
    assert tidy == (
        "FINDINGS: The cardiac silhouette is within normal limits. There is no pneumothorax. "
        "There is right lung base consolidation. IMPRESSION: Right effusion."
    )
    assert "INDICATION" not in tidy and "___" not in tidy
    assert tidy_report("FINDINGS: Compared to ___ ___ ___, no change.") == (
        "FINDINGS: Compared to ___, no change."
    )
    assert tidy_report("INDICATION: cough.") == ""
    assert report_target("INDICATION: cough.") == "INDICATION: cough."  # nothing else to learn
    long = " ".join(f"Line {i} is stable." for i in range(40))
    assert tidy_report(long).count(".") == MAX_SENTENCES


def test_the_candidate_that_agrees_wins_over_the_first() -> None:
    decisions = NONE | {"pleural_effusion": 1}
    candidates = ["FINDINGS: No effusion. Heart normal.", "FINDINGS: Small left pleural effusion."]
    grounded = ground_report(candidates, decisions)
    assert (grounded.source, grounded.candidate, grounded.raw_agreement) == ("generated", 1, 1.0)
    assert grounded.text == "FINDINGS: Small left pleural effusion."
    assert grounded.describe(2) == "language model, candidate 2 of 2"


def test_a_contradicting_sentence_is_rewritten_from_the_decision() -> None:
    decisions = NONE | {"pleural_effusion": 1}
    grounded = ground_report([GARBLED], decisions)
    assert grounded.source == "repaired"
    assert grounded.replaced == ("consolidation",)
    assert label_report(grounded.text).labels == decisions
    assert grounded.text.endswith("IMPRESSION: Right effusion. No consolidation.")
    assert "consolidation" in grounded.describe(1)


def test_a_repair_that_removes_an_agreeing_statement_restates_it() -> None:
    """One sentence names two findings; only one is wrong, and both must end right."""
    decisions = NONE | {"pleural_effusion": 1}
    grounded = ground_report(["FINDINGS: Left pleural effusion and pneumothorax."], decisions)
    read = label_report(grounded.text)
    assert read.labels == decisions
    assert read.sides["pleural_effusion"] == "left"  # the side the model wrote is kept


def test_no_usable_candidate_gives_the_template() -> None:
    decisions = NONE | {"cardiomegaly": -1}
    grounded = ground_report(["", "INDICATION: ___", "   "], decisions)
    assert (grounded.source, grounded.candidate) == ("template", None)
    assert label_report(grounded.text).labels == decisions
    assert grounded.describe(3).startswith("written from the findings")


def test_degeneration_figures() -> None:
    assert repeated_ngram_rate("no effusion no effusion no effusion") == pytest.approx(1 / 3)
    assert repeated_ngram_rate("the lungs are clear") == 0.0
    assert repeated_ngram_rate("") == 0.0
    assert placeholder_rate("___ year old ___") == pytest.approx(0.5)
    assert placeholder_rate("") == 0.0


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Is there a pleural effusion?", ("presence", "pleural_effusion")),
        ("Any fractures?", ("presence", "fracture")),
        ("Is the heart enlarged?", ("presence", "cardiomegaly")),
        ("Which side is the effusion?", ("side", "pleural_effusion")),
        ("Where is the pneumothorax?", ("side", "pneumothorax")),
        ("How large is the nodule?", ("size", "nodule")),
        ("What size is the pulmonary nodule?", ("size", "nodule")),
        ("What is the impression?", None),  # no finding
        ("Is there an effusion or a pneumothorax?", None),  # two findings
        ("Which side is the cardiomegaly?", None),  # no side to it
        ("How big is the effusion?", None),  # sizes are a nodule's
        ("Describe the nodule.", None),  # no known kind
    ],
)
def test_question_kinds(question: str, expected: tuple[str, str] | None) -> None:
    assert question_kind(question) == expected


def test_answers_come_from_the_head_then_the_report_then_the_model() -> None:
    decisions = NONE | {"pleural_effusion": 1, "nodule": -1}
    head = HEAD | {"pleural_effusion": 0.995, "nodule": 0.41}
    report = label_report("FINDINGS: Left pleural effusion. Possible nodule.")

    presence = ground_answer("Is there a pleural effusion?", decisions, head, report)
    assert (presence.value, presence.source) == ("yes", "finding head")
    assert presence.text == "yes (pleural effusion, probability 0.995 from the finding head)"
    assert ground_answer("Is there a nodule?", decisions, head, report).value == "possibly"
    assert ground_answer("Is there a pneumothorax?", decisions, head, report).value == "no"

    side = ground_answer("Which side is the effusion?", decisions, head, report)
    assert (side.value, side.source) == ("left", "report")
    absent = ground_answer("Which side is the pneumothorax?", decisions, head, report)
    assert (absent.value, absent.source) == ("there is no pneumothorax", "finding head")

    assert needs_language_model("How large is the nodule?", decisions, report)
    assert not needs_language_model("Which side is the effusion?", decisions, report)
    size = ground_answer("How large is the nodule?", decisions, head, report, "1.2 cm")
    assert (size.value, size.source) == ("12 mm", "language model")
    unsure = ground_answer("How large is the nodule?", decisions, head, report, "yes")
    assert (unsure.value, unsure.source) == ("not stated", "none")


def test_a_question_of_no_known_kind_is_not_guessed() -> None:
    answer = ground_answer("What is the patient's name?", NONE, HEAD, label_report(""))
    assert (answer.kind, answer.value, answer.source) == (None, CANNOT_ANSWER, "none")
    assert answer.text.startswith("cannot answer: ask whether a finding is present")


def test_a_side_against_the_side_head_is_a_disagreement_and_is_rewritten() -> None:
    decisions = NONE | {"pleural_effusion": 1}
    sides = {"pleural_effusion": "right"}
    wrong_side = "FINDINGS: Small left pleural effusion. IMPRESSION: Left effusion."
    assert disagreements(label_report(wrong_side), decisions, sides) == ["pleural_effusion"]
    assert disagreements(label_report("Pleural effusion."), decisions, sides) == []  # no side
    grounded = ground_report([wrong_side], decisions, sides)
    assert grounded.source == "repaired"
    assert grounded.text == "IMPRESSION: Right pleural effusion."
    assert label_report(grounded.text).sides["pleural_effusion"] == "right"


def test_a_side_question_is_answered_from_the_side_head() -> None:
    decisions = NONE | {"pneumothorax": 1}
    by_side = {"pneumothorax": {"left": 0.1, "right": 0.85, "bilateral": 0.05}}
    report = label_report("Left pneumothorax.")  # the report does not decide the side
    assert not needs_language_model("Which side is the pneumothorax?", decisions, report, by_side)
    answer = ground_answer(
        "Which side is the pneumothorax?", decisions, HEAD, report, side_probabilities=by_side
    )
    assert (answer.value, answer.source) == ("right", "finding head")
    assert answer.text.startswith("right (side probability 0.850; pneumothorax, probability")


@pytest.mark.parametrize(
    ("text", "tidy"),
    [
        # MIMIC's banner run together with the examination's title
        (
            "FINAL REPORT\n CHEST ON ___\n \n HISTORY: Intubation.\n \n FINDINGS: No effusion.",
            "FINDINGS: No effusion.",
        ),
        # headers a small model runs together on one line
        (
            "EXAMINATION: CHEST (PORTABLE AP) INDICATION: ___ year old man COMPARISON: None. "
            "FINDINGS: No effusion. IMPRESSION: Normal.",
            "FINDINGS: No effusion. IMPRESSION: Normal.",
        ),
        # a title in a mixed-case report goes; a report written in capitals keeps its text
        ("FINDINGS: CHEST PA. No effusion.", "FINDINGS: No effusion."),
        (
            "FINDINGS: Clear lungs. IMPRESSION: NO ACUTE PROCESS.",
            "FINDINGS: Clear lungs. IMPRESSION: NO ACUTE PROCESS.",
        ),
        (
            "FINAL REPORT CHEST PA AND LATERAL. HEART SIZE NORMAL. NO EFFUSION.",
            "FINDINGS: HEART SIZE NORMAL. NO EFFUSION.",
        ),
        ("FINAL REPORT: Small left effusion.", "FINDINGS: Small left effusion."),
        (
            "Report of the prior study is noted. No effusion.",
            "FINDINGS: Report of the prior study is noted. No effusion.",
        ),
    ],
)
def test_banners_titles_and_run_together_headers_are_not_findings(text: str, tidy: str) -> None:
    assert tidy_report(text) == tidy
