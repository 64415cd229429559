"""Centralized baseline: every site's training studies pooled in one place (what federation is
compared against), written in the same run directory format as a federated run.

Training runs in "rounds" of `steps_per_round` steps with an evaluation after each, so its
metrics.jsonl reads like a federation's. With DP the noise is calibrated once for the whole
schedule and the epsilon reported per round is the composition of every step so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedrad.client.ingest.dataset import TrainingExamples
from fedrad.client.training.evaluate import EvalConfig, evaluate
from fedrad.client.training.train import DPConfig, TrainConfig, train_local
from fedrad.common.model.checkpoint import save_checkpoint
from fedrad.common.model.config import model_config_for
from fedrad.common.model.foundation import FoundationRecipe, build_foundation
from fedrad.common.privacy.accounting import (
    MechanismStep,
    calibrate_noise,
    cumulative_epsilon,
    poisson_sample_rate,
)
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.run_dir import append_metrics, new_run_dir, plot_run, write_config, write_summary
from fedrad.simulations.cohort_data import load_cohort, pooled

logger = logging.getLogger(__name__)

POOLED = "pooled"


@dataclass(frozen=True)
class CentralizedConfig:
    preset: str = "tiny"
    lm: str | None = None  # a local HF causal-LM directory or GGUF file instead of the preset's
    rounds: int = 5
    steps_per_round: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    dp: bool = False
    epsilon: float = DEFAULT_EPSILON
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_reports: int = 64
    eval_questions: int = 128
    foundation: FoundationRecipe = field(default_factory=FoundationRecipe)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps_per_round < 1:
            raise ValueError("rounds and steps_per_round must be >= 1")
        if self.dp and self.epsilon <= 0:
            raise ValueError("epsilon must be positive")
        if self.dp and not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")


def run_centralized(
    cohort: Path,
    runs_root: Path,
    config: CentralizedConfig,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    model_config = model_config_for(config.preset, config.lm)
    splits, dropped = load_cohort(
        cohort, image_size=model_config.image_size, volume_shape=model_config.volume_shape
    )
    train = pooled([s.train for s in splits])
    held = pooled([s.held_out for s in splits])
    model, foundation_dir = build_foundation(
        model_config, recipe=config.foundation, seed=config.seed
    )
    model_config = model.config  # as built: frozen encoder, the base LM's verified hash
    run_dir = new_run_dir(runs_root, "centralized")
    total_steps = config.rounds * config.steps_per_round
    sample_rate = poisson_sample_rate(config.batch_size, len(train))
    noise = (
        calibrate_noise(
            target_epsilon=config.epsilon,
            delta=config.delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant="rdp",
        )
        if config.dp
        else 0.0
    )
    write_config(
        run_dir,
        {
            "kind": "centralized",
            "cohort": str(cohort.resolve()),
            "sites": [s.site_id for s in splits],
            "sites_left_out": dropped,
            "foundation": str(foundation_dir),
            "noise_multiplier": noise,
            **asdict(config),
            "model": asdict(model_config),
        },
    )
    examples = TrainingExamples(train, model.tokenizer, model_config, seed=config.seed)
    history: list[MechanismStep] = []
    eval_config = EvalConfig(max_reports=config.eval_reports, max_questions=config.eval_questions)
    started = time.perf_counter()
    record: dict[str, Any] = {}
    for round_no in range(1, config.rounds + 1):
        dp = DPConfig(
            enabled=config.dp,
            noise_multiplier=noise if config.dp else None,
            target_epsilon=None,
            delta=config.delta,
            max_grad_norm=config.max_grad_norm,
        )
        result = train_local(
            model,
            examples,
            TrainConfig(
                steps=config.steps_per_round,
                batch_size=config.batch_size,
                lr=config.lr,
                seed=config.seed * 1000 + round_no,
            ),
            dp,
        )
        epsilon: dict[str, float] = {}
        if config.dp:
            history.append(MechanismStep(noise, result.sample_rate, result.steps))
            epsilon[POOLED] = cumulative_epsilon(history, delta=config.delta)
        metrics = evaluate(model, held, eval_config)
        finite = [v for v in result.losses if v == v]
        record = {
            "round": round_no,
            "steps": round_no * config.steps_per_round,
            "train_loss": sum(finite[-20:]) / max(1, len(finite[-20:])),
            "epsilon": epsilon,
            "wall_s": time.perf_counter() - started,
            **metrics,
        }
        append_metrics(run_dir, record)
        save_checkpoint(
            model,
            run_dir / "checkpoints" / f"round_{round_no:03d}",
            metadata={"kind": "centralized", "round": round_no, "epsilon": epsilon},
        )
        if on_round is not None:
            on_round(record)
    plot_run(run_dir)
    write_summary(
        run_dir,
        {
            "kind": "centralized",
            "rounds": config.rounds,
            "final": record,
            "train_studies": len(train),
            "held_out_studies": len(held),
            "wall_s": time.perf_counter() - started,
            "checkpoint": str(run_dir / "checkpoints" / f"round_{config.rounds:03d}"),
        },
    )
    return run_dir
