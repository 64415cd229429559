"""`fedrad-coordinator`: the federation coordinator's command line."""

from __future__ import annotations

import shlex
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedrad.common.cli_support import EXIT_FINDINGS, emit_json, fail, not_yet
from fedrad.server.pki import (
    CA_CERT,
    CA_KEY,
    DEFAULT_CA_DAYS,
    DEFAULT_SERVER_DAYS,
    SITES_FILE,
    FederationSummary,
    PkiError,
    add_site,
    check_federation,
    describe_federation,
    flwr_environment,
    flwr_register_command,
    init_federation,
    renew_server_certificate,
)

app = typer.Typer(
    name="fedrad-coordinator",
    help="Federation coordinator: PKI, SuperLink, site registration, rounds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class KeyType(StrEnum):
    ec_p384 = "ec-p384"
    rsa_3072 = "rsa-3072"


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DirOpt = Annotated[
    Path,
    typer.Option(
        "--dir",
        help="The coordinator directory made by `init`.",
        envvar="FEDRAD_COORDINATOR_DIR",
    ),
]
HostOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        help="A host name or IP address sites use to reach the SuperLink (repeat the option).",
    ),
]
LoopbackOpt = Annotated[
    bool,
    typer.Option("--loopback/--no-loopback", help="Also cover localhost and 127.0.0.1."),
]
DaysOpt = Annotated[
    int, typer.Option(help="Validity of the SuperLink certificate, in days.", min=1)
]


def _print_summary(summary: FederationSummary) -> None:
    typer.echo(f"  CA certificate:        {summary.ca_certificate}")
    typer.echo(f"    SHA-256 fingerprint: {summary.ca_fingerprint}")
    typer.echo(f"    expires:             {summary.ca_expires}")
    typer.echo(f"  SuperLink certificate: {summary.server_certificate}")
    typer.echo(f"    covers:              {', '.join(summary.server_hosts)}")
    typer.echo(f"    expires:             {summary.server_expires}")


def _warn_if_local_only(summary: FederationSummary) -> None:
    if set(summary.server_hosts) <= {"localhost", "127.0.0.1", "::1"}:
        typer.echo(
            "warning: the certificate covers this machine only; sites elsewhere need --host",
            err=True,
        )


@app.command()
def init(
    directory: Annotated[
        Path, typer.Argument(help="New directory for the federation CA and TLS files.")
    ],
    host: HostOpt = None,
    days: DaysOpt = DEFAULT_SERVER_DAYS,
    ca_days: Annotated[
        int, typer.Option(help="Validity of the federation CA, in days.", min=1)
    ] = DEFAULT_CA_DAYS,
    loopback: LoopbackOpt = True,
    key_type: Annotated[KeyType, typer.Option(help="Key algorithm for CA and SuperLink.")] = (
        KeyType.ec_p384
    ),
    name: Annotated[str, typer.Option(help="The federation's name in certificates.")] = (
        "fedrad federation"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Create the federation CA and the SuperLink's TLS certificate; private keys 0600."""
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        fail(f"{directory} already holds a federation CA; a CA is created once")
    try:
        summary = init_federation(
            directory,
            hosts=host or [],
            include_loopback=loopback,
            ca_days=ca_days,
            server_days=days,
            algorithm=key_type.value,
            name=name,
        )
    except PkiError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to {directory}: {exc.strerror}")
    _warn_if_local_only(summary)
    if as_json:
        emit_json(summary.as_dict())
        return
    typer.echo(f"federation initialised in {directory}")
    _print_summary(summary)
    typer.echo(f"  private keys (0600, never leave this host): {', '.join(summary.private_keys)}")
    typer.echo(f"hand {summary.ca_certificate} to every site (fedrad-site init --ca-file);")
    typer.echo("sites check its fingerprint with you by phone before trusting it")


@app.command("renew-cert")
def renew_cert(
    directory: DirOpt = Path("."),
    host: HostOpt = None,
    days: DaysOpt = DEFAULT_SERVER_DAYS,
    loopback: LoopbackOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Issue a new SuperLink certificate (new hosts or dates) from the same CA."""
    try:
        summary = renew_server_certificate(
            directory, hosts=host or [], include_loopback=loopback, days=days
        )
    except PkiError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to {directory}: {exc.strerror}")
    _warn_if_local_only(summary)
    if as_json:
        emit_json(summary.as_dict())
        return
    typer.echo(f"new SuperLink certificate in {directory} (restart the SuperLink to use it)")
    _print_summary(summary)


@app.command("check-cert")
def check_cert(
    directory: DirOpt = Path("."),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A host name, IP or HOST:PORT sites use (repeat)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the SuperLink certificate against the CA: chain, dates, key, and each --host.

    Exit 0 when sound, 1 when a TLS client trusting ca.pem would refuse it, 2 on bad input.
    """
    try:
        problems = check_federation(directory, host or [])
        summary = describe_federation(directory)
    except PkiError as exc:
        fail(str(exc))
    if as_json:
        emit_json({"ok": not problems, "problems": problems, **summary.as_dict()})
    elif not problems:
        typer.echo(f"ok: {summary.server_certificate} is signed by {summary.ca_certificate}")
        _print_summary(summary)
    for problem in problems:
        typer.echo(f"problem: {problem}", err=True)
    if problems:
        raise typer.Exit(EXIT_FINDINGS)


@app.command()
def start() -> None:
    """Run Flower's SuperLink with TLS and node authentication."""
    not_yet("fedrad-coordinator start")


@app.command("add-site")
def add_site_command(
    public_key: Annotated[
        Path,
        typer.Argument(
            help="The site's public node key (its keys/node_key.pub).", metavar="SITE_KEY.pub"
        ),
    ],
    site_id: Annotated[str, typer.Option(help="The site's id in the federation.")],
    directory: DirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Register a site's public node key (OpenSSH ECDSA, NIST curve) in the site registry."""
    try:
        registration = add_site(directory, site_id, public_key)
    except PkiError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to {directory}: {exc.strerror}")
    record = registration.record
    command = flwr_register_command(directory, record.site_id)
    env = flwr_environment(directory)
    if as_json:
        emit_json(
            {
                **record.as_dict(),
                "new": registration.new,
                "registry": str(directory / SITES_FILE),
                "register_command": command,
                "register_environment": env,
            }
        )
        return
    if registration.new:
        typer.echo(f"site {record.site_id} registered: {record.curve} key {record.fingerprint}")
    else:
        typer.echo(f"site {record.site_id} was already registered with this key")
    typer.echo("to admit it to the running SuperLink (flower-superlink --enable-supernode-auth):")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    typer.echo(f"  {exports} {shlex.join(command)}")


@app.command()
def run() -> None:
    """Submit a federated run and follow it."""
    not_yet("fedrad-coordinator run")


@app.command()
def status() -> None:
    """Show connected sites and round progress."""
    not_yet("fedrad-coordinator status")


def main() -> None:
    app()
