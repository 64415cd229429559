"""A site's budget cannot silently reset, end to end through real sites: after a round, its
ledger and anchor are both put back to an older copy (a restored disk); the coordinator's
acknowledged head makes the site refuse the next round, spending nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedrad.client.federation import site_agent
from fedrad.client.federation.app import simulation_client_app
from fedrad.common.privacy.ledger import Ledger, line_hash, load_or_create_signing_key
from fedrad.common.privacy.ledger_anchor import (
    default_anchor_path,
    open_site_ledger,
    write_anchor,
)
from fedrad.server.app import run_server
from fedrad.server.participation import FederationError
from fedrad.server.rounds import ServerPlan
from tests.fl_fixtures import InProcessGrid, micro_foundation, micro_site, round_config

pytestmark = pytest.mark.usefixtures("in_process_federation")


def test_a_site_restored_from_an_older_copy_refuses_the_next_round(tmp_path: Path) -> None:
    site_agent.clear_caches()
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path / "sites", "site_a", foundation)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=1,
        rounds=2,
        round_config=round_config(planned_rounds=2, run_id="run"),
    )
    backup = tmp_path / "backup"

    def restore_older_copy(record: dict) -> None:
        """After round 1: ledger and anchor put back, in step, to before its evaluation."""
        ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
        assert len(ledger.entries()) == 2  # round 1's training and evaluation
        backup.mkdir()
        lines = spec.ledger_path.read_bytes().splitlines(keepends=True)
        (backup / "ledger.jsonl").write_bytes(lines[0])
        write_anchor(  # the anchor as it was then: it matches the shorter ledger
            backup / "anchor.json",
            load_or_create_signing_key(spec.key_path),
            site_id="site_a",
            lines=1,
            head_hash=line_hash(lines[0]),
        )
        shutil.copy(backup / "ledger.jsonl", spec.ledger_path)
        shutil.copy(backup / "anchor.json", default_anchor_path(spec.key_path))
        open_site_ledger(  # the site's own check is satisfied: only the coordinator knows
            spec.ledger_path, spec.key_path, site_id="site_a"
        )

    grid = InProcessGrid(simulation_client_app([spec]), 1)
    with pytest.raises(FederationError, match="coordinator acknowledged entry 2"):
        run_server(grid, plan, on_round=restore_older_copy)
    assert backup.is_dir()  # round 1 ran, then round 2 was refused
    after = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    assert len(after.entries()) == 1  # nothing spent on the rolled-back ledger
    assert after.refusals() == []  # a ledger that cannot be trusted takes no new line
