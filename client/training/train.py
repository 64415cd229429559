"""Local training at a site: DP-SGD (Poisson sampling, Opacus' per-sample clipping, calibrated
Gaussian noise) or plain SGD for baselines. Framework-free: no Flower import here.

The sampling and the noise draw from a `MechanismRandomness` (the OS CSPRNG unless a simulation
asked for reproducible draws); `TrainConfig.seed` drives only what is public: task prompts,
dropout, the shuffling of runs without DP.

The mechanism's raw parameters (sample rate, noise multiplier, steps, clip, delta) are returned
so the caller can append them to the site ledger: epsilon is recomputed from those, never
carried as an opaque number.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from fedrad.client.ingest.dataset import TrainingExamples
from fedrad.client.training.private_sgd import SiteNoiseDPOptimizer, poisson_loader
from fedrad.common.devices import Precision, autocast, select_device
from fedrad.common.model.parts import parts_reached, training_only
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.privacy.accounting import (
    AccountantName,
    MechanismStep,
    calibrate_noise,
    cumulative_epsilon,
    poisson_sample_rate,
)
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.secagg import ADAM_BETAS

logger = logging.getLogger(__name__)

GradSampleMode = Literal["hooks", "functorch"]


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy settings; `noise_multiplier` None means calibrate from the budget."""

    enabled: bool = True
    target_epsilon: float | None = DEFAULT_EPSILON  # what the planned schedule may spend in all
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0  # per-sample clipping bound
    noise_multiplier: float | None = None  # set explicitly to skip calibration
    planned_steps: int | None = None  # whole schedule (all rounds); default: this call's steps
    accountant: AccountantName = "rdp"
    grad_sample_mode: GradSampleMode = "hooks"

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.noise_multiplier is None and (
            self.target_epsilon is None or self.target_epsilon <= 0
        ):
            raise ValueError("DP needs a positive target_epsilon or an explicit noise_multiplier")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be positive")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps in this call
    batch_size: int = 16  # expected batch size; with Poisson sampling q = batch_size / N
    lr: float = 1e-3
    weight_decay: float = 0.0
    lora_lr_scale: float = 0.25  # LoRA adapters learn at this fraction of `lr`
    seed: int = 0  # public randomness only (never the DP noise or sampling)
    threads: int = 0  # torch CPU threads (0 = leave as is)
    device: str = "auto"  # "auto" = the site's GPU when it has one, else the CPU
    precision: Precision = "auto"  # "auto" = bf16 autocast on a GPU, fp32 on the CPU
    loader_workers: int = 2  # data-loading processes on a GPU (the CPU trains in-process)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.loader_workers < 0:
            raise ValueError("loader_workers must be >= 0")


@dataclass
class TrainResult:
    steps: int
    examples: int
    sample_rate: float
    noise_multiplier: float  # 0.0 without DP
    max_grad_norm: float | None
    delta: float | None
    epsilon: float | None  # spent by this call alone (the ledger accumulates across calls)
    seconds: float
    losses: list[float] = field(default_factory=list)
    accountant: str | None = None
    parts: frozenset[str] = frozenset()  # the modality parts trained (`common/model/parts.py`)


def _trim(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Drops padding columns beyond the longest example (right-padded): same loss, less work."""
    images, volumes, modality, ids, attention, target_mask, *rest = batch
    length = max(int(attention.sum(dim=1).max()), 1)
    return (
        images,
        volumes,
        modality,
        ids[:, :length],
        attention[:, :length],
        target_mask[:, :length],
        *rest,
    )


def train_local(
    model: RadiologyModel,
    examples: TrainingExamples,
    train: TrainConfig,
    dp: DPConfig,
    *,
    randomness: MechanismRandomness | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Trains the model's trainable parameters in place and returns what was spent.

    Only the shared part and the projectors of the modalities in `examples` train: another
    modality's projector gets neither gradient nor noise and comes back unchanged.
    `randomness` draws the DP sampling and noise; None means a fresh CSPRNG-keyed one.
    """
    if len(examples) == 0:
        raise ValueError("no training examples")
    reached = parts_reached(examples.studies.modalities)
    with training_only(model, reached):
        result = _train_parts(model, examples, train, dp, randomness, progress)
    return dataclasses.replace(result, parts=reached)


def _train_parts(
    model: RadiologyModel,
    examples: TrainingExamples,
    train: TrainConfig,
    dp: DPConfig,
    randomness: MechanismRandomness | None,
    progress: Callable[[int, float], None] | None,
) -> TrainResult:
    if train.threads:
        torch.set_num_threads(train.threads)
    torch.manual_seed(train.seed)  # dropout and task prompts: public, reproducible
    randomness = randomness or MechanismRandomness()
    n = len(examples)
    sample_rate = poisson_sample_rate(train.batch_size, n)
    device = select_device(train.device)
    # Onto the device before parameters are collected and Opacus' hooks attach: a LoRA
    # tensor replaced by a move afterwards would never be updated (the Opacus + peft hazard).
    model.to(device)
    if dp.enabled:
        loader = _dp_loader(examples, train, device, sample_rate, randomness)
    else:
        generator = torch.Generator().manual_seed(train.seed)
        loader = _shuffled_loader(examples, train, device, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    lora_ids = {id(p) for p in lora}
    image_side = [p for p in params if id(p) not in lora_ids]
    groups = [{"params": image_side, "lr": train.lr}]
    if lora:  # the pretrained LM drifts from its prompt if its adapters move as fast
        groups.append({"params": lora, "lr": train.lr * train.lora_lr_scale})
    # The betas are named once: SecAgg+ sizes its clipping range from AdamW's update bound.
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(
        groups, lr=train.lr, betas=ADAM_BETAS, weight_decay=train.weight_decay
    )
    model.train()
    start = time.perf_counter()

    noise = 0.0
    module: torch.nn.Module = model
    if dp.enabled:
        planned = dp.planned_steps or train.steps
        if dp.noise_multiplier is not None:
            noise = dp.noise_multiplier
        else:
            assert dp.target_epsilon is not None
            noise = calibrate_noise(  # the whole planned schedule, from nothing spent
                sample_rate=sample_rate,
                steps=planned,
                target_epsilon=dp.target_epsilon,
                delta=dp.delta,
                accountant=dp.accountant,
            )
        if dp.delta >= 1.0 / n:
            logger.warning("delta %.2g >= 1/N for N=%d: the guarantee is weak", dp.delta, n)
        ModuleValidator.validate(model, strict=True)  # no BatchNorm: it mixes records
        module = GradSampleModule(model, force_functorch=dp.grad_sample_mode == "functorch")
        module.forbid_grad_accumulation()
        optimizer = SiteNoiseDPOptimizer(
            optimizer,
            noise_multiplier=noise,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(n * sample_rate)),
            randomness=randomness,
        )

    weight = model.config.finding_loss_weight
    losses: list[float] = []
    done = 0
    try:
        while done < train.steps:
            for batch in loader:
                if done >= train.steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                if batch[0].shape[0] == 0:
                    _empty_step(optimizer, params)
                    loss_value = float("nan")
                else:
                    inputs = tuple(t.to(device, non_blocking=True) for t in _trim(tuple(batch)))
                    with autocast(device, train.precision):
                        lm_loss, finding_loss, _ = module(*inputs)
                    loss = (lm_loss.float() + weight * finding_loss.float()).mean()
                    loss.backward()
                    optimizer.step()
                    loss_value = float(loss.detach())
                losses.append(loss_value)
                done += 1
                if progress is not None:
                    progress(done, loss_value)
    finally:
        if isinstance(module, GradSampleModule):
            module._close()  # removes Opacus hooks; the model object stays ours
        model.eval()

    epsilon = None
    if dp.enabled:  # from the raw parameters, as the ledger and the audit do
        step = MechanismStep(noise, sample_rate, done)
        epsilon = cumulative_epsilon([step], delta=dp.delta, accountant=dp.accountant)
    seconds = time.perf_counter() - start
    finite = [v for v in losses if math.isfinite(v)]
    logger.info(
        "trained %d steps in %.1f s; loss %.3f -> %.3f; epsilon %s",
        done,
        seconds,
        finite[0] if finite else float("nan"),
        finite[-1] if finite else float("nan"),
        f"{epsilon:.3f}" if epsilon is not None else "n/a (no DP)",
    )
    return TrainResult(
        steps=done,
        examples=n,
        sample_rate=sample_rate,
        noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm if dp.enabled else None,
        delta=dp.delta if dp.enabled else None,
        epsilon=epsilon,
        seconds=seconds,
        losses=losses,
        accountant=dp.accountant if dp.enabled else None,
    )


def _loader_options(train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """On a GPU, worker processes prepare batches into pinned memory so the device is not kept
    waiting; the CPU trains in-process."""
    workers = train.loader_workers if device.type == "cuda" else 0
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "worker_init_fn": _reseed_worker if workers else None,
        "persistent_workers": False,
    }


def _dp_loader(
    examples: TrainingExamples,
    train: TrainConfig,
    device: torch.device,
    sample_rate: float,
    randomness: MechanismRandomness,
) -> DataLoader:
    """Exactly `train.steps` Poisson batches at `sample_rate`, drawn from `randomness`."""
    return poisson_loader(
        examples,
        sample_rate=sample_rate,
        steps=train.steps,
        randomness=randomness,
        **_loader_options(train, device),
    )


def _shuffled_loader(
    examples: TrainingExamples,
    train: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
) -> DataLoader:
    """Shuffled fixed-size batches for training without DP (baselines)."""
    batch_size = min(train.batch_size, len(examples))
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        **_loader_options(train, device),
    )


def _reseed_worker(worker_id: int) -> None:
    """Each loader process draws its own tasks (it starts with a copy of the same RNG)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, TrainingExamples):
        info.dataset.rng.seed(info.seed)


def _empty_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """A Poisson draw can be empty: the DP step still runs (noise only) and is accounted."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        p.grad = torch.zeros_like(p)
    optimizer.step()
