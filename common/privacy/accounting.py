"""Privacy accounting: epsilon from raw mechanism parameters, and the one noise calibrator.

Epsilon is always recomputed from a whole history (Opacus' accountant state shape), so spending
accumulates across calls, rounds and runs instead of restarting with every new PrivacyEngine
(the pitfall of Flower's Opacus example). Every epsilon in fedrad comes from
`cumulative_epsilon`; the independent audit (`common/audit`) recomputes it on its own.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

logger = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]

RDP_ORDERS: Final[tuple[float, ...]] = tuple(RDPAccountant.DEFAULT_ALPHAS)
"""The orders Opacus' RDPAccountant composes over; using the same ones gives its numbers."""
MAX_NOISE: Final[float] = 50.0
"""Beyond this noise multiplier a step is noise only: the calibrator refuses instead."""
CALIBRATION_TOLERANCE: Final[float] = 1e-3
"""The calibrated noise multiplier is within this fraction of the smallest that fits."""


@dataclass(frozen=True)
class MechanismStep:
    """One stretch of DP-SGD with fixed parameters: `steps` subsampled Gaussian releases."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not 0 < self.sample_rate <= 1 or self.steps < 0:
            raise ValueError(f"invalid mechanism parameters: {self}")


class CalibrationError(ValueError):
    """No noise multiplier up to MAX_NOISE keeps the schedule within its target; one line."""


def poisson_sample_rate(batch_size: int, n: int) -> float:
    """q = min(batch_size, N) / N: the rate DP-SGD's Poisson sampler draws at, the rate the
    noise is calibrated for and the rate the ledger records."""
    if n < 1 or batch_size < 1:
        raise ValueError("batch_size and the number of examples must be >= 1")
    return min(batch_size, n) / n


def cumulative_epsilon(
    history: Sequence[MechanismStep], *, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon at `delta` after every entry of the history (0 for an empty history, inf when
    a step had no noise).

    The PRV accountant has failed at large epsilon (opacus #601/#604); it falls back to RDP,
    which is an upper bound, and says so in the log.
    """
    entries = [h for h in history if h.steps > 0]
    if not entries:
        return 0.0
    if any(h.noise_multiplier == 0 for h in entries):
        return float("inf")
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in entries]
        try:
            return float(prv.get_epsilon(delta=delta))
        except (ValueError, RuntimeError, OverflowError) as exc:
            logger.warning("PRV accountant failed (%s); falling back to RDP", type(exc).__name__)
    with warnings.catch_warnings():
        # Opacus warns when the best order is the largest one (tiny epsilon, e.g. the noise
        # search probing sigma 50): the bound is still valid, only not the tightest.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        value, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=_rdp_of(entries), delta=delta)
    return float(value)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    curve = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(v) for v in curve)


def _rdp_of(history: Sequence[MechanismStep]) -> np.ndarray:
    """The RDP curve of a history. RDP is linear in steps, so each (q, sigma) curve is computed
    once and scaled: ledgers, the calibrator and the policy checks ask for the same few pairs
    again and again (docs/results/privacy.md)."""
    total = np.zeros(len(RDP_ORDERS))
    for h in history:
        if h.steps > 0:
            total = total + h.steps * np.asarray(_rdp_per_step(h.sample_rate, h.noise_multiplier))
    return total


def calibrate_noise(
    history: Sequence[MechanismStep] = (),
    *,
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Smallest noise multiplier (within CALIBRATION_TOLERANCE) such that `history` plus
    `steps` more steps at `sample_rate` stays within `target_epsilon` at `delta`. With an
    empty history it is the classic "calibrate once for the whole schedule"; with a ledger's
    history it is what is left of a budget. Raises CalibrationError when nothing up to
    MAX_NOISE fits (the target is already spent, or too little of it is left)."""

    def spend(sigma: float) -> float:
        step = MechanismStep(sigma, sample_rate, steps)
        return cumulative_epsilon([*history, step], delta=delta, accountant=accountant)

    already = cumulative_epsilon(history, delta=delta, accountant=accountant)
    if already >= target_epsilon:
        raise CalibrationError(
            f"privacy budget exhausted: epsilon {already:.3f} spent of {target_epsilon:.3f}"
        )
    if spend(MAX_NOISE) > target_epsilon:
        raise CalibrationError(
            f"privacy budget nearly exhausted: the remaining {target_epsilon - already:.3g} "
            f"epsilon cannot cover {steps} more steps at any useful noise (sigma <= {MAX_NOISE:g})"
        )
    # Warm start: on a run that goes as planned the answer is the previous round's sigma,
    # found in a few evaluations instead of a search (docs/results/privacy.md).
    same = [h.noise_multiplier for h in history if h.sample_rate == sample_rate and h.steps]
    guess, step = (same[-1], 1e-3) if same and same[-1] > 0 else (1.0, 0.5)
    if spend(guess) <= target_epsilon:
        high, low = guess, guess * (1 - step)
        while spend(low) <= target_epsilon:
            high, low = low, low / 2
    else:
        low, high = guess, guess * (1 + step)
        while spend(high) > target_epsilon:
            low, high = high, high * 2
    while high - low > CALIBRATION_TOLERANCE * high:
        mid = (low + high) / 2
        if spend(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
