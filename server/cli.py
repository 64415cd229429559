"""`fedrad-coordinator`: the federation coordinator's command line."""

from __future__ import annotations

import shlex
import signal
import subprocess
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedrad.common.cli_support import (
    EXIT_FINDINGS,
    SecAggFlag,
    SecAggShares,
    SecAggThreshold,
    emit_json,
    fail,
    setup_logging,
)
from fedrad.common.flower_process import FlowerProcessError, flower_executable
from fedrad.common.run_dir import plot_run, read_metrics, write_config, write_summary
from fedrad.server.deploy import (
    DATABASE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOG_FILE,
    STATE_FILE,
    DeployError,
    RunStatus,
    RunValue,
    SuperLinkState,
    admit_sites,
    build_run_config,
    control_address,
    default_connect_host,
    flower_environment,
    follow_command,
    nodes_command,
    parse_nodes_reply,
    parse_runs_reply,
    parse_setting,
    parse_submit_reply,
    preflight_run,
    preflight_start,
    read_nodes,
    run_flwr,
    runs_command,
    stage_app,
    stop_process,
    submit_command,
    superlink_command,
    superlink_reachable,
    wait_until_ready,
    write_state,
)
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
    list_sites,
    renew_server_certificate,
    split_address,
    write_flwr_connection,
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
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]
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
def start(
    directory: DirOpt = Path("."),
    host: Annotated[
        str, typer.Option(help="Address the SuperLink binds (0.0.0.0: every interface).")
    ] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option(help="Port of the SuperLink (Fleet, Control and Runtime APIs).")
    ] = DEFAULT_PORT,
    detach: Annotated[
        bool, typer.Option(help="Leave the SuperLink running in the background and return.")
    ] = False,
    startup_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the SuperLink to accept connections.")
    ] = 60.0,
    verbose: VerboseOpt = False,
) -> None:
    """Run Flower's SuperLink with TLS and node authentication, and admit every registered site.

    Stays in the foreground streaming the SuperLink's log (also appended to DIR/superlink.log);
    Ctrl-C stops it. Registrations and runs persist in DIR/superlink.db across restarts.
    """
    setup_logging(verbose)
    problems = preflight_start(directory, host=host, port=port)
    if problems:
        fail("; ".join(problems))
    try:
        address = control_address(default_connect_host(directory, host), port)
        write_flwr_connection(directory, address=address)
        command = superlink_command(
            directory, host=host, port=port, executable=flower_executable("flower-superlink")
        )
    except (DeployError, PkiError, FlowerProcessError) as exc:
        fail(str(exc))
    log_path = directory.resolve() / LOG_FILE
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            env=flower_environment(directory),
            stdout=log if detach else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Foreground: same process group, so Ctrl-C or a kill of the group stops both.
            start_new_session=detach,
        )
    relay = None if detach else _relay(process, log_path)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    state_written = False
    try:
        connect, _ = split_address(address)
        wait_until_ready(process, connect.strip("[]"), port, timeout=startup_timeout)
        admissions = admit_sites(directory)
        for admission in admissions:
            node = "" if admission.node_id is None else f" (node {admission.node_id})"
            line = f"site {admission.site_id}: {admission.status}{node}"
            typer.echo(line if admission.ok else f"{line}: {admission.message}", err=True)
        if not any(a.ok for a in admissions):
            raise DeployError("no site could be admitted to the SuperLink")
        write_state(
            directory,
            SuperLinkState(
                pid=process.pid,
                host=host,
                port=port,
                address=address,
                database=str(directory.resolve() / DATABASE),
                log=str(log_path),
            ),
        )
        state_written = True
        typer.echo(
            f"SuperLink running (pid {process.pid}) on {host}:{port}; sites connect to "
            f"{' or '.join(f'{h}:{port}' for h in describe_federation(directory).server_hosts)} "
            f"trusting {directory / CA_CERT}",
            err=True,
        )
        if detach:
            typer.echo(f"it runs in the background: kill {process.pid} stops it", err=True)
            return
        typer.echo("Ctrl-C stops it", err=True)
        code = process.wait()
        fail(f"flower-superlink exited with code {code}; its log is in {log_path}")
    except KeyboardInterrupt:
        stop_process(process)
        typer.echo("SuperLink stopped", err=True)
    except (DeployError, FlowerProcessError) as exc:
        stop_process(process)
        fail(f"{exc}; its log is in {log_path}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if relay is not None:
            relay.join(timeout=5)
        if state_written and not detach and process.poll() is not None:
            (directory / STATE_FILE).unlink(missing_ok=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _relay(process: subprocess.Popen[bytes], log_path: Path) -> threading.Thread:
    """Copies the child's output to its log file and to this terminal, line by line."""

    def copy() -> None:
        assert process.stdout is not None
        with log_path.open("ab") as log:
            for raw in process.stdout:
                log.write(raw)
                log.flush()
                typer.echo(raw.decode("utf-8", "replace").rstrip("\n"))

    thread = threading.Thread(target=copy, name="superlink-log", daemon=True)
    thread.start()
    return thread


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
def run(
    rounds: Annotated[int, typer.Option(help="Total rounds (a resumed run continues to it).")],
    foundation: Annotated[
        Path, typer.Option(help="The federation's starting checkpoint (sites hold a copy).")
    ],
    directory: DirOpt = Path("."),
    run_dir: Annotated[
        Path | None,
        typer.Option(help="The run directory; an existing one resumes after its last round."),
    ] = None,
    sites: Annotated[
        int | None, typer.Option(help="Sites that must join (default: every registered site).")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="Target epsilon per site for the whole schedule.")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="Delta of the target epsilon.")] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg, fedprox or fedadam.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="DP-SGD steps per site per round.")] = (
        None
    ),
    batch_size: Annotated[int | None, typer.Option(help="Expected batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the run.")] = None,
    round_timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for one round's replies.")
    ] = None,
    connect_timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for every site to connect.")
    ] = None,
    secagg: SecAggFlag = False,
    secagg_shares: SecAggShares = None,
    secagg_threshold: SecAggThreshold = None,
    min_sites: Annotated[
        int | None,
        typer.Option(
            metavar="K",
            help="A round goes on with K sites when the others are gone after --connect-timeout "
            "(default 1; SecAgg+: the threshold).",
        ),
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any other run config key, KEY=VALUE (e.g. eval-reports=16, central-noise=1.0, "
            "secagg-clip=0.5).",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="Stream the run's log until it ends (--no-follow: submit only).")
    ] = True,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Submit a federated run to the running SuperLink and follow it to the end.

    Exit 0 when the run completed, 1 when it failed or was stopped, 2 on bad input.
    """
    setup_logging(verbose)
    run_dir = run_dir or new_run_dir_path(Path("runs"))
    problems = preflight_run(directory, foundation=foundation, run_dir=run_dir, num_sites=sites)
    if problems:
        fail("; ".join(problems))
    options: dict[str, RunValue | None] = {
        "epsilon": epsilon,
        "delta": delta,
        "strategy": strategy,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "lr": lr,
        "seed": seed,
        "round-timeout": round_timeout,
        "connect-timeout": connect_timeout,
        "secagg": True if secagg else None,
        "secagg-shares": secagg_shares,
        "secagg-threshold": secagg_threshold,
        "min-sites": min_sites,
    }
    try:
        for text in setting or []:
            key, value = parse_setting(text)
            if options.get(key) is not None:
                raise DeployError(f"--set {key} repeats an option given already")
            options[key] = value
        config = build_run_config(
            run_dir=run_dir,
            foundation=foundation,
            rounds=rounds,
            num_sites=sites or len(list_sites(directory)),
            options=options,
        )
        completed = _check_plan(config)
    except (DeployError, PkiError, ValueError) as exc:
        fail(str(exc))
    if completed >= rounds:
        fail(f"{run_dir} already holds {completed} rounds; ask for more with --rounds")
    run_path = Path(str(config["run-dir"]))
    for sub in ("", "checkpoints", "plots"):
        (run_path / sub).mkdir(parents=True, exist_ok=True)
    write_config(run_path, {"kind": "federated", "deployment": True, "run_config": config})
    try:
        flwr = flower_executable("flwr")
        app_dir = stage_app(directory, config)
        run_id = parse_submit_reply(run_flwr(directory, submit_command(app_dir, flwr=flwr)))
    except (DeployError, FlowerProcessError) as exc:
        fail(str(exc))
    typer.echo(
        f"run {run_id} submitted: {rounds} rounds, {config['num-sites']} sites"
        + (", SecAgg+" if config.get("secagg") is True else "")
        + (f", resuming after round {completed}" if completed else "")
        + f"; run directory {run_path}",
        err=True,
    )
    if not follow:
        if as_json:
            emit_json({"run_id": run_id, "run_dir": str(run_path), "status": "submitted"})
        return
    try:
        outcome = _follow(directory, run_id, flwr)
    except KeyboardInterrupt:
        fail(f"stopped following; run {run_id} goes on (flwr stop {run_id} ends it)", 130)
    except DeployError as exc:
        fail(str(exc))
    records = read_metrics(run_path)
    if outcome.completed and records:
        plot_run(run_path)
        write_summary(
            run_path,
            {
                "kind": "federated",
                "deployment": True,
                "flower_run_id": run_id,
                "rounds": rounds,
                "sites": config["num-sites"],
                "secagg": config.get("secagg") is True,
                "final": records[-1],
            },
        )
    result = {
        "run_id": run_id,
        "run_dir": str(run_path),
        "status": outcome.status,
        "details": outcome.details,
        "rounds_committed": len(records),
        "elapsed_s": outcome.elapsed_s,
    }
    if as_json:
        emit_json(result)
    else:
        typer.echo(
            f"run {run_id} {outcome.status}: {len(records)} of {rounds} rounds committed in "
            f"{run_path}" + (f" ({outcome.details})" if outcome.details else "")
        )
    if not outcome.completed:
        raise typer.Exit(EXIT_FINDINGS)


def new_run_dir_path(root: Path) -> Path:
    """runs/federation-<UTC timestamp>, as new_run_dir names them (created later)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return root / f"federation-{stamp}"


def _check_plan(config: dict[str, RunValue]) -> int:
    """Parses the run config as the ServerApp will (unknown keys, types, ranges refused now,
    not on the SuperLink); returns the rounds already committed in the run directory."""
    from fedrad.server.rounds import ResumeError, RunBook, ServerPlan

    plan = ServerPlan.from_run_config(config)
    if not plan.run_dir.is_dir():
        return 0
    try:
        return RunBook(plan.run_dir, plan.foundation_dir).completed
    except (ResumeError, OSError, ValueError, KeyError) as exc:  # e.g. a torn metrics line
        raise DeployError(f"cannot resume {plan.run_dir}: {exc}") from exc


def _follow(directory: Path, run_id: int, flwr: str) -> RunStatus:
    """Streams the run's log (stderr) until Flower ends it; then how the run ended."""
    process = subprocess.Popen(
        follow_command(run_id, flwr=flwr),
        env=flower_environment(directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            typer.echo(raw.decode("utf-8", "replace").rstrip("\n"), err=True)
    finally:
        stop_process(process, timeout=5)
    deadline = time.monotonic() + 60
    while True:
        runs = parse_runs_reply(run_flwr(directory, runs_command(flwr=flwr, run_id=run_id)))
        status = next((r for r in runs if r.run_id == run_id), None)
        if status is None:
            raise DeployError(f"the SuperLink does not know run {run_id}")
        if status.finished or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


@app.command()
def status(
    directory: DirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Show the registered sites, their SuperNodes as Flower reports them, and the runs."""
    try:
        address = superlink_reachable(directory)
        flwr = flower_executable("flwr")
        nodes = parse_nodes_reply(
            run_flwr(directory, nodes_command(flwr=flwr)), read_nodes(directory)
        )
        runs = parse_runs_reply(run_flwr(directory, runs_command(flwr=flwr)))
        registry = [record.site_id for record in list_sites(directory)]
    except (DeployError, PkiError, FlowerProcessError) as exc:
        fail(str(exc))
    admitted = {n.site_id for n in nodes if n.site_id is not None}
    if as_json:
        emit_json(
            {
                "superlink": address,
                "sites": [n.as_dict() for n in nodes],
                "unmatched_sites": [s for s in registry if s not in admitted],
                "online": sum(n.status == "online" for n in nodes),
                "runs": [asdict(r) for r in runs],
            }
        )
        return
    typer.echo(f"SuperLink {address}")
    typer.echo(f"sites ({sum(n.status == 'online' for n in nodes)} online):")
    for node in nodes:
        since = f" since {node.online_since}" if node.online_since else ""
        name = node.site_id or "(unknown)"
        typer.echo(f"  {name:<20} {node.status:<12} node {node.node_id}{since}")
    for site in registry:
        if site not in admitted:
            typer.echo(f"  {site:<20} (its node id was not recorded by fedrad-coordinator start)")
    typer.echo(f"runs ({len(runs)}):")
    for item in runs:
        details = f" ({item.details})" if item.details else ""
        typer.echo(f"  {item.run_id}  {item.status:<20} {item.elapsed_s:8.0f} s{details}")


def main() -> None:
    app()
