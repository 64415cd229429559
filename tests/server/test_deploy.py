"""The coordinator's deployment commands as pure functions: Flower 1.41 command lines and
environments, the replies they parse, run configs, and one-line preflight problems; plus the
`start`, `run` and `status` CLIs refusing bad input before anything starts."""

from __future__ import annotations

import json
import os
import socket
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.site_config import init_site
from fedrad.common.flower_process import FLOWER_ENV
from fedrad.server import deploy
from fedrad.server.cli import app
from fedrad.server.deploy import (
    SECURE_CLIENTAPP,
    Admission,
    DeployError,
    SuperLinkState,
    app_components,
    app_pyproject,
    build_run_config,
    check_foundation,
    connect_host,
    flower_environment,
    parse_nodes_reply,
    parse_register_reply,
    parse_runs_reply,
    parse_setting,
    parse_submit_reply,
    preflight_run,
    preflight_start,
    read_nodes,
    record_nodes,
    register_commands,
    stage_app,
    superlink_command,
    write_state,
)
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


def _foundation(tmp_path: Path, trainable: object = ("lm.lora_A",)) -> Path:
    directory = tmp_path / "foundation"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"x")
    meta = {"trainable": list(trainable)} if isinstance(trainable, tuple) else {}
    (directory / "metadata.json").write_text(json.dumps(meta))
    return directory


# -- command lines and environments ----------------------------------------------------------


def test_superlink_command_has_tls_node_auth_and_a_database(coordinator: Path) -> None:
    command = superlink_command(coordinator, host="0.0.0.0", port=9100, executable="fsl")
    root = coordinator.resolve()
    assert command[0] == "fsl"
    pairs = dict(zip(command[1::2], command[2::2], strict=False))
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
    ]
    index = command.index("--database")
    assert command[index + 1] == str(root / "superlink.db")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(root / "ca.pem")
    assert command[command.index("--ssl-keyfile") + 1] == str(root / "superlink.key")
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "9100"
    assert pairs  # every value is a plain string
    with pytest.raises(DeployError, match="port"):
        superlink_command(coordinator, port=70000, executable="fsl")


def test_flower_environment(coordinator: Path, tmp_path: Path) -> None:
    env = flower_environment(coordinator, {"PATH": "/usr/bin", "KEEP": "1"}, bin_dir=tmp_path)
    for key, value in FLOWER_ENV.items():
        assert env[key] == value
    assert env["FLWR_HOME"] == str(coordinator.resolve() / "flwr")
    assert env["PATH"].split(os.pathsep) == [str(tmp_path), "/usr/bin"]
    assert env["KEEP"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


@pytest.mark.parametrize(
    ("bind", "covered", "expected"),
    [
        ("0.0.0.0", ["localhost", "coord.org", "127.0.0.1"], "127.0.0.1"),
        ("127.0.0.1", ["localhost", "coord.org"], "localhost"),
        ("0.0.0.0", ["coord.org"], "coord.org"),
        ("10.0.0.5", ["coord.org", "10.0.0.5"], "10.0.0.5"),
    ],
)
def test_connect_host(bind: str, covered: list[str], expected: str) -> None:
    assert connect_host(bind, covered) == expected


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


def test_staged_app_is_a_valid_flower_app_with_the_run_config(
    coordinator: Path, tmp_path: Path
) -> None:
    from flwr.cli.build import build_fab_from_files
    from flwr.common.config import validate_config

    config = build_run_config(
        run_dir=tmp_path / "r7",
        foundation=tmp_path / "foundation",
        rounds=2,
        num_sites=3,
        options={"round-timeout": 300.0, "dp": True},
    )
    app_dir = stage_app(coordinator, config)
    assert app_dir == coordinator.resolve() / "apps" / "r7"
    text = (app_dir / "pyproject.toml").read_text()
    document = tomllib.loads(text)
    assert document["tool"]["flwr"]["app"]["config"] == config
    assert document["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedrad.server.app:app",
        "clientapp": "fedrad.client.app:app",
    }
    valid, errors, _ = validate_config(document, check_module=True, project_dir=app_dir)
    assert valid, errors
    fab, _ = build_fab_from_files({"pyproject.toml": text.encode()})
    assert len(fab) < 10_000  # no source travels: the sites run their installed fedrad
    assert tomllib.loads(app_pyproject(config, version="9.9"))["project"]["version"] == "9.9"


# -- preflight -------------------------------------------------------------------------------


def test_preflight_start_ok_then_each_problem(coordinator: Path, tmp_path: Path) -> None:
    port = _free_port()
    problems = preflight_start(coordinator, host="127.0.0.1", port=port)
    assert len(problems) == 1 and problems[0].startswith("no registered sites")
    _register(coordinator, tmp_path, "site_a")
    assert preflight_start(coordinator, host="127.0.0.1", port=port) == []
    assert preflight_start(coordinator, host="0.0.0.0", port=port) == []

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=taken)
    assert problems == [f"port {taken} on 127.0.0.1 is already in use"]

    problems = preflight_start(coordinator, host="10.9.9.9", port=port)
    assert any("does not cover host 10.9.9.9" in p for p in problems)

    (coordinator / "superlink.key").chmod(0o644)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port)
    assert any("readable by others" in p for p in problems)
    (coordinator / "superlink.key").chmod(0o600)

    write_state(
        coordinator,
        SuperLinkState(os.getpid(), "127.0.0.1", port, f"127.0.0.1:{port}", "db", "log"),
    )
    problems = preflight_start(coordinator, host="127.0.0.1", port=port)
    assert problems == [
        f"a SuperLink started from {coordinator} is already running (pid {os.getpid()}, "
        f"127.0.0.1:{port})"
    ]
    for problem in problems:
        assert "\n" not in problem


def test_preflight_start_not_a_coordinator(tmp_path: Path) -> None:
    problems = preflight_start(tmp_path, host="127.0.0.1", port=_free_port())
    assert len(problems) == 1 and "not a coordinator directory" in problems[0]


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


# -- the CLI refuses before anything starts --------------------------------------------------


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_start_refuses_without_sites(coordinator: Path, monkeypatch) -> None:
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
    result = runner.invoke(app, [*base, "--set", "central-clip=1.0"])
    assert "need central-noise" in _one_line_error(result)
    result = runner.invoke(app, [*base, "--epsilon", "2", "--set", "epsilon=3"])
    assert "repeats an option" in _one_line_error(result)
    assert submitted == []


def test_a_secagg_run_stages_the_secagg_clientapp(coordinator: Path, tmp_path: Path) -> None:
    from flwr.common.config import validate_config

    from fedrad.server.rounds import ServerPlan

    options = {"secagg": True, "secagg-threshold": 2, "min-sites": 2}
    config = build_run_config(
        run_dir=tmp_path / "s1", foundation=tmp_path / "f", rounds=2, num_sites=3, options=options
    )
    plan = ServerPlan.from_run_config(config)
    assert plan.secagg and plan.shares_threshold == 2 and plan.required_sites == 2
    app_dir = stage_app(coordinator, config)
    document = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert document["tool"]["flwr"]["app"]["components"]["clientapp"] == SECURE_CLIENTAPP
    valid, errors, _ = validate_config(document, check_module=True, project_dir=app_dir)
    assert valid, errors
    plain = build_run_config(run_dir=tmp_path / "p", foundation=tmp_path, rounds=1, num_sites=3)
    assert app_components(plain)["clientapp"] == "fedrad.client.app:app"


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
