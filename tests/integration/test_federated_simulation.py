"""Federated simulation end to end on Flower's simulation engine (Ray), tiny cohort and micro
model: the run directory contract, one signed ledger entry per site per round, and resume."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from fedrad.common.model.checkpoint import load_checkpoint
from fedrad.common.privacy.ledger import (
    Ledger,
    load_or_create_signing_key,
    load_public_key,
    public_key_path,
    verify_ledger,
)
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.simulations.federated import (
    FederatedConfig,
    config_from_toml,
    resume_federated,
    run_federated,
)
from tests.fl_fixtures import micro_foundation

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_rounds_on_three_virtual_sites(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=3, studies_per_site=8, seed=1, workers=1, image_size=128)
    config = FederatedConfig(
        rounds=2,
        local_steps=2,
        batch_size=4,
        epsilon=5.0,
        eval_reports=2,
        eval_questions=4,
        initial_checkpoint=str(micro_foundation(tmp_path)),
    )
    seen: list[dict] = []
    run_dir = run_federated(cohort, tmp_path / "runs", config, on_round=seen.append)

    stored = tomllib.loads((run_dir / "config.toml").read_text())
    assert stored["kind"] == "federated"
    assert config_from_toml(run_dir / "config.toml") == config
    sites = stored["sites"]
    assert sites and set(sites) | set(stored.get("sites_left_out", {})) == {
        "site_1",
        "site_2",
        "site_3",
    }
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] == [r["round"] for r in seen]
    for record in records:
        assert set(record["epsilon"]) == set(sites)
        for key in (
            "macro_auroc",
            "ce_f1",
            "report_head_agreement",
            "rouge_l",
            "qa_accuracy",
            "qa_side_accuracy",
            "eval_epsilon",
        ):
            assert key in record
        assert record["failures"] == []
    for round_no in (0, 1, 2):
        load_checkpoint(run_dir / "checkpoints" / f"round_{round_no:03d}")
    assert (run_dir / "plots" / "metrics.png").is_file()
    assert (run_dir / "plots" / "epsilon.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kind"] == "federated" and summary["final"]["round"] == 2
    assert Path(summary["checkpoint"]) == run_dir / "checkpoints" / "round_002"

    for site in sites:
        folder = run_dir / "sites" / site
        key_path = folder / "ledger_key.pem"
        entries = Ledger(folder / "ledger.jsonl", load_or_create_signing_key(key_path)).entries()
        # per round: the training and the evaluation release (one Gaussian step at rate 1)
        assert [e["round"] for e in entries] == [1, 1, 2, 2]
        assert [(e["sample_rate"], e["steps"]) == (1.0, 1) for e in entries] == [0, 1, 0, 1]
        assert {e["run_id"] for e in entries} == {run_dir.name}
        epsilons = [e["epsilon"] for e in entries]
        assert epsilons == sorted(epsilons) and epsilons[-1] <= 5.0 * (1 + 1e-6)
        assert entries[2]["epsilon"] == pytest.approx(records[-1]["epsilon"][site])
        public = load_public_key(public_key_path(key_path))
        assert verify_ledger(folder / "ledger.jsonl", public) == []

    # resuming a finished run changes nothing and starts no simulation
    assert resume_federated(run_dir) == run_dir
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="rounds"):
        run_federated(
            cohort, tmp_path / "runs", dataclasses.replace(config, rounds=3), resume=run_dir
        )


def test_two_secagg_rounds_on_three_virtual_sites(tmp_path: Path) -> None:
    """The same run on Flower's simulation engine with SecAgg+: checkpoints, metrics with the
    per-site epsilon and the SecAgg+ figures, a signed ledger entry per site per round."""
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=3, studies_per_site=8, seed=1, workers=1, image_size=128)
    config = FederatedConfig(
        rounds=2,
        local_steps=2,
        batch_size=4,
        epsilon=5.0,
        eval_reports=2,
        eval_questions=4,
        secagg=True,
        initial_checkpoint=str(micro_foundation(tmp_path)),
    )
    run_dir = run_federated(cohort, tmp_path / "runs", config)
    assert config_from_toml(run_dir / "config.toml") == config
    sites = tomllib.loads((run_dir / "config.toml").read_text())["sites"]
    assert sites == ["site_1", "site_2", "site_3"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["failures"] == [] and set(record["epsilon"]) == set(sites)
        assert record["secagg"]["sites_summed"] == 3 and record["secagg"]["threshold"] == 2
        assert 0 < record["secagg"]["error_bound"] < 1e-5
        assert record["update_bytes"] > 0 and "macro_auroc" in record
    for round_no in (1, 2):
        load_checkpoint(run_dir / "checkpoints" / f"round_{round_no:03d}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secagg"] is True and summary["final"]["round"] == 2
    for site in sites:
        folder = run_dir / "sites" / site
        key_path = folder / "ledger_key.pem"
        entries = Ledger(folder / "ledger.jsonl", load_or_create_signing_key(key_path)).entries()
        assert [e["round"] for e in entries] == [1, 1, 2, 2]  # training, evaluation
        assert entries[2]["epsilon"] == pytest.approx(records[-1]["epsilon"][site])
        public = load_public_key(public_key_path(key_path))
        assert verify_ledger(folder / "ledger.jsonl", public) == []


def test_a_mixed_modality_federation_records_what_each_site_trained(tmp_path: Path) -> None:
    """Radiographs only, both, CT only: each site trains its parts, says so in its reply and
    its ledger, and the CT projector moves only by what the CT sites sent."""
    from safetensors.numpy import load_file

    pytest.importorskip("nibabel")
    cohort = tmp_path / "cohort"
    generate_cohort(
        cohort, sites=3, studies_per_site=10, seed=4, workers=1, image_size=128,
        ct_fractions=(0.0, 0.5, 1.0),
    )  # fmt: skip
    config = FederatedConfig(
        rounds=1,
        local_steps=2,
        batch_size=4,
        epsilon=5.0,
        eval_reports=2,
        eval_questions=4,
        initial_checkpoint=str(micro_foundation(tmp_path)),
    )
    run_dir = run_federated(cohort, tmp_path / "runs", config)
    trained = {}
    for site in ("site_1", "site_2", "site_3"):
        folder = run_dir / "sites" / site
        key = load_or_create_signing_key(folder / "ledger_key.pem")
        [spend, _] = Ledger(folder / "ledger.jsonl", key).entries()
        trained[site] = spend["trained"]
    assert trained == {
        "site_1": ["radiograph"],
        "site_2": ["CT", "radiograph"],
        "site_3": ["CT"],
    }
    start = load_file(str(run_dir / "checkpoints" / "round_000" / "model.safetensors"))
    after = load_file(str(run_dir / "checkpoints" / "round_001" / "model.safetensors"))
    for name in ("projector.0.weight", "volume_projector.0.weight", "head.weight"):
        assert not (start[name] == after[name]).all(), name
