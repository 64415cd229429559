"""Every setting of a federated run, declared once: its run config key, type, the value that
means "not set", and its help. The release app declares them all (a run can set nothing
else), the coordinator's plan parser reads a run config against them, and every command line
that sets one (`fedrad-coordinator run`, `fedrad-sim`) takes its flag's help from here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.protocol.messages import (
    ALL_EVAL_FAMILIES,
    DEFAULT_EVAL_EPSILON,
    DEFAULT_LR,
)

RunValue = int | float | str | bool


@dataclass(frozen=True)
class RunSetting:
    key: str  # hyphenated, as Flower's run config spells it
    kind: type  # int, float, str or bool: its TOML type
    default: RunValue  # "not set": the server's own default, or 0 / "" when off or derived
    help: str  # the help of the flag that sets it
    required: bool = False  # every run sets it; the default only holds its place

    @property
    def name(self) -> str:
        """The Python name of the key: the command parameter or config field that sets it."""
        return self.key.replace("-", "_")


# In the release app's order: its pyproject, and so the bundle's sha256, follow this order.
RUN_SETTINGS: Final[tuple[RunSetting, ...]] = (
    RunSetting(
        "run-dir",
        str,
        "",
        "The run directory; an existing one resumes after its last round.",
        required=True,
    ),
    RunSetting(
        "foundation-dir",
        str,
        "",
        "The federation's starting checkpoint (sites hold a copy).",
        required=True,
    ),
    RunSetting("num-sites", int, 0, "Sites that must join.", required=True),
    RunSetting("num-rounds", int, 0, "Federated rounds.", required=True),
    RunSetting("site-registry", str, "", "The coordinator's node id -> site id file."),
    RunSetting("strategy", str, "fedavg", "fedavg, fedprox or fedadam."),
    RunSetting("proximal-mu", float, 0.0, "FedProx: weight of the proximal term."),
    RunSetting("server-lr", float, 1e-2, "FedAdam: the server's learning rate."),
    RunSetting("round-timeout", float, 3600.0, "Seconds to wait for one round's replies."),
    RunSetting("connect-timeout", float, 300.0, "Seconds to wait for every site to connect."),
    RunSetting(
        "epsilon", float, DEFAULT_EPSILON, "Target epsilon per site for the whole schedule."
    ),
    RunSetting(
        "min-sites",
        int,
        0,  # 0: the server decides (1; SecAgg+: its threshold)
        "A round goes on with K sites when the others are gone after the connect timeout "
        "(default 1; SecAgg+: the threshold).",
    ),
    RunSetting(
        "secagg",
        bool,
        False,
        "SecAgg+: the coordinator sees only the sum of the sites' masked updates (fedavg or "
        "fedprox; 3 sites or more).",
    ),
    RunSetting(
        "central-noise",
        float,
        0.0,  # 0: central DP off
        "Central DP on the coordinator (site-level): noise multiplier per round. Off unless "
        "given; fedavg or fedprox only.",
    ),
    RunSetting(
        "central-clip",
        float,
        1.0,
        "Central DP: L2 bound on one site's update per round (default 1.0).",
    ),
    RunSetting(
        "central-delta",
        float,
        DEFAULT_DELTA,
        "Central DP: delta of the coordinator's epsilon (default 1e-5).",
    ),
    RunSetting(
        "secagg-shares",
        int,
        0,  # 0: every site holds one
        "SecAgg+: key shares per site (default: every site).",
    ),
    RunSetting(
        "secagg-threshold",
        int,
        0,  # 0: a majority
        "SecAgg+: shares that unmask (default: a majority, at least 2).",
    ),
    RunSetting(
        "secagg-clip",
        float,
        0.0,  # 0: derived from the optimiser's bound
        "SecAgg+: range of an update value (default: the optimiser's bound).",
    ),
    RunSetting(
        "secagg-max-weight", float, 100_000.0, "SecAgg+: largest site weight (training studies)."
    ),
    RunSetting("run-id", str, "", "Id in every ledger entry (default: the run directory's name)."),
    RunSetting("local-steps", int, 50, "DP-SGD steps per site per round."),
    RunSetting("batch-size", int, 16, "Expected batch size."),
    RunSetting("lr", float, DEFAULT_LR, "Local learning rate."),
    RunSetting("seed", int, 0, "Seed of the run."),
    RunSetting("dp", bool, True, "DP-SGD at every site (off only for baselines)."),
    RunSetting("delta", float, DEFAULT_DELTA, "Delta of the target epsilon."),
    RunSetting("max-grad-norm", float, 1.0, "DP-SGD: per-sample clipping bound."),
    RunSetting("accountant", str, "rdp", "rdp or prv."),
    RunSetting("eval-reports", int, 64, "Reports generated per site per evaluation."),
    RunSetting("eval-questions", int, 128, "Questions answered per site per evaluation."),
    RunSetting(
        "eval-metrics",
        str,
        ALL_EVAL_FAMILIES,
        "Evaluation figures asked of each site: auroc, report, qa (comma-separated), or none.",
    ),
    RunSetting(
        "eval-epsilon",
        float,
        DEFAULT_EVAL_EPSILON,
        "Epsilon one evaluation release spends at a site (noised counts; a site may cap it).",
    ),
)
SETTINGS: Final[dict[str, RunSetting]] = {setting.key: setting for setting in RUN_SETTINGS}
REQUIRED_KEYS: Final[frozenset[str]] = frozenset(s.key for s in RUN_SETTINGS if s.required)
_BY_NAME: Final[dict[str, RunSetting]] = {setting.name: setting for setting in RUN_SETTINGS}


def run_default(key: str) -> RunValue:
    """The declared "not set" value of `key`."""
    return SETTINGS[key].default


def settings_among(params: Mapping[str, Any]) -> dict[str, RunValue]:
    """The run settings a command was given, from its parameters (each named as its key, '-'
    -> '_'), in their order: a run's own required keys, None (not given) and a switch left off
    are left out."""
    given: dict[str, RunValue] = {}
    for name, value in params.items():
        setting = _BY_NAME.get(name)
        if setting is None or setting.required or value is None:
            continue
        if value is False and setting.default is False:
            continue
        given[setting.key] = value
    return given


def run_option(key: str, *flags: str, **options: Any) -> Any:
    """A typer option for the run setting `key`, with its declared help (CLIs only)."""
    import typer

    return typer.Option(*flags, help=SETTINGS[key].help, **options)
