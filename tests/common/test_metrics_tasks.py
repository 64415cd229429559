"""Metrics and task text: AUROC edge cases, clinical efficacy, BLEU/ROUGE bounds, prompts."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.common.findings import FINDINGS
from fedrad.common.metrics import (
    answer_accuracy,
    bleu4,
    clinical_efficacy,
    finding_auroc,
    macro,
    rouge_l,
)
from fedrad.common.tasks import Thresholds, all_questions, qa_prompt, report_prompt, suggestions


def test_auroc_perfect_random_and_single_class() -> None:
    labels = np.array([[1, 0, 0, -1, 1, 0], [0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 0]] * 4)
    probs = labels.clip(0, 1).astype(float)
    auroc = finding_auroc(probs, labels)
    assert auroc["nodule"] == pytest.approx(1.0)
    assert auroc["pleural_effusion"] is None  # one class only
    assert auroc["pneumothorax"] == pytest.approx(1.0)  # the -1 row is left out
    assert macro(auroc) == pytest.approx(1.0)
    assert finding_auroc(1 - probs, labels)["nodule"] == pytest.approx(0.0)


def test_clinical_efficacy_counts_findings_in_both_texts() -> None:
    refs = ["Small left pleural effusion.", "No acute disease.", "Right pneumothorax."]
    same = clinical_efficacy(refs, refs)
    assert same["f1"] == pytest.approx(1.0)
    wrong = clinical_efficacy(["No acute disease."] * 3, refs)
    assert wrong["f1"] == 0.0 and wrong["recall"] == 0.0


def test_bleu_and_rouge_bounds() -> None:
    refs = ["the lungs are clear without effusion or pneumothorax"] * 3
    assert bleu4(refs, refs) == pytest.approx(1.0)
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    assert bleu4(["cardiomegaly"] * 3, refs) < 0.05
    assert answer_accuracy(["Yes.", "no"], ["yes", "yes"]) == 0.5


def test_report_prompt_states_every_finding_and_details_where_known() -> None:
    labels = dict.fromkeys(FINDINGS, 0)
    assert report_prompt(labels) == (
        "findings: nodule absent; effusion absent; cardiomegaly absent; pneumothorax absent; "
        "consolidation absent; fracture absent\nreport:"
    )
    labels.update(pleural_effusion=1, nodule=-1)
    sides = dict.fromkeys(FINDINGS) | {"pleural_effusion": "left", "fracture": "right"}
    assert report_prompt(labels, sides, 8.0) == (
        "findings: nodule uncertain 8 mm; effusion present left; cardiomegaly absent; "
        "pneumothorax absent; consolidation absent; fracture absent\nreport:"
    )  # an absent finding's side is not stated
    assert qa_prompt(labels, " Is there\na nodule? ").endswith(
        "fracture absent\nquestion: Is there a nodule?\nanswer:"
    )


def test_decisions_follow_the_sites_thresholds() -> None:
    probs = dict.fromkeys(FINDINGS, 0.1) | {"fracture": 0.9, "nodule": 0.4}
    assert suggestions(probs)["fracture"] == 1 and suggestions(probs)["nodule"] == -1
    strict = Thresholds(present=0.95, possible=0.5)
    assert (
        suggestions(probs, strict)["fracture"] == -1 and suggestions(probs, strict)["nodule"] == 0
    )
    for bad in ((0.3, 0.5), (1.0, 0.3), (0.5, 0.0)):
        with pytest.raises(ValueError, match="thresholds"):
            Thresholds(*bad)


def test_questions_cover_presence_side_and_size() -> None:
    labels = dict.fromkeys(FINDINGS, 0) | {"nodule": 1}
    sides = dict.fromkeys(FINDINGS) | {"nodule": "left"}
    qa = {q.question: q.answer for q in all_questions(labels, sides, 8.0)}
    assert qa["Is there a pulmonary nodule?"] == "yes"
    assert qa["Which side is the nodule?"] == "left"
    assert qa["How large is the nodule?"] == "8 mm"
    assert qa["Which side is the effusion?"] == "there is no effusion"


def test_metrics_of_no_generated_text_are_undefined_not_zero() -> None:
    """eval_reports = 0 (AUROC only) must not crash an evaluation or report a zero F1."""
    empty = clinical_efficacy([], [])
    assert empty["f1"] is None and empty["macro_f1"] is None and empty["precision"] is None
    assert bleu4([], []) is None and rouge_l([], []) is None
