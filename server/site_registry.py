"""The coordinator's registry of sites: each site's public node key (`sites.toml`, and a copy
in `site_keys/` for Flower's CLI), its admission to the running SuperLink, and the node id
Flower gave it (`nodes.json`). The ServerApp reads that file as `participation.SiteRegistry`:
in a deployment the registry, never a reply, says which site a reply is from."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import tomli_w
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedrad.common.atomic_file import replace_file
from fedrad.common.flower_process import flower_executable
from fedrad.common.protocol.messages import SITE_ID_PATTERN
from fedrad.server.certificates import CA_CERT, FLWR_CONNECTION, PkiError
from fedrad.server.flwr_cli import DeployError, flwr_error, parse_json_reply, run_flwr

logger = logging.getLogger(__name__)

SITES_FILE: Final[str] = "sites.toml"
SITE_KEYS_DIR: Final[str] = "site_keys"
NODES_FILE: Final[str] = "nodes.json"  # site id -> node id as the SuperLink assigned it
NODE_KEY_CURVES: Final[dict[str, str]] = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}
_MAX_PUBKEY_BYTES: Final[int] = 16_384


# -- public node keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRecord:
    site_id: str
    public_key: str  # "ecdsa-sha2-nistp384 AAAA..." (OpenSSH, comment dropped)
    fingerprint: str  # "SHA256:..." as `ssh-keygen -l` prints it
    curve: str  # P-256, P-384 or P-521
    added: str  # ISO 8601, UTC

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Registration:
    record: SiteRecord
    new: bool  # False: this site was already registered with this very key


def ssh_fingerprint(openssh_line: str) -> str:
    blob = base64.b64decode(openssh_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_site_public_key(path: Path) -> tuple[str, str]:
    """(OpenSSH line, curve name) of a site's node key, checked the way `flwr supernode
    register` checks it (ECDSA on a NIST curve); a private key file is refused unread-further."""
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size > _MAX_PUBKEY_BYTES:
        raise PkiError(f"{path} is too large to be an OpenSSH public key")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise PkiError(
            f"{path} is a private key: send only the public half (keys/node_key.pub); "
            "a private key never leaves its site"
        )
    if b"BEGIN PUBLIC KEY" in data:
        raise PkiError(
            f"{path} is a PEM public key (the ledger key?): Flower needs the site's OpenSSH "
            "node key, keys/node_key.pub"
        )
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(
            f"{path} is not an OpenSSH public key (expected one line 'ecdsa-sha2-nistp384 AAAA...')"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else type(key).__name__
        kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else kind.removesuffix("PublicKey")
        raise PkiError(
            f"{path} is an {kind} key: Flower node authentication needs ECDSA on a NIST curve "
            "(P-256, P-384, P-521), the site's keys/node_key.pub"
        )
    if key.curve.name not in NODE_KEY_CURVES:
        raise PkiError(f"{path}: curve {key.curve.name} is not P-256, P-384 or P-521")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode("ascii"), NODE_KEY_CURVES[key.curve.name]


def list_sites(directory: Path) -> list[SiteRecord]:
    path = Path(directory) / SITES_FILE
    if not path.exists():
        return []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return [SiteRecord(site_id=sid, **fields) for sid, fields in raw.get("sites", {}).items()]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError) as exc:
        raise PkiError(f"{path} is not a readable site registry ({exc!s:.80})") from exc


def add_site(
    directory: Path, site_id: str, pubkey_path: Path, *, now: datetime | None = None
) -> Registration:
    """Registers a site's public node key in `sites.toml` and copies it to `site_keys/`. The same
    id with the same key is a no-op; a new key for a known id, or a known key under a second id,
    is refused (re-keying a site is a deliberate removal first)."""
    directory = Path(directory)
    if not (directory / CA_CERT).is_file():
        raise PkiError(
            f"{directory} is not a coordinator directory (no {CA_CERT}; run fedrad-coordinator "
            "init first)"
        )
    if not SITE_ID_PATTERN.fullmatch(site_id):
        raise PkiError(f"site id {site_id[:70]!r}: use letters, digits, '_', '.', '-' (max 64)")
    line, curve = read_site_public_key(pubkey_path)
    fingerprint = ssh_fingerprint(line)
    sites = {record.site_id: record for record in list_sites(directory)}
    known = sites.get(site_id)
    if known is not None:
        if known.fingerprint == fingerprint:
            return Registration(record=known, new=False)
        raise PkiError(
            f"site {site_id} is already registered with another key ({known.fingerprint})"
        )
    for other in sites.values():
        if other.fingerprint == fingerprint:
            raise PkiError(f"this key is already registered for site {other.site_id}")
    record = SiteRecord(
        site_id=site_id,
        public_key=line,
        fingerprint=fingerprint,
        curve=curve,
        added=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
    )
    sites[site_id] = record
    keys = directory / SITE_KEYS_DIR
    keys.mkdir(exist_ok=True)
    replace_file(keys / f"{site_id}.pub", (line + "\n").encode("ascii"), mode=0o644)
    table = {
        sid: {k: v for k, v in r.as_dict().items() if k != "site_id"} for sid, r in sites.items()
    }
    replace_file(
        directory / SITES_FILE,
        (
            "# fedrad site registry: public node keys only (written by fedrad-coordinator).\n"
            + tomli_w.dumps({"sites": table})
        ).encode("utf-8"),
        mode=0o644,
    )
    return Registration(record=record, new=True)


# -- admission to the running SuperLink -----------------------------------------------------------

AdmissionStatus = Literal["registered", "already registered", "failed"]


@dataclass(frozen=True)
class Admission:
    site_id: str
    status: AdmissionStatus
    node_id: int | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def flwr_register_command(directory: Path, site_id: str, *, flwr: str = "flwr") -> list[str]:
    """The Flower 1.41 command that admits a registered site's key to the running SuperLink
    (Control API RegisterNode), with FLWR_HOME=`flwr_home(directory)` (`run_flwr`)."""
    key = Path(directory).resolve() / SITE_KEYS_DIR / f"{site_id}.pub"
    return [
        flwr,
        "supernode",
        "register",
        str(key),
        FLWR_CONNECTION,
        "--name",
        site_id,
        "--format",
        "json",
    ]


def register_commands(directory: Path, *, flwr: str) -> list[tuple[str, list[str]]]:
    """(site id, command) for every site in the registry, in registry order."""
    return [
        (record.site_id, flwr_register_command(directory, record.site_id, flwr=flwr))
        for record in list_sites(directory)
    ]


def parse_register_reply(site_id: str, stdout: str) -> Admission:
    """`flwr supernode register --format json` -> Admission. The key comes from our own
    registry, so "already in use" means this very key is admitted (e.g. a restarted SuperLink
    with its database)."""
    try:
        reply = parse_json_reply(stdout)
    except DeployError as exc:
        return Admission(site_id, "failed", message=str(exc))
    if reply.get("success") is True:
        node = reply.get("node-id")
        return Admission(site_id, "registered", node_id=None if node is None else int(node))
    message = flwr_error(reply)
    if "already in use" in message.lower():
        return Admission(site_id, "already registered", message=message)
    return Admission(site_id, "failed", message=message)


def admit_sites(directory: Path) -> list[Admission]:
    """Registers every key of the site registry with the running SuperLink."""
    flwr = flower_executable("flwr")
    admissions = []
    for site_id, command in register_commands(directory, flwr=flwr):
        try:
            admission = parse_register_reply(site_id, run_flwr(directory, command))
        except DeployError as exc:
            admission = Admission(site_id, "failed", message=str(exc))
        logger.info("site %s: %s", site_id, admission.status)
        admissions.append(admission)
    record_nodes(directory, admissions)
    return admissions


def read_nodes(directory: Path) -> dict[str, int]:
    path = Path(directory) / NODES_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path} is not readable ({exc!s:.60})") from exc
    return {str(k): int(v) for k, v in raw.items()}


def record_nodes(directory: Path, admissions: Sequence[Admission]) -> dict[str, int]:
    """Keeps site id -> node id for `status` (a re-admitted key keeps its earlier id)."""
    nodes = read_nodes(directory)
    for admission in admissions:
        if admission.node_id is not None:
            nodes[admission.site_id] = admission.node_id
    path = Path(directory) / NODES_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(nodes, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return nodes
