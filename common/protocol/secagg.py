"""What SecAgg+ puts on the wire, defined once for the coordinator and the sites.

Flower 1.41 has SecAgg+ only in its legacy API (`secaggplus_mod` at a site, the
`SecAggPlusWorkflow` at the coordinator): a site's update travels as an ordered list of arrays,
scaled by `weight / max_weight`, clipped to `[-clipping_range, clipping_range]`, stochastically
quantized and masked; the coordinator only ever unmasks the sum. Fixed here: the arrays' order,
each stage's reply fields, the ranges and the error bound of the unmasked mean. The clipping
range comes from a bound on what a site sends (`adam_update_bound`), never from a guess:
`secaggplus_mod` clips silently, and a clipped update is a wrong model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final

from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

SECAGG_RECORD: Final[str] = RECORD_KEY_CONFIGS  # the protocol's ConfigRecord in every message
SECAGG_STATE: Final[str] = RECORD_KEY_STATE  # a site's protocol state in its Context
STAGE_FIELD: Final[str] = Key.STAGE
# What a site may answer at each stage, field by field (nothing else leaves):
#   setup: its two public keys; share keys: encrypted key shares for its neighbours;
#   collect masked vectors: its masked integer vectors; unmask: key shares of neighbours.
SECAGG_REPLY_FIELDS: Final[dict[str, frozenset[str]]] = {
    Stage.SETUP: frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}),
    Stage.SHARE_KEYS: frozenset({Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}),
    Stage.COLLECT_MASKED_VECTORS: frozenset({Key.MASKED_PARAMETERS}),
    Stage.UNMASK: frozenset({Key.NODE_ID_LIST, Key.SHARE_LIST}),
}
# Flower's legacy FitRes / EvaluateRes record names (flwr.compat recorddict_compat).
FIT_RES_RECORDS: Final[frozenset[str]] = frozenset(
    {"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}
)
EVALUATE_RES_RECORDS: Final[frozenset[str]] = frozenset(
    {"evaluateres.metrics", "evaluateres.num_examples", "evaluateres.loss", "evaluateres.status"}
)
# Key shares, encrypted or plain, fit well below this (sizes in Flower 1.41:
# docs/results/training.md); a model-sized payload does not.
MAX_SECRET_BYTES: Final[int] = 1024
MODULUS_RANGE: Final[int] = 2**32  # Flower's default; masks are drawn below it
MAX_QUANTIZATION_RANGE: Final[int] = 2**30  # quantized values are int32 in secaggplus_mod
ADAM_BETAS: Final[tuple[float, float]] = (0.9, 0.999)  # the sites' AdamW (client/training/train.py)


def array_order(names: Iterable[str]) -> list[str]:
    """The order in which trainable arrays travel as legacy Parameters: sorted by name."""
    return sorted(names)


def adam_update_bound(*, lr: float, steps: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Largest possible move of one coordinate in `steps` AdamW steps (no weight decay) from a
    fresh optimizer, whatever the gradients (DP noise, the FedProx term) were.

    Per step torch's AdamW moves a coordinate by lr * sqrt(1 - b2^t) / (1 - b1^t) * |m_t| /
    (sqrt(v_t) + eps). By Cauchy-Schwarz, |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) *
    sqrt(sum_{k<t} (b1^2 / b2)^k), so step t moves at most lr * B(t) (B(1) = 1: Adam's first
    step is lr * sign(g)). The bound is the sum of lr * B(t); about 7.3 * lr per step once t
    is large, for the default betas.
    """
    b1, b2 = betas
    gamma = b1 * b1 / b2
    if not (0 <= b1 < 1 and 0 < b2 < 1 and gamma < 1):
        raise ValueError("the bound needs 0 <= b1 < 1, 0 < b2 < 1 and b1^2 < b2")
    if lr <= 0 or steps < 1:
        raise ValueError("lr must be positive and steps >= 1")
    ratio = (1 - b1) / math.sqrt(1 - b2)
    total = 0.0
    for t in range(1, steps + 1):
        momentum = ratio * math.sqrt((1 - gamma**t) / (1 - gamma))  # bounds |m_t| / sqrt(v_t)
        total += momentum * math.sqrt(1 - b2**t) / (1 - b1**t)  # bias corrections
    return lr * total


def quantization_range(num_sites: int) -> int:
    """The finest power-of-two quantization whose sum over `num_sites` stays below half the
    modulus (so the unmasked sum never wraps), capped where secaggplus_mod's int32 holds it."""
    if num_sites < 1:
        raise ValueError("num_sites must be >= 1")
    levels = 1 << ((MODULUS_RANGE // 2 // num_sites).bit_length() - 1)
    return min(levels, MAX_QUANTIZATION_RANGE)


def weight_ratio(weight: float, *, max_weight: float, quantization: int) -> float:
    """The factor secaggplus_mod scales a site's update by: weight / max_weight, quantized."""
    return round(weight / max_weight * quantization) / quantization


def mean_error_bound(
    weights: Sequence[float], *, clipping_range: float, quantization: int, max_weight: float
) -> float:
    """Largest difference, per value, between the unmasked SecAgg+ mean and the exact weighted
    mean of the same updates: each site's scaled value is off by less than one quantization
    step (stochastic rounding), and the sum is divided by the summed weight ratios."""
    ratios = [weight_ratio(w, max_weight=max_weight, quantization=quantization) for w in weights]
    if not ratios or sum(ratios) <= 0:
        raise ValueError("the bound needs at least one positive weight")
    step = 2 * clipping_range / quantization
    return len(ratios) * step / sum(ratios)
