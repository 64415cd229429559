"""SecAgg+ ranges: AdamW's per-value update bound holds for any gradients (so secaggplus_mod
never clips a real update), the quantization never wraps the modulus, and the error bound of
the unmasked mean is what the arithmetic gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrad.common.protocol.secagg import (
    ADAM_BETAS,
    MAX_QUANTIZATION_RANGE,
    MODULUS_RANGE,
    adam_update_bound,
    array_order,
    mean_error_bound,
    quantization_range,
    weight_ratio,
)


def test_adams_first_step_is_lr_and_later_steps_approach_7_3_lr() -> None:
    assert adam_update_bound(lr=0.01, steps=1) == pytest.approx(0.01)
    bounds = [adam_update_bound(lr=1.0, steps=t) for t in (1, 2, 10, 50, 500)]
    assert bounds == sorted(bounds)
    increments = [
        adam_update_bound(lr=1.0, steps=t + 1) - adam_update_bound(lr=1.0, steps=t)
        for t in (100, 20_000)
    ]
    limit = (1 - 0.9) / math.sqrt(1 - 0.999) / math.sqrt(1 - 0.81 / 0.999)
    assert increments[-1] == pytest.approx(limit, rel=0.01)
    with pytest.raises(ValueError):
        adam_update_bound(lr=0.0, steps=3)
    with pytest.raises(ValueError):
        adam_update_bound(lr=1.0, steps=5, betas=(0.99, 0.9))  # b1^2 > b2: no bound


@pytest.mark.parametrize("pattern", ["same-sign growing", "same-sign shrinking", "noise", "spikes"])
def test_no_gradient_sequence_moves_adamw_past_the_bound(pattern: str) -> None:
    """What DP-SGD can hand AdamW (noisy, clipped, FedProx-shifted gradients) is arbitrary."""
    generator = torch.Generator().manual_seed(7)
    steps, lr = 40, 0.5
    param = torch.zeros(4096, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=lr, betas=ADAM_BETAS, weight_decay=0.0)
    for t in range(steps):
        scale = torch.rand(4096, generator=generator) * 10
        if pattern == "same-sign growing":
            grad = scale * 1.3**t
        elif pattern == "same-sign shrinking":
            grad = scale * 0.7**t
        elif pattern == "noise":
            grad = torch.randn(4096, generator=generator) * scale
        else:
            grad = torch.where(torch.rand(4096, generator=generator) < 0.05, scale * 1e4, 1e-6)
        param.grad = grad
        optimizer.step()
    moved = float(param.detach().abs().max())
    bound = adam_update_bound(lr=lr, steps=steps)
    assert moved <= bound
    if pattern == "same-sign growing":
        assert moved > 0.8 * bound  # and it is not loose where it matters


def test_quantized_sums_never_wrap_and_fit_int32() -> None:
    for sites in (1, 2, 3, 7, 100, 1000, 100_000):
        levels = quantization_range(sites)
        assert levels & (levels - 1) == 0 and levels <= MAX_QUANTIZATION_RANGE < 2**31
        assert sites * levels <= MODULUS_RANGE // 2
    assert quantization_range(3) == 2**29


def test_error_bound_is_sites_times_a_step_over_the_summed_weight_ratios() -> None:
    levels = 2**20
    ratios = [weight_ratio(w, max_weight=100.0, quantization=levels) for w in (10, 30)]
    assert ratios == pytest.approx([0.1, 0.3], abs=1 / levels)
    bound = mean_error_bound([10, 30], clipping_range=0.5, quantization=levels, max_weight=100.0)
    assert bound == pytest.approx(2 * (1.0 / levels) / sum(ratios))
    with pytest.raises(ValueError):
        mean_error_bound([], clipping_range=0.5, quantization=levels, max_weight=100.0)


def test_arrays_travel_sorted_by_name() -> None:
    assert array_order({"z.w": np.zeros(1), "a.b": np.zeros(1)}) == ["a.b", "z.w"]
