"""Each modality part is averaged over the sites that trained it, on every aggregation path."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.common.model.parts import declared_parts, part_metrics, part_of
from fedrad.server.part_average import partial_parts, rescale_parts

NAMES = ("projector.0.weight", "volume_projector.0.weight", "head.weight")


def _weighted_mean(values: list[dict[str, np.ndarray]], weights: list[float], name: str):
    return sum(w * v[name] for w, v in zip(weights, values, strict=True)) / sum(weights)


def test_parts_by_name() -> None:
    assert [part_of(n) for n in NAMES] == ["radiograph", "CT", "shared"]
    assert part_of("lm.base_model.model.h.0.lora_A.weight") == "shared"


@pytest.mark.parametrize("weights", [[10.0, 30.0, 20.0], [1.0, 1.0, 1.0]])
def test_the_mean_over_all_sites_becomes_the_mean_over_those_that_trained_each_part(
    weights: list[float],
) -> None:
    rng = np.random.default_rng(0)
    previous = {n: rng.standard_normal(4) for n in NAMES}
    reached = [frozenset({"radiograph"}), frozenset({"CT"}), frozenset({"radiograph", "CT"})]
    values = []
    for parts in reached:  # an untrained part comes back unchanged
        values.append(
            {
                n: previous[n] + rng.standard_normal(4)
                if part_of(n) in (*parts, "shared")
                else previous[n].copy()
                for n in NAMES
            }
        )
    mean = {n: _weighted_mean(values, weights, n) for n in NAMES}  # what FedAvg gives
    new = rescale_parts(mean, previous, weights, reached)
    for n in NAMES:
        part = part_of(n)
        trained = [i for i, p in enumerate(reached) if part == "shared" or part in p]
        expected = _weighted_mean([values[i] for i in trained], [weights[i] for i in trained], n)
        np.testing.assert_allclose(new[n], expected, rtol=1e-10)


def test_a_part_no_site_trained_keeps_its_value_and_full_parts_are_untouched() -> None:
    previous = {n: np.ones(3) for n in NAMES}
    mean = {n: np.full(3, 2.0) for n in NAMES}
    reached = [frozenset({"radiograph"}), frozenset({"radiograph"})]
    new = rescale_parts(mean, previous, [1.0, 3.0], reached)
    np.testing.assert_array_equal(new["volume_projector.0.weight"], np.ones(3))
    np.testing.assert_array_equal(new["projector.0.weight"], np.full(3, 2.0))
    assert partial_parts([1.0, 3.0], reached) == []  # nobody trained CT: nothing to rescale
    assert partial_parts([1.0, 3.0], [reached[0], frozenset({"CT"})]) == ["radiograph", "CT"]


def test_replies_without_a_declaration_trained_everything() -> None:
    previous = {n: np.zeros(2) for n in NAMES}
    mean = {n: np.ones(2) for n in NAMES}
    new = rescale_parts(mean, previous, [1.0, 1.0], [None, None])
    assert all(np.array_equal(new[n], mean[n]) for n in NAMES)


def test_declarations_round_trip_and_odd_values_are_refused() -> None:
    for reached in (frozenset(), frozenset({"CT"}), frozenset({"CT", "radiograph"})):
        assert declared_parts(part_metrics(reached)) == reached
    assert declared_parts({"num-examples": 3.0}) is None
    with pytest.raises(ValueError):
        declared_parts({"trained-CT": 0.5})
