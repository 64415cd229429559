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

from fedrad.client.site.config import init_site
from fedrad.server.cli import app
from fedrad.server.site_registry import list_sites

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


@pytest.mark.parametrize("site_id", ["site_9\n", "site_9 ", "\nsite_9"])
def test_add_site_refuses_an_id_with_whitespace_around_it(
    coordinator: Path, tmp_path: Path, site_id: str
) -> None:
    """The id is the whole of the text (`$` took "site_9\\n"), and nothing is registered."""
    pub = _site_key(tmp_path, "site_9")
    result = _run("add-site", "--dir", str(coordinator), "--site-id", site_id, str(pub))
    assert result.exit_code != 0
    assert "site id" in _one_line_error(result)
    assert list_sites(coordinator) == []


def test_help_lists_the_commands() -> None:
    result = _run("--help")
    assert result.exit_code == 0
    for name in ("init", "add-site", "check-cert", "renew-cert", "start", "run", "status"):
        assert name in result.stdout


# -- the CA key: encrypted with a passphrase, or kept off this host -----------------------------


@pytest.fixture
def encrypted(tmp_path: Path) -> Path:
    directory = tmp_path / "coord"
    secret = tmp_path / "ca.pass"
    secret.write_text("correct horse\n")
    result = _run(
        "init", str(directory), "--host", "coord.example.org", "--ca-passphrase-file", str(secret)
    )
    assert result.exit_code == 0, result.output
    return directory


def test_init_encrypts_the_ca_key_from_a_file_the_environment_or_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "ca.pass"
    secret.write_text("correct horse\n")
    by_file = _run(
        "init", str(tmp_path / "a"), "--encrypt-ca-key", "--ca-passphrase-file", str(secret),
        "--json",
    )  # fmt: skip
    assert by_file.exit_code == 0, by_file.output
    assert json.loads(by_file.stdout)["ca_key_encrypted"] is True
    key = (tmp_path / "a" / "ca.key").read_bytes()
    assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key, password=None)
    serialization.load_pem_private_key(key, password=b"correct horse")
    by_env = _run(
        "init", str(tmp_path / "b"), "--encrypt-ca-key", "--json",
        env={"FEDRAD_CA_PASSPHRASE": "from env"},
    )  # fmt: skip
    assert json.loads(by_env.stdout)["ca_key_encrypted"] is True
    serialization.load_pem_private_key(
        (tmp_path / "b" / "ca.key").read_bytes(), password=b"from env"
    )
    monkeypatch.setattr("fedrad.server.cli_setup._can_prompt", lambda: True)
    asked = runner.invoke(app, ["init", str(tmp_path / "c"), "--encrypt-ca-key"], input="pw\npw\n")
    assert asked.exit_code == 0, asked.output
    assert "CA key (0600): " in asked.stdout and "encrypted with your passphrase" in asked.stdout
    serialization.load_pem_private_key((tmp_path / "c" / "ca.key").read_bytes(), password=b"pw")
    plain = _run("init", str(tmp_path / "d"), "--json")
    assert json.loads(plain.stdout)["ca_key_encrypted"] is False


def test_init_without_a_passphrase_source_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    no_tty = _run("init", str(tmp_path / "a"), "--encrypt-ca-key")
    assert "no terminal to ask on" in _one_line_error(no_tty)
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    for args, env, message in [
        (["--ca-passphrase-file", str(empty)], None, "empty passphrase"),
        (["--ca-passphrase-file", str(tmp_path / "none")], None, "does not exist"),
        (["--encrypt-ca-key"], {"FEDRAD_CA_PASSPHRASE": ""}, "empty passphrase is refused"),
    ]:
        result = _run("init", str(tmp_path / "a"), *args, env=env)
        assert message in _one_line_error(result)
    assert not (tmp_path / "a").exists()


def test_init_says_the_ca_key_belongs_off_the_superlink_host(tmp_path: Path) -> None:
    result = _run("init", str(tmp_path / "coord"), "--host", "coord.example.org")
    assert result.exit_code == 0, result.output
    assert f"CA key (0600): {tmp_path / 'coord' / 'ca.key'}, NOT encrypted" in result.stdout
    assert "off the SuperLink host" in result.stdout and "only renew-cert needs it" in result.stdout


def test_renew_cert_with_an_encrypted_ca_key(encrypted: Path, tmp_path: Path) -> None:
    old = (encrypted / "superlink.pem").read_bytes()
    missing = _run("renew-cert", "--dir", str(encrypted))
    assert _one_line_error(missing) == (
        f"error: the CA key {encrypted / 'ca.key'} is encrypted: give its passphrase "
        "(--ca-passphrase-file FILE or FEDRAD_CA_PASSPHRASE)"
    )
    wrong = _run("renew-cert", "--dir", str(encrypted), env={"FEDRAD_CA_PASSPHRASE": "nope"})
    assert _one_line_error(wrong) == f"error: wrong passphrase for the CA key {encrypted}/ca.key"
    assert (encrypted / "superlink.pem").read_bytes() == old
    by_file = _run(
        "renew-cert", "--dir", str(encrypted), "--host", "new.example.org",
        "--ca-passphrase-file", str(tmp_path / "ca.pass"),
    )  # fmt: skip
    assert by_file.exit_code == 0, by_file.output
    assert _run("check-cert", "--dir", str(encrypted), "--host", "new.example.org").exit_code == 0
    renewed = (encrypted / "superlink.pem").read_bytes()
    by_env = _run(
        "renew-cert", "--dir", str(encrypted), "--host", "env.example.org", "--json",
        env={"FEDRAD_CA_PASSPHRASE": "correct horse"},
    )  # fmt: skip
    assert by_env.exit_code == 0, by_env.output
    assert "env.example.org" in json.loads(by_env.stdout)["server_hosts"]
    assert (encrypted / "superlink.pem").read_bytes() != renewed


def test_renew_cert_refuses_a_passphrase_for_an_unencrypted_key(coordinator: Path) -> None:
    old = (coordinator / "superlink.pem").read_bytes()
    result = _run("renew-cert", "--dir", str(coordinator), env={"FEDRAD_CA_PASSPHRASE": "pw"})
    assert "ca.key is not encrypted" in _one_line_error(result)
    assert (coordinator / "superlink.pem").read_bytes() == old


def test_renew_cert_without_the_ca_key_on_this_host(coordinator: Path, tmp_path: Path) -> None:
    (coordinator / "ca.key").rename(tmp_path / "offline-ca.key")
    result = _run("renew-cert", "--dir", str(coordinator))
    assert _one_line_error(result) == (
        f"error: the CA key {coordinator / 'ca.key'} is not on this host: "
        "run renew-cert where the CA key is kept"
    )


@pytest.mark.parametrize("kept", ["encrypted", "elsewhere"])
def test_check_cert_and_add_site_need_no_ca_key(encrypted: Path, tmp_path: Path, kept: str) -> None:
    if kept == "elsewhere":
        (encrypted / "ca.key").rename(tmp_path / "offline-ca.key")
    checked = _run("check-cert", "--dir", str(encrypted), "--host", "coord.example.org", "--json")
    assert checked.exit_code == 0, checked.output
    keys = json.loads(checked.stdout)["private_keys"]
    assert (str(encrypted / "ca.key") in keys) is (kept == "encrypted")
    pub = _site_key(tmp_path, "hospital-a")
    added = _run("add-site", "--dir", str(encrypted), "--site-id", "hospital-a", str(pub))
    assert added.exit_code == 0, added.output
