"""A site joining a federation, as pure functions: preflight problems (one line each), the
`flower-supernode` command line and environment, and what Flower's refusals mean; plus
`fedrad-site start` refusing bad input with one line before anything starts."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app
from fedrad.client.federation.site_agent import SiteSpec
from fedrad.client.site.config import SiteConfig, add_approved_app, init_site, load_site_config
from fedrad.client.site.supernode import (
    RUNNER_SECRET,
    SupernodeError,
    is_ca_certificate,
    new_runner_secret,
    node_config_arg,
    refusal_reason,
    runner_command,
    site_node_config,
    site_preflight,
    supernode_command,
    supernode_environment,
)
from fedrad.common.flower_process import FLOWER_ENV
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key
from fedrad.common.protocol.release_app import fab_sha256
from fedrad.server.certificates import init_federation

APPROVED = fab_sha256(b"the app bundle this site approved")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fed") / "coord"
    init_federation(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _foundation(tmp_path: Path) -> Path:
    directory = tmp_path / "foundation"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(b"x")
    return directory


def _site(tmp_path: Path, federation: Path, **over: object) -> SiteConfig:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        site_id="st_anna",
        data_dir=data,
        epsilon=2.0,
        coordinator="127.0.0.1:9092",
        ca_file=federation / "ca.pem",
        foundation_dir=_foundation(tmp_path),
        approved_apps=(APPROVED,),
    )
    settings.update(over)
    return init_site(tmp_path / "site", **settings)  # type: ignore[arg-type]


def test_a_fresh_site_passes_preflight(tmp_path: Path, federation: Path) -> None:
    config = _site(tmp_path, federation)
    assert site_preflight(config, port=_free_port()) == []


def test_a_site_that_approved_no_app_is_refused_until_it_approves_one(
    tmp_path: Path, federation: Path
) -> None:
    config = _site(tmp_path, federation, approved_apps=())
    assert config.policy.approved_apps == ()
    problems = site_preflight(config, port=_free_port())
    assert problems == [
        "this site has approved no app bundle, so it would refuse every run: "
        "fedrad-site approve --release (this fedrad's own) or fedrad-site approve FAB"
    ]
    config_path = tmp_path / "site" / "site.toml"
    assert add_approved_app(config_path, APPROVED) is True
    approved = load_site_config(config_path)
    assert approved.policy.approved_apps == (APPROVED,)
    assert site_preflight(approved, port=_free_port()) == []


def test_each_preflight_problem_is_one_line(tmp_path: Path, federation: Path) -> None:
    config = _site(tmp_path, federation, coordinator=None, ca_file=None, foundation_dir=None)
    config.data_dir.rmdir()
    config.node_key.chmod(0o644)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        problems = site_preflight(config, port=busy.getsockname()[1])
    assert len(problems) == 6, problems
    expected = (
        "data directory",
        "no coordinator address",
        "no ca_file",
        "readable by others",
        "no foundation checkpoint",
        "is in use",
    )
    for problem, words in zip(problems, expected, strict=True):
        assert words in problem and "\n" not in problem


def test_ca_file_must_be_a_ca(tmp_path: Path, federation: Path) -> None:
    assert is_ca_certificate(federation / "ca.pem") is None
    assert "not a CA certificate" in str(is_ca_certificate(federation / "superlink.pem"))
    assert "does not exist" in str(is_ca_certificate(tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("junk")
    assert "not a PEM certificate" in str(is_ca_certificate(tmp_path / "junk.pem"))
    config = _site(tmp_path, federation, ca_file=federation / "superlink.pem")
    assert site_preflight(config, port=_free_port()) == [
        f"ca_file {federation / 'superlink.pem'} is not a CA certificate (the federation's "
        "ca.pem is)"
    ]


def test_an_exhausted_budget_stops_the_site_before_it_joins(
    tmp_path: Path, federation: Path
) -> None:
    config = _site(tmp_path, federation)
    ledger = Ledger(config.ledger, load_or_create_signing_key(config.ledger_key))
    ledger.append(
        site_id=config.site_id,
        run_id="earlier",
        round=1,
        sample_rate=0.5,
        noise_multiplier=0.3,
        steps=200,
        max_grad_norm=1.0,
        delta=config.delta,
        accountant="rdp",
    )
    problems = site_preflight(config, port=_free_port())
    assert len(problems) == 1 and problems[0].startswith("privacy budget exhausted: epsilon")


def test_supernode_command_and_node_config(tmp_path: Path, federation: Path) -> None:
    config = _site(tmp_path, federation)
    config_path = tmp_path / "site" / "site.toml"
    foundation = tmp_path / "foundation"
    secret = tmp_path / "site" / "keys" / "runner.secret"
    command = supernode_command(
        config,
        config_path=config_path,
        foundation=foundation,
        secret_file=secret,
        port=9400,
        executable="fsn",
    )
    assert command[0] == "fsn"
    value = dict(zip(command[1::2], command[2::2], strict=True))
    assert value["--superlink"] == "127.0.0.1:9092"
    assert value["--root-certificates"] == str(federation.resolve() / "ca.pem")
    assert value["--auth-supernode-private-key"] == str(config.node_key)
    assert value["--host"] == "127.0.0.1" and value["--port"] == "9400"
    assert "--insecure" not in command
    # Flower starts no ClientApp runner of its own: the site's runner claims each task
    assert value["--isolation"] == "process"
    assert value["--superexec-auth-secret-file"] == str(secret)
    assert command.count("--isolation") == 1
    assert value["--node-config"] == (
        f"site-config='{config_path.resolve()}' foundation-dir='{foundation.resolve()}'"
    )
    with pytest.raises(SupernodeError, match="coordinator and ca_file"):
        supernode_command(
            _site(tmp_path / "b", federation, ca_file=None),
            config_path=config_path,
            foundation=foundation,
            secret_file=secret,
            executable="fsn",
        )


def test_node_config_is_what_flower_parses_and_the_client_app_reads(
    tmp_path: Path, federation: Path
) -> None:
    from flwr.common.config import parse_config_args

    _site(tmp_path, federation)
    config_path = tmp_path / "site" / "site.toml"
    values = site_node_config(config_path, tmp_path / "foundation")
    parsed = parse_config_args([node_config_arg(values)])
    assert parsed == values
    spec = SiteSpec.from_node_config(parsed)
    assert spec.site_id == "st_anna"
    assert spec.foundation_dir == (tmp_path / "foundation").resolve()
    assert spec.epsilon == 2.0 and spec.data_dir == tmp_path / "data"
    assert node_config_arg({"a": 1, "b": 0.5, "c": True}) == "a=1 b=0.5 c=true"
    with pytest.raises(SupernodeError):
        node_config_arg({"site-config": "/tmp/o'brien/site.toml"})
    with pytest.raises(SupernodeError):
        node_config_arg({"bad key": "x"})


def test_new_runner_secret_is_0600_and_new_at_every_start(tmp_path: Path, federation: Path) -> None:
    _site(tmp_path, federation)
    config_path = tmp_path / "site" / "site.toml"
    first = new_runner_secret(config_path)
    assert first == (tmp_path / "site").resolve() / RUNNER_SECRET
    assert first == (tmp_path / "site" / "keys" / "runner.secret").resolve()
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    value = first.read_bytes()
    assert len(value) >= 32
    first.chmod(0o644)  # a secret left readable by an earlier start is replaced, not reused
    second = new_runner_secret(config_path)
    assert second == first
    assert second.read_bytes() != value
    assert stat.S_IMODE(second.stat().st_mode) == 0o600


def test_new_runner_secret_makes_the_keys_folder(tmp_path: Path) -> None:
    path = new_runner_secret(tmp_path / "elsewhere" / "site.toml")
    assert path == (tmp_path / "elsewhere" / "keys" / "runner.secret").resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_runner_command(tmp_path: Path) -> None:
    config_path = tmp_path / "site" / "site.toml"
    secret = tmp_path / "site" / "keys" / "runner.secret"
    command = runner_command(config_path, secret_file=secret, port=9400)
    assert command == [
        sys.executable,
        "-m",
        "fedrad.client.site.app_runner",
        "--config",
        str(config_path.resolve()),
        "--runtime-api-address",
        "127.0.0.1:9400",
        "--secret-file",
        str(secret),
    ]
    assert runner_command(config_path, secret_file=secret)[6] == "127.0.0.1:9094"


def test_supernode_environment(tmp_path: Path) -> None:
    env = supernode_environment(
        tmp_path / "site" / "site.toml", {"PATH": "/usr/bin"}, bin_dir=tmp_path / "bin"
    )
    for key, value in FLOWER_ENV.items():
        assert env[key] == value
    assert env["FLWR_HOME"] == str((tmp_path / "site" / "flwr").resolve())
    assert env["PATH"].split(os.pathsep) == [str(tmp_path / "bin"), "/usr/bin"]


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ("ERROR : Exit Code: 305\n[code: 2004] Failed to activate SuperNode.", "not registered"),
        (
            "SSL/TLS handshake error detected.\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate",
            "not signed by this site's ca_file",
        ),
        ("Failed to initialize the connection to the SuperLink.", "could not connect"),
        ("something else", None),
    ],
)
def test_refusal_reason(output: str, words: str | None) -> None:
    reason = refusal_reason(output)
    assert (reason is None) if words is None else (words in str(reason))


def test_start_refuses_with_one_line(tmp_path: Path, federation: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["start", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no site config at {(tmp_path / 'none.toml').resolve()} (create one with "
        "fedrad-site init)"
    ]
    _site(tmp_path, federation, coordinator=None)
    result = runner.invoke(app, ["start", "--config", str(tmp_path / "site" / "site.toml")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no coordinator address" in lines[0]


def test_a_read_only_data_directory_needs_a_cache_dir(
    tmp_path: Path, federation: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACS export mounted read-only: preflight says so and how to fix it, before joining."""
    config = _site(tmp_path, federation)
    writable = tmp_path / "cache-home"
    writable.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == config.data_dir else real_access(p, mode)
    )
    problems = site_preflight(config, port=_free_port())
    assert problems == [
        f"cannot write the prepared-data cache at {config.data_dir / '.fedrad-cache'} "
        f"({config.data_dir} is read-only); set cache_dir in site.toml to a writable place"
    ]
    moved = dataclasses.replace(config, cache_dir=writable / "prepared")
    assert site_preflight(moved, port=_free_port()) == []
    # an existing cache (prepared elsewhere, perhaps read-only itself) is not judged
    (config.data_dir / ".fedrad-cache").mkdir()
    assert site_preflight(config, port=_free_port()) == []
