"""Privacy accounting from raw mechanism parameters, composed over a whole history.

The history is Opacus' accountant state shape: a list of (noise_multiplier, sample_rate, steps).
Epsilon is always recomputed from it, so spending accumulates across calls, rounds and runs
instead of restarting with every new PrivacyEngine (the pitfall of Flower's Opacus example).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from opacus.accountants import PRVAccountant, RDPAccountant

logger = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]


@dataclass(frozen=True)
class MechanismStep:
    """One stretch of DP-SGD with fixed parameters: `steps` subsampled Gaussian releases."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not 0 < self.sample_rate <= 1 or self.steps < 0:
            raise ValueError(f"invalid mechanism parameters: {self}")


def cumulative_epsilon(
    history: Sequence[MechanismStep], *, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon at `delta` after every entry of the history (0 for an empty history).

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
    rdp = RDPAccountant()
    rdp.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in entries]
    return float(rdp.get_epsilon(delta=delta))
