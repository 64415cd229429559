"""The coordinator's own signed ledger of central-DP releases (site-level DP).

With central DP on, the noise the coordinator adds is a privacy spend like a site's, so it is
kept in the site ledger format (`<run>/coordinator/ledger.jsonl`, key `ledger_key.pem` and its
.pub beside it) and `fedrad-audit RUN_DIR` verifies it with the sites'. One entry per released
aggregate, written after the round's aggregation and before the noisy model leaves for
evaluation or is committed: a round interrupted after its entry and run again on resume is a
second release (the first noisy model already went to the sites), so both entries count; a
round interrupted before its entry released nothing and has none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key
from fedrad.common.run_dir import ResumeError

logger = logging.getLogger(__name__)

COORDINATOR_ID: Final[str] = "coordinator"  # site_id of the coordinator's ledger entries


class CoordinatorLedger:
    """The coordinator's ledger of one run directory.

    Each round's aggregate is one Gaussian release: sample rate 1 (every configured site is
    asked to train), one step, `max_grad_norm` = the clipping norm of a site's update. The
    noise std is sigma * C / n for n configured sites, while the mean is over the m updates
    actually received, which one site moves by at most C / m: the noise multiplier that really
    protected the round is sigma * m / n, and that is what is recorded (with a warning) when a
    site refused or did not answer. With m = n it is sigma.
    """

    def __init__(self, run_dir: Path, *, run_id: str, delta: float) -> None:
        directory = Path(run_dir) / "coordinator"
        self.path = directory / "ledger.jsonl"
        self.key_path = directory / "ledger_key.pem"  # its .pub is written beside it
        self.run_id = run_id
        self.delta = delta
        self._ledger = Ledger(self.path, load_or_create_signing_key(self.key_path))

    def check_covers(self, completed: int) -> None:
        """A resumed run needs an entry for every committed round of this run."""
        recorded = {int(e["round"]) for e in self._ledger.entries() if e["run_id"] == self.run_id}
        missing = [r for r in range(1, completed + 1) if r not in recorded]
        if missing:
            raise ResumeError(
                f"central DP is on but the coordinator ledger {self.path} has no entry for "
                f"committed round(s) {', '.join(map(str, missing))}"
            )

    def record_release(
        self,
        round_no: int,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        updates: int,
        configured: int,
    ) -> float:
        """Appends one round's release; returns the coordinator's cumulative epsilon."""
        if updates < 1:
            raise ValueError("a release averages at least one update")
        effective = noise_multiplier * updates / configured
        if updates != configured:
            logger.warning(
                "round %d: central noise was sized for %d sites but %d updates were averaged; "
                "the ledger records the effective noise multiplier %.4g (not %.4g)",
                round_no,
                configured,
                updates,
                effective,
                noise_multiplier,
            )
        entry = self._ledger.append(
            site_id=COORDINATOR_ID,
            run_id=self.run_id,
            round=round_no,
            sample_rate=1.0,
            noise_multiplier=effective,
            steps=1,
            max_grad_norm=clipping_norm,
            delta=self.delta,
            accountant="rdp",
        )
        epsilon = entry["epsilon"]
        return float("inf") if epsilon is None else float(epsilon)
