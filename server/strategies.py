"""Strategy choice by name (FedAvg, FedProx, FedAdam) on Flower's Message API, sized to the
federation actually configured, plus the metric aggregation and FedAdam state the round
loop needs to resume.

Minimum node counts are the number of configured sites, never Flower's default of 2 (which
makes a one-site federation wait forever). Sites send their new trainable values; every
strategy here aggregates those (FedAdam turns the average into a server-side Adam step).
"""

from __future__ import annotations

import math
from typing import Final, Literal, get_args

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedrad.common.fl_protocol import ARRAYS_KEY, CONFIG_KEY, WEIGHT_KEY

StrategyName = Literal["fedavg", "fedprox", "fedadam"]
STRATEGIES: Final[tuple[str, ...]] = get_args(StrategyName)
SUMMED: Final[frozenset[str]] = frozenset({"n_studies", "n_reports", "n_questions"})
MAXED: Final[frozenset[str]] = frozenset({"eval_seconds"})


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


def build_strategy(
    name: str, *, num_sites: int, proximal_mu: float = 0.0, server_lr: float = 1e-2
) -> FedAvg:
    """Every configured site trains and evaluates each round (fraction 1, minimum = all)."""
    if num_sites < 1:
        raise ValueError("a federation needs at least one site")
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": num_sites,
        "min_available_nodes": num_sites,
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "train_metrics_aggr_fn": weighted_metrics,
        "evaluate_metrics_aggr_fn": weighted_metrics,
    }
    if name == "fedavg":
        return FedAvg(**common)  # type: ignore[arg-type]
    if name == "fedprox":
        if proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0 (0 is plain FedAvg)")
        return FedProx(**common, proximal_mu=proximal_mu)  # type: ignore[arg-type]
    if name == "fedadam":
        if server_lr <= 0:
            raise ValueError("fedadam needs server_lr > 0")
        return FedAdam(**common, eta=server_lr)  # type: ignore[arg-type]
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """What a strategy carries between rounds (FedAdam's moments), flat for safetensors."""
    state: dict[str, np.ndarray] = {}
    for prefix in ("m_t", "v_t"):
        moments = getattr(strategy, prefix, None)
        for key, value in (moments or {}).items():
            state[f"{prefix}/{key}"] = np.ascontiguousarray(value)
    return state


def restore_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    """Puts saved moments back, so a resumed FedAdam continues instead of restarting."""
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
