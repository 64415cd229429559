"""The interval figures pooled over sites: weighted by the decisions behind each."""

from __future__ import annotations

import pytest

from fedrad.simulations.benchmarks.utility import pooled_interval


def _site(pairs: int, decisions: int, model: float, rule: float) -> dict[str, object]:
    cell = {"n": decisions, "model": model, "rule": rule}
    return {
        "interval": {
            "pairs": pairs,
            "decisions": decisions,
            "model": model,
            "rule": rule,
            "by_finding": {"nodule": cell},
            "by_change": {"new": cell},
        }
    }


def test_sites_are_weighted_by_their_decisions() -> None:
    out = pooled_interval({"a": _site(2, 10, 1.0, 0.0), "b": _site(6, 30, 0.5, 1.0)})
    assert out["pairs"] == 8 and out["decisions"] == 40
    assert out["model"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)
    assert out["rule"] == pytest.approx(30 / 40)
    assert out["by_finding"]["nodule"]["n"] == 40
    assert out["by_change"]["new"]["model"] == pytest.approx(25 / 40)
    assert out["decisions_present"] == 40  # "new" only: every decision is about a finding
    assert out["model_present"] == pytest.approx(25 / 40)


def test_no_site_with_a_prior() -> None:
    assert pooled_interval({"a": {"interval": {"pairs": 0}}, "b": {}}) == {"pairs": 0}
