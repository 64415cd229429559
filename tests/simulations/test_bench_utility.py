"""The utility bench's bookkeeping: arms are checked up front, rows come from run directories."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import ANY

import pytest
from typer.testing import CliRunner

from fedrad.common.protocol.messages import NO_EVAL_FAMILIES
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.simulations.benchmarks.utility import (
    ARMS,
    UtilityBenchConfig,
    _row,
    exact_evaluation,
    markdown_table,
    smallest_site,
)
from fedrad.simulations.cli import app as sim_app
from fedrad.simulations.federated import FederatedConfig, run_local_only
from tests.fl_fixtures import micro_foundation


def test_unknown_arms_and_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown arm"):
        UtilityBenchConfig(arms=("federated-dp-eps2",))
    with pytest.raises(ValueError, match=">= 1"):
        UtilityBenchConfig(local_steps=0)
    assert UtilityBenchConfig().arms == ARMS


def test_rows_read_the_last_round_and_the_table_shows_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"round": 1, "macro_auroc": 0.5, "ce_f1": 0.1, "epsilon": {"a": 2.0, "b": 2.5}},
        {"round": 2, "macro_auroc": 0.7, "ce_f1": 0.3, "bleu4": 0.2, "epsilon": {"a": 3.0}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = _row("federated-dp-eps3", run, 125.0)
    assert row["macro_auroc"] == 0.7 and row["first_round"]["macro_auroc"] == 0.5
    assert row["max_site_epsilon"] == 3.0 and row["rouge_l"] is None and row["rounds"] == 2
    table = markdown_table({"rows": [row]})
    assert (
        "| federated-dp-eps3 | 0.700 | 0.300 | - | - | 0.200 | - | - | - | - | - | - | - "
        "| 3.00 | - | 2.1 min |"
    ) in table


def test_evaluate_refuses_what_is_not_a_current_checkpoint(tmp_path: Path) -> None:
    args = ["evaluate", "--data", str(tmp_path), "--model", str(tmp_path / "none")]
    result = CliRunner().invoke(sim_app, args)
    assert result.exit_code == 2 and "not a checkpoint directory" in result.stderr


def test_the_smallest_site_is_compared_on_its_own_held_out_split(tmp_path: Path) -> None:
    rows = []
    for arm, aurocs in (("federated-dp-eps8", (0.9, 0.8)), ("local-dp-eps8", (0.85, 0.6))):
        run = tmp_path / arm
        run.mkdir()
        per_site = {
            "big": {"n_studies": 40, "macro_auroc": aurocs[0]},
            "small": {"n_studies": 9, "macro_auroc": aurocs[1]},
        }
        record = {"round": 1, "macro_auroc": 0.8, "per_site": per_site}
        (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        rows.append(_row(arm, run, 60.0))
    assert smallest_site(rows) == "small"
    table = markdown_table({"rows": rows, "smallest_site": "small"})
    assert "AUROC on small" in table
    assert "| 8.00 | 0.800 |" not in table  # no epsilon here: the column reads "-"
    assert "| - | 0.800 | 1.0 min |" in table and "| - | 0.600 | 1.0 min |" in table


@pytest.mark.slow
def test_arms_are_scored_by_an_exact_evaluation_of_their_final_models(tmp_path: Path) -> None:
    """The bench's local arm asks its sites for no figures and scores each site's own final
    model on that site's held-out split itself; the row pools them by held-out size."""
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=2, studies_per_site=12, seed=2, workers=1, image_size=64)
    federated = FederatedConfig(
        rounds=1,
        local_steps=2,
        batch_size=4,
        epsilon=5.0,
        eval_reports=1,
        eval_questions=2,
        eval_metrics=NO_EVAL_FAMILIES,
        initial_checkpoint=str(micro_foundation(tmp_path)),
    )
    run_dir = run_local_only(cohort, tmp_path / "runs", federated)
    bench = UtilityBenchConfig(rounds=1, eval_reports=1, eval_questions=2)
    exact = exact_evaluation(cohort, run_dir, bench, per_site_models=True)
    assert sorted(exact) == ["site_1", "site_2"]
    row = _row("local-dp-eps8", run_dir, 1.0, exact)
    sizes = [exact[s]["n_studies"] for s in sorted(exact)]
    aurocs = [exact[s]["macro_auroc"] for s in sorted(exact)]
    if all(a is not None for a in aurocs):
        expected = sum(a * n for a, n in zip(aurocs, sizes, strict=True)) / sum(sizes)
        assert row["macro_auroc"] == pytest.approx(expected)
    for site in exact:  # the ledger holds the training rounds only: nothing was released
        lines = (run_dir / "sites" / site / "ledger.jsonl").read_text().splitlines()
        assert len(lines) == 1

    # `fedrad-sim evaluate`: one checkpoint on every site's held-out split, the same figures
    model = run_dir / "checkpoints" / "site_1" / "round_001"
    args = ["evaluate", "--data", str(cohort), "--model", str(model), "--eval-reports", "1"]
    result = CliRunner().invoke(sim_app, [*args, "--eval-questions", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(data["per_site"]) == ["site_1", "site_2"]
    assert data["per_site"]["site_1"] == exact["site_1"] | {"eval_seconds": ANY}
    assert data["pooled"]["report_head_agreement"] == pytest.approx(1.0)  # grounded reports
    human = CliRunner().invoke(sim_app, [*args, "--eval-questions", "2"])
    assert human.exit_code == 0 and "report-head agreement 1.000" in human.stdout
