"""What the loopback deployment tests share: free ports, child processes in their own session
(killed by id), the coordinator's and the sites' command lines, and the audit of a ledger."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app as site_cli
from fedrad.client.site.config import init_site
from fedrad.common.audit.ledger_audit import audit_ledger, public_key_id, read_public_key
from fedrad.common.privacy.ledger import public_key_path
from fedrad.common.synthetic.cohort import generate_cohort
from fedrad.server.cli import app as coordinator_cli
from fedrad.server.fleet_proxy import ProxyError, find_nginx
from tests.fl_fixtures import micro_foundation

BIN = Path(sys.executable).parent
SITES = ("site_1", "site_2", "site_3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
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
                env=child_env(),
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


def approve_release(config: Path) -> None:
    """`fedrad-site approve --release`: the site computes the release bundle's hash itself."""
    result = CliRunner().invoke(site_cli, ["approve", "--release", "--config", str(config)])
    assert result.exit_code == 0, result.output


def coordinator_json(*args: str) -> dict:
    result = CliRunner().invoke(coordinator_cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def site_start(config: Path, port: int) -> list[str]:
    return [str(BIN / "fedrad-site"), "start", "--config", str(config), "--port", str(port)]


def refused(spawn: Callable[[list[str], Path], Process], config: Path, log: Path) -> str:
    """Runs `fedrad-site start` to its end; returns its one-line error."""
    process = spawn(site_start(config, free_port()), log)
    try:
        code = process.popen.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fedrad-site start did not give up: {process.text()}")
    assert code == 2, process.text()
    lines = process.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.text()
    return lines[0]


def ledger_ok(site_dir: Path) -> int:
    """Audits a site's ledger (status ok) and returns how many training rounds it recorded."""
    key = read_public_key(public_key_path(site_dir / "keys" / "ledger_key.pem"))
    audit = audit_ledger(site_dir / "ledger.jsonl", {public_key_id(key): key})
    assert audit.status == "ok", (audit.status, audit.reason)
    return len(training_lines((site_dir / "ledger.jsonl").read_text().splitlines()))


def training_lines(lines: list[str]) -> list[str]:
    """A ledger's DP-SGD entries: not events (refusals, recoveries), not evaluation releases
    (one Gaussian step at sample rate 1; no deployment test trains one step on a whole split)."""
    entries = [(line, json.loads(line)) for line in lines if line.strip()]
    return [
        line
        for line, e in entries
        if "event" not in e and (e["sample_rate"], e["steps"]) != (1.0, 1)
    ]


def run_command(
    coordinator: Path,
    foundation: Path,
    run_dir: Path,
    *,
    rounds: int,
    epsilon: float,
    connect_timeout: float = 180.0,
    extra: Sequence[str] = (),
) -> list[str]:
    """`fedrad-coordinator run` for the micro model: two local steps, tiny evaluation."""
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
        str(connect_timeout),
        "--round-timeout",
        "400",
        *extra,
        "--json",
    ]


def run_to_end(command: list[str], *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """A `fedrad-coordinator run` (or any command) to its end, its output captured."""
    return subprocess.run(
        command, capture_output=True, text=True, env=child_env(), timeout=timeout, check=False
    )


def coordinator_status(coordinator: Path) -> dict:
    done = subprocess.run(
        [str(BIN / "fedrad-coordinator"), "status", "--dir", str(coordinator), "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@dataclass(frozen=True)
class Federation:
    """A coordinator with a running SuperLink and three registered (not yet started) sites."""

    cohort: Path
    foundation: Path
    coordinator: Path
    address: str
    site_dirs: dict[str, Path]
    link_args: list[str]  # `fedrad-coordinator start`, to restart it
    link: Process


def require_nginx() -> None:
    """The Fleet proxy needs nginx: skipped with the install command where it is missing,
    failed instead where CI says it must run (FEDRAD_REQUIRE_NGINX=1)."""
    try:
        find_nginx()
    except ProxyError as exc:
        if os.environ.get("FEDRAD_REQUIRE_NGINX") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def free_port_pair() -> int:
    """A port P with P + 1 free too (the Fleet proxy and the SuperLink behind it)."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    pytest.fail("no two adjacent free ports on 127.0.0.1")


def start_federation(
    tmp_path: Path,
    spawn: Callable[[list[str], Path], Process],
    sites: Sequence[str] = SITES,
) -> Federation:
    """Tiny cohort, micro model, `fedrad-coordinator init`, a `fedrad-site init` + `add-site` +
    `approve --release` per site, then `fedrad-coordinator start` (Fleet proxy, loopback
    SuperLink with TLS and node authentication) until it is up."""
    require_nginx()
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, sites=len(sites), studies_per_site=8, seed=1, workers=1, image_size=64)
    foundation = micro_foundation(tmp_path)
    coordinator = tmp_path / "coord"
    coordinator_json("init", str(coordinator))
    port = free_port_pair()
    address = f"127.0.0.1:{port}"
    site_dirs = {}
    for index, site_id in enumerate(sites, start=1):
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
        coordinator_json(
            "add-site",
            "--dir",
            str(coordinator),
            "--site-id",
            site_id,
            str(config.node_key.with_suffix(".pub")),
        )
        approve_release(site_dirs[site_id] / "site.toml")
    link_args = [str(BIN / "fedrad-coordinator"), "start", "--dir", str(coordinator)]
    link_args += ["--host", "127.0.0.1", "--port", str(port)]
    link = spawn(link_args, tmp_path / "coordinator.log")
    link.wait_for("Ctrl-C stops it", timeout=120)
    assert link.text().count(": registered (node ") == len(sites)
    return Federation(cohort, foundation, coordinator, address, site_dirs, link_args, link)


def start_sites(
    federation: Federation, spawn: Callable[[list[str], Path], Process], logs: Path
) -> tuple[dict[str, Process], dict[str, int]]:
    """`fedrad-site start` for every site, until each has joined; the processes and ports."""
    ports = {site_id: free_port() for site_id in federation.site_dirs}
    nodes = {
        site_id: spawn(
            site_start(federation.site_dirs[site_id] / "site.toml", ports[site_id]),
            logs / f"{site_id}.log",
        )
        for site_id in federation.site_dirs
    }
    for node in nodes.values():
        node.wait_for("joined the federation", timeout=120)
    return nodes, ports
