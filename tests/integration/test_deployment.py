"""Deployment end to end on loopback: `fedrad-coordinator start` (SuperLink with TLS and node
authentication) and three `fedrad-site start` (SuperNodes) as separate processes, a 2-round run
submitted with `fedrad-coordinator run`; a site whose key is not registered and a site trusting
another CA are refused; then the coordinator restarts (state in its database) and a resumed
run loses one site mid-round, completes the round with the others, and the site rejoins.

Every process is started in its own session and killed by its id in the fixture's teardown;
ports are picked free at run time. Tiny synthetic cohort, micro model.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedrad.client.site.config import init_site
from tests.integration.deployment_support import (
    SITES,
    Process,
    approve_release,
    coordinator_json,
    coordinator_status,
    ledger_ok,
    refused,
    run_command,
    run_to_end,
    site_start,
    start_federation,
    start_sites,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_three_sites_over_tls_with_node_authentication(
    tmp_path: Path, spawn: Callable[[list[str], Path], Process]
) -> None:
    started = time.monotonic()
    federation = start_federation(tmp_path, spawn)
    cohort, foundation = federation.cohort, federation.foundation
    coordinator, address, site_dirs = (
        federation.coordinator,
        federation.address,
        federation.site_dirs,
    )
    link, link_args = federation.link, federation.link_args

    # (a) a key the coordinator never registered is refused
    rogue = init_site(
        tmp_path / "rogue",
        site_id="rogue",
        data_dir=cohort / "site_1",
        coordinator=address,
        ca_file=coordinator / "ca.pem",
        foundation_dir=foundation,
    )
    approve_release(tmp_path / "rogue" / "site.toml")
    assert "not registered" in refused(spawn, tmp_path / "rogue" / "site.toml", tmp_path / "a.log")
    assert not rogue.ledger.exists() or rogue.ledger.read_bytes() == b""  # nothing spent
    # (b) a site trusting another CA refuses the SuperLink's certificate
    other = tmp_path / "other-federation"
    coordinator_json("init", str(other))
    init_site(
        tmp_path / "wrong_ca",
        site_id="site_1",
        data_dir=cohort / "site_1",
        coordinator=address,
        ca_file=other / "ca.pem",
        foundation_dir=foundation,
    )
    approve_release(tmp_path / "wrong_ca" / "site.toml")
    refusal = refused(spawn, tmp_path / "wrong_ca" / "site.toml", tmp_path / "b.log")
    assert "not signed by this site's ca_file" in refusal

    nodes, site_ports = start_sites(federation, spawn, tmp_path)
    status = coordinator_status(coordinator)
    assert sorted(s["site_id"] for s in status["sites"] if s["status"] == "online") == list(SITES)

    run_dir = tmp_path / "runs" / "deployed"
    done = run_to_end(
        run_command(coordinator, foundation, run_dir, rounds=2, epsilon=5.0),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    assert outcome["status"] == "finished:completed" and outcome["rounds_committed"] == 2
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert set(record["epsilon"]) == set(SITES) and record["failures"] == []
    assert (run_dir / "summary.json").is_file() and (run_dir / "config.toml").is_file()
    for site_id in SITES:
        assert ledger_ok(site_dirs[site_id]) == 2
    status = coordinator_status(coordinator)
    assert [r["status"] for r in status["runs"]] == ["finished:completed"]
    print(f"\n2-round deployment: {time.monotonic() - started:.0f} s")
    print(f"deployed rounds (3 sites): {[round(r['round_s'], 1) for r in records]} s")

    # (d) the coordinator restarts: registrations and runs persist in its database, and the
    # SuperNodes reconnect by themselves
    link.stop()
    assert not (coordinator / "superlink.json").exists()
    link = spawn(link_args, tmp_path / "coordinator-2.log")
    link.wait_for("Ctrl-C stops it", timeout=120)
    assert link.text().count(": already registered") == 3
    deadline = time.monotonic() + 120
    while sum(s["status"] == "online" for s in coordinator_status(coordinator)["sites"]) < 3:
        assert time.monotonic() < deadline, coordinator_status(coordinator)
        time.sleep(2)

    # (c) a resumed run to round 3; site_3 dies as round 3 starts; the others finish the
    # training round, site_3 rejoins and the round completes. The 2-round plan spent its
    # whole target of 5, so the longer plan needs a larger target (each site's budget is 8).
    resumed = spawn(
        run_command(coordinator, foundation, run_dir, rounds=3, epsilon=7.0),
        tmp_path / "resumed.log",
    )
    resumed.wait_for("configure_train", timeout=300)
    assert "resuming after round 2" in resumed.text()
    nodes["site_3"].stop(signal.SIGKILL)
    resumed.wait_for("aggregate_train: Received 2 results", timeout=300)
    nodes["site_3"] = spawn(
        site_start(site_dirs["site_3"] / "site.toml", site_ports["site_3"]),
        tmp_path / "site_3-rejoined.log",
    )
    nodes["site_3"].wait_for("joined the federation", timeout=120)
    resumed.wait_for('"status": "finished:completed"', timeout=400)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert set(records[2]["epsilon"]) == {"site_1", "site_2"}
    assert all(5.0 < records[2]["epsilon"][s] <= 7.0 for s in ("site_1", "site_2"))
    assert len(records[2]["failures"]) == 1
    for site_id in SITES:
        assert ledger_ok(site_dirs[site_id]) == (2 if site_id == "site_3" else 3)
    print(f"with restart, loss and rejoin: {time.monotonic() - started:.0f} s")
