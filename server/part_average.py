"""Each modality part averaged over the sites that trained it (`common/model/parts.py`).

Every aggregation path here (FedAvg or FedProx on values, SecAgg+ on masked deltas, with or
without central noise) yields the weighted mean over all replies, in which a site that never
saw a modality contributes an unchanged copy (delta 0) of that modality's projector. That mean,
rescaled by W / W_part around the previous global value, is exactly the weighted mean over the
sites that trained the part: `g + (mean - g) * W / W_part`. A part no site trained stays as it
was. Under central DP this is post-processing (the guarantee is unchanged; the noise on a part
grows by the same factor). FedAdam's server step is not linear in the mean, so a mixed
federation refuses it rather than averaging wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from fedrad.common.model.parts import MODALITY_PARTS, part_of

logger = logging.getLogger(__name__)


def part_weights(
    weights: Sequence[float], declared: Sequence[frozenset[str] | None]
) -> dict[str, float]:
    """Per modality part, the total weight of the replies that trained it (a reply that
    declares no parts trained them all)."""
    return {
        part: float(
            sum(w for w, d in zip(weights, declared, strict=True) if d is None or part in d)
        )
        for part in MODALITY_PARTS
    }


def partial_parts(weights: Sequence[float], declared: Sequence[frozenset[str] | None]) -> list[str]:
    """The parts some replies trained and others did not: their mean needs rescaling (a part
    nobody trained has nothing to average)."""
    total = float(sum(weights))
    return [p for p, w in part_weights(weights, declared).items() if 0 < w < total]


def rescale_parts(
    mean: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray],
    weights: Sequence[float],
    declared: Sequence[frozenset[str] | None],
) -> dict[str, np.ndarray]:
    """The new global arrays with each modality part averaged over the sites that trained it."""
    total = float(sum(weights))
    by_part = part_weights(weights, declared)
    out = dict(mean)
    if total <= 0:
        return out
    for name, value in mean.items():
        part = part_of(name)
        if part not in by_part or by_part[part] >= total:
            continue
        old = np.asarray(previous[name], dtype=np.float64)
        if by_part[part] <= 0:
            out[name] = np.asarray(previous[name]).copy()
            continue
        scaled = old + (np.asarray(value, dtype=np.float64) - old) * (total / by_part[part])
        out[name] = scaled.astype(np.asarray(value).dtype)
    untrained = [p for p, w in by_part.items() if w <= 0]
    if untrained:
        logger.info("parts no site trained this round (kept as they were): %s", untrained)
    return out
