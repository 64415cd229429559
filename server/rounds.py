"""The coordinator's round bookkeeping, framework-free: plan, checkpoints, metrics, resume.

A round is committed in two steps: the checkpoint (`checkpoints/round_NNN`, written
atomically, with the strategy's state beside the weights), then its line in `metrics.jsonl`.
The metrics line is the commit point: on resume the last round listed there is the last one
done, its checkpoint is where training continues, and a round is never counted twice.
Checkpoint directories past that point are leftovers of an interrupted round and are
overwritten when the round is run again. Site ledgers are never touched here: a site that
trained in an interrupted round did spend that privacy, and its ledger keeps saying so. With
central DP on, the coordinator's own ledger is `common/privacy/coordinator_ledger.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedrad.common.model.checkpoint import read_metadata, write_checkpoint_from
from fedrad.common.privacy.defaults import DEFAULT_DELTA
from fedrad.common.protocol.messages import LEDGER_HEAD_FIELD, WEIGHT_KEY, RoundConfig
from fedrad.common.protocol.release_app import given_settings
from fedrad.common.protocol.run_config import REQUIRED_KEYS, SETTINGS, run_default
from fedrad.common.run_dir import ResumeError, append_metrics, read_metrics

logger = logging.getLogger(__name__)

STRATEGY_STATE_FILE: Final[str] = "strategy_state.safetensors"
CENTRAL_KEYS: Final[dict[str, str]] = {  # run config key -> ServerPlan field
    "central-noise": "central_noise_multiplier",
    "central-clip": "central_clipping_norm",
    "central-delta": "central_delta",
}
SECAGG_KEYS: Final[dict[str, tuple[str, type]]] = {  # run config key -> (field, type)
    "secagg-shares": ("secagg_shares", int),
    "secagg-threshold": ("secagg_threshold", int),
    "secagg-clip": ("secagg_clip", float),
    "secagg-max-weight": ("secagg_max_weight", float),
}
SECAGG_STRATEGIES: Final[tuple[str, ...]] = ("fedavg", "fedprox")
SECAGG_MIN_SITES: Final[int] = 3  # with two, each site reads the other's update off the sum


def checkpoint_dir(run_dir: Path, round_no: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_no:03d}"


@dataclass(frozen=True)
class ServerPlan:
    """Everything the coordinator's round loop needs, parsed once at start-up."""

    run_dir: Path
    foundation_dir: Path
    num_sites: int  # sites configured; every one trains and evaluates each round
    rounds: int  # total planned rounds (a resumed run continues up to this)
    round_config: RoundConfig  # template sent to sites; server_round is set per round
    strategy: str = "fedavg"
    proximal_mu: float = 0.0  # fedprox only
    server_lr: float = 1e-2  # fedadam only
    round_timeout_s: float = 3600.0  # waiting for one round's replies
    connect_timeout_s: float = 300.0  # waiting for every configured site to connect
    central_noise_multiplier: float | None = None  # central DP: sigma per round; None = off
    central_clipping_norm: float = 1.0  # central DP: L2 bound on one site's whole update
    central_delta: float = DEFAULT_DELTA  # central DP: delta of the site-level epsilon
    min_sites: int | None = None  # a round goes on with this many (None: 1; SecAgg+: threshold)
    secagg: bool = False  # SecAgg+: the coordinator sees only the sum of masked updates
    secagg_shares: int | None = None  # key shares per site (None: every site holds one)
    secagg_threshold: int | None = None  # shares that unmask (None: a majority, at least 2)
    secagg_clip: float | None = None  # range of an update value (None: AdamW's bound)
    secagg_max_weight: float = 100_000.0  # largest site weight (training studies)
    site_registry: Path | None = None  # node id -> site id (deployment); None: replies name it

    def __post_init__(self) -> None:
        if self.num_sites < 1:
            raise ValueError("num_sites must be >= 1")
        if self.rounds < 1 or self.round_config.planned_rounds != self.rounds:
            raise ValueError("rounds must be >= 1 and equal the round config's planned_rounds")
        if self.round_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        noise = self.central_noise_multiplier
        if noise is not None and not (math.isfinite(noise) and noise > 0):
            raise ValueError("central noise multiplier must be positive")
        if not (math.isfinite(self.central_clipping_norm) and self.central_clipping_norm > 0):
            raise ValueError("central clipping norm must be positive")
        if not 0 < self.central_delta < 1:
            raise ValueError("central delta must be in (0, 1)")
        if noise is not None and self.strategy == "fedadam":
            raise ValueError(
                "central DP cannot be used with fedadam (the noise would be added after the "
                "server's Adam step); use fedavg or fedprox"
            )
        if self.secagg:
            self._check_secagg()
        elif any(
            getattr(self, f) is not None
            for f, _ in SECAGG_KEYS.values()
            if f != "secagg_max_weight"
        ):
            raise ValueError("secagg-shares, secagg-threshold and secagg-clip need secagg = true")
        if self.min_sites is not None and not 1 <= self.min_sites <= self.num_sites:
            raise ValueError(f"min-sites must be in 1..{self.num_sites} (the configured sites)")
        if self.min_sites is not None and self.secagg and self.min_sites < self.shares_threshold:
            raise ValueError(
                f"min-sites {self.min_sites} is below the SecAgg+ reconstruction threshold "
                f"{self.shares_threshold}: such a round could never be unmasked"
            )

    def _check_secagg(self) -> None:
        """One-line reasons for SecAgg+ settings that cannot work."""
        if self.strategy not in SECAGG_STRATEGIES:
            raise ValueError(
                f"SecAgg+ supports {' and '.join(SECAGG_STRATEGIES)} (a weighted mean of the "
                f"sites' updates); {self.strategy} is not wired through it"
            )
        if self.num_sites < SECAGG_MIN_SITES:
            raise ValueError(
                f"SecAgg+ needs at least {SECAGG_MIN_SITES} sites (with {self.num_sites}, each "
                "site reads the others' update off the aggregate)"
            )
        shares = self.secagg_shares_count
        if not SECAGG_MIN_SITES <= shares <= self.num_sites:
            raise ValueError(f"secagg-shares must be in {SECAGG_MIN_SITES}..{self.num_sites}")
        if not 2 <= self.shares_threshold < shares:
            raise ValueError(f"secagg-threshold must be in 2..{shares - 1} (below secagg-shares)")
        clip = self.secagg_clip
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError("secagg-clip must be positive")
        if not (math.isfinite(self.secagg_max_weight) and self.secagg_max_weight >= 1):
            raise ValueError("secagg-max-weight must be >= 1")

    @property
    def secagg_shares_count(self) -> int:
        """Key shares per site: every site by default (the federations here are small)."""
        return self.secagg_shares if self.secagg_shares is not None else self.num_sites

    @property
    def shares_threshold(self) -> int:
        """Shares that reconstruct a key: a majority of the shares by default, at least 2."""
        if self.secagg_threshold is not None:
            return self.secagg_threshold
        return max(2, self.secagg_shares_count // 2 + 1)

    @property
    def required_sites(self) -> int:
        """Sites a round step needs to go on without the others."""
        if self.min_sites is not None:
            return self.min_sites
        return self.shares_threshold if self.secagg else 1

    @property
    def central_dp(self) -> bool:
        return self.central_noise_multiplier is not None

    def config_for(self, round_no: int) -> RoundConfig:
        return replace(self.round_config, server_round=round_no)

    @staticmethod
    def from_run_config(run_config: Mapping[str, Any]) -> ServerPlan:
        """The plan of a run config (`run_config.RUN_SETTINGS`: hyphenated keys, unknown ones
        refused), as a deployment's `--run-config` or a simulation's settings give it. A
        setting left at its declared default counts as not given."""
        run_config = given_settings(run_config)
        unknown = set(run_config) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown run config key(s): {', '.join(sorted(unknown))}")
        missing = REQUIRED_KEYS - set(run_config)
        if missing:
            raise ValueError(f"run config lacks {', '.join(sorted(missing))}")

        def value(key: str) -> Any:
            return run_config.get(key, run_default(key))

        rounds = int(run_config["num-rounds"])
        record: dict[str, Any] = {key: value(key) for key in _ROUND_KEYS}
        record["run-id"] = run_config.get("run-id", Path(str(run_config["run-dir"])).name)
        record["server-round"] = 1
        record["planned-rounds"] = rounds
        record["target-epsilon"] = value("epsilon")
        return ServerPlan(
            run_dir=Path(str(run_config["run-dir"])),
            foundation_dir=Path(str(run_config["foundation-dir"])),
            num_sites=int(run_config["num-sites"]),
            rounds=rounds,
            round_config=RoundConfig.from_record(record),
            strategy=str(value("strategy")),
            proximal_mu=float(value("proximal-mu")),
            server_lr=float(value("server-lr")),
            round_timeout_s=float(value("round-timeout")),
            connect_timeout_s=float(value("connect-timeout")),
            site_registry=(
                Path(str(run_config["site-registry"])) if "site-registry" in run_config else None
            ),
            **_central_settings(run_config),
            **_secagg_settings(run_config),
        )


# The run config keys RoundConfig carries as they are (the rest it derives, or are the plan's;
# ledger-head is per site, set as each site's message is built: `server/ledger_heads.py`).
_ROUND_KEYS: Final[frozenset[str]] = frozenset(
    f.name.replace("_", "-") for f in fields(RoundConfig)
) - {"server-round", "planned-rounds", "target-epsilon", LEDGER_HEAD_FIELD}


def _central_settings(run_config: Mapping[str, Any]) -> dict[str, float]:
    """The central-DP keys as ServerPlan fields: numbers only, and central-clip or
    central-delta without central-noise is refused rather than silently ignored."""
    values: dict[str, float] = {}
    for key, name in CENTRAL_KEYS.items():
        if key not in run_config:
            continue
        value = run_config[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"run config {key!r} must be a number, got {type(value).__name__}")
        values[name] = float(value)
    if values and "central_noise_multiplier" not in values:
        raise ValueError("central-clip and central-delta need central-noise (central DP is off)")
    return values


def _secagg_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """secagg (a bool), min-sites and the secagg-* keys as ServerPlan fields, types checked."""
    values: dict[str, Any] = {}
    if "secagg" in run_config:
        if not isinstance(run_config["secagg"], bool):
            raise ValueError("run config 'secagg' must be true or false")
        values["secagg"] = run_config["secagg"]
    typed: dict[str, tuple[str, type]] = {**SECAGG_KEYS, "min-sites": ("min_sites", int)}
    for key, (name, kind) in typed.items():
        if key not in run_config:
            continue
        value = run_config[key]
        ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            raise ValueError(
                f"run config {key!r} must be {kind.__name__}, got {type(value).__name__}"
            )
        values[name] = kind(value)
    given = sorted(set(run_config) & set(SECAGG_KEYS))
    if given and not values.get("secagg"):
        raise ValueError(f"{', '.join(given)} need secagg = true")
    return values


@dataclass(frozen=True)
class TrainOutcome:
    """One training round as the round loop sees it, however the updates travelled."""

    arrays: dict[str, np.ndarray] | None  # the new global trainable values; None: no update
    metrics: dict[str, float]  # training metrics, weighted by example count
    per_site: dict[str, dict[str, float]]  # each answering site's own (epsilon, loss, ...)
    failures: list[str]  # one line per site whose update is missing, safe to log
    updates: int  # updates in the aggregate
    update_bytes: int  # payload bytes one site sent this round (the largest)
    secagg: dict[str, float] | None = None  # SecAgg+ figures of the round (None: plain)


@dataclass(frozen=True)
class EvalOutcome:
    metrics: dict[str, float]  # global evaluation, weighted by example count
    failures: list[str]  # "evaluate: ..." per site that did not report
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)  # each site's own


@dataclass(frozen=True)
class ResumePoint:
    completed: int  # rounds already committed (0 = fresh start)
    arrays: dict[str, np.ndarray]  # global trainable values to continue from
    strategy_state: dict[str, np.ndarray]


class RunBook:
    """Checkpoints and metrics of one run directory, with the rules that make resume safe."""

    def __init__(self, run_dir: Path, foundation_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.foundation_dir = Path(foundation_dir)
        self._trainable = _declared(self.foundation_dir)
        self.completed = self._completed_rounds()

    def _completed_rounds(self) -> int:
        rounds = [int(r["round"]) for r in read_metrics(self.run_dir)]
        if rounds != list(range(1, len(rounds) + 1)):
            raise ResumeError(
                f"{self.run_dir / 'metrics.jsonl'} lists rounds {rounds}, not 1..n in order"
            )
        if rounds and not (checkpoint_dir(self.run_dir, rounds[-1]) / "metadata.json").is_file():
            raise ResumeError(
                f"round {rounds[-1]} is in metrics.jsonl but its checkpoint is missing"
            )
        return len(rounds)

    def resume_point(self) -> ResumePoint:
        """Where training continues: the last committed checkpoint, or the foundation."""
        if self.completed == 0:
            return ResumePoint(0, self._load_arrays(self.foundation_dir), {})
        directory = checkpoint_dir(self.run_dir, self.completed)
        meta = read_metadata(directory)
        if meta.get("foundation") != self.foundation_dir.name:
            raise ResumeError(
                f"{directory} was trained from foundation {meta.get('foundation')!r}, "
                f"not {self.foundation_dir.name!r}"
            )
        state_file = directory / STRATEGY_STATE_FILE
        state = load_numpy(str(state_file)) if state_file.is_file() else {}
        return ResumePoint(self.completed, self._load_arrays(directory), state)

    def _load_arrays(self, directory: Path) -> dict[str, np.ndarray]:
        """The declared trainable tensors only, read with safetensors (no pickle)."""
        from safetensors.torch import load_file

        weights = load_file(str(directory / "model.safetensors"))
        missing = self._trainable - set(weights)
        if missing:
            raise ResumeError(f"{directory} lacks {len(missing)} trainable tensors")
        return {k: weights[k].float().numpy() for k in sorted(self._trainable)}

    def commit(
        self,
        round_no: int,
        arrays: Mapping[str, np.ndarray],
        record: Mapping[str, Any],
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        """Checkpoint, then the metrics line (the commit point). Refuses a round twice."""
        if round_no != self.completed + 1:
            raise ResumeError(
                f"round {round_no} cannot follow round {self.completed} (no round twice)"
            )
        if set(arrays) != self._trainable:
            raise ResumeError("aggregated arrays do not match the declared trainable set")
        # The foundation with the new trainable values: the coordinator never builds the
        # model (with a pretrained base that would mean loading the whole LLM to save MBs).
        directory = write_checkpoint_from(
            self.foundation_dir,
            arrays,
            checkpoint_dir(self.run_dir, round_no),
            metadata={
                "kind": "federated",
                "round": round_no,
                "foundation": self.foundation_dir.name,
                "epsilon": record.get("epsilon", {}),
            },
        )
        if strategy_state:
            save_numpy(dict(strategy_state), str(directory / STRATEGY_STATE_FILE))
        append_metrics(self.run_dir, dict(record))
        self.completed = round_no
        return directory


def _declared(foundation_dir: Path) -> frozenset[str]:
    names = read_metadata(foundation_dir).get("trainable")
    if not isinstance(names, list) or not names:
        raise ResumeError(f"{foundation_dir} declares no trainable parameters")
    return frozenset(str(n) for n in names)


def round_record(
    round_no: int,
    *,
    train: Mapping[str, float] | None,
    evaluation: Mapping[str, float] | None,
    epsilon: Mapping[str, float],
    failures: list[str],
    update_bytes: int,
    round_s: float,
    wall_s: float,
    central_epsilon: float | None = None,
    secagg: Mapping[str, float] | None = None,
    per_site: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """One metrics.jsonl line: global (weighted) evaluation, per-site cumulative epsilon,
    each site's own evaluation of the global model (`per_site`: the aggregate metrics it
    replied, as the local-only baseline records them), with central DP the coordinator's
    cumulative (site-level) epsilon, and with SecAgg+ its round figures (sites summed,
    clipping range, the error bound of the unmasked mean)."""
    record: dict[str, Any] = {"round": round_no}
    for key, value in (evaluation or {}).items():
        if key != WEIGHT_KEY:  # the same count as n_studies
            record[key] = _finite_or_none(value)
    train = train or {}
    record["steps"] = _finite_or_none(train.get("steps", float("nan")))
    record["epsilon"] = {site: _finite_or_none(eps) for site, eps in sorted(epsilon.items())}
    record["sites_trained"] = len(epsilon)
    if central_epsilon is not None:
        record["central_epsilon"] = _finite_or_none(central_epsilon)
    if secagg is not None:
        record["secagg"] = dict(secagg)
    record["failures"] = failures
    record["update_bytes"] = update_bytes
    record["round_s"] = round_s
    record["wall_s"] = wall_s
    if per_site:
        record["per_site"] = {
            site: {k: _finite_or_none(v) for k, v in sorted(metrics.items()) if k != WEIGHT_KEY}
            for site, metrics in sorted(per_site.items())
        }
    return record


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def plan_summary(plan: ServerPlan) -> dict[str, Any]:
    """The plan as TOML-safe values, for config.toml."""
    data = asdict(plan)
    data["run_dir"] = str(plan.run_dir)
    data["foundation_dir"] = str(plan.foundation_dir)
    data["site_registry"] = None if plan.site_registry is None else str(plan.site_registry)
    return data
