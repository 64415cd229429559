"""What a hospital site will take part in: its own policy, from the `[policy]` table of its
site.toml, never from the coordinator.

Like NVIDIA FLARE's site privacy policy, but stated as formal DP limits. Two places check it:
`check_run_plan` on the coordinator's run config before the site joins a run, and
`check_round` inside each round once the noise is calibrated, before any training step. A
refusal is one line ("site policy: ..."), logged and recorded in the site's ledger by
`record_refusal` (a signed entry that spends nothing). Reasons carry numbers and names only:
never paths, report text or patient data.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedrad.common.privacy.ledger import MAX_REASON_CHARS, LedgerError
from fedrad.common.privacy.ledger_anchor import open_site_ledger
from fedrad.common.protocol.messages import EVAL_FAMILIES, eval_families
from fedrad.common.protocol.release_app import RELEASE_RUN_CONFIG

if TYPE_CHECKING:
    from fedrad.client.federation.site_agent import SiteSpec
    from fedrad.client.site.config import SiteConfig

logger = logging.getLogger(__name__)

# The coordinator's strategies (server/strategies.py STRATEGIES; client never imports server).
STRATEGIES: Final[tuple[str, ...]] = ("fedavg", "fedprox", "fedadam")
# Both always used with fullmatch: `$` would accept a trailing newline.
SHA256_HEX: Final[re.Pattern[str]] = re.compile(r"[0-9a-f]{64}")
_NAME: Final[re.Pattern[str]] = re.compile(r"[a-z0-9_-]{1,32}")
PREFIX: Final[str] = "site policy: "


class SitePolicyError(ValueError):
    """The `[policy]` table cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class SitePolicy:
    """The site's limits; every default permits (a site.toml without `[policy]`)."""

    max_epsilon_per_run: float | None = None  # one run, all its rounds composed (at its delta)
    max_epsilon_per_round: float | None = None  # one round's mechanism on its own
    min_noise_multiplier: float | None = None  # the least DP-SGD noise the site accepts
    require_secagg: bool = False  # only runs under SecAgg+
    strategies: tuple[str, ...] | None = None  # None: any of STRATEGIES
    allow_central_dp: bool = True  # False: not in runs that add central DP noise
    approved_apps: tuple[str, ...] = ()  # sha256 hex of Flower app bundles (FABs) approved
    max_epsilon_per_evaluation: float | None = None  # one evaluation release on its own
    release_metrics: tuple[str, ...] | None = None  # evaluation families; None: every one

    def __post_init__(self) -> None:
        for name in (
            "max_epsilon_per_run",
            "max_epsilon_per_round",
            "min_noise_multiplier",
            "max_epsilon_per_evaluation",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SitePolicyError(f"policy {name} must be a number")
            if not (value > 0 and math.isfinite(value)):
                raise SitePolicyError(f"policy {name} must be positive and finite, got {value}")
        if self.strategies is not None:
            if not self.strategies:
                raise SitePolicyError("policy strategies is empty: leave it out to allow any")
            unknown = [s for s in self.strategies if s not in STRATEGIES]
            if unknown:
                raise SitePolicyError(
                    f"policy strategies: {', '.join(map(str, unknown))[:60]} not among "
                    f"{', '.join(STRATEGIES)}"
                )
        if self.release_metrics is not None:
            unknown = [f for f in self.release_metrics if f not in EVAL_FAMILIES]
            if unknown:
                raise SitePolicyError(
                    f"policy release_metrics: {', '.join(map(str, unknown))[:60]} not among "
                    f"{', '.join(EVAL_FAMILIES)}"
                )
        bad = [h for h in self.approved_apps if not SHA256_HEX.fullmatch(str(h))]
        if bad:
            raise SitePolicyError(
                f"policy approved_apps: {str(bad[0])[:70]!r} is not a lowercase SHA-256 hex "
                "digest (64 characters 0-9a-f)"
            )

    @property
    def permissive(self) -> bool:
        """Whether this is the default policy (nothing to write to site.toml)."""
        return self == SitePolicy()

    @property
    def caps_privacy(self) -> bool:
        """Whether the policy bounds epsilon or noise: then a run without DP is refused."""
        return any(
            v is not None
            for v in (
                self.max_epsilon_per_run,
                self.max_epsilon_per_round,
                self.min_noise_multiplier,
            )
        )


_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "max_epsilon_per_run": (int, float),
    "max_epsilon_per_round": (int, float),
    "min_noise_multiplier": (int, float),
    "require_secagg": bool,
    "strategies": list,
    "allow_central_dp": bool,
    "approved_apps": list,
    "max_epsilon_per_evaluation": (int, float),
    "release_metrics": list,
}


def policy_from_table(table: Mapping[str, Any], *, where: str) -> SitePolicy:
    """The `[policy]` table as a SitePolicy; unknown keys and wrong types are refused."""
    unknown = sorted(set(table) - set(_TYPES))
    if unknown:
        raise SitePolicyError(f"{where}: unknown [policy] key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = _TYPES[key]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise SitePolicyError(f"{where}: [policy] {key} has the wrong type")
        if kind is list:
            if not all(isinstance(v, str) for v in value):
                raise SitePolicyError(f"{where}: [policy] {key} must be a list of strings")
            value = tuple(dict.fromkeys(value))  # order kept, repeats dropped
        elif kind is not bool:
            value = float(value)
        values[key] = value
    try:
        return SitePolicy(**values)
    except SitePolicyError as exc:
        raise SitePolicyError(f"{where}: {exc}") from exc


def policy_to_table(policy: SitePolicy) -> dict[str, Any]:
    """What differs from the permissive default, as site.toml's `[policy]` table."""
    default = SitePolicy()
    table: dict[str, Any] = {}
    for f in fields(SitePolicy):
        value = getattr(policy, f.name)
        if value != getattr(default, f.name):
            table[f.name] = list(value) if isinstance(value, tuple) else value
    return table


# -- the checks ------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3g}"


def check_run_plan(policy: SitePolicy, run_config: Mapping[str, object]) -> str | None:
    """Why this site does not take part in a run, in one line, or None when it does.

    `run_config` is the coordinator's Flower run config (hyphenated keys as ServerPlan reads
    them); keys left out take the release app's declared defaults (`RELEASE_RUN_CONFIG`:
    epsilon 8.0, secagg false, strategy fedavg, dp true, no central noise). A value of the
    wrong type is refused (fail closed).
    """
    dp = run_config.get("dp", RELEASE_RUN_CONFIG["dp"])
    if not isinstance(dp, bool):
        return PREFIX + "the run's dp is not true or false"
    if not dp and policy.caps_privacy:
        return PREFIX + "the run has dp = false and this site takes part only under DP-SGD"
    epsilon = run_config.get("epsilon", RELEASE_RUN_CONFIG["epsilon"])
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        return PREFIX + "the run's epsilon is not a number"
    cap = policy.max_epsilon_per_run
    if dp and cap is not None and not float(epsilon) <= cap:
        return (
            PREFIX + f"the run's epsilon {_num(float(epsilon))} is above this site's "
            f"max_epsilon_per_run {_num(cap)}"
        )
    secagg = run_config.get("secagg", RELEASE_RUN_CONFIG["secagg"])
    if not isinstance(secagg, bool):
        return PREFIX + "the run's secagg is not true or false"
    if policy.require_secagg and not secagg:
        return PREFIX + "this site requires SecAgg+ and the run has secagg = false"
    strategy = run_config.get("strategy", RELEASE_RUN_CONFIG["strategy"])
    if policy.strategies is not None and strategy not in policy.strategies:
        named = strategy if isinstance(strategy, str) and _NAME.fullmatch(strategy) else "(unnamed)"
        return (
            PREFIX + f"strategy {named} is not one this site takes part in "
            f"({', '.join(policy.strategies)})"
        )
    asked = run_config.get("eval-metrics", RELEASE_RUN_CONFIG["eval-metrics"])
    if not isinstance(asked, str):
        return PREFIX + "the run's eval-metrics is not text"
    reason = check_evaluation(policy, eval_families(asked))
    if reason is not None:
        return reason
    noise = run_config.get("central-noise", RELEASE_RUN_CONFIG["central-noise"])
    if isinstance(noise, bool) or not isinstance(noise, int | float):
        return PREFIX + "the run's central-noise is not a number"
    if not policy.allow_central_dp and noise != 0:
        return PREFIX + "the run adds central DP noise and this site's allow_central_dp is false"
    return None


def check_round(
    policy: SitePolicy,
    *,
    noise_multiplier: float | None,
    round_epsilon: float,
    run_epsilon: float,
) -> str | None:
    """Why this site does not train this round, in one line, or None when it does.

    `noise_multiplier` is the calibrated DP-SGD noise (None: the round has no DP);
    `round_epsilon` is the round's mechanism on its own and `run_epsilon` this run's rounds
    so far composed with it, both at the round's delta.
    """
    if noise_multiplier is None:
        if policy.caps_privacy:
            return PREFIX + "the round has no DP-SGD and this site takes part only under DP"
        return None
    low = policy.min_noise_multiplier
    if low is not None and noise_multiplier < low:
        return (
            PREFIX + f"noise multiplier {_num(noise_multiplier)} is below this site's "
            f"min_noise_multiplier {_num(low)}"
        )
    cap = policy.max_epsilon_per_round
    if cap is not None and not round_epsilon <= cap * (1 + 1e-9):
        return (
            PREFIX + f"this round's epsilon {_num(round_epsilon)} is above this site's "
            f"max_epsilon_per_round {_num(cap)}"
        )
    cap = policy.max_epsilon_per_run
    if cap is not None and not run_epsilon <= cap * (1 + 1e-9):
        return (
            PREFIX + f"this run's epsilon would reach {_num(run_epsilon)}, above this site's "
            f"max_epsilon_per_run {_num(cap)}"
        )
    return None


def check_evaluation(policy: SitePolicy, families: tuple[str, ...]) -> str | None:
    """Why this site does not release the evaluation families a round asks for, or None."""
    if policy.release_metrics is None:
        return None
    withheld = [f for f in families if f not in policy.release_metrics]
    if withheld:
        return (
            PREFIX + f"this site does not release {', '.join(withheld)} metrics "
            f"(release_metrics: {', '.join(policy.release_metrics) or 'none'})"
        )
    return None


def evaluation_epsilon(policy: SitePolicy, asked: float) -> float:
    """What one evaluation release spends: the plan's ask, capped by the site's policy."""
    cap = policy.max_epsilon_per_evaluation
    return asked if cap is None else min(asked, cap)


# -- refusals on record ----------------------------------------------------------------------


def one_line(reason: str) -> str:
    """A reason as the ledger takes it: whitespace collapsed, printable, bounded."""
    text = " ".join(reason.split())
    text = "".join(c if c.isprintable() else "?" for c in text) or "refused"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _site_files(site: SiteSpec | SiteConfig) -> tuple[str, Path, Path, Path | None]:
    """Site id, ledger, ledger key, ledger anchor (None: beside the key)."""
    from fedrad.client.site.config import SiteConfig  # site_config imports this module

    if isinstance(site, SiteConfig):
        return site.site_id, site.ledger, site.ledger_key, site.ledger_anchor
    return site.site_id, site.ledger_path, site.key_path, site.ledger_anchor


def record_refusal(
    site: SiteSpec | SiteConfig, run_id: str, round: int, reason: str
) -> dict[str, Any] | None:
    """Logs "site SITE refused run RUN round N: REASON" and appends the refusal to the site's
    ledger (signed, spending nothing); returns the entry. `round` is 0 for a whole run.

    The refusal stands whether or not it could be recorded: a ledger that cannot be written
    (torn, unverifiable, or discontinuous with its anchor: `ledger_anchor.py`) is logged as
    an error and None is returned, so the caller's own one-line refusal is what the
    coordinator sees, never a traceback."""
    site_id, ledger_path, key_path, anchor_path = _site_files(site)
    text = one_line(reason)
    logger.warning("site %s refused run %s round %d: %s", site_id, run_id, round, text)
    try:
        ledger = open_site_ledger(ledger_path, key_path, anchor_path, site_id=site_id)
        return ledger.append_refusal(site_id=site_id, run_id=run_id, round=round, reason=text)
    except (LedgerError, OSError) as exc:
        logger.error("site %s could not record the refusal in its ledger: %s", site_id, exc)
        return None
