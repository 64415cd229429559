"""Strategy choice by name, sized to the federation, NaN-aware metric aggregation and FedAdam
state that survives a resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedrad.server.strategies import (
    build_strategy,
    restore_strategy_state,
    strategy_state,
    weighted_metrics,
)


@pytest.mark.parametrize(
    ("name", "kind"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)]
)
@pytest.mark.parametrize("sites", [1, 3])
def test_strategy_by_name_waits_for_exactly_the_configured_sites(
    name: str, kind: type, sites: int
) -> None:
    strategy = build_strategy(name, num_sites=sites, proximal_mu=0.1, server_lr=0.01)
    assert type(strategy) is kind
    assert strategy.min_train_nodes == strategy.min_evaluate_nodes == sites
    assert strategy.min_available_nodes == sites
    assert strategy.fraction_train == strategy.fraction_evaluate == 1.0
    if name == "fedprox":
        assert strategy.proximal_mu == 0.1
    if name == "fedadam":
        assert strategy.eta == 0.01


def test_bad_choices_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedsgd", num_sites=2)
    with pytest.raises(ValueError, match="proximal_mu"):
        build_strategy("fedprox", num_sites=2, proximal_mu=0.0)
    with pytest.raises(ValueError, match="at least one site"):
        build_strategy("fedavg", num_sites=0)


def test_metrics_average_by_weight_skipping_undefined_values() -> None:
    records = [
        RecordDict(
            {"m": MetricRecord({"num-examples": 3.0, "macro_auroc": 0.9, "n_studies": 3.0})}
        ),
        RecordDict(
            {"m": MetricRecord({"num-examples": 1.0, "macro_auroc": math.nan, "n_studies": 1.0})}
        ),
        RecordDict(
            {"m": MetricRecord({"num-examples": 1.0, "macro_auroc": 0.4, "n_studies": 1.0})}
        ),
    ]
    out = weighted_metrics(records, "num-examples")
    assert out["macro_auroc"] == pytest.approx((3 * 0.9 + 0.4) / 4)
    assert out["n_studies"] == 5.0
    assert out["num-examples"] == 5.0


def test_fedadam_moments_round_trip() -> None:
    strategy = build_strategy("fedadam", num_sites=2)
    strategy.m_t = {"w": np.ones(3)}
    strategy.v_t = {"w": np.full(3, 2.0)}
    state = strategy_state(strategy)
    fresh = build_strategy("fedadam", num_sites=2)
    restore_strategy_state(fresh, state)
    assert np.array_equal(fresh.m_t["w"], np.ones(3))
    assert np.array_equal(fresh.v_t["w"], np.full(3, 2.0))
    assert strategy_state(build_strategy("fedavg", num_sites=2)) == {}
    with pytest.raises(ValueError, match="does not fit"):
        restore_strategy_state(build_strategy("fedavg", num_sites=2), state)
