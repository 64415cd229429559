"""`fedrad-coordinator` init, check-cert, renew-cert and add-site through typer's runner: JSON
contract, exit codes, one-line errors, nothing written on bad input."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from fedrad.client.site_config import init_site
from fedrad.server.cli import app

runner = CliRunner()


def _run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    directory = tmp_path / "coord"
    result = _run("init", str(directory), "--host", "coord.example.org", "--json")
    assert result.exit_code == 0, result.output
    return directory


def _site_key(tmp_path: Path, site_id: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    config = init_site(tmp_path / site_id, site_id=site_id, data_dir=tmp_path / "data")
    return config.node_key.with_suffix(".pub")


def test_init_json_contract_and_key_modes(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    result = _run(
        "init", str(directory), "--host", "coord.example.org", "--host", "10.0.0.5", "--json"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ca_certificate"] == str(directory / "ca.pem")
    assert out["server_hosts"] == ["localhost", "coord.example.org", "127.0.0.1", "10.0.0.5"]
    assert len(out["ca_fingerprint"].split(":")) == 32
    for key in out["private_keys"]:
        assert stat.S_IMODE(Path(key).stat().st_mode) == 0o600
    assert result.stderr == ""  # covers a host beyond this machine: no warning


def test_init_names_the_file_to_hand_to_sites_and_refuses_a_second_time(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    result = _run("init", str(directory), "--days", "30")
    assert result.exit_code == 0, result.output
    assert f"hand {directory / 'ca.pem'} to every site" in result.stdout
    assert "covers this machine only" in result.stderr
    ca = (directory / "ca.key").read_bytes()
    again = _run("init", str(directory), "--host", "coord.example.org")
    assert "already holds a federation CA" in _one_line_error(again)
    assert (directory / "ca.key").read_bytes() == ca


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "bind-all address"),
        (["--host", "coord.example.org:8000"], "without a port"),
        (["--host", "https://coord.example.org"], "not a URL"),
        (["--host", "bad host"], "not a valid host name"),
        (["--days", "400", "--ca-days", "365"], "outlive the CA"),
        (["--no-loopback"], "at least one host"),
    ],
)
def test_init_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = _run("init", str(tmp_path / "coord"), *args)
    assert message in _one_line_error(result)
    assert not (tmp_path / "coord").exists()


def test_init_rejects_unknown_key_type(tmp_path: Path) -> None:
    result = _run("init", str(tmp_path / "coord"), "--key-type", "dsa")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_check_cert(coordinator: Path) -> None:
    ok = _run("check-cert", "--dir", str(coordinator), "--host", "coord.example.org:8000")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("ok: ")
    bad = _run("check-cert", "--dir", str(coordinator), "--host", "10.9.9.9", "--json")
    assert bad.exit_code == 1
    out = json.loads(bad.stdout)
    assert out["ok"] is False
    assert out["problems"] == [
        "does not cover host 10.9.9.9 (covers localhost, coord.example.org, 127.0.0.1)"
    ]
    assert bad.stderr.startswith("problem: does not cover host 10.9.9.9")
    missing = _run("check-cert", "--dir", str(coordinator.parent / "nope"))
    assert "not a coordinator directory" in _one_line_error(missing)


def test_renew_cert_then_check(coordinator: Path) -> None:
    ca = (coordinator / "ca.pem").read_bytes()
    result = _run("renew-cert", "--dir", str(coordinator), "--host", "new.example.org", "--json")
    assert result.exit_code == 0, result.output
    assert "new.example.org" in json.loads(result.stdout)["server_hosts"]
    assert (coordinator / "ca.pem").read_bytes() == ca
    assert _run("check-cert", "--dir", str(coordinator), "--host", "new.example.org").exit_code == 0
    old = _run("check-cert", "--dir", str(coordinator), "--host", "coord.example.org")
    assert old.exit_code == 1
    nowhere = _run("renew-cert", "--dir", str(coordinator.parent / "nope"))
    assert "does not exist" in _one_line_error(nowhere)


def test_add_site_registers_the_site_key(coordinator: Path, tmp_path: Path) -> None:
    pub = _site_key(tmp_path, "hospital-a")
    result = _run(
        "add-site", "--dir", str(coordinator), "--site-id", "hospital-a", str(pub), "--json"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["site_id"] == "hospital-a" and out["new"] is True
    assert out["public_key"] == pub.read_text().strip()
    assert out["registry"] == str(coordinator / "sites.toml")
    assert out["register_command"][:3] == ["flwr", "supernode", "register"]
    assert out["register_environment"]["FLWR_HOME"].endswith("flwr")
    # again, human output, directory from the environment: already there, still exit 0
    again = _run(
        "add-site",
        "--site-id",
        "hospital-a",
        str(pub),
        env={"FEDRAD_COORDINATOR_DIR": str(coordinator)},
    )
    assert again.exit_code == 0, again.output
    assert "already registered with this key" in again.stdout
    assert "flwr supernode register" in again.stdout and "FLWR_HOME=" in again.stdout


def test_add_site_refusals_are_one_line(coordinator: Path, tmp_path: Path) -> None:
    pub_a = _site_key(tmp_path, "hospital-a")
    pub_b = _site_key(tmp_path, "hospital-b")
    assert _run("add-site", "--dir", str(coordinator), "--site-id", "a", str(pub_a)).exit_code == 0
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    cases = [
        ("b", pub_b.with_suffix(""), "is a private key"),
        ("b", ed, "is an Ed25519 key"),
        ("b", pub_a, "already registered for site a"),
        ("a", pub_b, "already registered with another key"),
        ("b", tmp_path / "missing.pub", "no such file"),
        ("b/../../x", pub_b, "site id"),
    ]
    for site_id, path, message in cases:
        result = _run("add-site", "--dir", str(coordinator), "--site-id", site_id, str(path))
        assert message in _one_line_error(result), (site_id, path)
    elsewhere = _run("add-site", "--dir", str(tmp_path), "--site-id", "b", str(pub_b))
    assert "not a coordinator directory" in _one_line_error(elsewhere)
    no_id = _run("add-site", "--dir", str(coordinator), str(pub_b))
    assert no_id.exit_code == 2 and "--site-id" in no_id.output


def test_help_lists_the_commands() -> None:
    result = _run("--help")
    assert result.exit_code == 0
    for name in ("init", "add-site", "check-cert", "renew-cert", "start", "run", "status"):
        assert name in result.stdout
