"""`fedrad-coordinator`: the federation coordinator's command line. The commands live with
their group (`cli_setup`: before anything runs; `cli_federation`: the running federation);
here they are listed in the order `--help` shows them."""

from __future__ import annotations

import typer

from fedrad.server import cli_federation, cli_setup

app = typer.Typer(
    name="fedrad-coordinator",
    help="Federation coordinator: PKI, SuperLink, site registration, rounds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(cli_setup.init)
app.command("renew-cert")(cli_setup.renew_cert)
app.command("check-cert")(cli_setup.check_cert)
app.command()(cli_federation.start)
app.command()(cli_federation.stop)
app.command("add-site")(cli_setup.add_site_command)
app.command("build-app")(cli_federation.build_app)
app.command()(cli_federation.run)
app.command()(cli_federation.status)


def main() -> None:
    app()
