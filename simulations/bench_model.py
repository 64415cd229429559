"""`fedrad-sim bench model`: step time and peak memory, DP vs non-DP, per preset, on this machine.

Each preset runs in a fresh process so its peak RSS is its own. Steps use a fixed synthetic
batch of realistic shape (the cost of a step does not depend on pixel values), the same loss as
training, and Opacus' DPOptimizer with per-sample clipping and noise; the DP/non-DP ratio is the
figure the design asks to drive down. Nothing is asserted: this measures.
"""

from __future__ import annotations

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


def _batch(config: Any, vocab: int, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    length = 24 + 72  # a typical prompt + report length in tokens
    images = torch.randn(batch_size, 1, config.image_size, config.image_size, generator=gen)
    ids = torch.randint(2, vocab, (batch_size, length), generator=gen)
    attention = torch.ones(batch_size, length, dtype=torch.long)
    target = torch.zeros(batch_size, length, dtype=torch.bool)
    target[:, 24:] = True
    ctx = torch.full((batch_size,), 10, dtype=torch.long)
    findings = torch.randint(0, 2, (batch_size, 6), generator=gen).float()
    return images, ids, attention, target, ctx, findings, torch.ones(batch_size, 6)


def _time_steps(
    module: Any, optimizer: Any, batch: tuple[torch.Tensor, ...], steps: int
) -> list[float]:
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        lm_loss, finding_loss, _ = module(*batch)
        (lm_loss + finding_loss).mean().backward()
        optimizer.step()
        if i >= 2:  # two warm-up steps (allocator, hooks)
            times.append(time.perf_counter() - start)
    return times


def bench_preset(preset_name: str, *, steps: int, batch_size: int, threads: int) -> dict[str, Any]:
    """Runs in its own process: builds the preset and times non-DP and DP steps."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedrad.common.checkpoint import build_model
    from fedrad.common.model_config import preset
    from fedrad.common.tokenizer import train_tokenizer
    from fedrad.simulations.foundation import public_reports

    if threads:
        torch.set_num_threads(threads)
    # as federations run it: the public foundation's encoder is frozen (it never trains)
    config = preset(preset_name, freeze_encoder=True)
    corpus = [report for _, report in public_reports(400, 0)]
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    batch = _batch(config, len(tokenizer), batch_size, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    no_dp = _time_steps(model, torch.optim.AdamW(params, lr=1e-4), batch, steps)
    dp_times: dict[str, float | None] = {}
    for mode in MODES:
        gsm = GradSampleModule(model, force_functorch=(mode == "functorch"))
        optimizer = DPOptimizer(
            torch.optim.AdamW(params, lr=1e-4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch_size,
        )
        dp_times[mode] = statistics.median(_time_steps(gsm, optimizer, batch, steps))
        gsm._close()
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    best_mode = min(dp_times, key=lambda m: dp_times[m] or float("inf"))
    no_dp_median = statistics.median(no_dp)
    return {
        "preset": preset_name,
        "params_total": total,
        "params_trainable": trainable,
        "bytes_per_update": trainable * 4,
        "bytes_full_model": total * 4,
        "update_reduction": total / trainable,
        "batch_size": batch_size,
        "tokens_per_example": batch[1].shape[1] + config.num_prefix_tokens,
        "step_s": {"no_dp": no_dp_median, "dp": dp_times[best_mode]},
        "dp_mode": best_mode,
        "dp_step_s_by_mode": dp_times,
        "dp_over_no_dp": (dp_times[best_mode] or float("nan")) / no_dp_median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "lm_sha256": None,
        "steps_timed": steps,
    }


def _child(queue: Any, preset_name: str, steps: int, batch_size: int, threads: int) -> None:
    queue.put(bench_preset(preset_name, steps=steps, batch_size=batch_size, threads=threads))


def run_bench(
    presets: list[str], *, steps: int = 10, batch_size: int = 16, threads: int = 0
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = []
    for name in presets:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, name, steps, batch_size, threads))
        proc.start()
        try:
            result = queue.get(timeout=3600)
        except Exception as exc:  # queue.Empty: the child died or hung
            proc.kill()
            raise RuntimeError(f"benchmark of preset {name} failed (exit {proc.exitcode})") from exc
        proc.join()
        results.append(result)
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "results": results,
    }
