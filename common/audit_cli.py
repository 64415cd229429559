"""`fedrad-audit`: the privacy officer's command line."""

from __future__ import annotations

import typer

from fedrad.common.cli_support import not_yet

app = typer.Typer(
    name="fedrad-audit",
    help="Privacy audit: verify site ledgers and recompute every epsilon independently.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def ledger() -> None:
    """Verify signatures and hash chains and recompute epsilon for LEDGER files."""
    not_yet("fedrad-audit ledger")


@app.command()
def empirical() -> None:
    """Canary-based membership-inference audit giving an empirical lower bound on epsilon."""
    not_yet("fedrad-audit empirical")


def main() -> None:
    app()
