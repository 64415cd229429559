"""The run directory contract shared by simulations, baselines and the coordinator:
config.toml, metrics.jsonl (one object per round), checkpoints/, plots/*.png, summary.json."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import tomli_w


class ResumeError(Exception):
    """The run directory cannot be resumed as it is; the message says why."""


def new_run_dir(root: Path, kind: str) -> Path:
    """runs/<kind>-<UTC timestamp>[-n]: never reuses an existing directory."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        candidate = root / (f"{kind}-{stamp}" + (f"-{n}" if n else ""))
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        (candidate / "checkpoints").mkdir()
        (candidate / "plots").mkdir()
        return candidate
    raise RuntimeError(f"cannot create a run directory under {root}")


def _toml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_safe(v) for v in value if v is not None]
    if isinstance(value, Path):
        return str(value)
    return value


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Everything needed to rerun (None values are omitted: TOML has no null)."""
    (run_dir / "config.toml").write_text(tomli_w.dumps(_toml_safe(config)))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One line per round, flushed and synced: a killed run keeps every finished round."""
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(_json_safe(record), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


FAILED_ROUNDS = "failed_rounds.jsonl"


def append_failed_round(run_dir: Path, round_no: int, failures: list[str]) -> None:
    """A round that could not be committed, with each site's one-line reason (a refusal is on
    the coordinator's record as well as in the site's ledger)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with (Path(run_dir) / FAILED_ROUNDS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"round": round_no, "failures": failures}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_failed_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / FAILED_ROUNDS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1, sort_keys=True))


PLOTTED = (
    "macro_auroc",
    "ce_f1",
    "report_head_agreement",
    "bleu4",
    "rouge_l",
    "qa_accuracy",
    "qa_presence_accuracy",
)

MAX_PLOTTED_SITES = 10
"""Beyond this many sites one line each is unreadable: the epsilon plot shows their spread."""


def site_order(site_id: str) -> tuple[str, int, str]:
    """site_2 before site_10: the trailing number compares as a number."""
    match = re.fullmatch(r"(.*?)(\d+)", site_id)
    if match is None:
        return (site_id, -1, site_id)
    return (match.group(1), int(match.group(2)), site_id)


def epsilon_spread(per_site: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Max, median and min over the sites per round (sites without a bound value are left out)."""
    rounds = len(next(iter(per_site.values())))
    columns = [
        [float(v[i]) for v in per_site.values() if isinstance(v[i], int | float)]
        for i in range(rounds)
    ]
    n = len(per_site)
    return {
        f"max over {n} sites": [max(c) if c else None for c in columns],
        "median": [statistics.median(c) if c else None for c in columns],
        "min": [min(c) if c else None for c in columns],
    }


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def _line_plot(
    path: Path,
    rounds: list[int],
    series: dict[str, list[Any]],
    *,
    ylabel: str,
    unit_range: bool,
) -> Path:
    """One PNG, one line per series; missing or unbounded (None) values are gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(rounds, [_nan(v) for v in values], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if unit_range:
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """Metrics and cumulative epsilon per round as PNGs."""
    records = read_metrics(run_dir)
    if not records:
        return []
    rounds = [r["round"] for r in records]
    metrics = {
        key: [r.get(key) for r in records]
        for key in PLOTTED
        if any(r.get(key) is not None for r in records)
    }
    out = [
        _line_plot(
            run_dir / "plots" / "metrics.png",
            rounds,
            metrics,
            ylabel="held-out metric",
            unit_range=True,
        )
    ]
    sites = sorted({s for r in records for s in (r.get("epsilon") or {})}, key=site_order)
    if sites:
        epsilon = {site: [(r.get("epsilon") or {}).get(site) for r in records] for site in sites}
        if len(sites) > MAX_PLOTTED_SITES:
            epsilon = epsilon_spread(epsilon)
        out.append(
            _line_plot(
                run_dir / "plots" / "epsilon.png",
                rounds,
                epsilon,
                ylabel="cumulative epsilon",
                unit_range=False,
            )
        )
    return out
