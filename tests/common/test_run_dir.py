"""The run directory helpers: metrics survive as JSON lines, plots tolerate unbounded epsilon."""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

from fedrad.common.run_dir import (
    append_metrics,
    epsilon_spread,
    new_run_dir,
    plot_run,
    read_metrics,
    site_order,
)


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


def test_site_order_is_numeric() -> None:
    sites = ["site_10", "site_2", "site_1", "hospital", "site_100"]
    assert sorted(sites, key=site_order) == ["hospital", "site_1", "site_2", "site_10", "site_100"]


def test_many_sites_plot_their_spread_without_layout_warnings(tmp_path: Path) -> None:
    run = new_run_dir(tmp_path, "test")
    for rnd in (1, 2):
        eps: dict[str, float | None] = {f"site_{i}": rnd * (1 + i / 100) for i in range(1, 101)}
        eps["site_50"] = None  # unbounded sites drop out of the spread, not the plot
        append_metrics(run, {"round": rnd, "macro_auroc": 0.5 + rnd / 10, "epsilon": eps})
    spread = epsilon_spread(
        {s: [r["epsilon"][s] for r in read_metrics(run)] for s in read_metrics(run)[0]["epsilon"]}
    )
    assert spread["max over 100 sites"] == [2.0, 4.0]
    assert spread["min"] == [1.01, 2.02]
    assert spread["median"][0] == statistics.median(1 + i / 100 for i in range(1, 101) if i != 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plot_run(run)
    assert [p.name for p in paths] == ["metrics.png", "epsilon.png"]
