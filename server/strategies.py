"""Strategy choice by name (FedAvg, FedProx, FedAdam) on Flower's Message API, sized to the
federation actually configured, plus the metric aggregation and FedAdam state the round
loop needs to resume, and site-level central DP (`with_central_dp`).

Minimum node counts are the number of configured sites, never Flower's default of 2 (which
makes a one-site federation wait forever). Sites send their new trainable values; every
strategy here aggregates those (FedAdam turns the average into a server-side Adam step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Final, Literal, get_args

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.messages import ARRAYS_KEY, CONFIG_KEY, WEIGHT_KEY

logger = logging.getLogger(__name__)

StrategyName = Literal["fedavg", "fedprox", "fedadam"]
STRATEGIES: Final[tuple[str, ...]] = get_args(StrategyName)
SUMMED: Final[frozenset[str]] = frozenset({"n_studies"})
MAXED: Final[frozenset[str]] = frozenset({"eval_epsilon"})
UNIT_WEIGHT_KEY: Final[str] = "fedrad-unit-weight"  # stamped by the coordinator, never sent
CENTRAL_DP_FEDADAM: Final[str] = (
    "central DP cannot be used with fedadam: the noise would be added after the server's "
    "Adam step, whose output one site's update can move by more than the clipping bound; "
    "use fedavg or fedprox"
)


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Per key, the mean weighted by `weight_key` over the replies where it is finite.

    Flower's default averages every key over all replies, so a site where a metric is
    undefined (NaN: e.g. AUROC without a positive case) would poison or skew it. Counts are
    summed and timings take the maximum.
    """
    values: dict[str, list[tuple[float, float]]] = {}
    total = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weight_key])  # type: ignore[arg-type]
        total += weight
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list):
                continue
            values.setdefault(key, []).append((float(value), weight))
    out = MetricRecord()
    out[weight_key] = total
    for key, pairs in values.items():
        finite = [(v, w) for v, w in pairs if math.isfinite(v)]
        if key in SUMMED:
            out[key] = float(sum(v for v, _ in finite))
        elif key in MAXED:
            out[key] = max((v for v, _ in finite), default=float("nan"))
        elif finite and sum(w for _, w in finite) > 0:
            out[key] = sum(v * w for v, w in finite) / sum(w for _, w in finite)
        else:
            out[key] = float("nan")
    return out


def metrics_by_examples(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """`weighted_metrics` by example count whatever key the arrays are weighted by: under
    equal weights a site's loss or AUROC still counts by how many studies it stands for."""
    out = weighted_metrics(records, WEIGHT_KEY)
    if UNIT_WEIGHT_KEY in out:
        del out[UNIT_WEIGHT_KEY]
    return out


def _stamp_unit_weight(replies: Iterable[Message]) -> list[Message]:
    """Every reply with content counts once; whatever a site sent under the key is replaced."""
    out = list(replies)
    for reply in out:
        if not reply.has_error():
            for record in reply.content.metric_records.values():
                record[UNIT_WEIGHT_KEY] = 1.0
    return out


class EqualWeightFedAvg(FedAvg):
    """FedAvg whose arrays are the unweighted mean of the updates (central DP needs it)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, _stamp_unit_weight(replies))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, _stamp_unit_weight(replies))


class EqualWeightFedProx(EqualWeightFedAvg, FedProx):
    """FedProx (the proximal term is the sites' business) with equal-weight aggregation."""


def build_strategy(
    name: str,
    *,
    num_sites: int,
    proximal_mu: float = 0.0,
    server_lr: float = 1e-2,
    equal_weights: bool = False,
) -> FedAvg:
    """Every configured site trains and evaluates each round (fraction 1, minimum = all).

    `equal_weights` averages the arrays without weighting by example count (for central DP;
    FedAdam is refused with it). Metrics are weighted by example count either way.
    """
    if num_sites < 1:
        raise ValueError("a federation needs at least one site")
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": num_sites,
        "min_available_nodes": num_sites,
        "weighted_by_key": UNIT_WEIGHT_KEY if equal_weights else WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "train_metrics_aggr_fn": metrics_by_examples if equal_weights else weighted_metrics,
        "evaluate_metrics_aggr_fn": metrics_by_examples if equal_weights else weighted_metrics,
    }
    if name == "fedavg":
        return (EqualWeightFedAvg if equal_weights else FedAvg)(**common)  # type: ignore[arg-type]
    if name == "fedprox":
        if proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0 (0 is plain FedAvg)")
        kind = EqualWeightFedProx if equal_weights else FedProx
        return kind(**common, proximal_mu=proximal_mu)  # type: ignore[arg-type]
    if name == "fedadam":
        if equal_weights:
            raise ValueError(CENTRAL_DP_FEDADAM)
        if server_lr <= 0:
            raise ValueError("fedadam needs server_lr > 0")
        return FedAdam(**common, eta=server_lr)  # type: ignore[arg-type]
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper, fed what it assumes, with its noise drawn
    from a CSPRNG-keyed `MechanismRandomness` instead of numpy's global generator (which
    anyone who learns its state can replay).

    The wrapper pairs each reply's arrays with the global ones by position; sites send them in
    their model's parameter order, so each reply is first put in the global's key order (a
    reply with other names is refused). Replies carrying an error must be left out by the
    caller: the wrapper skips aggregation altogether if it sees one.
    """

    randomness: MechanismRandomness = MechanismRandomness()

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noised = add_central_noise(aggregated_arrays.to_numpy_ndarrays(), std, self.randomness)
        logger.info("central DP noise of std %.4g added to the mean", std)
        return ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in zip(aggregated_arrays.keys(), noised, strict=True)}
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        order = list(self.current_arrays.keys())
        for reply in replies:
            if reply.has_error():
                raise ValueError("central DP aggregation was given a reply with an error")
            for name, record in list(reply.content.array_records.items()):
                if set(record.keys()) != set(order):
                    raise ValueError(
                        "a site's update does not hold exactly the global model's arrays"
                    )
                reply.content[name] = ArrayRecord({k: record[k] for k in order})
        return super().aggregate_train(server_round, replies)


def add_central_noise(
    arrays: list[np.ndarray], std: float, randomness: MechanismRandomness
) -> list[np.ndarray]:
    """The aggregate plus N(0, std^2) per value, from the coordinator's CSPRNG."""
    return [a + randomness.gaussian_array(a.shape, std, a.dtype) for a in arrays]


def with_central_dp(
    strategy: FedAvg, *, noise_multiplier: float, clipping_norm: float, num_sites: int
) -> CentralDP:
    """Site-level central DP (the unit of privacy is one site's whole update) around an
    equal-weight FedAvg or FedProx, with Flower's `DifferentialPrivacyServerSideFixedClipping`:
    each update (new values minus the global) is clipped to L2 norm C, the clipped values are
    averaged, and Gaussian noise of std sigma * C / n is added. That std bounds one site's
    influence only for an UNWEIGHTED mean, so the arrays are averaged with equal weights: the
    coordinator stamps a unit weight (`UNIT_WEIGHT_KEY`) into every reply it received, so no
    site can change its own weight; metrics are still averaged by example count. FedAdam is
    refused: the noise would come after the Adam step, whose sensitivity it does not bound.
    """
    if isinstance(strategy, FedAdam):
        raise ValueError(CENTRAL_DP_FEDADAM)
    if strategy.weighted_by_key != UNIT_WEIGHT_KEY:
        raise ValueError("central DP needs equal weights (build_strategy(equal_weights=True))")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError("the central noise multiplier must be positive")
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError("the central clipping norm must be positive")
    return CentralDP(strategy, noise_multiplier, clipping_norm, num_sites)


def inner_strategy(strategy: Strategy) -> Strategy:
    """The strategy under any DP wrapper (where FedAdam's moments would live)."""
    while isinstance(inner := getattr(strategy, "strategy", None), Strategy):
        strategy = inner
    return strategy


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """What a strategy carries between rounds (FedAdam's moments), flat for safetensors."""
    strategy = inner_strategy(strategy)
    state: dict[str, np.ndarray] = {}
    for prefix in ("m_t", "v_t"):
        moments = getattr(strategy, prefix, None)
        for key, value in (moments or {}).items():
            state[f"{prefix}/{key}"] = np.ascontiguousarray(value)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Puts saved moments back, so a resumed FedAdam continues instead of restarting."""
    strategy = inner_strategy(strategy)
    for prefix in ("m_t", "v_t"):
        moments = {
            key.split("/", 1)[1]: value
            for key, value in state.items()
            if key.startswith(f"{prefix}/")
        }
        if moments:
            if not hasattr(strategy, prefix):
                raise ValueError(
                    f"saved {prefix} state does not fit strategy {type(strategy).__name__}"
                )
            setattr(strategy, prefix, moments)


def size_to_sites(strategy: Strategy, num_sites: int) -> None:
    """This round step samples exactly the `num_sites` sites its grid holds: Flower's sampling
    waits, without a time limit, for its minimum number of connected nodes."""
    inner = inner_strategy(strategy)
    for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        setattr(inner, name, num_sites)
