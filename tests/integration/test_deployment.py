"""Deployment end to end on loopback: `fedrad-coordinator start` (SuperLink with TLS and node
authentication) and three `fedrad-site start` (SuperNodes) as separate processes, a 2-round run
submitted with `fedrad-coordinator run`; a site whose key is not registered and a site trusting
another CA are refused; then the coordinator restarts (state in its database) and a resumed
run loses one site mid-round, completes the round with the others, and the site rejoins.

Every process is started in its own session and killed by its id in the fixture's teardown;
ports are picked free at run time. Tiny synthetic cohort, micro model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.site_config import init_site
from fedrad.common.ledger import public_key_path
from fedrad.common.ledger_audit import audit_ledger, public_key_id, read_public_key
from fedrad.server.cli import app as coordinator_cli
from fedrad.simulations.synth import generate_cohort
from tests.fl_fixtures import micro_foundation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
SITES = ("site_1", "site_2", "site_3")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",  # three sites and a coordinator share two cores
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
    )
    return env


class Process:
    """A child in its own session, its output in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, mark: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while mark not in self.text():
            if self.popen.poll() is not None:
                pytest.fail(f"{self.log.name} exited ({self.popen.returncode}): {self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {mark!r} in {self.log.name} after {timeout} s: {self.text()}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signals the child's whole process group (its id: it leads its own session)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # grandchildren left in the group
            os.killpg(self.pid, signal.SIGKILL)


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str], Path], Process]]:
    started: list[Process] = []

    def start(args: list[str], log: Path) -> Process:
        process = Process(args, log)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop(timeout=15)


def _coordinator(*args: str) -> dict:
    result = CliRunner().invoke(coordinator_cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _site_start(config: Path, port: int) -> list[str]:
    return [str(BIN / "fedrad-site"), "start", "--config", str(config), "--port", str(port)]


def _refused(spawn: Callable[[list[str], Path], Process], config: Path, log: Path) -> str:
    """Runs `fedrad-site start` to its end; returns its one-line error."""
    process = spawn(_site_start(config, _free_port()), log)
    try:
        code = process.popen.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fedrad-site start did not give up: {process.text()}")
    assert code == 2, process.text()
    lines = process.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.text()
    return lines[0]


def _ledger_ok(site_dir: Path) -> int:
    key = read_public_key(public_key_path(site_dir / "keys" / "ledger_key.pem"))
    audit = audit_ledger(site_dir / "ledger.jsonl", {public_key_id(key): key})
    assert audit.status == "ok", (audit.status, audit.reason)
    return audit.entries


def _run(
    coordinator: Path, foundation: Path, run_dir: Path, *, rounds: int, epsilon: float
) -> list[str]:
    return [
        str(BIN / "fedrad-coordinator"),
        "run",
        "--dir",
        str(coordinator),
        "--rounds",
        str(rounds),
        "--foundation",
        str(foundation),
        "--run-dir",
        str(run_dir),
        "--local-steps",
        "2",
        "--batch-size",
        "4",
        "--epsilon",
        str(epsilon),
        "--set",
        "eval-reports=2",
        "--set",
        "eval-questions=4",
        "--connect-timeout",
        "180",
        "--round-timeout",
        "400",
        "--json",
    ]


def _status(coordinator: Path) -> dict:
    done = subprocess.run(
        [str(BIN / "fedrad-coordinator"), "status", "--dir", str(coordinator), "--json"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def test_three_sites_over_tls_with_node_authentication(
    tmp_path: Path, spawn: Callable[[list[str], Path], Process]
) -> None:
    started = time.monotonic()
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=3, studies_per_site=8, seed=1, workers=1, image_size=64)
    foundation = micro_foundation(tmp_path)
    coordinator = tmp_path / "coord"
    _coordinator("init", str(coordinator))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    site_dirs = {}
    for index, site_id in enumerate(SITES, start=1):
        site_dirs[site_id] = tmp_path / site_id
        config = init_site(
            site_dirs[site_id],
            site_id=site_id,
            data_dir=cohort / f"site_{index}",
            epsilon=8.0,
            coordinator=address,
            ca_file=coordinator / "ca.pem",
            foundation_dir=foundation,
        )
        _coordinator(
            "add-site",
            "--dir",
            str(coordinator),
            "--site-id",
            site_id,
            str(config.node_key.with_suffix(".pub")),
        )
    link_args = [str(BIN / "fedrad-coordinator"), "start", "--dir", str(coordinator)]
    link_args += ["--host", "127.0.0.1", "--port", str(port)]
    link = spawn(link_args, tmp_path / "coordinator.log")
    link.wait_for("Ctrl-C stops it", timeout=120)
    assert link.text().count(": registered (node ") == 3

    # (a) a key the coordinator never registered is refused
    rogue = init_site(
        tmp_path / "rogue",
        site_id="rogue",
        data_dir=cohort / "site_1",
        coordinator=address,
        ca_file=coordinator / "ca.pem",
        foundation_dir=foundation,
    )
    assert "not registered" in _refused(spawn, tmp_path / "rogue" / "site.toml", tmp_path / "a.log")
    assert not rogue.ledger.exists()
    # (b) a site trusting another CA refuses the SuperLink's certificate
    other = tmp_path / "other-federation"
    _coordinator("init", str(other))
    init_site(
        tmp_path / "wrong_ca",
        site_id="site_1",
        data_dir=cohort / "site_1",
        coordinator=address,
        ca_file=other / "ca.pem",
        foundation_dir=foundation,
    )
    refusal = _refused(spawn, tmp_path / "wrong_ca" / "site.toml", tmp_path / "b.log")
    assert "not signed by this site's ca_file" in refusal

    site_ports = {site_id: _free_port() for site_id in SITES}
    nodes = {
        site_id: spawn(
            _site_start(site_dirs[site_id] / "site.toml", site_ports[site_id]),
            tmp_path / f"{site_id}.log",
        )
        for site_id in SITES
    }
    for node in nodes.values():
        node.wait_for("joined the federation", timeout=120)
    status = _status(coordinator)
    assert sorted(s["site_id"] for s in status["sites"] if s["status"] == "online") == list(SITES)

    run_dir = tmp_path / "runs" / "deployed"
    done = subprocess.run(
        _run(coordinator, foundation, run_dir, rounds=2, epsilon=5.0),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
        check=False,
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
        assert _ledger_ok(site_dirs[site_id]) == 2
    status = _status(coordinator)
    assert [r["status"] for r in status["runs"]] == ["finished:completed"]
    print(f"\n2-round deployment: {time.monotonic() - started:.0f} s")

    # (d) the coordinator restarts: registrations and runs persist in its database, and the
    # SuperNodes reconnect by themselves
    link.stop()
    assert not (coordinator / "superlink.json").exists()
    link = spawn(link_args, tmp_path / "coordinator-2.log")
    link.wait_for("Ctrl-C stops it", timeout=120)
    assert link.text().count(": already registered") == 3
    deadline = time.monotonic() + 120
    while sum(s["status"] == "online" for s in _status(coordinator)["sites"]) < 3:
        assert time.monotonic() < deadline, _status(coordinator)
        time.sleep(2)

    # (c) a resumed run to round 3; site_3 dies as round 3 starts; the others finish the
    # training round, site_3 rejoins and the round completes. The 2-round plan spent its
    # whole target of 5, so the longer plan needs a larger target (each site's budget is 8).
    resumed = spawn(
        _run(coordinator, foundation, run_dir, rounds=3, epsilon=7.0), tmp_path / "resumed.log"
    )
    resumed.wait_for("configure_train", timeout=300)
    assert "resuming after round 2" in resumed.text()
    nodes["site_3"].stop(signal.SIGKILL)
    resumed.wait_for("aggregate_train: Received 2 results", timeout=300)
    nodes["site_3"] = spawn(
        _site_start(site_dirs["site_3"] / "site.toml", site_ports["site_3"]),
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
        assert _ledger_ok(site_dirs[site_id]) == (2 if site_id == "site_3" else 3)
    print(f"with restart, loss and rejoin: {time.monotonic() - started:.0f} s")
