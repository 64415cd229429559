"""Federated simulation settings and the local-only baseline (in-process, no Ray)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedrad.client.federation import site_agent
from fedrad.common.model.checkpoint import load_checkpoint
from fedrad.common.protocol.release_app import run_config_toml
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.server.rounds import ServerPlan
from fedrad.simulations.cohort_data import CohortError
from fedrad.simulations.federated import (
    FederatedConfig,
    config_from_toml,
    run_federated,
    run_local_only,
    server_plan,
)
from tests.fl_fixtures import micro_foundation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"local_steps": 0}, "local_steps must be >= 1"),
        ({"strategy": "fedsgd"}, "strategy must be one of fedavg, fedprox, fedadam"),
        ({"strategy": "fedprox", "proximal_mu": 0.0}, "fedprox needs proximal_mu > 0"),
        ({"epsilon": 0.0}, "epsilon must be positive"),
        ({"delta": 1.0}, "delta must be in (0, 1)"),
        ({"accountant": "gdp"}, "accountant must be rdp or prv"),
        (
            {"secagg": True, "strategy": "fedadam"},
            "SecAgg+ supports fedavg and fedprox, not fedadam",
        ),
        ({"secagg_shares": 3}, "secagg_shares and secagg_threshold need secagg"),
        ({"min_sites": 0}, "min_sites must be >= 1"),
    ],
)
def test_bad_settings_fail_at_once_with_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        FederatedConfig(**settings)
    assert "\n" not in str(info.value)


def test_a_simulation_s_plan_is_read_from_its_run_config_as_a_deployment_s(
    tmp_path: Path,
) -> None:
    run_dir, foundation = tmp_path / "runs" / "r1", tmp_path / "runs" / "r1" / "round_000"
    for config, mu in [
        (FederatedConfig(), 0.0),  # the proximal term goes out with fedprox only
        (FederatedConfig(strategy="fedprox", proximal_mu=0.3, epsilon=3.0, seed=4), 0.3),
        (FederatedConfig(central_noise=1.1, central_clip=0.5, central_delta=1e-6), 0.0),
        (FederatedConfig(secagg=True, secagg_threshold=2, min_sites=2, dp=False), 0.0),
    ]:
        values = config.run_config(run_dir, foundation, num_sites=3)
        run_config_toml(values)  # every key declared: it could be a deployment's --run-config
        plan = server_plan(config, run_dir, foundation, num_sites=3)
        assert plan == ServerPlan.from_run_config(values)
        assert (plan.run_dir, plan.foundation_dir, plan.num_sites) == (run_dir, foundation, 3)
        assert plan.round_config == config.round_config("r1")
        assert plan.proximal_mu == mu and plan.central_noise_multiplier == config.central_noise
        assert (plan.secagg, plan.min_sites) == (config.secagg, config.min_sites)
    assert "central-clip" not in FederatedConfig().run_config(run_dir, foundation, num_sites=3)


def test_no_usable_site_is_a_cohort_error(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="does not exist"):
        run_federated(tmp_path / "missing", tmp_path / "runs", FederatedConfig())
    cohort = tmp_path / "cohort"
    (cohort / "site_empty").mkdir(parents=True)
    config = FederatedConfig(initial_checkpoint=str(micro_foundation(tmp_path)))
    with pytest.raises(CohortError, match="no usable site"):
        run_federated(cohort, tmp_path / "runs", config)
    assert not (tmp_path / "runs").exists()  # nothing half-made is left behind


def test_secagg_on_two_sites_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=2, studies_per_site=6, seed=1, workers=1, image_size=64)
    config = FederatedConfig(secagg=True, initial_checkpoint=str(micro_foundation(tmp_path)))
    with pytest.raises(ValueError, match="SecAgg\\+ needs at least 3 sites"):
        run_federated(cohort, tmp_path / "runs", config)
    assert not (tmp_path / "runs").exists()


def test_secagg_flags_are_checked_by_the_cli() -> None:
    from typer.testing import CliRunner

    from fedrad.simulations.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["run", "--data", "nowhere", "--secagg-shares", "3"])
    assert result.exit_code == 2 and "--secagg-shares and --secagg-threshold need --secagg" in (
        result.output
    )
    result = runner.invoke(app, ["run", "--data", "nowhere", "--secagg", "--strategy", "fedadam"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        .splitlines()[-1]
        .endswith("SecAgg+ supports fedavg and fedprox, not fedadam")
    )


@pytest.fixture
def _one_thread() -> Iterator[None]:
    site_agent.clear_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_local_only_writes_the_run_directory_contract(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=2, studies_per_site=12, seed=2, workers=1, image_size=64)
    config = FederatedConfig(
        rounds=2,
        local_steps=2,
        batch_size=4,
        epsilon=5.0,
        eval_reports=1,
        eval_questions=2,
        initial_checkpoint=str(micro_foundation(tmp_path)),
    )
    seen: list[dict] = []
    run_dir = run_local_only(cohort, tmp_path / "runs", config, on_round=seen.append)
    assert config_from_toml(run_dir / "config.toml") == config
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] == [r["round"] for r in seen]
    sites = sorted(records[-1]["per_site"])
    assert sorted(records[-1]["epsilon"]) == sites
    for site in sites:
        assert 0 < records[0]["epsilon"][site] < records[1]["epsilon"][site] <= 5.0
        lines = (run_dir / "sites" / site / "ledger.jsonl").read_text().splitlines()
        assert len(lines) == 4  # per round: the training and the evaluation release
        load_checkpoint(run_dir / "checkpoints" / site / "round_002")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kind"] == "local"
    assert (run_dir / "plots" / "metrics.png").is_file()
