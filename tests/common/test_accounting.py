"""Epsilon from raw mechanism parameters: golden values and composition across calls."""

from __future__ import annotations

import math

import pytest

from fedrad.common.privacy.accounting import (
    CALIBRATION_TOLERANCE,
    CalibrationError,
    MechanismStep,
    calibrate_noise,
    cumulative_epsilon,
    poisson_sample_rate,
)


def test_opacus_golden_value_rdp() -> None:
    """Opacus' own test: sigma 1.5, q 0.04, 2,250 steps, delta 1e-5 -> 7.329 (RDP)."""
    eps = cumulative_epsilon([MechanismStep(1.5, 0.04, 2250)], delta=1e-5)
    assert eps == pytest.approx(7.329, abs=0.01)


@pytest.mark.parametrize(
    ("steps", "rdp", "prv"), [(100, 1.214, 0.728), (1000, 2.101, 1.838), (5000, 4.589, 4.212)]
)
def test_rdp_and_prv_match_values_measured_with_two_libraries(
    steps: int, rdp: float, prv: float
) -> None:
    history = [MechanismStep(1.0, 0.01, steps)]
    assert cumulative_epsilon(history, delta=1e-5) == pytest.approx(rdp, rel=0.01)
    assert cumulative_epsilon(history, delta=1e-5, accountant="prv") == pytest.approx(prv, rel=0.01)


def test_history_composes_like_one_long_run() -> None:
    split = [MechanismStep(1.1, 0.02, 300) for _ in range(4)]
    whole = [MechanismStep(1.1, 0.02, 1200)]
    assert cumulative_epsilon(split, delta=1e-5) == pytest.approx(
        cumulative_epsilon(whole, delta=1e-5), rel=1e-9
    )
    assert cumulative_epsilon(split[:2], delta=1e-5) < cumulative_epsilon(split, delta=1e-5)


def test_empty_history_and_zero_noise() -> None:
    assert cumulative_epsilon([], delta=1e-5) == 0.0
    assert math.isinf(cumulative_epsilon([MechanismStep(0.0, 0.1, 5)], delta=1e-5))


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        MechanismStep(1.0, 0.0, 10)
    with pytest.raises(ValueError):
        MechanismStep(-1.0, 0.1, 10)


def test_cached_composition_equals_opacus_rdp_accountant_on_a_mixed_history() -> None:
    from opacus.accountants import RDPAccountant

    history = [
        MechanismStep(1.1, 0.02, 300),
        MechanismStep(0.8, 0.05, 40),
        MechanismStep(2.0, 0.01, 7),
    ]
    reference = RDPAccountant()
    reference.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    assert cumulative_epsilon(history, delta=1e-5) == pytest.approx(
        reference.get_epsilon(delta=1e-5), rel=1e-12
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_is_the_smallest_that_fits(accountant: str) -> None:
    q, steps = 0.05, 1000
    sigma = calibrate_noise(
        sample_rate=q, steps=steps, target_epsilon=8.0, delta=1e-5, accountant=accountant
    )

    def spend(noise: float) -> float:
        step = MechanismStep(noise, q, steps)
        return cumulative_epsilon([step], delta=1e-5, accountant=accountant)  # type: ignore[arg-type]

    assert spend(sigma) <= 8.0 < spend(sigma * (1 - 2 * CALIBRATION_TOLERANCE))


def test_calibration_agrees_with_opacus_search() -> None:
    """Opacus' own search (what training used before there was one calibrator) lands within
    its 0.01 epsilon tolerance of the same answer."""
    from opacus.accountants.utils import get_noise_multiplier

    q, steps = 16 / 356, 200
    ours = calibrate_noise(sample_rate=q, steps=steps, target_epsilon=8.0, delta=1e-5)
    theirs = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=q, steps=steps)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_what_is_left_of_a_history_is_calibrated_and_an_exhausted_one_refused() -> None:
    history = [MechanismStep(1.0, 0.1, 100)]
    spent = cumulative_epsilon(history, delta=1e-5)
    sigma = calibrate_noise(
        history, sample_rate=0.1, steps=100, target_epsilon=2 * spent, delta=1e-5
    )
    total = cumulative_epsilon([*history, MechanismStep(sigma, 0.1, 100)], delta=1e-5)
    assert total <= 2 * spent and total == pytest.approx(2 * spent, rel=0.01)
    with pytest.raises(CalibrationError, match="privacy budget exhausted"):
        calibrate_noise(history, sample_rate=0.1, steps=100, target_epsilon=spent, delta=1e-5)
    with pytest.raises(CalibrationError, match="sigma <= 50"):
        calibrate_noise(
            history, sample_rate=0.1, steps=10**6, target_epsilon=spent * 1.001, delta=1e-5
        )


def test_the_poisson_sample_rate_is_the_batch_share_of_the_examples() -> None:
    assert poisson_sample_rate(16, 356) == 16 / 356
    assert poisson_sample_rate(32, 10) == 1.0  # a batch larger than the data samples it all
    with pytest.raises(ValueError):
        poisson_sample_rate(16, 0)
