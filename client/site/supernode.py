"""A site joins the federation: preflight checks and the Flower 1.41 `flower-supernode` and
runner command lines, built from the site's own site.toml. Pure functions, tested without
Flower; `fedrad-site start` runs both commands in the foreground.

The SuperNode authenticates with the site's node key (registered at the coordinator), trusts
only the federation CA in `ca_file` (a SuperLink whose certificate that CA did not sign fails
the TLS handshake), runs with process isolation so that Flower itself executes nothing, and
hands the ClientApp `--node-config "site-config=... foundation-dir=..."`: everything the
ClientApp reads (data, ledger, keys, budget, policy) comes from the site's own config, never
from the coordinator. fedrad's runner (`client/site/app_runner.py`) claims the SuperNode's tasks
with a secret written fresh at every start and runs only bundles the site approved.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography import x509

from fedrad.client.ingest.site_data import cache_write_problem
from fedrad.client.site.config import SiteConfig, SiteConfigError, site_budget
from fedrad.common.flower_process import (
    FlowerProcessError,
    flower_process_env,
    port_in_use,
    write_fresh_secret,
)
from fedrad.common.privacy.ledger import LedgerError

DEFAULT_RUNTIME_PORT: Final[int] = 9094  # flower-supernode's own default for its local API
FLWR_HOME_DIR: Final[str] = "flwr"  # under the site directory: apps the SuperNode installs
# Every Flower process: no `uv sync` at run time (it would pull another torch), no update
# check, no telemetry. (The coordinator sets the same; client and server share no module.)
# What flower-supernode prints when the coordinator refuses it, and what that means here.
_REFUSALS: Final[tuple[tuple[str, str], ...]] = (
    (
        "code: 2004",
        "the coordinator refused this site's node key: it is not registered there (send "
        "keys/node_key.pub to the coordinator for fedrad-coordinator add-site)",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the SuperLink's TLS certificate is not signed by this site's ca_file: refusing to "
        "connect (check the CA fingerprint with the coordinator)",
    ),
    ("SSL/TLS handshake error", "the TLS handshake with the SuperLink failed"),
    (
        "Failed to initialize the connection",
        "could not connect to the SuperLink (is it running and reachable?)",
    ),
)


class SupernodeError(Exception):
    """The site cannot join; the message says why in one line."""


def is_ca_certificate(path: Path) -> str | None:
    """None when `path` holds a PEM CA certificate; else why not, in one line."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        return f"ca_file {path} does not exist"
    except IsADirectoryError:
        return f"ca_file {path} is a directory, not a PEM certificate"
    except (OSError, ValueError):
        return f"ca_file {path} is not a PEM certificate"
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return f"ca_file {path} is not a CA certificate (the federation's ca.pem is)"
    return None


def site_preflight(
    config: SiteConfig, *, foundation: Path | None = None, port: int = DEFAULT_RUNTIME_PORT
) -> list[str]:
    """Every reason this site cannot join, one line each, before anything starts."""
    problems: list[str] = []
    if not config.data_dir.is_dir():
        problems.append(f"data directory {config.data_dir} does not exist")
    else:
        reason = cache_write_problem(config.data_dir, config.cache_dir)
        if reason is not None:
            problems.append(reason)
    if config.coordinator is None:
        problems.append("site.toml has no coordinator address (coordinator = 'HOST:PORT')")
    if config.ca_file is None:
        problems.append("site.toml has no ca_file (the federation CA from the coordinator)")
    else:
        reason = is_ca_certificate(config.ca_file)
        if reason is not None:
            problems.append(reason)
    key = config.node_key
    if not key.is_file():
        problems.append(f"node key {key} is missing (fedrad-site init creates it)")
    elif key.stat().st_mode & 0o077:
        problems.append(
            f"node key {key} is readable by others (mode {key.stat().st_mode & 0o777:o}); chmod 600"
        )
    if not config.policy.approved_apps:
        problems.append(
            "this site has approved no app bundle, so it would refuse every run: "
            "fedrad-site approve --release (this fedrad's own) or fedrad-site approve FAB"
        )
    chosen = foundation or config.foundation_dir
    if chosen is None:
        problems.append("no foundation checkpoint: set foundation_dir in site.toml or --foundation")
    elif not (Path(chosen) / "model.safetensors").is_file():
        problems.append(f"foundation {chosen} is not a checkpoint directory")
    if not 0 < port < 65536:
        problems.append(f"port {port} is not in 1..65535")
    else:
        try:
            if port_in_use("127.0.0.1", port):
                problems.append(
                    f"local port {port} is in use (another SuperNode? pick one with --port)"
                )
        except FlowerProcessError as exc:
            problems.append(str(exc))
    try:
        budget = site_budget(config)
    except (SiteConfigError, LedgerError) as exc:
        problems.append(str(exc))
    else:
        if budget["exhausted"]:
            spent = budget["spent_epsilon"]
            problems.append(
                f"privacy budget exhausted: epsilon "
                f"{'unbounded' if spent is None else f'{spent:.3f}'} spent of "
                f"{budget['budget_epsilon']:g}; this site takes no further rounds"
            )
    return problems


def node_config_arg(values: Mapping[str, str | int | float | bool]) -> str:
    """Flower's `--node-config` string: space-separated key=value with TOML values; strings
    as TOML literal strings ('...'), which need no escaping."""
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise SupernodeError(f"node config key {key!r} is not a plain name")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif "'" in value or "\n" in value:
            raise SupernodeError(f"node config {key}: the value may not hold ' or a newline")
        else:
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def site_node_config(config_path: Path, foundation: Path) -> dict[str, str]:
    """What the ClientApp reads (`SiteSpec.from_node_config`): the site's own config file and
    its local copy of the foundation checkpoint, as absolute paths."""
    return {
        "site-config": str(Path(config_path).expanduser().resolve()),
        "foundation-dir": str(Path(foundation).expanduser().resolve()),
    }


def supernode_command(
    config: SiteConfig,
    *,
    config_path: Path,
    foundation: Path,
    secret_file: Path,
    port: int = DEFAULT_RUNTIME_PORT,
    executable: str,
) -> list[str]:
    """`flower-supernode` for this site: TLS verified by ca_file, node authentication with
    the site's key, its node config, its local Runtime API on 127.0.0.1:`port`, and process
    isolation: Flower starts no runner of its own; fedrad's (`app_runner`) claims each task
    with the secret in `secret_file`."""
    if config.coordinator is None or config.ca_file is None:
        raise SupernodeError("site.toml needs coordinator and ca_file to join a federation")
    return [
        executable,
        "--superlink",
        config.coordinator,
        "--root-certificates",
        str(config.ca_file),
        "--auth-supernode-private-key",
        str(config.node_key),
        "--node-config",
        node_config_arg(site_node_config(config_path, foundation)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret_file),
    ]


RUNNER_SECRET: Final[str] = "keys/runner.secret"  # under the site directory, 0600, per start


def new_runner_secret(config_path: Path) -> Path:
    """A fresh random secret for this start, 0600: only the site's runner may claim tasks."""
    return write_fresh_secret(Path(config_path).expanduser().resolve().parent / RUNNER_SECRET)


def runner_command(
    config_path: Path, *, secret_file: Path, port: int = DEFAULT_RUNTIME_PORT
) -> list[str]:
    """fedrad's ClientApp runner in this Python, attached to the SuperNode's local API."""
    return [
        sys.executable,
        "-m",
        "fedrad.client.site.app_runner",
        "--config",
        str(Path(config_path).expanduser().resolve()),
        "--runtime-api-address",
        f"127.0.0.1:{port}",
        "--secret-file",
        str(secret_file),
    ]


def supernode_environment(
    config_path: Path, base: Mapping[str, str] | None = None, *, bin_dir: Path | None = None
) -> dict[str, str]:
    """The SuperNode's environment, with FLWR_HOME under the site directory (the SuperNode
    starts `flower-superexec` and `flwr-clientapp` by name)."""
    home = Path(config_path).expanduser().resolve().parent / FLWR_HOME_DIR
    return flower_process_env(home, base, bin_dir=bin_dir)


CONNECTED_MARK: Final[str] = "SuperNode ID:"  # flower-supernode logs it once admitted


def refusal_reason(output: str) -> str | None:
    """The one-line meaning of flower-supernode's failure to connect, if it is a known one."""
    for mark, meaning in _REFUSALS:
        if mark in output:
            return meaning
    return None
