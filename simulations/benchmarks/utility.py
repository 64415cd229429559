"""What privacy and federation cost in model quality: one cohort, one seed, one budget of
optimizer steps, six ways of training.

- centralized, no DP: every site's training studies pooled in one place (the upper bound);
- federated, no DP; federated with DP-SGD at every site at epsilon 1, 3 and 8;
- local only at epsilon 8: each site alone (what a hospital gets without the federation).

The federated and local runs take `rounds x local_steps` steps per site; the centralized run
takes the same total (`rounds x local_steps x sites`) on the pooled data. Every arm is a normal
run directory under `out/`, so each number can be traced to its metrics.jsonl and config.toml.

The federated and local arms ask their sites for no evaluation figures (`eval-metrics none`):
a deployed site releases figures only as noised counts charged to its budget, which would
take budget from training and noise from the comparison. The researcher owns this cohort, so
each arm's final model is evaluated here, exactly, on every site's held-out split (the
centralized arm's own evaluation is exact already).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedrad.client.training.evaluate import EvalConfig, evaluate
from fedrad.common.model.checkpoint import load_checkpoint, read_model_config
from fedrad.common.model.radiology_model import RadiologyModel
from fedrad.common.privacy.defaults import DEFAULT_DELTA
from fedrad.common.protocol.messages import DEFAULT_LR, NO_EVAL_FAMILIES
from fedrad.common.run_dir import read_metrics
from fedrad.server.rounds import checkpoint_dir
from fedrad.simulations.centralized import CentralizedConfig, run_centralized
from fedrad.simulations.cohort_data import load_cohort, site_dirs
from fedrad.simulations.cohort_data import pooled as pooled_studies
from fedrad.simulations.federated import FederatedConfig, run_federated, run_local_only

logger = logging.getLogger(__name__)

METRICS: Final[tuple[str, ...]] = (
    "macro_auroc",
    "ce_f1",
    "report_head_agreement",
    "bleu4",
    "rouge_l",
    "qa_accuracy",
    "qa_presence_accuracy",
    "qa_side_accuracy",
    "qa_size_accuracy",
    "repeated_4gram",
    "placeholders",
)
EXACT_ONLY: Final[tuple[str, ...]] = (
    "first_candidate_agreement",
    "first_candidate_ce_f1",
    "reports_generated",
    "reports_repaired",
    "reports_template",
)
"""Figures only an exact evaluation has (a site never releases them): how often the model's
own best candidate already agreed, and where the final reports came from."""
ARMS: Final[tuple[str, ...]] = (
    "centralized-nodp",
    "federated-nodp",
    "federated-dp-eps1",
    "federated-dp-eps3",
    "federated-dp-eps8",
    "local-dp-eps8",
)


@dataclass(frozen=True)
class UtilityBenchConfig:
    rounds: int = 4  # federated rounds (centralized: as many evaluation points)
    local_steps: int = 80  # DP-SGD steps per site per round
    batch_size: int = 16  # expected batch size everywhere
    lr: float = DEFAULT_LR  # every arm's learning rate: only privacy and federation differ
    seed: int = 0
    delta: float = DEFAULT_DELTA
    eval_reports: int = 48  # generated reports per site (or pooled) per evaluation
    eval_questions: int = 96
    arms: tuple[str, ...] = ARMS  # which of ARMS to run
    preset: str = "tiny"  # model preset of every arm
    lm: str | None = None  # a local base LM instead of the preset's (see `--lm`)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        if self.rounds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_steps and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")


def _row(
    arm: str, run_dir: Path, wall_s: float, exact: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One arm's line; `exact` (site -> its held-out metrics) replaces what the run recorded."""
    records = read_metrics(run_dir)
    last = records[-1] if records else {}
    eps = [v for v in (last.get("epsilon") or {}).values() if v is not None]
    per_site = exact if exact is not None else (last.get("per_site") or {})
    final = pooled(exact) if exact is not None else {m: last.get(m) for m in METRICS}
    if exact is None:  # the centralized arm evaluates exactly itself, every round
        final |= {m: last.get(m) for m in EXACT_ONLY}
    return {
        "arm": arm,
        "run_dir": str(run_dir),
        "rounds": len(records),
        **final,
        "max_site_epsilon": max(eps) if eps else None,
        "wall_s": round(wall_s, 1),
        "first_round": (
            None
            if exact is not None
            else {m: (records[0].get(m) if records else None) for m in METRICS}
        ),
        "per_site": {
            site: {m: metrics.get(m) for m in ("n_studies", *METRICS, *EXACT_ONLY)}
            for site, metrics in per_site.items()
        },
    }


def pooled(per_site: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each metric's mean over sites where it is defined, weighted by held-out studies."""
    out: dict[str, float | None] = {}
    for metric in (*METRICS, *EXACT_ONLY):
        pairs = [
            (float(m[metric]), float(m["n_studies"]))
            for m in per_site.values()
            if m.get(metric) is not None and np.isfinite(m[metric])
        ]
        weight = sum(w for _, w in pairs)
        out[metric] = sum(v * w for v, w in pairs) / weight if weight else None
    return out


def pooled_interval(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The interval figures (`interval_evaluation`) over every site: each accuracy weighted by
    the decisions behind it (a finding's studies with a prior and a known change)."""
    rows = [m["interval"] for m in per_site.values() if (m.get("interval") or {}).get("pairs")]
    if not rows:
        return {"pairs": 0}
    out: dict[str, Any] = {"pairs": sum(r["pairs"] for r in rows)}
    total = sum(r["decisions"] for r in rows)
    out["decisions"] = total
    for arm in ("model", "rule"):
        out[arm] = sum(r[arm] * r["decisions"] for r in rows) / total
    for table in ("by_finding", "by_change"):
        merged: dict[str, dict[str, float]] = {}
        for r in rows:
            for key, cell in r[table].items():
                acc = merged.setdefault(key, {"n": 0, "model": 0.0, "rule": 0.0})
                acc["n"] += cell["n"]
                acc["model"] += cell["model"] * cell["n"]
                acc["rule"] += cell["rule"] * cell["n"]
        out[table] = {
            k: {"n": v["n"], "model": v["model"] / v["n"], "rule": v["rule"] / v["n"]}
            for k, v in merged.items()
        }
    changed = [v for k, v in out["by_change"].items() if k != "absent"]
    n = sum(v["n"] for v in changed)
    out["decisions_present"] = n
    for arm in ("model", "rule"):
        out[f"{arm}_present"] = sum(v[arm] * v["n"] for v in changed) / n if n else None
    return out


def evaluate_on_cohort(
    cohort: Path,
    model_for: Callable[[str], RadiologyModel],
    eval_config: EvalConfig,
    *,
    image_size: int,
) -> dict[str, dict[str, Any]]:
    """Each site's held-out split through `model_for(site_id)`, exactly (the researcher owns
    the cohort): the site's aggregate figures, per-finding AUROC left out."""
    splits, _ = load_cohort(cohort, image_size=image_size)
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        raw = evaluate(model_for(split.site_id), split.held_out, eval_config)
        results[split.site_id] = {k: v for k, v in raw.items() if k != "auroc"}
    return results


def evaluate_by_modality(
    cohort: Path,
    model: RadiologyModel,
    eval_config: EvalConfig,
    *,
    image_size: int,
) -> dict[str, dict[str, Any]]:
    """One model on the held-out studies of every site pooled per modality, exactly: for
    radiographs and for CT, the aggregate figures and the per-finding AUROC."""
    splits, _ = load_cohort(cohort, image_size=image_size, volume_shape=model.config.volume_shape)
    held = pooled_studies([split.held_out for split in splits])
    results: dict[str, dict[str, Any]] = {}
    for modality, rows in sorted(held.by_modality().items()):
        results[modality] = evaluate(model, held.subset(rows), eval_config)
    return results


def exact_evaluation(
    cohort: Path, run_dir: Path, config: UtilityBenchConfig, *, per_site_models: bool
) -> dict[str, dict[str, Any]]:
    """The arm's final model(s) on every site's held-out split, exactly: the checkpoint of the
    last round (one per site for the local arm)."""
    last = f"round_{config.rounds:03d}"
    shared = None if per_site_models else load_checkpoint(run_dir / "checkpoints" / last)
    eval_config = EvalConfig(max_reports=config.eval_reports, max_questions=config.eval_questions)
    image_size = read_model_config(checkpoint_dir(run_dir, 0)).image_size  # the run's start
    return evaluate_on_cohort(
        cohort,
        lambda site: shared or load_checkpoint(run_dir / "checkpoints" / site / last),
        eval_config,
        image_size=image_size,
    )


def smallest_site(rows: list[dict[str, Any]]) -> str | None:
    """The site with the fewest held-out studies (the split is a fixed fraction per site)."""
    sizes: dict[str, float] = {}
    for row in rows:
        for site, metrics in row["per_site"].items():
            if metrics.get("n_studies") is not None:
                sizes[site] = metrics["n_studies"]
    return min(sizes, key=lambda s: (sizes[s], s)) if sizes else None


def run_utility_bench(
    cohort: Path,
    out: Path,
    config: UtilityBenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs every configured arm in turn and writes `out/utility.json`; returns its content."""
    cohort, out = Path(cohort), Path(out)
    sites = len(site_dirs(cohort))
    out.mkdir(parents=True, exist_ok=True)
    federated = FederatedConfig(
        preset=config.preset,
        lm=config.lm,
        rounds=config.rounds,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        delta=config.delta,
        eval_reports=config.eval_reports,
        eval_questions=config.eval_questions,
        eval_metrics=NO_EVAL_FAMILIES,  # evaluated exactly below, from the final checkpoints
    )
    plans: dict[str, Callable[[], Path]] = {
        "centralized-nodp": lambda: run_centralized(
            cohort,
            out,
            CentralizedConfig(
                preset=config.preset,
                lm=config.lm,
                rounds=config.rounds,
                steps_per_round=config.local_steps * sites,
                batch_size=config.batch_size,
                lr=config.lr,
                dp=False,
                delta=config.delta,
                seed=config.seed,
                eval_reports=config.eval_reports * sites,
                eval_questions=config.eval_questions * sites,
            ),
        ),
        "federated-nodp": lambda: run_federated(cohort, out, replace(federated, dp=False)),
        "federated-dp-eps1": lambda: run_federated(cohort, out, replace(federated, epsilon=1.0)),
        "federated-dp-eps3": lambda: run_federated(cohort, out, replace(federated, epsilon=3.0)),
        "federated-dp-eps8": lambda: run_federated(cohort, out, replace(federated, epsilon=8.0)),
        "local-dp-eps8": lambda: run_local_only(cohort, out, replace(federated, epsilon=8.0)),
    }
    rows = []
    for index, arm in enumerate(config.arms, start=1):
        if progress is not None:
            progress(f"[{index}/{len(config.arms)}] {arm}")
        started = time.perf_counter()
        run_dir = plans[arm]()
        exact = (
            None
            if arm.startswith("centralized")
            else exact_evaluation(cohort, run_dir, config, per_site_models=arm.startswith("local"))
        )
        rows.append(_row(arm, run_dir, time.perf_counter() - started, exact))
        logger.info("utility bench: %s done in %.0f s", arm, rows[-1]["wall_s"])
    result = {
        "cohort": str(cohort),
        "sites": sites,
        "smallest_site": smallest_site(rows),
        "config": asdict(config),
        "rows": rows,
    }
    (out / "utility.json").write_text(json.dumps(result, indent=1))
    return result


TABLE: Final[tuple[tuple[str, str], ...]] = (
    ("macro_auroc", "macro AUROC"),
    ("ce_f1", "CE F1"),
    ("report_head_agreement", "report-head agr."),
    ("first_candidate_agreement", "agr. before grounding"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("qa_accuracy", "QA acc."),
    ("qa_presence_accuracy", "QA presence"),
    ("qa_side_accuracy", "QA side"),
    ("qa_size_accuracy", "QA size"),
    ("repeated_4gram", "repeated 4-grams"),
    ("placeholders", "placeholders"),
)


def markdown_table(result: dict[str, Any]) -> str:
    """The results page's table: one line per arm, the last round's held-out metrics."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    small = result.get("smallest_site")
    head = (
        "| arm | "
        + " | ".join(title for _, title in TABLE)
        + f" | max site eps | AUROC on {small or 'smallest site'} | wall |"
    )
    lines = [head, "|---" * (len(TABLE) + 4) + "|"]
    for row in result["rows"]:
        eps = row["max_site_epsilon"]
        own = row.get("per_site", {}).get(small, {}).get("macro_auroc") if small else None
        lines.append(
            f"| {row['arm']} | "
            + " | ".join(cell(row.get(m)) for m, _ in TABLE)
            + f" | {'-' if eps is None else f'{eps:.2f}'} | {cell(own)}"
            + f" | {row['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)
