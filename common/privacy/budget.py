"""A site's privacy budget: what a ledger has spent and has left, and the rules that turn a
round's plan into noise within every cap (the site's budget over its whole ledger, its policy's
per-run and per-round caps). The site agent refuses with the reasons given here, before any
training step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedrad.common.privacy.accounting import (
    MAX_NOISE,
    AccountantName,
    CalibrationError,
    MechanismStep,
    calibrate_noise,
    cumulative_epsilon,
)
from fedrad.common.privacy.ledger import Ledger

logger = logging.getLogger(__name__)


class BudgetError(ValueError):
    """A round the budget rules do not admit; the one-line reason is safe to send back."""


def budget_refusal(
    site_id: str,
    *,
    epsilon: float | None,
    delta: float | None,
    dp: bool,
    round_delta: float,
) -> str | None:
    """Why a site's budget (`epsilon` at `delta`; None: none of its own) can never allow a
    round, before any arithmetic, or None."""
    if epsilon is not None and not dp:
        return f"site {site_id} has an epsilon budget and refuses a round without DP"
    if dp and delta is not None and round_delta > delta:
        return f"the round asks delta {round_delta:g}, above this site's delta budget {delta:g}"
    return None


def capped_target(target_epsilon: float, epsilon: float | None) -> float:
    """What a run may spend in all at a site: the plan's `target_epsilon`, capped by the site's
    own budget `epsilon` (None: none), which never comes from the coordinator."""
    if epsilon is not None and epsilon < target_epsilon:
        logger.info("site budget %.3g caps the planned epsilon %.3g", epsilon, target_epsilon)
        return epsilon
    return target_epsilon


@dataclass(frozen=True)
class RoundBudget:
    """One DP round at a site: what its ledger holds and what the plan has left to run.

    The noise is calibrated so that the whole ledger plus every remaining planned step stays
    within the target: on a fresh run that is "calibrate once for the whole schedule", after a
    resume or a repeated round it still fits. The policy's per-run cap bounds this run's
    entries plus its remaining steps the same way. `reserved` is what the plan will also
    spend at a noise already fixed (the evaluation releases still to come): the training
    noise leaves room for it.
    """

    history: Sequence[MechanismStep]  # every privacy entry of the site's ledger, every run
    run_history: Sequence[MechanismStep]  # this run's entries only
    sample_rate: float  # Poisson rate of this round's steps
    local_steps: int  # this round's steps
    remaining_steps: int  # this round's and every later planned round's
    delta: float
    accountant: AccountantName
    reserved: Sequence[MechanismStep] = ()

    def noise(self, target_epsilon: float, *, max_epsilon_per_run: float | None = None) -> float:
        """The round's noise multiplier: the larger of what the whole ledger needs to stay
        within `target_epsilon` and what this run needs to stay within `max_epsilon_per_run`
        (every bound holds at the larger, since epsilon only falls as the noise grows)."""
        try:
            noise = self._calibrate([*self.history, *self.reserved], target_epsilon)
        except CalibrationError as exc:
            raise BudgetError(str(exc)) from None
        if max_epsilon_per_run is None:
            return noise
        try:
            run_noise = self._calibrate([*self.run_history, *self.reserved], max_epsilon_per_run)
        except CalibrationError:
            raise BudgetError(
                f"site policy: this run cannot stay within this site's max_epsilon_per_run "
                f"{max_epsilon_per_run:.3g} (its remaining {self.remaining_steps} steps at "
                f"any noise up to {MAX_NOISE:g})"
            ) from None
        if run_noise > noise:
            logger.info(
                "site policy max_epsilon_per_run %.3g raises the noise from %.3f to %.3f",
                max_epsilon_per_run,
                noise,
                run_noise,
            )
        return max(noise, run_noise)

    def round_epsilon(self, noise: float) -> float:
        """This round's mechanism on its own (what max_epsilon_per_round caps)."""
        return self._spend([self._this_round(noise)])

    def run_epsilon(self, noise: float) -> float:
        """This run's entries composed with this round (what max_epsilon_per_run caps)."""
        return self._spend([*self.run_history, self._this_round(noise)])

    def _calibrate(self, history: Sequence[MechanismStep], target_epsilon: float) -> float:
        return calibrate_noise(
            history,
            sample_rate=self.sample_rate,
            steps=self.remaining_steps,
            target_epsilon=target_epsilon,
            delta=self.delta,
            accountant=self.accountant,
        )

    def _this_round(self, noise: float) -> MechanismStep:
        return MechanismStep(noise, self.sample_rate, self.local_steps)

    def _spend(self, history: Sequence[MechanismStep]) -> float:
        return cumulative_epsilon(history, delta=self.delta, accountant=self.accountant)


def evaluation_noise(epsilon: float, *, delta: float, accountant: AccountantName) -> float:
    """Noise multiplier of one evaluation release (a Gaussian mechanism: one step at sample
    rate 1) that spends `epsilon` on its own at `delta`."""
    try:
        return calibrate_noise(
            sample_rate=1.0, steps=1, target_epsilon=epsilon, delta=delta, accountant=accountant
        )
    except CalibrationError as exc:
        raise BudgetError(f"an evaluation at epsilon {epsilon:.3g}: {exc}") from None


def evaluation_step(noise: float) -> MechanismStep:
    """The ledger's record of one evaluation release: one Gaussian step at rate 1."""
    return MechanismStep(noise, 1.0, 1)


def budget_status(ledger: Ledger, *, epsilon: float, delta: float) -> dict[str, Any]:
    """Spent and left of a budget of `epsilon` at `delta`, recomputed from every privacy entry
    of `ledger` at the delta and with the accountant of its latest entry: the terms the site
    enforced and the ledger recorded last (`delta` and RDP before anything was spent)."""
    spent_delta, accountant = ledger.terms() or (delta, "rdp")
    spent = ledger.spent(spent_delta, accountant)
    unbounded = math.isinf(spent)
    return {
        "budget_epsilon": epsilon,
        "delta": spent_delta,
        "accountant": accountant,
        "spent_epsilon": None if unbounded else spent,
        "left_epsilon": None if unbounded else max(epsilon - spent, 0.0),
        "unbounded": unbounded,
        "exhausted": unbounded or spent >= epsilon,
    }
