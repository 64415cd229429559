"""`fedrad-coordinator`: the federation coordinator's command line."""

from __future__ import annotations

import typer

from fedrad.common.cli_support import not_yet

app = typer.Typer(
    name="fedrad-coordinator",
    help="Federation coordinator: PKI, SuperLink, site registration, rounds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def init() -> None:
    """Create the federation CA and the SuperLink's TLS certificate."""
    not_yet("fedrad-coordinator init")


@app.command()
def start() -> None:
    """Run Flower's SuperLink with TLS and node authentication."""
    not_yet("fedrad-coordinator start")


@app.command("add-site")
def add_site() -> None:
    """Register a site's public node key."""
    not_yet("fedrad-coordinator add-site")


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
