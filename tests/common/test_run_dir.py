"""The run directory helpers: metrics survive as JSON lines, plots tolerate unbounded epsilon."""

from __future__ import annotations

import math
from pathlib import Path

from fedrad.common.run_dir import append_metrics, new_run_dir, plot_run, read_metrics


def test_metrics_round_trip_and_non_finite_values_become_null(tmp_path: Path) -> None:
    run = new_run_dir(tmp_path, "test")
    append_metrics(run, {"round": 1, "macro_auroc": math.nan, "epsilon": {"a": math.inf}})
    assert read_metrics(run) == [{"round": 1, "macro_auroc": None, "epsilon": {"a": None}}]
    assert new_run_dir(tmp_path, "test") != run  # never reused


def test_plots_with_unbounded_epsilon_and_missing_metrics(tmp_path: Path) -> None:
    run = new_run_dir(tmp_path, "test")
    append_metrics(run, {"round": 1, "macro_auroc": 0.5, "epsilon": {"a": None, "b": 1.0}})
    append_metrics(run, {"round": 2, "macro_auroc": None, "epsilon": {"a": None, "b": 2.0}})
    paths = plot_run(run)
    assert [p.name for p in paths] == ["metrics.png", "epsilon.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
