"""The site registry: the public node key `fedrad-site init` makes is accepted and conflicts
or wrong keys are refused, each site's `flwr supernode register` command, Flower's replies to
it, and the node ids admission records."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedrad.server.certificates import PkiError
from fedrad.server.site_registry import (
    SITE_KEYS_DIR,
    SITES_FILE,
    Admission,
    add_site,
    flwr_register_command,
    list_sites,
    parse_register_reply,
    read_nodes,
    record_nodes,
    register_commands,
)
from tests.server.coordinator_support import register_sites, site_key

# -- public node keys ----------------------------------------------------------------------------


def _ssh_pub(tmp_path: Path, key: object, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(
        key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" someone@somewhere\n"
    )
    return path


def test_add_site_accepts_the_key_fedrad_site_init_makes(coordinator: Path, tmp_path: Path) -> None:
    pub = site_key(tmp_path, "hospital-a")
    when = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
    registration = add_site(coordinator, "hospital-a", pub, now=when)
    record = registration.record
    assert registration.new
    assert record.public_key == pub.read_text().strip()
    assert record.public_key.startswith("ecdsa-sha2-nistp384 ")
    assert record.curve == "P-384" and record.added == "2026-11-23T09:30:00+00:00"
    assert record.fingerprint.startswith("SHA256:")
    if shutil.which("ssh-keygen"):
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=True
        )
        assert record.fingerprint in out.stdout
    raw = tomllib.loads((coordinator / SITES_FILE).read_text())
    assert raw["sites"]["hospital-a"]["fingerprint"] == record.fingerprint
    assert list_sites(coordinator) == [record]
    copy = coordinator / SITE_KEYS_DIR / "hospital-a.pub"
    assert copy.read_text().strip() == record.public_key
    # the same site and key again: nothing changes
    again = add_site(coordinator, "hospital-a", pub)
    assert not again.new and again.record == record
    # a second site, and a P-256 key from elsewhere
    add_site(coordinator, "hospital.b_2", site_key(tmp_path, "hospital.b_2"))
    p256 = _ssh_pub(tmp_path, ec.generate_private_key(ec.SECP256R1()), "p256.pub")
    assert add_site(coordinator, "site-c", p256).record.curve == "P-256"
    assert [r.site_id for r in list_sites(coordinator)] == ["hospital-a", "hospital.b_2", "site-c"]


def test_add_site_refuses_conflicts(coordinator: Path, tmp_path: Path) -> None:
    pub_a = site_key(tmp_path, "hospital-a")
    pub_b = site_key(tmp_path, "hospital-b")
    add_site(coordinator, "hospital-a", pub_a)
    with pytest.raises(PkiError, match="already registered with another key"):
        add_site(coordinator, "hospital-a", pub_b)
    with pytest.raises(PkiError, match="already registered for site hospital-a"):
        add_site(coordinator, "hospital-z", pub_a)
    assert [r.site_id for r in list_sites(coordinator)] == ["hospital-a"]


def test_add_site_refuses_wrong_keys(coordinator: Path, tmp_path: Path) -> None:
    site_pub = site_key(tmp_path, "hospital-a")
    cases = {
        "Ed25519": _ssh_pub(tmp_path, ed25519.Ed25519PrivateKey.generate(), "ed.pub"),
        "RSA": _ssh_pub(tmp_path, rsa.generate_private_key(65537, 2048), "rsa.pub"),
        "private key": site_pub.with_suffix(""),  # keys/node_key itself
        "PEM public key": tmp_path / "hospital-a" / "keys" / "ledger_key.pub",
        "not an OpenSSH public key": tmp_path / "garbage.pub",
        "no such file": tmp_path / "missing.pub",
    }
    (tmp_path / "garbage.pub").write_text("ecdsa-sha2-nistp384 bm90IGEga2V5\n")
    for expected, path in cases.items():
        with pytest.raises(PkiError, match=expected) as info:
            add_site(coordinator, "x", path)
        assert "\n" not in str(info.value)
    with pytest.raises(PkiError, match="site id"):
        add_site(coordinator, "../etc", site_pub)
    with pytest.raises(PkiError, match="not a coordinator directory"):
        add_site(tmp_path / "nowhere", "hospital-a", site_pub)
    assert not (coordinator / SITES_FILE).exists()


# -- admission -----------------------------------------------------------------------------------


def test_flwr_register_command(coordinator: Path, tmp_path: Path) -> None:
    add_site(coordinator, "hospital-a", site_key(tmp_path, "hospital-a"))
    command = flwr_register_command(coordinator, "hospital-a")
    key = coordinator.resolve() / SITE_KEYS_DIR / "hospital-a.pub"
    assert command == [
        "flwr",
        "supernode",
        "register",
        str(key),
        "fedrad",
        "--name",
        "hospital-a",
        "--format",
        "json",
    ]


def test_register_commands_cover_the_registry_in_order(coordinator: Path, tmp_path: Path) -> None:
    register_sites(coordinator, tmp_path, "b_site", "a_site")
    commands = register_commands(coordinator, flwr="flwr")
    assert [site for site, _ in commands] == ["b_site", "a_site"]
    command = commands[0][1]
    assert command[:3] == ["flwr", "supernode", "register"]
    assert command[3] == str(coordinator.resolve() / "site_keys" / "b_site.pub")
    assert command[-4:] == ["--name", "b_site", "--format", "json"]


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


def test_nodes_file_keeps_earlier_ids(coordinator: Path) -> None:
    record_nodes(coordinator, [Admission("a", "registered", node_id=5)])
    record_nodes(
        coordinator, [Admission("a", "already registered"), Admission("b", "registered", 6)]
    )
    assert read_nodes(coordinator) == {"a": 5, "b": 6}
