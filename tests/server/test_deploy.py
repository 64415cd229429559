"""The coordinator's deployment commands as pure functions: Flower 1.41 command lines and
environments, the replies they parse, run configs, the release app and one-line preflight
problems; plus the `start`, `run` and `status` CLIs refusing bad input before anything
starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.site.config import init_site
from fedrad.common.flower_process import FLOWER_ENV
from fedrad.common.protocol.release_app import (
    RELEASE_RUN_CONFIG,
    clientapp_for,
    fab_sha256,
    release_fab,
    release_pyproject,
    release_version,
)
from fedrad.server import deploy
from fedrad.server.cli import app
from fedrad.server.deploy import (
    Admission,
    DeployError,
    SuperLinkState,
    build_run_config,
    check_foundation,
    default_superlink_port,
    flower_environment,
    loopback_name,
    new_superexec_secret,
    parse_nodes_reply,
    parse_register_reply,
    parse_runs_reply,
    parse_setting,
    parse_submit_reply,
    preflight_run,
    preflight_start,
    proxy_tls_name,
    read_nodes,
    read_state,
    record_nodes,
    register_commands,
    release_app_dir,
    stage_release_app,
    stop_group,
    stop_pids,
    submit_command,
    superexec_command,
    superlink_command,
    write_run_config,
    write_state,
)
from fedrad.server.fleet_proxy import ProxyError
from fedrad.server.pki import add_site, init_federation, write_flwr_connection

runner = CliRunner()


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    directory = tmp_path / "coord"
    init_federation(directory, hosts=["coord.example.org"])
    return directory


def _register(directory: Path, tmp_path: Path, *site_ids: str) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    for site_id in site_ids:
        config = init_site(tmp_path / site_id, site_id=site_id, data_dir=tmp_path / "data")
        add_site(directory, site_id, config.node_key.with_suffix(".pub"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (bound together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def nginx_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight as on a coordinator with nginx installed, whether this host has it or not."""
    monkeypatch.setattr(deploy, "find_nginx", lambda: "/usr/sbin/nginx")


def _foundation(tmp_path: Path, trainable: object = ("lm.lora_A",)) -> Path:
    directory = tmp_path / "foundation"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"x")
    meta = {"trainable": list(trainable)} if isinstance(trainable, tuple) else {}
    (directory / "metadata.json").write_text(json.dumps(meta))
    return directory


# -- command lines and environments ----------------------------------------------------------


def test_superlink_command_has_tls_node_auth_and_a_database(coordinator: Path) -> None:
    secret = coordinator / "superexec.secret"
    command = superlink_command(coordinator, port=9100, executable="fsl", secret_file=secret)
    root = coordinator.resolve()
    assert command[0] == "fsl"
    assert all(isinstance(c, str) for c in command)
    assert command.count("--enable-supernode-auth") == 1
    flags = [c for c in command if c.startswith("--")]
    assert flags == [
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--database",
        "--host",
        "--port",
        "--disable-runtime-dependency-installation",
        "--isolation",
        "--superexec-auth-secret-file",
    ]
    index = command.index("--database")
    assert command[index + 1] == str(root / "superlink.db")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(root / "ca.pem")
    assert command[command.index("--ssl-keyfile") + 1] == str(root / "superlink.key")
    assert command[command.index("--port") + 1] == "9100"
    with pytest.raises(DeployError, match="port"):
        superlink_command(coordinator, port=70000, executable="fsl", secret_file=secret)


def test_the_superlink_binds_loopback_only_with_process_isolation(coordinator: Path) -> None:
    """Its Control API has no access control: the sites reach only the Fleet proxy, and only
    the coordinator's own runner (holding the secret) may claim ServerApp tasks."""
    secret = coordinator / "superexec.secret"
    command = superlink_command(coordinator, port=9101, executable="fsl", secret_file=secret)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command.count("--host") == 1
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert "--insecure" not in command
    assert not any(c.startswith(("--fleet-api-address", "--control-api-address")) for c in command)


def test_superexec_command(coordinator: Path) -> None:
    secret = coordinator / "superexec.secret"
    command = superexec_command(
        coordinator,
        address="127.0.0.1:9101",
        executable="fse",
        secret_file=secret,
        parent_pid=4242,
    )
    assert command == [
        "fse",
        "--runtime-api-address",
        "127.0.0.1:9101",
        "--root-certificates",
        str(coordinator.resolve() / "ca.pem"),
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        "4242",
    ]
    assert "--insecure" not in command


def test_new_superexec_secret_is_0600_and_new_at_every_start(coordinator: Path) -> None:
    first = new_superexec_secret(coordinator)
    assert first == coordinator.resolve() / "superexec.secret"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    value = first.read_bytes()
    assert len(value) >= 32
    first.chmod(0o644)
    second = new_superexec_secret(coordinator)
    assert second == first
    assert second.read_bytes() != value
    assert stat.S_IMODE(second.stat().st_mode) == 0o600


def test_default_superlink_port() -> None:
    assert default_superlink_port(8000) == 8001
    assert default_superlink_port(9092) == 9093
    assert default_superlink_port(65535) == 65534


# -- the names the proxy and the CLI verify the SuperLink by --------------------------------


def test_loopback_and_proxy_names_of_the_default_certificate(coordinator: Path) -> None:
    assert loopback_name(coordinator) == "127.0.0.1"
    assert proxy_tls_name(coordinator) == "localhost"  # nginx does not match IP addresses


def test_a_certificate_without_loopback_names(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, include_loopback=False, hosts=["coord.example.org"])
    with pytest.raises(DeployError, match=r"does not cover 127\.0\.0\.1 or localhost") as refused:
        loopback_name(directory)
    assert "renew-cert" in str(refused.value) and "--loopback" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert proxy_tls_name(directory) == "coord.example.org"


def test_a_certificate_with_only_an_ip(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, include_loopback=False, hosts=["10.1.2.3"])
    with pytest.raises(DeployError, match="names no DNS host") as refused:
        proxy_tls_name(directory)
    assert "renew-cert" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(DeployError, match=r"does not cover 127\.0\.0\.1 or localhost"):
        loopback_name(directory)


def test_flower_environment(coordinator: Path, tmp_path: Path) -> None:
    env = flower_environment(coordinator, {"PATH": "/usr/bin", "KEEP": "1"}, bin_dir=tmp_path)
    for key, value in FLOWER_ENV.items():
        assert env[key] == value
    assert env["FLWR_HOME"] == str(coordinator.resolve() / "flwr")
    assert env["PATH"].split(os.pathsep) == [str(tmp_path), "/usr/bin"]
    assert env["KEEP"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_register_commands_cover_the_registry_in_order(coordinator: Path, tmp_path: Path) -> None:
    _register(coordinator, tmp_path, "b_site", "a_site")
    commands = register_commands(coordinator, flwr="flwr")
    assert [site for site, _ in commands] == ["b_site", "a_site"]
    command = commands[0][1]
    assert command[:3] == ["flwr", "supernode", "register"]
    assert command[3] == str(coordinator.resolve() / "site_keys" / "b_site.pub")
    assert command[-4:] == ["--name", "b_site", "--format", "json"]


# -- replies ---------------------------------------------------------------------------------


def test_parse_register_reply() -> None:
    ok = parse_register_reply("s1", '{"success": true, "node-id": 1755105074038854503}')
    assert ok == Admission("s1", "registered", node_id=1755105074038854503)
    assert ok.ok
    again = parse_register_reply(
        "s1",
        json.dumps(
            {
                "success": False,
                "error-message": "Using SuperLink: fedrad (127.0.0.1:8000)\n\n"
                "[code: 23] Public key already in use.",
            }
        ),
    )
    assert again.status == "already registered" and again.ok
    assert "Using SuperLink" not in again.message
    refused = parse_register_reply(
        "s1", '{"success": false, "error-message": "Using SuperLink: x\\n\\nPermission denied"}'
    )
    assert refused.status == "failed" and not refused.ok
    assert refused.message == "Permission denied"
    garbage = parse_register_reply("s1", "Traceback (most recent call last): ...")
    assert garbage.status == "failed" and "no JSON" in garbage.message


def test_parse_submit_reply() -> None:
    assert parse_submit_reply('{"success": true, "run-id": "6363443523138477186"}') == (
        6363443523138477186
    )
    with pytest.raises(DeployError, match="refused the run: no federation"):
        parse_submit_reply('{"success": false, "error-message": "no federation"}')


def test_parse_runs_and_nodes_replies() -> None:
    runs = parse_runs_reply(
        json.dumps(
            {
                "success": True,
                "runs": [
                    {"run-id": "7", "status": "finished:completed", "status-details": "N/A"},
                    {
                        "run-id": "8",
                        "status": "finished:failed",
                        "status-details": "ServerApp failed with exception: boom",
                        "elapsed": 11.5,
                    },
                    {"run-id": "9", "status": "running", "elapsed": 3},
                ],
            }
        )
    )
    assert [(r.run_id, r.completed, r.finished) for r in runs] == [
        (7, True, True),
        (8, False, True),
        (9, False, False),
    ]
    assert runs[0].details == "" and runs[1].details.endswith("boom")
    nodes = parse_nodes_reply(
        json.dumps(
            {
                "success": True,
                "nodes": [
                    {"node-id": "11", "status": "online", "online-at": "2026-11-23 08:43:34Z"},
                    {"node-id": "12", "status": "registered", "online-at": "N/A"},
                    {"node-id": "13", "status": "offline", "online-at": "2026-11-23 08:40:00Z"},
                ],
            }
        ),
        {"site_a": 11},
    )
    assert [(n.site_id, n.status, n.online_since) for n in nodes] == [
        ("site_a", "online", "2026-11-23 08:43:34Z"),
        (None, "registered", None),
        (None, "offline", None),
    ]
    with pytest.raises(DeployError, match="cannot list runs"):
        parse_runs_reply('{"success": false, "error-message": "denied"}')


def test_nodes_file_keeps_earlier_ids(coordinator: Path) -> None:
    record_nodes(coordinator, [Admission("a", "registered", node_id=5)])
    record_nodes(
        coordinator, [Admission("a", "already registered"), Admission("b", "registered", 6)]
    )
    assert read_nodes(coordinator) == {"a": 5, "b": 6}


# -- the run config and the staged app -------------------------------------------------------


def test_run_config_is_what_the_server_app_accepts(tmp_path: Path) -> None:
    from fedrad.server.rounds import ServerPlan

    config = build_run_config(
        run_dir=tmp_path / "runs" / "r1",
        foundation=tmp_path / "foundation",
        rounds=3,
        num_sites=2,
        options={"epsilon": 4.0, "lr": None, "connect-timeout": 90.0, "eval-reports": 2},
    )
    assert "lr" not in config
    assert config["run-dir"] == str((tmp_path / "runs" / "r1").resolve())
    plan = ServerPlan.from_run_config(config)
    assert plan.rounds == 3 and plan.num_sites == 2
    assert plan.round_config.target_epsilon == 4.0 and plan.connect_timeout_s == 90.0
    assert plan.round_config.run_id == "r1"
    with pytest.raises(DeployError, match="own option"):
        build_run_config(
            run_dir=tmp_path, foundation=tmp_path, rounds=1, num_sites=1, options={"num-rounds": 2}
        )
    with pytest.raises(DeployError, match="rounds"):
        build_run_config(run_dir=tmp_path, foundation=tmp_path, rounds=0, num_sites=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("delta=1e-5", ("delta", 1e-5)),
        ("eval-reports=16", ("eval-reports", 16)),
        ("dp=false", ("dp", False)),
        ('accountant="prv"', ("accountant", "prv")),
        ("strategy=fedprox", ("strategy", "fedprox")),
    ],
)
def test_parse_setting(text: str, expected: tuple[str, object]) -> None:
    assert parse_setting(text) == expected


@pytest.mark.parametrize("text", ["delta", "=1", "delta=", "x=[1, 2]"])
def test_parse_setting_refuses(text: str) -> None:
    with pytest.raises(DeployError):
        parse_setting(text)


def test_the_staged_release_app_is_the_bundle_the_sites_approve(coordinator: Path) -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    app_dir = stage_release_app(coordinator)
    assert app_dir == release_app_dir(coordinator)
    assert app_dir == coordinator.resolve() / "apps" / f"fedrad-{release_version()}"
    assert sorted(p.name for p in app_dir.iterdir()) == ["pyproject.toml"]
    assert (app_dir / "pyproject.toml").read_bytes() == release_pyproject()
    document = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert document["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedrad.server.app:app",
        "clientapp": "fedrad.client.federation.app:app",
    }
    assert document["tool"]["flwr"]["app"]["config"] == RELEASE_RUN_CONFIG
    valid, errors, _ = validate_config(document, check_module=True, project_dir=app_dir)
    assert valid, errors
    fab = build_fab_from_disk(app_dir)  # what `flwr run APP_DIR` submits
    assert fab_sha256(fab) == fab_sha256(release_fab())  # what `approve --release` computes
    assert stage_release_app(coordinator) == app_dir  # every run: the same app, unchanged
    assert build_fab_from_disk(app_dir) == fab


def test_stage_release_app_refuses_a_folder_holding_other_files(coordinator: Path) -> None:
    app_dir = stage_release_app(coordinator)
    (app_dir / "notes.txt").write_text("not part of the release")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        stage_release_app(coordinator)


def test_write_run_config_round_trips(tmp_path: Path) -> None:
    from flwr.common.config import fuse_dicts, parse_config_args

    from fedrad.server.rounds import ServerPlan

    config = build_run_config(
        run_dir=tmp_path / "r7",
        foundation=tmp_path / "foundation",
        rounds=2,
        num_sites=3,
        options={"round-timeout": 300.0, "dp": True, "accountant": "prv", "seed": 5},
    )
    (tmp_path / "r7").mkdir()
    path = write_run_config(tmp_path / "r7", config)
    assert path == tmp_path / "r7" / "run_config.toml"
    assert tomllib.loads(path.read_text()) == config
    parsed = parse_config_args([str(path)])  # as `flwr run --run-config FILE` reads it
    assert parsed == config
    fused = fuse_dicts(dict(RELEASE_RUN_CONFIG), parsed)  # what the ServerApp is handed
    assert ServerPlan.from_run_config(fused) == ServerPlan.from_run_config(config)


def test_write_run_config_refuses_an_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="unknown run config key\\(s\\): bogus"):
        write_run_config(tmp_path, {"run-dir": str(tmp_path), "bogus": 1})
    assert not (tmp_path / "run_config.toml").exists()


def test_submit_command(tmp_path: Path) -> None:
    app_dir = tmp_path / "apps" / "fedrad-1.0"
    settings = tmp_path / "r1" / "run_config.toml"
    assert submit_command(app_dir, settings, flwr="flwr") == [
        "flwr",
        "run",
        str(app_dir),
        "fedrad",
        "--run-config",
        str(settings),
        "--format",
        "json",
    ]


# -- preflight -------------------------------------------------------------------------------


def test_preflight_start_ok_then_each_problem(
    coordinator: Path, tmp_path: Path, nginx_found: None
) -> None:
    port, inner = _free_ports(2)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert len(problems) == 1 and problems[0].startswith("no registered sites")
    _register(coordinator, tmp_path, "site_a")
    assert preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner) == []
    assert preflight_start(coordinator, host="0.0.0.0", port=port, superlink_port=inner) == []

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=taken, superlink_port=inner)
    assert problems == [f"port {taken} on 127.0.0.1 is already in use"]

    problems = preflight_start(coordinator, host="10.9.9.9", port=port, superlink_port=inner)
    assert any("does not cover host 10.9.9.9" in p for p in problems)

    (coordinator / "superlink.key").chmod(0o644)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert any("readable by others" in p for p in problems)
    (coordinator / "superlink.key").chmod(0o600)

    write_state(
        coordinator,
        SuperLinkState(os.getpid(), "127.0.0.1", port, f"127.0.0.1:{port}", "db", "log"),
    )
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert problems == [
        f"a SuperLink started from {coordinator} is already running (pid {os.getpid()}, "
        f"127.0.0.1:{port})"
    ]
    for problem in problems:
        assert "\n" not in problem


def test_preflight_start_not_a_coordinator(tmp_path: Path, nginx_found: None) -> None:
    port, inner = _free_ports(2)
    problems = preflight_start(tmp_path, host="127.0.0.1", port=port, superlink_port=inner)
    assert len(problems) == 1 and "not a coordinator directory" in problems[0]


def test_preflight_start_without_nginx(
    coordinator: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(coordinator, tmp_path, "site_a")

    def missing() -> str:
        raise ProxyError("nginx not found: the coordinator's Fleet proxy needs it; install it")

    monkeypatch.setattr(deploy, "find_nginx", missing)
    port, inner = _free_ports(2)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert problems == ["nginx not found: the coordinator's Fleet proxy needs it; install it"]


def test_preflight_start_with_the_superlink_port_in_use(
    coordinator: Path, tmp_path: Path, nginx_found: None
) -> None:
    _register(coordinator, tmp_path, "site_a")
    port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=taken)
    assert problems == [
        f"port {taken} on 127.0.0.1 (the SuperLink's own) is already in use: pick another "
        "with --superlink-port"
    ]
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=port)
    assert problems == [f"the SuperLink's own port {port} is the proxy's port: pick another"]
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=70000)
    assert problems == ["port 70000 is not in 1..65535"]


def test_preflight_start_takes_the_port_after_the_proxy_s_by_default(
    coordinator: Path, tmp_path: Path, nginx_found: None
) -> None:
    _register(coordinator, tmp_path, "site_a")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=taken - 1)
    assert f"port {taken} on 127.0.0.1 (the SuperLink's own) is already in use" in problems[-1]


@pytest.mark.parametrize(
    ("hosts", "words"),
    [
        (["coord.example.org"], ["does not cover 127.0.0.1 or localhost"]),
        (["10.1.2.3"], ["does not cover 127.0.0.1 or localhost", "names no DNS host"]),
    ],
)
def test_preflight_start_with_a_certificate_the_proxy_cannot_verify(
    tmp_path: Path, nginx_found: None, hosts: list[str], words: list[str]
) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, include_loopback=False, hosts=hosts)
    _register(directory, tmp_path, "site_a")
    port, inner = _free_ports(2)
    problems = preflight_start(directory, host="0.0.0.0", port=port, superlink_port=inner)
    assert len(problems) == len(words), problems
    for problem, expected in zip(problems, words, strict=True):
        assert expected in problem and "renew-cert" in problem and "\n" not in problem


def test_check_foundation(tmp_path: Path) -> None:
    assert check_foundation(tmp_path / "nope") == [f"foundation {tmp_path / 'nope'} does not exist"]
    foundation = _foundation(tmp_path)
    assert check_foundation(foundation) == []
    (foundation / "metadata.json").write_text("{}")
    assert "declares no trainable" in check_foundation(foundation)[0]
    (foundation / "model.safetensors").unlink()
    assert "no model.safetensors" in check_foundation(foundation)[0]


def test_preflight_run(coordinator: Path, tmp_path: Path) -> None:
    port = _free_port()
    write_flwr_connection(coordinator, address=f"127.0.0.1:{port}")
    problems = preflight_run(
        coordinator, foundation=tmp_path / "missing", run_dir=tmp_path / "r", num_sites=None
    )
    assert problems == [
        f"foundation {tmp_path / 'missing'} does not exist",
        f"no registered sites in {coordinator}",
        f"no SuperLink answers at 127.0.0.1:{port}: start it with fedrad-coordinator start "
        f"--dir {coordinator}",
    ]
    _register(coordinator, tmp_path, "site_a")
    foundation = _foundation(tmp_path)
    with socket.socket() as listening:  # something accepts connections there
        listening.bind(("127.0.0.1", port))
        listening.listen()
        assert (
            preflight_run(coordinator, foundation=foundation, run_dir=tmp_path / "r", num_sites=1)
            == []
        )
        problems = preflight_run(
            coordinator, foundation=foundation, run_dir=tmp_path / "r", num_sites=2
        )
    assert problems == ["--sites 2 but only 1 sites are registered"]


# -- state and stopping -------------------------------------------------------------------------


def test_superlink_state_round_trips_and_lists_every_pid(coordinator: Path) -> None:
    state = SuperLinkState(
        pid=11,
        host="0.0.0.0",
        port=9092,
        address="127.0.0.1:9093",
        database="db",
        log="log",
        superlink_port=9093,
        proxy_pid=12,
        superexec_pid=13,
    )
    write_state(coordinator, state)
    assert read_state(coordinator) == state
    assert state.pids() == [12, 13, 11]  # the proxy first: the sites' door closes first
    older = SuperLinkState(11, "0.0.0.0", 9092, "127.0.0.1:9092", "db", "log")
    assert older.pids() == [11]


def test_a_state_file_from_before_the_proxy_still_reads(coordinator: Path) -> None:
    (coordinator / "superlink.json").write_text(
        json.dumps(
            {
                "pid": 5,
                "host": "0.0.0.0",
                "port": 9092,
                "address": "127.0.0.1:9092",
                "database": "db",
                "log": "log",
            }
        )
    )
    state = read_state(coordinator)
    assert state is not None and state.pids() == [5] and state.superlink_port is None
    (coordinator / "superlink.json").write_text('{"pid": 5, "colour": "red"}')
    with pytest.raises(DeployError, match="not a readable SuperLink state file"):
        read_state(coordinator)
    (coordinator / "superlink.json").unlink()
    assert read_state(coordinator) is None


def _sleeper(*, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A child that sleeps, reaped by a thread as soon as it ends (as init reaps the detached
    processes `fedrad-coordinator stop` signals), so its pid is gone once it exits."""
    code = "import signal, sys, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(60)\n"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    threading.Thread(target=process.wait, daemon=True).start()
    return process


def test_stop_pids_ends_a_sleeping_process() -> None:
    process = _sleeper()
    try:
        assert stop_pids([process.pid], timeout=10.0) == 1
        process.wait(timeout=5)
        assert process.returncode == -signal.SIGTERM
        assert stop_pids([process.pid], timeout=1.0) == 0  # gone already: nothing to stop
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_pids_kills_a_process_that_ignores_sigterm() -> None:
    process = _sleeper(ignore_term=True)
    try:
        assert stop_pids([process.pid], timeout=0.5) == 1
        process.wait(timeout=5)
        assert process.returncode == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_group_ends_a_process_group() -> None:
    code = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        stop_group(process.pid, timeout=10.0)
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)
        stop_group(process.pid, timeout=10.0)  # gone already: returns at once
    finally:
        if process.poll() is None:
            process.kill()


# -- the CLI refuses before anything starts --------------------------------------------------


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_start_refuses_without_sites(coordinator: Path, monkeypatch, nginx_found: None) -> None:
    started: list[object] = []
    monkeypatch.setattr(deploy.subprocess, "Popen", lambda *a, **k: started.append(a))
    args = ["start", "--dir", str(coordinator), "--port", str(_free_port())]
    result = runner.invoke(app, [*args, "--host", "127.0.0.1"])
    line = _one_line_error(result)
    assert "no registered sites" in line
    assert started == []


def test_run_and_status_refuse_without_a_superlink(coordinator: Path, tmp_path: Path) -> None:
    write_flwr_connection(coordinator, address=f"127.0.0.1:{_free_port()}")
    _register(coordinator, tmp_path, "site_a")
    foundation = _foundation(tmp_path)
    result = runner.invoke(
        app,
        [
            "run",
            "--dir",
            str(coordinator),
            "--rounds",
            "2",
            "--foundation",
            str(foundation),
            "--run-dir",
            str(tmp_path / "r"),
        ],
    )
    assert "no SuperLink answers" in _one_line_error(result)
    assert not (tmp_path / "r").exists()
    result = runner.invoke(app, ["status", "--dir", str(coordinator)])
    assert "no SuperLink answers" in _one_line_error(result)


def test_run_refuses_a_bad_setting_before_submitting(
    coordinator: Path, tmp_path: Path, monkeypatch
) -> None:
    _register(coordinator, tmp_path, "site_a")
    foundation = _foundation(tmp_path)
    monkeypatch.setattr("fedrad.server.cli.preflight_run", lambda *a, **k: [])
    submitted: list[object] = []
    monkeypatch.setattr("fedrad.server.cli.run_flwr", lambda *a, **k: submitted.append(a))
    base = ["run", "--dir", str(coordinator), "--rounds", "2", "--foundation", str(foundation)]
    base += ["--run-dir", str(tmp_path / "r")]
    result = runner.invoke(app, [*base, "--set", "bogus=1"])
    assert "unknown run config key(s): bogus" in _one_line_error(result)
    # 2.0: central-clip at its declared default (1.0) counts as not given, so is no error
    result = runner.invoke(app, [*base, "--set", "central-clip=2.0"])
    assert "need central-noise" in _one_line_error(result)
    result = runner.invoke(app, [*base, "--epsilon", "2", "--set", "epsilon=3"])
    assert "repeats an option" in _one_line_error(result)
    assert submitted == []


def test_a_secagg_run_submits_the_one_release_app(coordinator: Path, tmp_path: Path) -> None:
    """SecAgg+ is a run setting, not another bundle: the sites pick the secure ClientApp."""
    from fedrad.server.rounds import ServerPlan

    options = {"secagg": True, "secagg-threshold": 2, "min-sites": 2}
    config = build_run_config(
        run_dir=tmp_path / "s1", foundation=tmp_path / "f", rounds=2, num_sites=3, options=options
    )
    plan = ServerPlan.from_run_config(config)
    assert plan.secagg and plan.shares_threshold == 2 and plan.required_sites == 2
    app_dir = stage_release_app(coordinator)
    document = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert (
        document["tool"]["flwr"]["app"]["components"]["clientapp"]
        == "fedrad.client.federation.app:app"
    )
    (tmp_path / "s1").mkdir()
    settings = tomllib.loads(write_run_config(tmp_path / "s1", config).read_text())
    assert settings["secagg"] is True
    assert clientapp_for(settings) == "fedrad.client.federation.secure_aggregation:app"
    plain = build_run_config(run_dir=tmp_path / "p", foundation=tmp_path, rounds=1, num_sites=3)
    assert clientapp_for(plain) == "fedrad.client.federation.app:app"


def test_run_refuses_secagg_settings_that_cannot_work_before_submitting(
    coordinator: Path, tmp_path: Path, monkeypatch
) -> None:
    for site in ("site_a", "site_b", "site_c"):
        _register(coordinator, tmp_path, site)
    foundation = _foundation(tmp_path)
    monkeypatch.setattr("fedrad.server.cli.preflight_run", lambda *a, **k: [])
    submitted: list[object] = []
    monkeypatch.setattr("fedrad.server.cli.run_flwr", lambda *a, **k: submitted.append(a))
    base = ["run", "--dir", str(coordinator), "--rounds", "2", "--foundation", str(foundation)]
    base += ["--run-dir", str(tmp_path / "r")]
    result = runner.invoke(app, [*base, "--secagg", "--strategy", "fedadam"])
    assert "SecAgg+ supports fedavg and fedprox" in _one_line_error(result)
    result = runner.invoke(app, [*base, "--secagg", "--sites", "2"])
    assert "SecAgg+ needs at least 3 sites" in _one_line_error(result)
    result = runner.invoke(app, [*base, "--secagg-threshold", "2"])
    assert "need secagg = true" in _one_line_error(result)
    result = runner.invoke(app, [*base, "--secagg", "--min-sites", "1"])
    assert "below the SecAgg+ reconstruction threshold" in _one_line_error(result)
    assert submitted == []
