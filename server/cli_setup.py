"""`fedrad-coordinator` init, renew-cert, check-cert and add-site: the federation's CA, the
SuperLink's certificate and the registry of sites, made before anything runs."""

from __future__ import annotations

import os
import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedrad.common.cli_support import EXIT_FINDINGS, JsonOpt, emit_json, fail
from fedrad.server.certificates import (
    CA_CERT,
    CA_KEY,
    CA_PASSPHRASE_ENV,
    DEFAULT_CA_DAYS,
    DEFAULT_SERVER_DAYS,
    FederationSummary,
    PkiError,
    ca_key_is_encrypted,
    check_federation,
    describe_federation,
    flwr_home,
    init_federation,
    read_passphrase_file,
    renew_server_certificate,
)
from fedrad.server.cli_options import DirOpt
from fedrad.server.site_registry import SITES_FILE, add_site, flwr_register_command


class KeyType(StrEnum):
    ec_p384 = "ec-p384"
    rsa_3072 = "rsa-3072"


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
CaPassphraseFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-passphrase-file",
        metavar="FILE",
        help=f"File whose first line is the CA key's passphrase (else ${CA_PASSPHRASE_ENV}).",
    ),
]
EncryptCaKeyOpt = Annotated[
    bool,
    typer.Option(
        "--encrypt-ca-key",
        help="Keep ca.key encrypted with a passphrase (--ca-passphrase-file, "
        f"${CA_PASSPHRASE_ENV}, or asked for on the terminal).",
    ),
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


def _can_prompt() -> bool:
    """Whether a person is there to type a passphrase (tests replace this)."""
    return sys.stdin.isatty()


def _ca_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The CA key passphrase from --ca-passphrase-file, else $FEDRAD_CA_PASSPHRASE; None when
    neither is given. Never a command-line value: it would show in the process list."""
    if passphrase_file is not None:
        try:
            return read_passphrase_file(passphrase_file)
        except PkiError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot read passphrase file {passphrase_file}: {exc.strerror}")
    value = os.environ.get(CA_PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        fail(f"{CA_PASSPHRASE_ENV} is set but empty: an empty passphrase is refused")
    return value.encode("utf-8")


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
    encrypt_ca_key: EncryptCaKeyOpt = False,
    ca_passphrase_file: CaPassphraseFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the federation CA and the SuperLink's TLS certificate; private keys 0600."""
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        fail(f"{directory} already holds a federation CA; a CA is created once")
    passphrase = None
    if encrypt_ca_key or ca_passphrase_file is not None:  # a passphrase file implies the flag
        passphrase = _ca_passphrase(ca_passphrase_file)
        if passphrase is None:
            if not _can_prompt():
                fail(
                    "--encrypt-ca-key needs a passphrase and there is no terminal to ask on: "
                    f"give --ca-passphrase-file FILE or {CA_PASSPHRASE_ENV}"
                )
            text = typer.prompt(
                "Passphrase for the CA key", hide_input=True, confirmation_prompt=True
            )
            passphrase = text.encode("utf-8")
    elif os.environ.get(CA_PASSPHRASE_ENV):
        typer.echo(
            f"warning: {CA_PASSPHRASE_ENV} is set but --encrypt-ca-key is not: "
            "ca.key is written unencrypted",
            err=True,
        )
    try:
        summary = init_federation(
            directory,
            hosts=host or [],
            include_loopback=loopback,
            ca_days=ca_days,
            server_days=days,
            algorithm=key_type.value,
            name=name,
            ca_passphrase=passphrase,
        )
    except PkiError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to {directory}: {exc.strerror}")
    _warn_if_local_only(summary)
    if as_json:
        emit_json({**summary.as_dict(), "ca_key_encrypted": passphrase is not None})
        return
    typer.echo(f"federation initialised in {directory}")
    _print_summary(summary)
    typer.echo(f"  SuperLink key (0600, never leaves this host): {summary.server_key}")
    state = "encrypted with your passphrase" if passphrase is not None else "NOT encrypted"
    typer.echo(f"  CA key (0600): {directory / CA_KEY}, {state}")
    typer.echo(
        f"move {directory / CA_KEY} off the SuperLink host (offline storage): "
        "only renew-cert needs it"
    )
    typer.echo(f"hand {summary.ca_certificate} to every site (fedrad-site init --ca-file);")
    typer.echo("sites check its fingerprint with you by phone before trusting it")


def renew_cert(
    directory: DirOpt = Path("."),
    host: HostOpt = None,
    days: DaysOpt = DEFAULT_SERVER_DAYS,
    loopback: LoopbackOpt = True,
    ca_passphrase_file: CaPassphraseFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a new SuperLink certificate (new hosts or dates) from the same CA; the one command
    that needs the CA key (and its passphrase, when it is encrypted)."""
    passphrase = _ca_passphrase(ca_passphrase_file)
    if passphrase is None and _can_prompt() and ca_key_is_encrypted(directory):
        text = typer.prompt(f"Passphrase for {directory / CA_KEY}", hide_input=True)
        passphrase = text.encode("utf-8")
    try:
        summary = renew_server_certificate(
            directory,
            hosts=host or [],
            include_loopback=loopback,
            days=days,
            ca_passphrase=passphrase,
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
    env = {"FLWR_HOME": str(flwr_home(directory))}
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
