"""The trust boundary of a deployment, attacked on loopback through fedrad's own CLIs.

`fedrad-coordinator init/add-site/start` and two `fedrad-site init/approve --release/start` as
separate processes. (1) An outsider holding the CA certificate and the address the sites reach
tries each control action (submit, list runs, list nodes, logs, stop, register a key,
unregister a site, claim a Runtime task): every one is refused by the proxy. (2) The
coordinator's operator submits an app bundle the sites never approved: each site refuses it
before any of its code runs (its ClientApp would write a marker file). (3) The real run
completes its rounds with both sites. (4) The sites tighten their policies (site_1 requires
SecAgg+, site_2 caps epsilon per run): the next plain run is refused by both, nothing is spent,
and the refusals are on both sides' records.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import textwrap
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import tomli_w

from fedrad.common.flower_process import flower_process_env
from fedrad.common.protocol.release_app import release_pyproject
from fedrad.server.superlink import accepts_connections
from tests.integration.deployment_support import (
    BIN,
    Process,
    child_env,
    ledger_ok,
    run_command,
    run_to_end,
    start_federation,
    start_sites,
    training_lines,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TWO_SITES = ("site_1", "site_2")


def flwr_json(home: Path, *args: str, timeout: float = 60) -> dict:
    """One `flwr` CLI call with FLWR_HOME=home; its JSON reply (`flwr log` has none: its
    output is the reply's "text")."""
    env = flower_process_env(home, child_env())
    if args[0] == "log":
        done = subprocess.run(
            [str(BIN / "flwr"), *args, "--show"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        return {"success": done.returncode == 0, "text": done.stdout + done.stderr}
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    start = done.stdout.find("{")
    assert start >= 0, (args, done.stdout, done.stderr)
    return json.loads(done.stdout[start:])


def outsider_home(tmp_path: Path, address: str, ca: Path) -> Path:
    """A `flwr` connection to the sites' address, trusting the federation CA: what any site
    (or anyone a site's ca.pem leaked to) holds."""
    home = tmp_path / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "fed",
                    "fed": {"address": address, "root-certificates": str(ca)},
                }
            }
        )
    )
    return home


def write_rogue_app(root: Path, marker: Path, out: Path) -> Path:
    """An app bundle no site approved: its ServerApp asks every node to train and writes what
    came back; its ClientApp would write `marker` the moment a site imported it."""
    app = root / "rogue"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "project": {
                    "name": "rogue",
                    "version": "1.0.0",
                    "description": "not fedrad",
                    "license": "Apache-2.0",
                },
                "tool": {
                    "flwr": {
                        "app": {
                            "publisher": "mallory",
                            "components": {
                                "serverapp": "rogue_server:app",
                                "clientapp": "rogue_client:app",
                            },
                            "config": {"out": str(out)},
                        }
                    }
                },
            }
        )
    )
    (app / "rogue_client.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from flwr.clientapp import ClientApp

            Path({str(marker)!r}).write_text("the rogue ClientApp ran at a site")
            app = ClientApp()
            """
        )
    )
    (app / "rogue_server.py").write_text(
        textwrap.dedent(
            """
            import json
            import time
            from pathlib import Path

            from flwr.app import ConfigRecord, Message, RecordDict
            from flwr.serverapp import ServerApp

            app = ServerApp()


            @app.main()
            def main(grid, context):
                deadline = time.monotonic() + 120
                while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
                    time.sleep(0.5)
                messages = [
                    Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                            message_type="train")
                    for node in grid.get_node_ids()
                ]
                replies = grid.send_and_receive(messages, timeout=120)
                rows = [
                    {"error": r.has_error(),
                     "code": r.error.code if r.has_error() else None,
                     "reason": r.error.reason if r.has_error() else ""}
                    for r in replies
                ]
                Path(context.run_config["out"]).write_text(json.dumps(rows))
            """
        )
    )
    return app


def set_policy(config: Path, **policy: object) -> None:
    """The site's own edit of its site.toml [policy] (the runner re-reads it every task)."""
    document = tomllib.loads(config.read_text())
    document.setdefault("policy", {}).update(policy)
    config.write_text(tomli_w.dumps(document))


def test_outsider_is_refused_and_sites_run_only_what_they_approved(
    tmp_path: Path, spawn: Callable[[list[str], Path], Process]
) -> None:
    federation = start_federation(tmp_path, spawn, sites=TWO_SITES)
    coordinator, address = federation.coordinator, federation.address
    ca = coordinator / "ca.pem"

    # (1) the outsider: eight control actions at the sites' address, each refused
    home = outsider_home(tmp_path, address, ca)
    rogue_key = tmp_path / "rogue_key.pub"
    rogue_key.write_text((federation.site_dirs["site_1"] / "keys" / "node_key.pub").read_text())
    nodes = json.loads((coordinator / "nodes.json").read_text())
    outsider_app = tmp_path / "outsider-app"
    outsider_app.mkdir()
    (outsider_app / "pyproject.toml").write_bytes(release_pyproject())
    attempts = {
        "submit": ["run", str(outsider_app), "fed"],
        "list runs": ["ls", "fed"],
        "list nodes": ["supernode", "list", "fed"],
        "logs": ["log", "1", "fed"],
        "stop": ["stop", "1", "fed"],
        "register a key": ["supernode", "register", str(rogue_key), "fed"],
        "unregister a site": ["supernode", "unregister", str(nodes["site_2"]), "fed"],
    }
    refused = {}
    for action, args in attempts.items():
        reply = flwr_json(home, *args)
        refused[action] = reply.get("success") is not True and "403" in str(reply)
    host, port = address.rsplit(":", 1)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as client:
        base = f"https://{host}:{port}"
        refused["acquire a Runtime task"] = (
            client.post(f"{base}/v1/runtime/acquire-task", content=b"").status_code == 403
        )
        for path in ("/", "/docs", "/v1/control/list-runs", "/v1/fleet/../control/list-runs"):
            assert client.post(f"{base}{path}", content=b"").status_code == 403, path
        assert client.get(f"{base}/v1/fleet/pull-messages").status_code == 403
    assert refused == dict.fromkeys(refused, True), refused
    assert len(refused) == 8

    # the coordinator's own CLI, on loopback, still controls it
    nodes_proc, _ = start_sites(federation, spawn, tmp_path)
    status = subprocess.run(
        [str(BIN / "fedrad-coordinator"), "status", "--dir", str(coordinator), "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=True,
    )
    online = [s["site_id"] for s in json.loads(status.stdout)["sites"] if s["status"] == "online"]
    assert sorted(online) == list(TWO_SITES)

    # (2) an app bundle no site approved, submitted by the coordinator's operator
    marker, out = tmp_path / "MARKER", tmp_path / "rogue-replies.json"
    rogue = write_rogue_app(tmp_path, marker, out)
    reply = flwr_json(coordinator / "flwr", "run", str(rogue), "fedrad")
    assert reply.get("success") is True, reply
    deadline = time.monotonic() + 300
    while not out.exists():
        assert time.monotonic() < deadline, "the rogue ServerApp never heard back"
        time.sleep(1)
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["error"] for r in rows), rows
    assert all("has not approved app bundle" in r["reason"] for r in rows), rows
    assert not marker.exists()
    for site_id in TWO_SITES:
        assert "has not approved app bundle" in nodes_proc[site_id].text()

    # (3) the real run completes with both honest sites
    run_dir = tmp_path / "runs" / "real"
    done = run_to_end(
        run_command(coordinator, federation.foundation, run_dir, rounds=2, epsilon=4.0),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["rounds_committed"] == 2
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["epsilon"]) == set(TWO_SITES) and r["failures"] == [] for r in records)
    print(f"\ndeployed round on loopback: {[round(r['round_s'], 1) for r in records]} s")
    spent = {site_id: ledger_ok(federation.site_dirs[site_id]) for site_id in TWO_SITES}

    # (4) the sites' own policies refuse the next plan, spending nothing
    set_policy(federation.site_dirs["site_1"] / "site.toml", require_secagg=True)
    set_policy(federation.site_dirs["site_2"] / "site.toml", max_epsilon_per_run=2.0)
    refused_dir = tmp_path / "runs" / "refused"
    done = run_to_end(
        run_command(coordinator, federation.foundation, refused_dir, rounds=1, epsilon=4.0),
        timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "requires SecAgg+" in done.stderr and "max_epsilon_per_run" in done.stderr
    assert "requires SecAgg+" in nodes_proc["site_1"].text()
    assert "max_epsilon_per_run" in nodes_proc["site_2"].text()
    failed = [json.loads(x) for x in (refused_dir / "failed_rounds.jsonl").read_text().splitlines()]
    lines = failed[-1]["failures"]
    assert any(x.startswith("site_1: refused: site policy") and "SecAgg+" in x for x in lines)
    assert any(x.startswith("site_2: refused: site policy") for x in lines), lines
    for site_id in TWO_SITES:
        assert ledger_ok(federation.site_dirs[site_id]) >= spent[site_id]
        entries = (federation.site_dirs[site_id] / "ledger.jsonl").read_text().splitlines()
        refusals = [json.loads(x) for x in entries if '"refusal"' in x]
        assert any("site policy" in r.get("reason", "") for r in refusals)
        trained = training_lines(entries)
        assert len(trained) == 2  # the real run's two rounds: the refused run spent nothing

    # (5) the proxy dies: the coordinator stops the SuperLink and its runner, in one line
    state = json.loads((coordinator / "superlink.json").read_text())
    os.kill(state["proxy_pid"], signal.SIGKILL)
    code = federation.link.popen.wait(timeout=60)
    assert code == 2
    assert "the Fleet proxy (nginx) exited" in federation.link.text()
    assert not accepts_connections("127.0.0.1", int(address.rsplit(":", 1)[1]))
    assert not accepts_connections("127.0.0.1", state["superlink_port"])
