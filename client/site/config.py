"""A hospital site's own configuration and keys: what the site decides, never the coordinator.

`fedrad-site init DIR` writes `DIR/site.toml` (its budget, data, ledger; an optional `[policy]`
table, `client/site/policy.py`) and the site's keys under `DIR/keys/`: the Ed25519 ledger key
and the SuperNode key (ECDSA P-384, OpenSSH, as Flower reads it). Private keys are created 0600
with O_EXCL and never overwritten; only the `.pub` halves are meant to leave the host. Beside
the ledger key (or at `ledger_anchor`) lives the ledger's anchor, the second copy of its head
that makes a deleted, truncated or replaced ledger a refusal (`common/privacy/ledger_anchor.py`).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.client.site.policy import (
    SHA256_HEX,
    SitePolicy,
    SitePolicyError,
    policy_from_table,
    policy_to_table,
)
from fedrad.common.atomic_file import replace_file
from fedrad.common.privacy.budget import budget_status
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.privacy.ledger import load_or_create_signing_key, public_key_path
from fedrad.common.privacy.ledger_anchor import anchor_path_for, ledger_head, open_site_ledger
from fedrad.common.protocol.messages import SITE_ID_PATTERN

CONFIG_NAME: Final[str] = "site.toml"
# where init puts them, relative to the site directory (and the defaults when absent)
DEFAULT_LEDGER: Final[str] = "ledger.jsonl"
DEFAULT_LEDGER_KEY: Final[str] = "keys/ledger_key.pem"
DEFAULT_NODE_KEY: Final[str] = "keys/node_key"
# The SuperLink's fleet address as site.toml holds it, always with fullmatch (`$` took
# "host:9092\n"): no whitespace anywhere, and ASCII digits (\d, as int(), takes any script's).
COORDINATOR_ADDRESS: Final[re.Pattern[str]] = re.compile(r"[^\s:]+:[0-9]{1,5}")
HEADER: Final[str] = (
    "# fedrad site configuration: owned by this hospital, never sent to the coordinator.\n"
)


class SiteConfigError(Exception):
    """The site configuration cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class SiteConfig:
    """Everything the site owns. Relative paths in the file are relative to the file."""

    site_id: str  # the name the site's ledger entries carry
    data_dir: Path  # DICOM files + reports.csv (the site data contract)
    epsilon: float  # the site's total privacy budget, over every run, at `delta`
    delta: float  # the delta the budget holds at; rounds asking for more are refused
    ledger: Path  # the site's one ledger, across runs
    ledger_key: Path  # Ed25519 private key (0600); ledger_key.pub beside it
    node_key: Path  # ECDSA P-384 SuperNode key (0600, OpenSSH); node_key.pub beside it
    coordinator: str | None = None  # SuperLink fleet address host:port
    ca_file: Path | None = None  # the federation CA that signed the SuperLink certificate
    foundation_dir: Path | None = None  # the federation's starting checkpoint, local copy
    cache_dir: Path | None = None  # prepared (de-identified) data; default <data_dir>/.fedrad-cache
    # what the site takes part in ([policy]); the default takes part in any plan
    policy: SitePolicy = field(default_factory=SitePolicy)
    # the ledger's signed anchor (None: beside ledger_key, <ledger_key stem>.anchor.json);
    # best kept where the ledger's own backups and restores do not reach
    ledger_anchor: Path | None = None

    def __post_init__(self) -> None:
        if not SITE_ID_PATTERN.fullmatch(self.site_id):
            raise SiteConfigError(
                f"site id {self.site_id[:70]!r}: use letters, digits, '_', '.', '-' (max 64)"
            )
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise SiteConfigError(f"epsilon budget must be positive and finite, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise SiteConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.coordinator is not None and not is_coordinator_address(self.coordinator):
            raise SiteConfigError(f"coordinator {self.coordinator[:70]!r} is not HOST:PORT")
        if self.ledger_anchor_path in (self.ledger, self.ledger_key):
            raise SiteConfigError(
                "ledger_anchor must be a file of its own (not ledger, ledger_key)"
            )

    @property
    def ledger_anchor_path(self) -> Path:
        """Where the ledger's anchor is: `ledger_anchor`, or beside the ledger key."""
        return anchor_path_for(self.ledger_key, self.ledger_anchor)


def is_coordinator_address(text: str) -> bool:
    """Whether `text` is HOST:PORT as Flower dials it: the whole of it (a newline, a space or a
    control character anywhere is refused, not passed on) and a port in 1..65535."""
    return (
        COORDINATOR_ADDRESS.fullmatch(text) is not None
        and text.isprintable()
        and 0 < int(text.rpartition(":")[2]) < 65536
    )


_KEYS: Final[dict[str, type | tuple[type, ...]]] = {
    "site_id": str,
    "data_dir": str,
    "epsilon": (int, float),
    "delta": (int, float),
    "ledger": str,
    "ledger_key": str,
    "ledger_anchor": str,
    "node_key": str,
    "coordinator": str,
    "ca_file": str,
    "foundation_dir": str,
    "cache_dir": str,
}
_REQUIRED: Final[tuple[str, ...]] = ("site_id", "data_dir", "epsilon", "delta")


def load_site_config(path: Path) -> SiteConfig:
    """Parses and validates `site.toml`; unknown keys and wrong types are refused."""
    path = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SiteConfigError(
            f"no site config at {path} (create one with fedrad-site init)"
        ) from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SiteConfigError(f"{path}: not a readable TOML file ({exc!s:.80})") from exc
    return _parse_config(raw, base=path.parent, where=str(path))


def _parse_config(raw: dict[str, Any], *, base: Path, where: str) -> SiteConfig:
    """The whole file: exactly one [site] table and optionally a [policy] table."""
    site = raw.get("site")
    if not isinstance(site, dict):
        raise SiteConfigError(f"{where}: expected exactly one [site] table")
    unknown = sorted(set(raw) - {"site", "policy"})
    if unknown:
        raise SiteConfigError(
            f"{where}: unknown table or key(s) {', '.join(unknown)} (expected exactly one "
            "[site] table and optionally [policy])"
        )
    policy = raw.get("policy", {})
    if not isinstance(policy, dict):
        raise SiteConfigError(f"{where}: policy must be a [policy] table")
    return _parse_site_table(site, base=base, where=where, policy=policy)


def _parse_site_table(
    site: dict[str, Any], *, base: Path, where: str, policy: dict[str, Any] | None = None
) -> SiteConfig:
    """The [site] table (and [policy], if any) as a SiteConfig; relative paths are relative
    to `base`."""
    unknown = sorted(set(site) - set(_KEYS))
    if unknown:
        raise SiteConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if k not in site]
    if missing:
        raise SiteConfigError(f"{where}: missing {', '.join(missing)}")
    for key, value in site.items():
        if isinstance(value, bool) or not isinstance(value, _KEYS[key]):
            raise SiteConfigError(f"{where}: {key} has the wrong type")

    def path_of(key: str, default: str | None = None) -> Path | None:
        value = site.get(key, default)
        if value is None:
            return None
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else (base / p)

    try:
        site_policy = policy_from_table(policy or {}, where=where)
    except SitePolicyError as exc:
        raise SiteConfigError(str(exc)) from exc
    return SiteConfig(
        site_id=site["site_id"],
        data_dir=path_of("data_dir"),  # type: ignore[arg-type]
        epsilon=float(site["epsilon"]),
        delta=float(site["delta"]),
        ledger=path_of("ledger", DEFAULT_LEDGER),  # type: ignore[arg-type]
        ledger_key=path_of("ledger_key", DEFAULT_LEDGER_KEY),  # type: ignore[arg-type]
        node_key=path_of("node_key", DEFAULT_NODE_KEY),  # type: ignore[arg-type]
        coordinator=site.get("coordinator"),
        ca_file=path_of("ca_file"),
        foundation_dir=path_of("foundation_dir"),
        cache_dir=path_of("cache_dir"),
        policy=site_policy,
        ledger_anchor=path_of("ledger_anchor"),
    )


def _create_node_key(path: Path) -> None:
    """ECDSA P-384 in OpenSSH format (what `flower-supernode` loads); 0600, never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(
            fd,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        os.fsync(fd)
    finally:
        os.close(fd)
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )


def init_site(
    directory: Path,
    *,
    site_id: str,
    data_dir: Path,
    epsilon: float = DEFAULT_EPSILON,
    delta: float = DEFAULT_DELTA,
    coordinator: str | None = None,
    ca_file: Path | None = None,
    foundation_dir: Path | None = None,
    cache_dir: Path | None = None,
    max_epsilon_per_run: float | None = None,
    max_epsilon_per_round: float | None = None,
    min_noise_multiplier: float | None = None,
    require_secagg: bool = False,
    strategies: tuple[str, ...] | list[str] | None = None,
    allow_central_dp: bool = True,
    approved_apps: tuple[str, ...] | list[str] = (),
    ledger_anchor: Path | None = None,
) -> SiteConfig:
    """Creates a site directory: config, keys, the ledger's anchor (its empty head) and
    nothing else. Refuses to touch an existing one, so a re-run can never replace a key (a new
    ledger key would orphan the ledger) nor restart a ledger. The policy keywords become a
    [policy] table, written only when one differs from the permissive default."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if config_path.exists():
        raise SiteConfigError(f"{config_path} already exists; a site is initialised once")
    for name in (DEFAULT_LEDGER_KEY, DEFAULT_NODE_KEY):
        if (directory / name).exists():
            raise SiteConfigError(f"{directory / name} already exists; refusing to replace a key")
    site: dict[str, Any] = {
        "site_id": site_id,
        "data_dir": str(Path(data_dir).expanduser().resolve()),
        "epsilon": float(epsilon),
        "delta": float(delta),
        "ledger": DEFAULT_LEDGER,
        "ledger_key": DEFAULT_LEDGER_KEY,
        "node_key": DEFAULT_NODE_KEY,
    }
    if coordinator is not None:
        site["coordinator"] = coordinator
    if ca_file is not None:
        site["ca_file"] = str(Path(ca_file).expanduser().resolve())
    if foundation_dir is not None:
        site["foundation_dir"] = str(Path(foundation_dir).expanduser().resolve())
    if cache_dir is not None:
        site["cache_dir"] = str(Path(cache_dir).expanduser().resolve())
    if ledger_anchor is not None:
        site["ledger_anchor"] = str(Path(ledger_anchor).expanduser().resolve())
    try:
        policy = policy_to_table(
            SitePolicy(
                max_epsilon_per_run=max_epsilon_per_run,
                max_epsilon_per_round=max_epsilon_per_round,
                min_noise_multiplier=min_noise_multiplier,
                require_secagg=require_secagg,
                strategies=None if strategies is None else tuple(strategies),
                allow_central_dp=allow_central_dp,
                approved_apps=tuple(approved_apps),
            )
        )
    except SitePolicyError as exc:
        raise SiteConfigError(str(exc)) from exc
    document: dict[str, Any] = {"site": site, "policy": policy} if policy else {"site": site}
    # validated exactly as it will be read back, before anything is written
    config = _parse_config(document, base=directory, where="site settings")
    for path, what in ((config.ledger_anchor_path, "a ledger anchor"), (config.ledger, "a ledger")):
        if path.exists():
            raise SiteConfigError(f"{path} already exists; refusing to replace {what}")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    load_or_create_signing_key(config.ledger_key)
    _create_node_key(config.node_key)
    open_site_ledger(  # a new site: an empty ledger and its anchor
        config.ledger, config.ledger_key, config.ledger_anchor_path, site_id=config.site_id
    )
    config_path.write_text(HEADER + tomli_w.dumps(document), encoding="utf-8")
    return load_site_config(config_path)


def add_approved_app(config_path: Path, sha256: str) -> bool:
    """Adds a Flower app bundle's SHA-256 to [policy].approved_apps; False when it is there
    already. The file is re-read and rewritten atomically (a temporary file, then
    os.replace) under a lock on its directory, keeping its header comment; the result is
    validated as load_site_config reads it before it replaces the old file."""
    digest = sha256.strip().lower()
    if not SHA256_HEX.fullmatch(digest):
        raise SiteConfigError(f"{sha256[:70]!r} is not a SHA-256 hex digest (64 characters 0-9a-f)")
    path = Path(config_path).expanduser().resolve()
    try:
        lock = os.open(path.parent, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise SiteConfigError(
            f"no site config at {path} (create one with fedrad-site init)"
        ) from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two approvals at once must not lose one
        config = load_site_config(path)  # the file as it is must be valid to be edited
        if digest in config.policy.approved_apps:
            return False
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
        policy = dict(raw.get("policy", {}))
        policy["approved_apps"] = [*config.policy.approved_apps, digest]
        raw["policy"] = policy
        header = "".join(_header_lines(text)) or HEADER
        new_text = header + tomli_w.dumps(raw)
        _parse_config(tomllib.loads(new_text), base=path.parent, where=str(path))
        replace_file(path, new_text.encode("utf-8"), mode=path.stat().st_mode & 0o777)
    finally:
        os.close(lock)  # releases the lock
    return True


def _header_lines(text: str) -> list[str]:
    """The comment lines the file begins with (what init wrote, or the site's own)."""
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        if not line.lstrip().startswith("#"):
            break
        lines.append(line if line.endswith("\n") else line + "\n")
    return lines


def shareable_files(config: SiteConfig) -> list[Path]:
    """The only files that may leave the host: the public halves of the keys."""
    return [public_key_path(config.ledger_key), config.node_key.with_suffix(".pub")]


def site_budget(config: SiteConfig) -> dict[str, Any]:
    """Spent and left, recomputed from every entry of the site's ledger (verified with the
    site's own key) at the terms of its latest entry: the numbers the site last enforced."""
    if not config.ledger_key.is_file():
        raise SiteConfigError(
            f"ledger key {config.ledger_key} is missing: the ledger cannot be verified"
        )
    # checked against its anchor: a ledger cut short or replaced is refused here too
    ledger = open_site_ledger(
        config.ledger, config.ledger_key, config.ledger_anchor_path, site_id=config.site_id
    )
    entries = ledger.entries()  # privacy entries only: events spend nothing
    return {
        "site_id": config.site_id,
        "ledger": str(config.ledger),
        **budget_status(ledger, epsilon=config.epsilon, delta=config.delta),
        "rounds": len(entries),
        "runs": len({e["run_id"] for e in entries}),
        "refusals": len(ledger.refusals()),
        "recoveries": len(ledger.recoveries()),
        "ledger_head": ledger_head(ledger),
    }
