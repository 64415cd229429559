"""Evaluation on held-out studies: AUROC alone (no generated text) is a valid evaluation."""

from __future__ import annotations

from fedrad.client.training.evaluate import EvalConfig, evaluate
from tests.model_fixtures import micro_model, micro_studies


def test_an_evaluation_without_reports_or_questions_reports_auroc_only() -> None:
    model = micro_model()
    studies = micro_studies(10, model.config.image_size)
    result = evaluate(model, studies, EvalConfig(max_reports=0, max_questions=0))
    assert result["n_reports"] == 0 and result["n_questions"] == 0
    assert result["ce_f1"] is None and result["bleu4"] is None and result["qa_accuracy"] is None
    assert result["n_studies"] == 10
