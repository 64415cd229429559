"""`fedrad-audit`: the privacy officer's command line.

`fedrad-audit LEDGER...` verifies and recomputes ledgers (the default command);
`fedrad-audit empirical ...` runs the canary membership-inference audit.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedrad.common.audit.ledger_audit import (
    Anchor,
    LedgerAudit,
    audit_ledger,
    public_key_id,
    read_public_key,
    with_budget,
    worst_status,
)
from fedrad.common.cli_support import (
    EXIT_FINDINGS,
    EXIT_OK,
    JsonOpt,
    VerboseOpt,
    emit_json,
    fail,
    setup_logging,
)
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON

LEDGER_NAME = "ledger.jsonl"
BESIDE_KEY_NAME = "ledger_key.pub"

ledger_app = typer.Typer(
    name="fedrad-audit",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _ledger_files(paths: list[Path]) -> list[Path]:
    """Files as given; a directory stands for every ledger.jsonl under it (a run directory)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.rglob(LEDGER_NAME))
            if not found:
                fail(f"{path}: no {LEDGER_NAME} under this directory")
            files.extend(found)
        else:
            files.append(path)  # a missing file is reported as such, not a usage error
    return files


def _budgets(values: list[str]) -> tuple[float | None, dict[str, float]]:
    """`--budget 8` for every ledger, `--budget site_1=3` for one site."""
    default: float | None = None
    per_site: dict[str, float] = {}
    for value in values:
        site, _, number = value.rpartition("=")
        try:
            eps = float(number)
        except ValueError:
            fail(f"--budget {value!r}: expected a number or SITE=NUMBER")
        if not eps > 0 or math.isinf(eps):
            fail(f"--budget {value!r}: epsilon must be a positive finite number")
        if site:
            per_site[site] = eps
        else:
            default = eps
    return default, per_site


def _anchors(path: Path | None) -> dict[str, Anchor]:
    if path is None:
        return {}
    try:
        payload = json.loads(path.read_text())
        return {
            str(Path(item["path"]).resolve()): Anchor(int(item["entries"]), str(item["head_hash"]))
            for item in payload["ledgers"]
            if item.get("head_hash")
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"--previous {path}: not an audit written by `fedrad-audit --json` ({exc!s:.60})")


def _table(audits: list[LedgerAudit]) -> Table:
    table = Table(title="fedrad privacy ledger audit", title_justify="left")
    for column in ("ledger", "site", "entries", "delta", "claimed", "RDP", "PLD", "budget"):
        left = column in ("ledger", "site")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    table.add_column("status")
    for audit in audits:
        color = "green" if audit.status == "ok" else "red"
        table.add_row(
            audit.path,
            audit.site_id or "-",
            str(audit.entries),
            "-" if audit.delta is None else f"{audit.delta:g}",
            _eps(audit.claimed_epsilon, audit),
            _eps(audit.recomputed_rdp, audit),
            _eps(audit.recomputed_pld, audit),
            "-" if audit.budget is None else f"{audit.budget:g}",
            f"[{color}]{audit.status}[/{color}]",
        )
    return table


def _eps(value: float | None, audit: LedgerAudit) -> str:
    if audit.entries == 0 or audit.delta is None:
        return "-"
    if value is None or math.isinf(value):
        return "inf" if (value is not None or audit.unbounded) else "n/a"
    return f"{value:.3f}"


@ledger_app.command(
    help="Verify LEDGER files (or every ledger.jsonl under a run directory): Ed25519 signatures, "
    "the hash chain, and every epsilon recomputed from the raw mechanism parameters with "
    "independent RDP and PLD accountants (Google dp_accounting). Exit 0 only when every "
    "ledger is ok. The canary audit is `fedrad-audit empirical --help`.",
    epilog="Statuses: ok, over budget, tampered, broken chain, unverifiable, torn, malformed, "
    "empty, missing. A recovery the site's privacy officer recorded is listed as a finding of "
    "its own and leaves the status as it is. Keep the --json output: passed back with "
    "--previous it detects a ledger that was rolled back or rewritten since.",
)
def ledger(
    ledgers: Annotated[
        list[Path], typer.Argument(help="Ledger files or run directories.", show_default=False)
    ],
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--public-key",
            help="A site's Ed25519 public key (PEM or OpenSSH); repeat for several sites. "
            f"Without it, {BESIDE_KEY_NAME} beside each ledger is used, if present.",
        ),
    ] = None,
    budget: Annotated[
        list[str] | None,
        typer.Option(help="Epsilon budget for every ledger, or SITE=EPS for one; repeatable."),
    ] = None,
    previous: Annotated[
        Path | None,
        typer.Option(help="An earlier `--json` audit: flag ledgers rolled back since then."),
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    setup_logging(verbose)
    keys = {}
    for path in public_key or []:
        try:
            key = read_public_key(path)
        except ValueError as exc:
            fail(str(exc))
        keys[public_key_id(key)] = key
    default_budget, site_budgets = _budgets(budget or [])
    anchors = _anchors(previous)
    audits: list[LedgerAudit] = []
    for path in _ledger_files(ledgers):
        site_keys, source = keys, "given" if keys else None
        beside = path.parent / BESIDE_KEY_NAME
        if not keys and beside.is_file():
            try:
                key = read_public_key(beside)
                site_keys, source = {public_key_id(key): key}, "beside the ledger"
            except ValueError:
                site_keys, source = {}, None
        audit = audit_ledger(
            path, site_keys, key_source=source, anchor=anchors.get(str(path.resolve()))
        )
        budget_of_site = site_budgets.get(audit.site_id or "", default_budget)
        if budget_of_site is not None:
            audit = with_budget(audit, budget_of_site)
        audits.append(audit)
    unknown = set(site_budgets) - {a.site_id for a in audits}
    if unknown:
        fail(f"--budget names site(s) with no ledger here: {', '.join(sorted(unknown))}")
    status = worst_status(audits)
    if as_json:
        emit_json({"status": status, "ledgers": [a.to_dict() for a in audits]})
    else:
        console = Console(width=max(120, Console().width), soft_wrap=True)
        console.print(_table(audits))
        for audit in audits:
            if audit.status != "ok" or audit.key_source == "beside the ledger" or audit.recoveries:
                console.print(f"{audit.path}: {audit.status}: {audit.reason}", highlight=False)
            for finding in audit.findings:
                if finding.status == "recovery":  # not tampering, but never to be missed
                    console.print(f"{audit.path}: recovery: {finding.reason}", highlight=False)
        bad = sum(a.status != "ok" for a in audits)
        console.print(
            f"{len(audits)} ledger(s), {bad} not ok" if bad else f"all {len(audits)} ok",
            highlight=False,
        )
    raise typer.Exit(EXIT_OK if status == "ok" else EXIT_FINDINGS)


empirical_app = typer.Typer(
    name="fedrad-audit empirical",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@empirical_app.command(
    help="Canary membership-inference audit (one training run, Steinke, Nasr and Jagielski "
    "2023): canaries are inserted into one site's training data, each with probability 1/2; "
    "the model is trained with the site's DP-SGD settings and, as a power check, without DP; "
    "the canaries' loss drops then give an empirical lower bound on epsilon (95% confidence) "
    "beside the claimed one. Exit 1 if a DP bound exceeds its claim."
)
def empirical(
    data: Annotated[Path, typer.Option(help="A cohort directory (one folder per site).")],
    site: Annotated[
        str | None, typer.Option(help="The site folder to audit (default: the first).")
    ] = None,
    epsilon: Annotated[
        float, typer.Option(help="The DP target of the audited training.")
    ] = DEFAULT_EPSILON,
    delta: Annotated[float, typer.Option(help="The DP delta.")] = DEFAULT_DELTA,
    steps: Annotated[int, typer.Option(help="Optimizer steps of each training run.")] = 200,
    canaries: Annotated[int, typer.Option(help="Canary records (half trained on).")] = 128,
    batch_size: Annotated[int, typer.Option(help="Expected batch size (Poisson).")] = 16,
    preset: Annotated[str, typer.Option(help="Model preset.")] = "tiny",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Start from this checkpoint instead of the foundation.")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Canaries, inclusion and the public training seed (DP noise and sampling "
            "always come from the CSPRNG)."
        ),
    ] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Also write the result and its config as JSON here.")
    ] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from fedrad.simulations.empirical_audit import (
        EmpiricalAuditConfig,
        EmpiricalAuditError,
        render_table,
        run_empirical_audit,
    )

    setup_logging(verbose)
    try:
        config = EmpiricalAuditConfig(
            site_id=site,
            preset=preset,
            checkpoint=checkpoint,
            canaries=canaries,
            steps=steps,
            batch_size=batch_size,
            epsilon=epsilon,
            delta=delta,
            seed=seed,
        )
        result = run_empirical_audit(
            data, config, progress=None if as_json else lambda m: typer.echo(m, err=True)
        )
    except EmpiricalAuditError as exc:
        fail(str(exc))
    payload = result.to_dict()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))
    if as_json:
        emit_json(payload)
    else:
        typer.echo(render_table(result))
    raise typer.Exit(EXIT_OK if result.consistent else EXIT_FINDINGS)


def main(argv: list[str] | None = None) -> None:
    """`empirical` is a subcommand; anything else is the ledger audit's arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "empirical":
        empirical_app(args[1:], prog_name="fedrad-audit empirical")
    elif args and args[0] == "ledger":  # the explicit spelling
        ledger_app(args[1:], prog_name="fedrad-audit")
    else:
        ledger_app(args or ["--help"], prog_name="fedrad-audit")
