"""Round bookkeeping and resume: the metrics line is the commit point, no round is counted
twice, and the ServerApp round loop (driven in-process, no Ray) resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.federation.app import simulation_client_app
from fedrad.common.model.checkpoint import load_checkpoint, read_metadata
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key, verify_ledger
from fedrad.common.run_dir import read_metrics
from fedrad.server.app import FederationError, run_server
from fedrad.server.rounds import (
    STRATEGY_STATE_FILE,
    ResumeError,
    RunBook,
    ServerPlan,
    checkpoint_dir,
)
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
    training_entries,
)

pytestmark = pytest.mark.usefixtures("in_process_federation")


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    return run_dir


def test_runbook_commits_in_order_and_resumes_from_the_last_commit(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    run_dir = _run_dir(tmp_path)
    book = RunBook(run_dir, foundation)
    start = book.resume_point()
    assert start.completed == 0 and start.strategy_state == {}
    assert set(start.arrays) == set(read_metadata(foundation)["trainable"])
    moved = {k: v + 1.0 for k, v in start.arrays.items()}
    with pytest.raises(ResumeError, match="cannot follow"):
        book.commit(2, moved, {"round": 2})
    book.commit(1, moved, {"round": 1, "epsilon": {"a": 1.0}}, {"m_t/x": np.ones(2)})
    with pytest.raises(ResumeError, match="no round twice"):
        book.commit(1, moved, {"round": 1})
    # an interrupted round 2 left a checkpoint but no metrics line: it does not count
    checkpoint_dir(run_dir, 2).mkdir()
    resumed = RunBook(run_dir, foundation).resume_point()
    assert resumed.completed == 1
    assert all(np.array_equal(resumed.arrays[k], moved[k]) for k in moved)
    assert np.array_equal(resumed.strategy_state["m_t/x"], np.ones(2))
    model = load_checkpoint(checkpoint_dir(run_dir, 1))
    assert torch.equal(
        dict(model.named_parameters())[next(iter(moved))].detach(),
        torch.from_numpy(moved[next(iter(moved))]),
    )


def test_runbook_refuses_a_damaged_run(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    run_dir = _run_dir(tmp_path)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    with pytest.raises(ResumeError, match="checkpoint is missing"):
        RunBook(run_dir, foundation)
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"round": 1}) + "\n" + json.dumps({"round": 3}) + "\n"
    )
    with pytest.raises(ResumeError, match=r"not 1\.\.n"):
        RunBook(run_dir, foundation)


def test_server_loop_resumes_after_a_crash_without_counting_a_round_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foundation = micro_foundation(tmp_path)
    specs = [micro_site(tmp_path / "sites", f"site_{i}", foundation, seed=i) for i in range(2)]
    run_dir = _run_dir(tmp_path)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=2,
        rounds=3,
        round_config=round_config(planned_rounds=3, run_id=run_dir.name),
        strategy="fedadam",
    )
    grid = InProcessGrid(simulation_client_app(specs), 2)
    real_commit = RunBook.commit

    def crash_in_round_2(self: RunBook, round_no: int, *args: object, **kwargs: object) -> Path:
        if round_no == 2:
            raise RuntimeError("coordinator lost power")
        return real_commit(self, round_no, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RunBook, "commit", crash_in_round_2)
    with pytest.raises(RuntimeError, match="lost power"):
        run_server(grid, plan)
    assert [r["round"] for r in read_metrics(run_dir)] == [1]

    monkeypatch.setattr(RunBook, "commit", real_commit)
    seen: list[dict] = []
    assert run_server(grid, plan, on_round=seen.append) == 3
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["round"] for r in seen] == [2, 3]
    assert run_server(grid, plan) == 3  # nothing left to do
    assert len(read_metrics(run_dir)) == 3

    last = records[-1]
    assert set(last["epsilon"]) == {"site_0", "site_1"}
    assert last["update_bytes"] > 0 and last["failures"] == []
    assert last["macro_auroc"] is None or 0 <= last["macro_auroc"] <= 1
    assert set(last["per_site"]) == {"site_0", "site_1"}  # each site's own held-out split
    assert all(m["n_studies"] >= 1 for m in last["per_site"].values())
    assert (checkpoint_dir(run_dir, 3) / STRATEGY_STATE_FILE).is_file()
    for round_no in (1, 2, 3):
        load_checkpoint(checkpoint_dir(run_dir, round_no))
    for spec in specs:
        key = load_or_create_signing_key(spec.key_path)
        entries = training_entries(spec)
        # round 2 trained twice (the crash came after the sites spent): both are on record
        assert [e["round"] for e in entries] == [1, 2, 2, 3]
        assert entries[-1]["epsilon"] == pytest.approx(last["epsilon"][spec.site_id])
        assert entries[-1]["epsilon"] <= 5.0  # recalibrated: the plan still meets its target
        assert verify_ledger(spec.ledger_path, key.public_key()) == []
    configs = [m.content["config"] for m in grid.sent if m.metadata.message_type == "train"]
    assert [c["server-round"] for c in configs] == [1, 1, 2, 2, 2, 2, 3, 3]


def test_a_round_with_no_usable_update_stops_with_the_reasons(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path / "sites", "site_0", foundation)
    capped = dataclasses.replace(spec, epsilon=1e-9)
    plan = ServerPlan(
        run_dir=_run_dir(tmp_path),
        foundation_dir=foundation,
        num_sites=1,
        rounds=1,
        round_config=round_config(planned_rounds=1),
    )
    grid = InProcessGrid(simulation_client_app([capped]), 1)
    with pytest.raises(FederationError, match=r"no usable update.*refused"):
        run_server(grid, plan)


def test_a_site_that_refuses_is_logged_and_the_round_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foundation = micro_foundation(tmp_path)
    specs = [micro_site(tmp_path / "sites", f"site_{i}", foundation, seed=i) for i in range(2)]
    specs[1] = dataclasses.replace(specs[1], epsilon=1e-9)  # nothing left to spend
    run_dir = _run_dir(tmp_path)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=2,
        rounds=1,
        round_config=round_config(planned_rounds=1, run_id=run_dir.name),
    )
    grid = InProcessGrid(simulation_client_app(specs), 2)
    with caplog.at_level(logging.WARNING, logger="fedrad.server.app"):
        assert run_server(grid, plan) == 1
    record = read_metrics(run_dir)[0]
    assert set(record["epsilon"]) == {"site_0"}
    assert any("privacy budget" in f for f in record["failures"])
    assert any("sent no update" in r.getMessage() for r in caplog.records)
    ledger = Ledger(specs[1].ledger_path, load_or_create_signing_key(specs[1].key_path))
    # training and evaluation both refused: on record, nothing spent
    assert ledger.entries() == [] and len(ledger.refusals()) == 2


def test_plan_from_run_config_rejects_unknown_keys(tmp_path: Path) -> None:
    plan = ServerPlan.from_run_config(
        {
            "run-dir": str(tmp_path / "run"),
            "foundation-dir": str(tmp_path / "f"),
            "num-sites": 1,
            "num-rounds": 3,
            "strategy": "fedprox",
            "proximal-mu": 0.1,
            "local-steps": 7,
            "epsilon": 4.0,
        }
    )
    assert plan.num_sites == 1 and plan.rounds == 3 and plan.strategy == "fedprox"
    assert plan.config_for(2).server_round == 2
    assert plan.round_config.local_steps == 7 and plan.round_config.target_epsilon == 4.0
    with pytest.raises(ValueError, match="unknown run config key"):
        ServerPlan.from_run_config({"run-dir": "r", "num-rounds": 1, "min-nodes": 2})


def test_plan_from_run_config_reads_the_site_registry(tmp_path: Path) -> None:
    base = {"run-dir": "r", "foundation-dir": "f", "num-sites": 2, "num-rounds": 1}
    registry = tmp_path / "coordinator" / "nodes.json"
    plan = ServerPlan.from_run_config({**base, "site-registry": str(registry)})
    assert plan.site_registry == registry
    assert ServerPlan.from_run_config(base).site_registry is None  # a simulation names none
