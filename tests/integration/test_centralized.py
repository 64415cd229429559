"""Centralized baseline end to end on a tiny cohort: the run directory contract, a loadable
checkpoint per round that `fedrad-site report` reads, and cumulative epsilon under DP."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app as site_app
from fedrad.common.model.foundation import FoundationRecipe
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.simulations.centralized import CentralizedConfig, run_centralized

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A few steps and public images: the default encoder recipe (4,000 images) costs minutes, and
# each case builds its own foundation in a fresh cache.
SMALL_FOUNDATION = FoundationRecipe(
    corpus_reports=200,
    steps=10,
    batch_size=8,
    public_images=40,
    encoder_steps=3,
    public_volumes=20,
    volume_steps=3,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "c"
    generate_cohort(out, sites=3, studies_per_site=10, seed=3, workers=1, image_size=128)
    return out


@pytest.mark.parametrize("dp", [False, True])
def test_run_directory_contract(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: bool
) -> None:
    monkeypatch.setenv("FEDRAD_CACHE", str(tmp_path / "cache"))
    config = CentralizedConfig(
        rounds=2,
        steps_per_round=2,
        batch_size=4,
        dp=dp,
        epsilon=8.0,
        delta=1e-3,
        eval_reports=2,
        eval_questions=4,
        foundation=SMALL_FOUNDATION,
    )
    run_dir = run_centralized(cohort, tmp_path / "runs", config)
    assert tomllib.loads((run_dir / "config.toml").read_text())["dp"] is dp
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for key in (
        "macro_auroc",
        "ce_f1",
        "report_head_agreement",
        "bleu4",
        "rouge_l",
        "qa_accuracy",
        "qa_presence_accuracy",
        "epsilon",
    ):
        assert key in lines[-1]
    assert lines[-1]["report_head_agreement"] == 1.0  # every report kept to the heads
    if dp:
        eps = [r["epsilon"]["pooled"] for r in lines]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
    else:
        assert lines[-1]["epsilon"] == {}
    assert (run_dir / "plots" / "metrics.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = Path(summary["checkpoint"])
    assert ckpt.is_dir() and (run_dir / "checkpoints" / "round_001").is_dir()
    scan = next(p for p in (cohort / "site_1").rglob("*") if p.is_file() and "dicom" in p.parts)
    result = CliRunner().invoke(site_app, ["report", str(scan), "--model", str(ckpt), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["notes"] == []
