"""The two secret parts of DP-SGD at a site, driven by the site's own randomness: which
records each step draws (Poisson sampling) and the Gaussian noise on their clipped gradients.

Opacus draws both from torch generators (its `secure_mode` needs torchcsprng, which has no
build here); a torch generator seeded from anything the coordinator sends is replayable by the
coordinator. So the sampler and the noise here take every draw from a
`MechanismRandomness` (`common/privacy/randomness.py`), and Opacus keeps what it does well:
per-sample gradients and clipping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from fedrad.common.privacy.randomness import MechanismRandomness


class PoissonBatchSampler(Sampler[list[int]]):
    """`steps` batches; each record joins each batch independently with `sample_rate` (the
    sampled Gaussian mechanism's subsampling, exactly the rate the ledger records)."""

    def __init__(
        self,
        num_samples: int,
        *,
        sample_rate: float,
        steps: int,
        randomness: MechanismRandomness,
    ) -> None:
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.randomness = randomness

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.randomness.bernoulli(self.num_samples, self.sample_rate)
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def poisson_loader(
    dataset: Dataset,
    *,
    sample_rate: float,
    steps: int,
    randomness: MechanismRandomness,
    **loader_options: Any,
) -> DataLoader:
    """A loader of Poisson batches (possibly empty: the step still runs and is accounted)."""
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    sampler = PoissonBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        sample_rate=sample_rate,
        steps=steps,
        randomness=randomness,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_options)


class SiteNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (per-sample clipping, averaging) whose Gaussian noise comes from the
    site's `MechanismRandomness` instead of a torch generator."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        randomness: MechanismRandomness,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self.randomness = randomness

    def add_noise(self) -> None:
        """Clipped gradient sum + N(0, (sigma * C)^2) per coordinate, into `p.grad`."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.randomness.gaussian_like(p.summed_grad, std)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
