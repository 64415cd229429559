"""A patient's studies linked at the site: priors, the patient-level split, the interval head
under DP, and the comparison a reading makes or refuses."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import random

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedrad.client.ingest.dataset import SiteStudies, split_held_out
from fedrad.client.reading.comparison import Identity, Scan, prior_problem
from fedrad.client.reading.inference import answer_scan
from fedrad.client.training.interval_evaluation import interval_evaluation
from fedrad.common.findings import FINDINGS
from fedrad.common.interval import CHANGES
from tests.model_fixtures import micro_examples, micro_model, micro_studies


def _with(studies: SiteStudies, i: int, **changes: object) -> SiteStudies:
    rows = list(studies.studies)
    rows[i] = dataclasses.replace(rows[i], **changes)  # type: ignore[arg-type]
    return SiteStudies(rows, studies.images)


def test_a_prior_is_the_same_patients_latest_earlier_study_of_the_same_kind() -> None:
    studies = micro_studies(9, patients=3, ct_every=4)
    priors = studies.priors()
    for i, p in enumerate(priors):
        if p is None:
            continue
        a, b = studies.studies[p], studies.studies[i]
        assert a.patient == b.patient and a.modality == b.modality and a.day < b.day
    # patient p1: studies 1, 4 (CT), 7: study 7's prior skips the CT
    assert priors[7] == 1 and priors[4] is None and priors[1] is None
    # patient p0: studies 0 (CT), 3, 6: the CT is no radiograph's prior
    assert priors[3] is None and priors[6] == 3


def test_unknown_patient_or_date_or_same_day_links_nothing() -> None:
    studies = micro_studies(6, patients=3)
    assert studies.priors()[3] == 0
    assert _with(studies, 3, patient="").priors()[3] is None
    assert _with(studies, 0, day=None).priors()[3] is None
    assert _with(studies, 0, day=3).priors()[3] is None  # same day: no order


def test_the_split_keeps_a_patients_studies_together() -> None:
    studies = micro_studies(40, patients=10)
    train, held = split_held_out(studies, fraction=0.3)
    assert {s.patient for s in train.studies}.isdisjoint({s.patient for s in held.studies})
    assert len(held) and len(train)


def test_interval_targets_come_from_the_two_reports() -> None:
    examples = micro_examples(micro_model(), 12, patients=4)
    for i, (p, row) in enumerate(zip(examples.prior_rows, examples.interval, strict=True)):
        if p is None:
            assert bool((row == -1).all())
            continue
        before, now = examples.studies.studies[p], examples.studies.studies[i]
        k = FINDINGS.index("nodule")  # a nodule without a size stated: unknown if it persists
        if before.labels["nodule"] == 0 and now.labels["nodule"] == 1:
            assert CHANGES[int(row[k])] == "new"
        if before.labels["nodule"] == 1 and now.labels["nodule"] == 0:
            assert CHANGES[int(row[k])] == "resolved"


def _batch(model, n: int):  # type: ignore[no-untyped-def]
    ex = micro_examples(model, n, patients=3)
    return tuple(torch.stack(col) for col in zip(*(ex[i] for i in range(n)), strict=True))


def test_the_interval_head_trains_exactly_under_dp() -> None:
    """Opacus' per-sample step equals the plain step (no noise, no clipping) with priors in
    the batch: the prior's features are a constant input, so per-sample gradients stay exact."""
    base = micro_model()
    batch = _batch(base, 9)
    assert bool((batch[-1] >= 0).any())  # some rows have a known change
    plain, private = copy.deepcopy(base), copy.deepcopy(base)
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    lm, finding, _ = plain(*batch)
    (lm + finding).mean().backward()
    assert plain.interval_head.weight.grad is not None
    assert float(plain.interval_head.weight.grad.abs().sum()) > 0
    opt.step()
    gsm = GradSampleModule(private)
    dp_params = [p for p in private.parameters() if p.requires_grad]
    dp_opt = DPOptimizer(
        torch.optim.SGD(dp_params, lr=0.5),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch_size=batch[0].shape[0],
    )
    lm, finding, _ = gsm(*batch)
    (lm + finding).mean().backward()
    per_row = private.interval_head.weight.grad_sample
    no_prior = ~(batch[-1] >= 0).any(dim=1)
    assert bool(no_prior.any())
    assert float(per_row[no_prior].abs().sum()) == 0.0  # a row without a prior adds nothing
    dp_opt.step()
    gsm._close()
    assert torch.allclose(plain.interval_head.weight, private.interval_head.weight, atol=1e-6)


def test_interval_evaluation_reports_model_and_rule() -> None:
    model = micro_model()
    result = interval_evaluation(model, micro_studies(12, patients=3))
    assert result["pairs"] == 9
    assert 0.0 <= result["model"] <= 1.0 and 0.0 <= result["rule"] <= 1.0  # type: ignore[operator]
    assert set(result["by_finding"]) <= set(FINDINGS)  # type: ignore[arg-type]
    changed = sum(v["n"] for c, v in result["by_change"].items() if c != "absent")  # type: ignore[union-attr]
    assert result["decisions_present"] == changed
    assert interval_evaluation(model, micro_studies(6))["pairs"] == 0


def _scan(patient: str, day: int | None, kind: str = "radiograph") -> Scan:
    date = dt.date(2024, 1, 1) + dt.timedelta(days=day) if day is not None else None
    shape = (1, 1, 8, 16, 16) if kind == "CT" else (1, 1, 32, 32)
    return Scan(torch.randn(shape), kind, kind, Identity(patient, date))


@pytest.mark.parametrize(
    ("prior", "reason"),
    [
        (_scan("B", 0), "another patient"),
        (_scan("A", 50), "newer than the current study (by 10 days)"),
        (_scan("A", 40), "same day"),
        (_scan("A", 0, "CT"), "same kind of scan"),
        (_scan("", 0), "prior's header names no patient"),
        (_scan("A", None), "prior's header has no study date"),
    ],
)
def test_a_prior_that_cannot_be_compared_is_named(prior: Scan, reason: str) -> None:
    problem = prior_problem(_scan("A", 40), prior)
    assert problem is not None and reason in problem


def test_a_reading_with_a_prior_states_the_comparison_and_answers_about_it() -> None:
    model = micro_model()
    current, prior = _scan("A", 40), _scan("A", 0)
    q = "Is the effusion new, larger, smaller, stable or resolved since the prior?"
    out = answer_scan(model, current.tensor, question=q, current=current, prior=prior, candidates=1)
    assert out.comparison is not None and out.comparison.compared
    assert out.comparison.days_before == 40
    assert "COMPARISON: Prior study 40 days earlier." in out.report
    assert out.answer_value in CHANGES
    change = out.comparison.changes["pleural_effusion"]
    assert out.answer_value == change
    decided = out.decisions["pleural_effusion"]
    if decided == 1:
        assert change in ("new", "larger", "smaller", "stable")
    elif decided == 0:
        assert change in ("absent", "resolved")

    other = answer_scan(
        model, current.tensor, question=q, current=current, prior=_scan("B", 0), candidates=1
    )
    assert other.comparison is not None and not other.comparison.compared
    assert "COMPARISON" not in other.report
    assert other.answer_value == "cannot answer" and "another patient" in str(other.answer)
    unread = answer_scan(model, current.tensor, current=current, prior="unreadable", candidates=1)
    assert unread.comparison is not None and unread.comparison.reason == "unreadable"
    none = answer_scan(model, current.tensor, question=q, candidates=1)
    assert none.comparison is None and none.answer_value == "cannot answer"


@pytest.mark.parametrize("seed", range(40))
def test_a_small_site_always_keeps_studies_to_train_on(seed: int) -> None:
    """Keyed pseudonyms hash anywhere: patients with several studies each must not take a
    small site's held-out split beyond ceil(fraction x n) (the first patient excepted)."""
    rng = random.Random(seed)
    n = rng.randint(2, 12)
    studies = micro_studies(n)
    owners = [f"p{seed}-{rng.randint(0, max(1, n // 2))}" for _ in range(n)]
    rows = [dataclasses.replace(s, patient=o) for s, o in zip(studies.studies, owners, strict=True)]
    site = SiteStudies(rows, studies.images)
    train, held = split_held_out(site, fraction=0.2)
    assert len(train) >= 1 and len(held) >= 1 and len(train) + len(held) == n
    sides = {s.patient: "held" for s in held.studies}
    if len(set(owners)) > 1:
        assert all(sides.get(s.patient) != "held" for s in train.studies)  # never split
        first = max(owners.count(s.patient) for s in held.studies)
        assert len(held) <= max(math.ceil(0.2 * n), first)
