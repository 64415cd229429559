"""What SecAgg+ costs: the same federated run with plain FedAvg and with SecAgg+, alternated
`repeats` times on one cohort (the machine's other load drifts; alternating spreads it evenly).

Per arm: seconds per round (round 1 holds the workers' cold start, so the figure compared is
the mean of the later rounds), the simulation's own wall time, the bytes one site sends per
round (plain: its float32 trainable arrays; SecAgg+: public keys, encrypted key shares, its
masked int64 vectors and unmasking shares), and the final held-out macro AUROC. Sites train
identically in both arms, so the AUROC difference is what SecAgg+'s quantization changes.
Every arm is a normal run directory under `out/`.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedrad.common.run_dir import read_metrics
from fedrad.simulations.federated import FederatedConfig, run_federated

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggBenchConfig:
    rounds: int = 3  # per run; round 1 is the cold start, the later ones are compared
    local_steps: int = 20  # DP-SGD steps per site per round
    repeats: int = 2  # plain / SecAgg+ pairs, alternated
    eval_reports: int = 8  # reports generated per site per evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 2 or self.local_steps < 1 or self.repeats < 1 or self.eval_reports < 1:
            raise ValueError("rounds must be >= 2; local_steps, repeats, eval_reports >= 1")

    def federated(self, *, secagg: bool) -> FederatedConfig:
        return FederatedConfig(
            rounds=self.rounds,
            local_steps=self.local_steps,
            eval_reports=self.eval_reports,
            eval_questions=2 * self.eval_reports,
            seed=self.seed,
            secagg=secagg,
        )


def arm_row(run_dir: Path) -> dict[str, Any]:
    """One run's figures, read back from its run directory."""
    records = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [float(r["round_s"]) for r in records]
    return {
        "run_dir": str(run_dir),
        "round_s": rounds,
        "warm_round_s": statistics.mean(rounds[1:]),
        "simulation_s": float(summary["simulation_s"]),
        "update_bytes": int(records[-1]["update_bytes"]),
        "macro_auroc": records[-1].get("macro_auroc"),
        "secagg": records[-1].get("secagg"),
    }


def compare(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """SecAgg+ against plain: per-round seconds, simulation seconds, bytes, AUROC."""
    plain, secure = rows["plain"], rows["secagg"]

    def mean(arm: list[dict[str, Any]], key: str) -> float:
        return statistics.mean(float(row[key]) for row in arm)

    return {
        "warm_round_s": {
            "plain": mean(plain, "warm_round_s"),
            "secagg": mean(secure, "warm_round_s"),
        },
        "warm_round_overhead_s": mean(secure, "warm_round_s") - mean(plain, "warm_round_s"),
        "simulation_overhead_s": mean(secure, "simulation_s") - mean(plain, "simulation_s"),
        "update_bytes": {"plain": plain[0]["update_bytes"], "secagg": secure[0]["update_bytes"]},
        "bytes_ratio": secure[0]["update_bytes"] / plain[0]["update_bytes"],
        "max_auroc_difference": max(
            abs(float(s["macro_auroc"]) - float(p["macro_auroc"]))
            for p, s in zip(plain, secure, strict=True)
        ),
        "error_bound": secure[0]["secagg"]["error_bound"],
    }


def run_secagg_bench(
    cohort: Path,
    out: Path,
    config: SecAggBenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs the pairs, writes `out/secagg.json`, returns it."""
    out = Path(out)
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "secagg": []}
    for repeat in range(config.repeats):
        for arm in ("plain", "secagg"):
            run_dir = run_federated(cohort, out / arm, config.federated(secagg=arm == "secagg"))
            rows[arm].append(arm_row(run_dir))
            if progress is not None:
                row = rows[arm][-1]
                progress(
                    f"{arm} {repeat + 1}/{config.repeats}: {row['warm_round_s']:.2f} s per "
                    f"round, {row['update_bytes']:,} bytes per site"
                )
    result = {
        "config": asdict(config),
        "cohort": str(Path(cohort).resolve()),
        "arms": rows,
        "comparison": compare(rows),
    }
    (out / "secagg.json").write_text(json.dumps(result, indent=1))
    return result
