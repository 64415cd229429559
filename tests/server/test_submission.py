"""A run as pure functions: the run config the ServerApp accepts, `--set` settings, the
staged release app the sites approve, `flwr` replies, and one-line preflight problems; plus
`run` and `status` refusing bad input before anything is submitted."""

from __future__ import annotations

import json
import socket
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.common.protocol.release_app import (
    RELEASE_RUN_CONFIG,
    clientapp_for,
    fab_sha256,
    release_fab,
    release_pyproject,
    release_version,
)
from fedrad.server import cli_federation
from fedrad.server.certificates import write_flwr_connection
from fedrad.server.cli import app
from fedrad.server.flwr_cli import DeployError
from fedrad.server.submission import (
    build_run_config,
    check_foundation,
    parse_nodes_reply,
    parse_runs_reply,
    parse_setting,
    parse_submit_reply,
    preflight_run,
    release_app_dir,
    stage_release_app,
    submit_command,
    write_run_config,
)
from tests.server.coordinator_support import (
    foundation_dir,
    free_port,
    one_line_error,
    register_sites,
)

runner = CliRunner()


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


# -- replies ---------------------------------------------------------------------------------


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


# -- preflight -------------------------------------------------------------------------------


def test_check_foundation(tmp_path: Path) -> None:
    assert check_foundation(tmp_path / "nope") == [f"foundation {tmp_path / 'nope'} does not exist"]
    foundation = foundation_dir(tmp_path)
    assert check_foundation(foundation) == []
    (foundation / "metadata.json").write_text("{}")
    assert "declares no trainable" in check_foundation(foundation)[0]
    (foundation / "model.safetensors").unlink()
    assert "no model.safetensors" in check_foundation(foundation)[0]


def test_preflight_run(coordinator: Path, tmp_path: Path) -> None:
    port = free_port()
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
    register_sites(coordinator, tmp_path, "site_a")
    foundation = foundation_dir(tmp_path)
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


# -- the CLI refuses before anything is submitted --------------------------------------------


def test_run_and_status_refuse_without_a_superlink(coordinator: Path, tmp_path: Path) -> None:
    write_flwr_connection(coordinator, address=f"127.0.0.1:{free_port()}")
    register_sites(coordinator, tmp_path, "site_a")
    foundation = foundation_dir(tmp_path)
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
    assert "no SuperLink answers" in one_line_error(result)
    assert not (tmp_path / "r").exists()
    result = runner.invoke(app, ["status", "--dir", str(coordinator)])
    assert "no SuperLink answers" in one_line_error(result)


def test_run_refuses_a_bad_setting_before_submitting(
    coordinator: Path, tmp_path: Path, monkeypatch
) -> None:
    register_sites(coordinator, tmp_path, "site_a")
    foundation = foundation_dir(tmp_path)
    monkeypatch.setattr(cli_federation, "preflight_run", lambda *a, **k: [])
    submitted: list[object] = []
    monkeypatch.setattr(cli_federation, "run_flwr", lambda *a, **k: submitted.append(a))
    base = ["run", "--dir", str(coordinator), "--rounds", "2", "--foundation", str(foundation)]
    base += ["--run-dir", str(tmp_path / "r")]
    result = runner.invoke(app, [*base, "--set", "bogus=1"])
    assert "unknown run config key(s): bogus" in one_line_error(result)
    # 2.0: central-clip at its declared default (1.0) counts as not given, so is no error
    result = runner.invoke(app, [*base, "--set", "central-clip=2.0"])
    assert "need central-noise" in one_line_error(result)
    result = runner.invoke(app, [*base, "--epsilon", "2", "--set", "epsilon=3"])
    assert "repeats an option" in one_line_error(result)
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
        register_sites(coordinator, tmp_path, site)
    foundation = foundation_dir(tmp_path)
    monkeypatch.setattr(cli_federation, "preflight_run", lambda *a, **k: [])
    submitted: list[object] = []
    monkeypatch.setattr(cli_federation, "run_flwr", lambda *a, **k: submitted.append(a))
    base = ["run", "--dir", str(coordinator), "--rounds", "2", "--foundation", str(foundation)]
    base += ["--run-dir", str(tmp_path / "r")]
    result = runner.invoke(app, [*base, "--secagg", "--strategy", "fedadam"])
    assert "SecAgg+ supports fedavg and fedprox" in one_line_error(result)
    result = runner.invoke(app, [*base, "--secagg", "--sites", "2"])
    assert "SecAgg+ needs at least 3 sites" in one_line_error(result)
    result = runner.invoke(app, [*base, "--secagg-threshold", "2"])
    assert "need secagg = true" in one_line_error(result)
    result = runner.invoke(app, [*base, "--secagg", "--min-sites", "1"])
    assert "below the SecAgg+ reconstruction threshold" in one_line_error(result)
    assert submitted == []
