"""`fedrad-sim bench model`: step time and peak memory, DP vs non-DP, per preset, on this machine.

Each preset runs in a fresh process so its peak RSS is its own. Steps use a fixed synthetic
batch of realistic shape (the cost of a step does not depend on pixel values), the same loss as
training, and the sites' DP optimizer (Opacus' per-sample clipping, noise from the site's
CSPRNG, `client/training/private_sgd.py`); the DP/non-DP ratio is the figure the design asks to
drive down. The same step with Opacus' own torch-generator noise is timed beside it (what the
CSPRNG costs). Nothing is asserted: this measures.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import platform
import resource
import statistics
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

MODES = ("hooks", "functorch")
BATCH_KINDS = ("radiograph", "CT", "mixed")
"""What a measured batch holds: radiographs, CT volumes, or half of each (a mixed site)."""


def _batch(
    config: Any, vocab: int, batch_size: int, seed: int, kind: str = "radiograph"
) -> tuple[torch.Tensor, ...]:
    """One training batch as `TrainingExamples` gives it (both scan slots, modality codes)."""
    gen = torch.Generator().manual_seed(seed)
    length = 24 + 72  # a typical prompt + report length in tokens
    images = torch.randn(batch_size, 1, config.image_size, config.image_size, generator=gen)
    volumes = torch.randn(batch_size, 1, *config.volume_shape, generator=gen)
    if kind == "radiograph":
        modality, volumes = torch.zeros(batch_size, dtype=torch.long), volumes[:, :, :1, :1, :1]
    elif kind == "CT":
        modality = torch.ones(batch_size, dtype=torch.long)
    else:
        modality = (torch.arange(batch_size) % 2).long()
    ids = torch.randint(2, vocab, (batch_size, length), generator=gen)
    attention = torch.ones(batch_size, length, dtype=torch.long)
    target = torch.zeros(batch_size, length, dtype=torch.bool)
    target[:, 24:] = True
    ctx = torch.full((batch_size,), 10, dtype=torch.long)
    findings = torch.randint(0, 2, (batch_size, 6), generator=gen).float()
    sides = torch.full((batch_size, 5), -1, dtype=torch.long)
    return (
        images, volumes, modality, ids, attention, target, ctx, findings,
        torch.ones(batch_size, 6), sides,
    )  # fmt: skip


def _time_steps(
    module: Any,
    optimizer: Any,
    batch: tuple[torch.Tensor, ...],
    steps: int,
    amp: contextlib.AbstractContextManager[object],
) -> list[float]:
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with amp:
            lm_loss, finding_loss, _ = module(*batch)
        (lm_loss.float() + finding_loss.float()).mean().backward()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps (allocator, hooks)
            times.append(time.perf_counter() - start)
    return times


def bench_preset(
    preset_name: str,
    *,
    steps: int,
    batch_size: int,
    threads: int,
    lm: str | None = None,
    kind: str = "radiograph",
) -> dict[str, Any]:
    """Runs in its own process: builds the preset and times non-DP and DP steps."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedrad.client.training.private_sgd import SiteNoiseDPOptimizer
    from fedrad.common.devices import autocast, select_device
    from fedrad.common.model.checkpoint import build_model
    from fedrad.common.model.config import model_config_for
    from fedrad.common.model.foundation import public_reports
    from fedrad.common.model.parts import part_of, parts_reached
    from fedrad.common.model.tokenizer import train_tokenizer
    from fedrad.common.privacy.randomness import MechanismRandomness

    if threads:
        torch.set_num_threads(threads)
    # as federations run it: the public foundation's encoder is frozen (it never trains)
    config = model_config_for(preset_name, lm, freeze_encoder=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    if config.pretrained_lm:  # the base LM with its own tokenizer, hash verified
        model = build_model(config)
    else:
        corpus = [report for _, report in public_reports(400, 0)]
        model = build_model(config, train_tokenizer(corpus, vocab_size=config.vocab_size))
    load_s = time.perf_counter() - started
    device = select_device("auto")
    model.to(device)
    batch = tuple(
        t.to(device) for t in _batch(model.config, len(model.tokenizer), batch_size, 0, kind)
    )
    # what a site holding these modalities trains (`common/model/parts.py`)
    reached = parts_reached({"radiograph", "CT"} if kind == "mixed" else {kind})
    for name, p in model.named_parameters():
        if part_of(name) not in ("shared", *reached):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = autocast(device, "auto")
    no_dp = _time_steps(model, torch.optim.AdamW(params, lr=1e-4), batch, steps, amp)
    dp_times: dict[str, float | None] = {}
    for mode in MODES:
        gsm = GradSampleModule(model, force_functorch=(mode == "functorch"))
        optimizer = SiteNoiseDPOptimizer(
            torch.optim.AdamW(params, lr=1e-4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch_size,
            randomness=MechanismRandomness(),
        )
        dp_times[mode] = statistics.median(_time_steps(gsm, optimizer, batch, steps, amp))
        gsm._close()
    best_mode = min(dp_times, key=lambda m: dp_times[m] or float("inf"))
    gsm = GradSampleModule(model, force_functorch=(best_mode == "functorch"))
    torch_noise = DPOptimizer(  # Opacus' own noise: a torch generator anyone seeded could replay
        torch.optim.AdamW(params, lr=1e-4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch_size,
    )
    torch_noise_s = statistics.median(_time_steps(gsm, torch_noise, batch, steps, amp))
    gsm._close()
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    no_dp_median = statistics.median(no_dp)
    return {
        "preset": preset_name,
        "batch": kind,
        "lm": model.config.lm_path or model.config.lm_package or "from config",
        "params_total": total,
        "params_trainable": trainable,
        "bytes_per_update": trainable * 4,
        "bytes_full_model": total * 4,
        "update_reduction": total / trainable,
        "batch_size": batch_size,
        "tokens_per_example": batch[3].shape[1] + model.config.num_prefix_tokens,
        "step_s": {"no_dp": no_dp_median, "dp": dp_times[best_mode]},
        "dp_mode": best_mode,
        "dp_step_s_by_mode": dp_times,
        "dp_over_no_dp": (dp_times[best_mode] or float("nan")) / no_dp_median,
        "dp_torch_noise_step_s": torch_noise_s,
        "torch_noise_dp_over_no_dp": torch_noise_s / no_dp_median,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        ),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "lm_sha256": model.config.lm_sha256 or None,
        "steps_timed": steps,
    }


def _child(
    queue: Any,
    preset_name: str,
    steps: int,
    batch_size: int,
    threads: int,
    lm: str | None,
    kind: str,
) -> None:
    from fedrad.common.model.base_lm import BaseLMError

    try:
        queue.put(
            bench_preset(
                preset_name,
                steps=steps,
                batch_size=batch_size,
                threads=threads,
                lm=lm,
                kind=kind,
            )
        )
    except (BaseLMError, ValueError) as exc:
        queue.put({"preset": preset_name, "error": str(exc)})


class BenchError(RuntimeError):
    """A preset could not be measured; the message says why in one line."""


def run_bench(
    presets: list[str],
    *,
    steps: int = 10,
    batch_size: int = 16,
    threads: int = 0,
    lm: str | None = None,
    kind: str = "radiograph",
) -> dict[str, Any]:
    if kind not in BATCH_KINDS:
        raise BenchError(f"unknown batch kind {kind!r} (choose from {', '.join(BATCH_KINDS)})")
    ctx = mp.get_context("spawn")
    results = []
    for name in presets:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, name, steps, batch_size, threads, lm, kind))
        proc.start()
        try:
            result = queue.get(timeout=3600)
        except Exception as exc:  # queue.Empty: the child died or hung
            proc.kill()
            raise BenchError(f"benchmark of preset {name} failed (exit {proc.exitcode})") from exc
        proc.join()
        if "error" in result:
            raise BenchError(f"preset {name}: {result['error']}")
        results.append(result)
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "results": results,
    }
