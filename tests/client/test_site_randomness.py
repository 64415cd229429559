"""Local DP against the coordinator: a site's noise and sampling are its own secret, and what an
evaluation releases is noised and charged to the ledger.

The coordinator sends the plan (seed included) and sees every update: if the same plan on the
same data gave the same update, it could replay the noise and undo it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    cached_model,
    evaluate_site,
    train_site,
    trainable_arrays,
)
from fedrad.client.site.policy import SitePolicy, check_run_plan
from fedrad.client.training.evaluate import EvalConfig, evaluate, study_outputs
from fedrad.client.training.private_evaluation import contribution_sums, release, sensitivity
from fedrad.client.training.private_sgd import PoissonBatchSampler, SiteNoiseDPOptimizer
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key
from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.messages import EVAL_FAMILIES, ProtocolError, RoundConfig
from tests.fl_fixtures import micro_foundation, micro_site, round_config
from tests.model_fixtures import micro_model, micro_studies

pytestmark = pytest.mark.usefixtures("fresh_site_process")


def _ledger(spec: SiteSpec) -> list[dict]:
    return Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path)).entries()


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in sorted(arrays)])


# -- the randomness itself -------------------------------------------------------------------


def test_secure_draws_never_repeat_and_reproducible_ones_do() -> None:
    secure = MechanismRandomness()
    assert secure.is_secure
    assert not torch.equal(secure.standard_normal(64), secure.standard_normal(64))
    a, b = (MechanismRandomness.reproducible("site/run/0/1/train") for _ in range(2))
    assert not a.is_secure
    assert torch.equal(a.standard_normal(64), b.standard_normal(64))
    other = MechanismRandomness.reproducible("site/run/0/2/train")
    assert not torch.equal(MechanismRandomness.reproducible("site/run/0/1/train").uniform(8),
                           other.uniform(8))  # fmt: skip


def test_the_gaussian_and_the_uniforms_have_the_right_law() -> None:
    randomness = MechanismRandomness()
    z = randomness.standard_normal(200_000)
    assert z.dtype == torch.float64
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() > 1.96).double().mean()) - 0.05) < 0.003  # the tails too
    u = randomness.uniform(100_000)
    assert float(u.min()) >= 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    noise = randomness.gaussian_like(torch.zeros(3, 4, dtype=torch.float32), 2.0)
    assert noise.shape == (3, 4) and noise.dtype == torch.float32
    assert torch.equal(randomness.gaussian_like(torch.ones(2), 0.0), torch.zeros(2))


def test_poisson_batches_draw_each_record_at_the_rate() -> None:
    sampler = PoissonBatchSampler(200, sample_rate=0.1, steps=300, randomness=MechanismRandomness())
    sizes = [len(batch) for batch in sampler]
    assert len(sizes) == 300
    assert abs(np.mean(sizes) - 20) < 1.0
    assert all(len(set(b)) == len(b) for b in sampler)  # a record joins a batch at most once


def test_the_dp_optimizer_adds_the_sites_noise_at_sigma_c_over_b() -> None:
    """Zero gradients in, the noise alone out: std sigma * C / B per coordinate."""
    param = torch.nn.Parameter(torch.zeros(20_000))
    optimizer = SiteNoiseDPOptimizer(
        torch.optim.SGD([param], lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=4,
        randomness=MechanismRandomness(),
    )
    param.grad_sample = torch.zeros(4, 20_000)
    optimizer.step()
    assert float(param.detach().std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.03)


# -- a round at a site -----------------------------------------------------------------------


def test_the_same_plan_twice_gives_different_updates_under_the_same_mechanism(
    tmp_path: Path,
) -> None:
    foundation = micro_foundation(tmp_path)
    start = trainable_arrays(cached_model(foundation))
    plan = round_config()
    updates, entries = [], []
    for name in ("first", "second"):
        spec = micro_site(tmp_path / name, "site_a", foundation)
        updates.append(_flat(train_site(spec, start, plan).arrays))
        entries.append(_ledger(spec)[-1])
    assert not np.allclose(updates[0], updates[1])
    mechanism = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "epsilon")
    assert [entries[0][k] for k in mechanism] == [entries[1][k] for k in mechanism]


def test_insecure_reproducible_repeats_a_round_exactly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foundation = micro_foundation(tmp_path)
    start = trainable_arrays(cached_model(foundation))
    updates = []
    for name in ("first", "second"):
        spec = dataclasses.replace(
            micro_site(tmp_path / name, "site_a", foundation), insecure_reproducible=True
        )
        updates.append(_flat(train_site(spec, start, round_config()).arrays))
    np.testing.assert_array_equal(updates[0], updates[1])
    assert "INSECURE REPRODUCIBLE" in caplog.text


def test_a_round_config_cannot_steer_the_randomness() -> None:
    record = round_config().to_record()
    for key in ("noise-seed", "dp-seed", "sampling-seed", "insecure-reproducible"):
        with pytest.raises(ProtocolError, match="own CSPRNG"):
            RoundConfig.from_record({**record, key: 1})
    with pytest.raises(SiteRefusalError, match="own CSPRNG"):
        SiteSpec.from_node_config(
            {"site-id": "a", "data-dir": "/x", "foundation-dir": "/y", "noise-seed": 3}
        )


# -- what an evaluation releases -------------------------------------------------------------


def test_an_exact_release_matches_the_sites_own_evaluation() -> None:
    """Without noise the released figures are the evaluation's (AUROC binned, QA per study)."""
    model = micro_model()
    studies = micro_studies(24, model.config.image_size)
    config = EvalConfig(max_reports=6, max_questions=12)
    exact = evaluate(model, studies, config)
    released = release(
        study_outputs(model, studies, config),
        tuple(EVAL_FAMILIES),
        noise_multiplier=0.0,
        randomness=MechanismRandomness(),
    ).metrics
    for key in (
        "ce_f1",
        "ce_precision",
        "ce_recall",
        "rouge_l",
        "report_head_agreement",
        "repeated_4gram",
        "placeholders",
    ):
        if math.isnan(released[key]):  # no count behind it: the exact figure is 0 or None
            assert not exact[key]
        else:
            assert released[key] == pytest.approx(exact[key], abs=1e-9)
    for finding, value in exact["auroc"].items():  # type: ignore[union-attr]
        if value is not None:
            assert released[f"auroc_{finding}"] == pytest.approx(value, abs=0.15)


def test_one_study_moves_the_released_sums_by_at_most_the_sensitivity() -> None:
    model = micro_model()
    studies = micro_studies(12, model.config.image_size)
    families = tuple(EVAL_FAMILIES)
    out = study_outputs(model, studies, EvalConfig(max_reports=12, max_questions=1000))
    full = contribution_sums(out, families)
    for drop in range(len(studies)):
        keep = [i for i in range(len(studies)) if i != drop]
        fewer = dataclasses.replace(
            out,
            probabilities=out.probabilities[keep],
            labels=out.labels[keep],
            report_index=[i for i in out.report_index if i != drop],
            generated=[
                g for i, g in zip(out.report_index, out.generated, strict=True) if i != drop
            ],
            references=[
                r for i, r in zip(out.report_index, out.references, strict=True) if i != drop
            ],
            first_candidates=[
                c for i, c in zip(out.report_index, out.first_candidates, strict=True) if i != drop
            ],
            sources=[s for i, s in zip(out.report_index, out.sources, strict=True) if i != drop],
            decisions=[
                d for i, d in zip(out.report_index, out.decisions, strict=True) if i != drop
            ],
            sides=[s for i, s in zip(out.report_index, out.sides, strict=True) if i != drop],
            qa_study=[s for s in out.qa_study if s != drop],
            qa_kind=[k for s, k in zip(out.qa_study, out.qa_kind, strict=True) if s != drop],
            answers=[a for s, a in zip(out.qa_study, out.answers, strict=True) if s != drop],
            expected=[e for s, e in zip(out.qa_study, out.expected, strict=True) if s != drop],
        )
        less = contribution_sums(fewer, families)
        moved = math.sqrt(sum(float(np.sum((full[f] - less[f]) ** 2)) for f in families))
        assert moved <= sensitivity(families) + 1e-9


def test_an_evaluation_is_noised_recorded_and_capped_by_policy(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    start = trainable_arrays(cached_model(foundation))
    spec = micro_site(tmp_path, "site_a", foundation)
    plan = round_config(eval_metrics="auroc")
    released = evaluate_site(spec, start, plan)
    entry = _ledger(spec)[-1]
    assert (entry["sample_rate"], entry["steps"]) == (1.0, 1)
    assert entry["max_grad_norm"] == pytest.approx(sensitivity(["auroc"]))
    assert released.metrics["eval_epsilon"] == pytest.approx(plan.eval_epsilon, rel=0.01)
    assert "ce_f1" not in released.metrics  # not asked for: not computed, not sent

    capped = dataclasses.replace(spec, policy=SitePolicy(max_epsilon_per_evaluation=0.25))
    assert evaluate_site(capped, start, plan).metrics["eval_epsilon"] == pytest.approx(
        0.25, rel=0.01
    )

    withheld = dataclasses.replace(spec, policy=SitePolicy(release_metrics=("auroc",)))
    spent = _ledger(spec)
    with pytest.raises(SiteRefusalError, match="does not release report"):
        evaluate_site(withheld, start, round_config(eval_metrics="auroc,report"))
    ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    assert ledger.entries() == spent  # nothing spent
    assert "does not release report" in ledger.refusals()[-1]["reason"]  # and on record

    poor = dataclasses.replace(spec, epsilon=float(spent[-1]["epsilon"]))  # budget all spent
    with pytest.raises(SiteRefusalError, match="past"):
        evaluate_site(poor, start, plan)


def test_a_run_asking_for_withheld_figures_is_refused_before_it_starts() -> None:
    policy = SitePolicy(release_metrics=("auroc",))
    assert "does not release report, qa" in (check_run_plan(policy, {}) or "")
    assert check_run_plan(policy, {"eval-metrics": "auroc"}) is None
    assert check_run_plan(SitePolicy(), {}) is None


def test_a_plan_asking_for_no_figures_spends_nothing_on_evaluation(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    start = trainable_arrays(cached_model(foundation))
    plan = round_config(eval_metrics="none", planned_rounds=1)
    asked, silent = (micro_site(tmp_path / name, "site_a", foundation) for name in ("a", "b"))
    trained = {
        "asked": train_site(asked, start, round_config(planned_rounds=1)),
        "silent": train_site(silent, start, plan),
    }
    # nothing reserved for evaluation: the silent plan's training gets the whole target
    assert trained["silent"].metrics["epsilon"] > trained["asked"].metrics["epsilon"]
    released = evaluate_site(silent, start, plan)
    assert set(released.metrics) == {"num-examples", "n_studies"}
    assert len(_ledger(silent)) == 1  # the training round only
    with pytest.raises(ProtocolError, match="eval_metrics"):
        round_config(eval_metrics="")
