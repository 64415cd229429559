"""The framework-free site agent: a round trip through train/evaluate with the ledger,
calibration against the planned schedule, budget refusal, FedProx, and input checks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.federation import site_agent
from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    cached_model,
    evaluate_site,
    train_site,
    trainable_arrays,
)
from fedrad.common.privacy.accounting import MechanismStep, calibrate_noise, cumulative_epsilon
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key, verify_ledger
from fedrad.common.protocol.messages import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, ProtocolError
from tests.fl_fixtures import micro_foundation, micro_site, round_config

pytestmark = pytest.mark.usefixtures("fresh_site_process")


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def test_round_trip_trains_records_and_meets_the_planned_budget(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path, "site_a", foundation)
    start = trainable_arrays(cached_model(foundation))
    plan = round_config()

    first = train_site(spec, start, plan)
    assert set(first.arrays) == set(start)
    assert _distance(first.arrays, start) > 0
    assert set(first.metrics) <= TRAIN_METRIC_KEYS
    assert first.num_examples == first.metrics["num-examples"]
    second = train_site(spec, first.arrays, dataclasses.replace(plan, server_round=2))

    ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    entries = ledger.entries()
    assert [e["round"] for e in entries] == [1, 2]
    assert {e["run_id"] for e in entries} == {"test-run"}
    # the noise was calibrated once for the whole plan: same sigma; the planned evaluations
    # are reserved inside the target (round 1's did not run here, so round 2 spends a bit more)
    assert entries[1]["noise_multiplier"] == pytest.approx(entries[0]["noise_multiplier"], rel=0.1)
    assert first.metrics["epsilon"] < second.metrics["epsilon"] < 5.0
    assert second.metrics["epsilon"] == pytest.approx(entries[1]["epsilon"])
    public = load_or_create_signing_key(spec.key_path).public_key()
    assert verify_ledger(spec.ledger_path, public) == []

    released = evaluate_site(spec, second.arrays, dataclasses.replace(plan, server_round=2))
    assert set(released.metrics) == EVAL_METRIC_KEYS
    assert released.metrics["num-examples"] == released.num_examples > 0
    assert all(isinstance(v, float) for v in released.metrics.values())
    last = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path)).entries()[-1]
    assert (last["sample_rate"], last["steps"]) == (1.0, 1)  # one Gaussian release
    assert last["noise_multiplier"] == released.metrics["eval_noise_multiplier"]
    assert last["epsilon"] == pytest.approx(5.0, rel=0.02)  # the plan spends its target


def test_budget_and_plan_are_enforced(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path, "site_a", foundation)
    start = trainable_arrays(cached_model(foundation))
    train_site(spec, start, round_config(planned_rounds=1))
    capped = dataclasses.replace(spec, epsilon=1.0)  # the hospital's own, lower cap
    with pytest.raises(SiteRefusalError, match="budget exhausted"):
        train_site(capped, start, round_config(run_id="second-run", planned_rounds=1))
    with pytest.raises(ProtocolError, match="past the plan"):
        round_config(server_round=3, planned_rounds=2)
    ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    assert len(ledger.entries()) == 1  # the refused round spent nothing
    assert [r["run_id"] for r in ledger.refusals()] == ["second-run"]


def test_a_repeated_round_still_fits_the_budget() -> None:
    """After a crash a round may run twice: the remaining schedule is recalibrated to fit."""
    q, steps = 0.1, 20
    history = [MechanismStep(1.5, q, steps)]  # epsilon about 2 already spent
    sigma = calibrate_noise(
        history, sample_rate=q, steps=steps, target_epsilon=8.0, delta=1e-5, accountant="rdp"
    )
    total = cumulative_epsilon([*history, MechanismStep(sigma, q, steps)], delta=1e-5)
    assert total <= 8.0
    assert total == pytest.approx(8.0, rel=0.01)


def test_global_arrays_must_match_the_trainable_set(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path, "site_a", foundation)
    start = trainable_arrays(cached_model(foundation))
    extra = {**start, "lm.base_model.model.transformer.wte.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(SiteRefusalError, match="unexpected"):
        train_site(spec, extra, round_config())
    name = next(iter(start))
    wrong = {**start, name: np.zeros((1,), np.float32)}
    with pytest.raises(SiteRefusalError, match="shape"):
        train_site(spec, wrong, round_config())
    assert not spec.ledger_path.exists()  # nothing spent on a refused round


@pytest.mark.parametrize("dp", [False, True])
def test_fedprox_term_keeps_the_update_near_the_global_model(tmp_path: Path, dp: bool) -> None:
    foundation = micro_foundation(tmp_path)
    start = trainable_arrays(cached_model(foundation))
    distances = []
    for mu in (0.0, 50.0):
        spec = micro_site(tmp_path / f"mu{mu}", "site_a", foundation)
        plan = round_config(
            dp=dp, target_epsilon=1e4, local_steps=4, planned_rounds=1, proximal_mu=mu
        )
        distances.append(_distance(train_site(spec, start, plan).arrays, start))
    assert distances[1] < 0.7 * distances[0]
    assert all(math.isfinite(d) for d in distances)


def test_a_deployed_site_names_itself_in_its_node_config(tmp_path: Path) -> None:
    spec = SiteSpec.from_node_config(
        {
            "site-id": "st_hildegard",
            "data-dir": str(tmp_path / "data"),
            "foundation-dir": str(tmp_path / "foundation"),
            "epsilon-budget": 3.0,
        }
    )
    assert spec.site_id == "st_hildegard" and spec.epsilon == 3.0
    assert spec.ledger_path == tmp_path / "data" / ".fedrad-site" / "ledger.jsonl"
    with pytest.raises(SiteRefusalError, match="data-dir, foundation-dir"):
        SiteSpec.from_node_config({"site-id": "x"})


def test_a_site_prepares_its_export_into_its_cache_dir(tmp_path: Path) -> None:
    from fedrad.common.synthetic.cohort import generate_cohort

    generate_cohort(tmp_path / "cohort", sites=1, studies_per_site=8, seed=1, workers=1)
    data = tmp_path / "cohort" / "site_1"
    spec = SiteSpec(
        site_id="site_1",
        foundation_dir=tmp_path / "foundation",
        ledger_path=tmp_path / "ledger.jsonl",
        key_path=tmp_path / "key.pem",
        data_dir=data,
        cache_dir=tmp_path / "prepared",
    )
    train, held = site_agent.site_studies(spec, 32)
    assert len(train) + len(held) > 0
    assert list((tmp_path / "prepared").glob("*/manifest.json"))
    assert not (data / ".fedrad-cache").exists()  # nothing written into the export
