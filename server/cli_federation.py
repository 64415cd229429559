"""`fedrad-coordinator` start, stop, build-app, run and status: the running federation and
the runs submitted to it."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from fedrad.common.cli_support import (
    EXIT_FINDINGS,
    JsonOpt,
    SecAggFlag,
    SecAggShares,
    SecAggThreshold,
    VerboseOpt,
    emit_json,
    fail,
    setup_logging,
)
from fedrad.common.flower_process import FlowerProcessError, flower_executable, flower_process_env
from fedrad.common.protocol.run_config import RunValue, run_option, settings_among
from fedrad.common.run_dir import (
    plot_run,
    read_failed_rounds,
    read_metrics,
    write_config,
    write_summary,
)
from fedrad.server.certificates import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    PkiError,
    describe_federation,
    flwr_home,
    write_flwr_connection,
)
from fedrad.server.cli_options import DirOpt
from fedrad.server.fleet_proxy import PROXY_DIR, ProxyError, find_nginx, nginx_command, nginx_config
from fedrad.server.fleet_proxy import check_config as check_proxy_config
from fedrad.server.fleet_proxy import write_config as write_proxy_config
from fedrad.server.flwr_cli import DeployError, run_flwr
from fedrad.server.site_registry import NODES_FILE, admit_sites, list_sites, read_nodes
from fedrad.server.submission import (
    build_run_config,
    check_plan,
    follow_run,
    new_run_dir_path,
    nodes_command,
    parse_nodes_reply,
    parse_runs_reply,
    parse_setting,
    parse_submit_reply,
    preflight_run,
    runs_command,
    stage_release_app,
    submit_command,
    write_run_config,
)
from fedrad.server.superlink import (
    DATABASE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOG_FILE,
    STATE_FILE,
    SUPEREXEC_LOG,
    SUPEREXEC_SECRET,
    Child,
    SuperLinkState,
    control_address,
    default_superlink_port,
    first_exit,
    loopback_name,
    new_superexec_secret,
    pid_alive,
    preflight_start,
    proxy_tls_name,
    read_state,
    relay,
    stop_all,
    stop_group,
    stop_pids,
    superexec_command,
    superlink_command,
    superlink_reachable,
    wait_for_proxy,
    wait_until_ready,
    write_state,
)


def start(
    directory: DirOpt = Path("."),
    host: Annotated[
        str, typer.Option(help="Address the sites reach (the Fleet proxy; 0.0.0.0: every one).")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port the sites reach (the Fleet proxy).")] = (
        DEFAULT_PORT
    ),
    superlink_port: Annotated[
        int | None,
        typer.Option(help="The SuperLink's own port, on 127.0.0.1 only (default: PORT + 1)."),
    ] = None,
    detach: Annotated[
        bool, typer.Option(help="Leave the federation running in the background and return.")
    ] = False,
    startup_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the SuperLink to accept connections.")
    ] = 60.0,
    verbose: VerboseOpt = False,
) -> None:
    """Run the federation: Flower's SuperLink on loopback with TLS and node authentication,
    its ServerApp runner, and the Fleet proxy (nginx) that alone faces the sites; then admit
    every registered site.

    Sites reach HOST:PORT, where only Flower's Fleet API is served; submitting, listing and
    stopping runs and registering nodes work from this host only (`run`, `status`). Stays in
    the foreground streaming the SuperLink's log (also in DIR/superlink.log); Ctrl-C stops all
    three. If one of them dies, the others are stopped too.
    """
    setup_logging(verbose)
    inner = default_superlink_port(port) if superlink_port is None else superlink_port
    problems = preflight_start(directory, host=host, port=port, superlink_port=inner)
    if problems:
        fail("; ".join(problems))
    directory = directory.resolve()
    try:
        address = control_address(loopback_name(directory), inner)
        write_flwr_connection(directory, address=address)
        nginx = find_nginx()
        proxy_config = write_proxy_config(
            directory,
            nginx_config(
                directory,
                host=host,
                port=port,
                upstream_port=inner,
                upstream_name=proxy_tls_name(directory),
                certificate=directory / SERVER_CERT,
                key=directory / SERVER_KEY,
                ca=directory / CA_CERT,
            ),
        )
        check_proxy_config(nginx, proxy_config)
        secret = new_superexec_secret(directory)
        command = superlink_command(
            directory,
            port=inner,
            executable=flower_executable("flower-superlink"),
            secret_file=secret,
        )
        superexec = flower_executable("flower-superexec")
    except (DeployError, PkiError, FlowerProcessError, ProxyError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write to {directory}: {exc.strerror}")
    env = flower_process_env(flwr_home(directory))
    log_path = directory / LOG_FILE
    children: list[Child] = []
    with log_path.open("ab") as log:
        link = subprocess.Popen(
            command,
            env=env,
            stdout=log if detach else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Foreground: same process group, so Ctrl-C or a kill of the group stops all.
            start_new_session=detach,
        )
    children.append(Child("flower-superlink", link))
    relaying = None if detach else relay(link, log_path, typer.echo)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    state_written = False
    try:
        wait_until_ready(link, "127.0.0.1", inner, timeout=startup_timeout)
        with (directory / SUPEREXEC_LOG).open("ab") as log:
            runner = subprocess.Popen(
                superexec_command(
                    directory,
                    address=address,
                    executable=superexec,
                    secret_file=secret,
                    parent_pid=link.pid,
                ),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,
            )
        children.append(Child("the ServerApp runner (flower-superexec)", runner))
        proxy = subprocess.Popen(
            nginx_command(nginx, proxy_config),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            # its own group always: nginx's workers outlive a killed master unless the whole
            # group is stopped (stop_group)
            start_new_session=True,
        )
        children.append(Child("the Fleet proxy (nginx)", proxy, group=True))
        wait_for_proxy(proxy, host, port, timeout=startup_timeout)
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
                pid=link.pid,
                host=host,
                port=port,
                address=address,
                database=str(directory / DATABASE),
                log=str(log_path),
                superlink_port=inner,
                proxy_pid=proxy.pid,
                superexec_pid=runner.pid,
            ),
        )
        state_written = True
        typer.echo(
            f"SuperLink running (pid {link.pid}) on 127.0.0.1:{inner}; sites connect to the "
            f"Fleet proxy at "
            f"{' or '.join(f'{h}:{port}' for h in describe_federation(directory).server_hosts)} "
            f"trusting {directory / CA_CERT}; runs are submitted from this host only",
            err=True,
        )
        if detach:
            typer.echo(
                f"it runs in the background: fedrad-coordinator stop --dir {directory}", err=True
            )
            return
        typer.echo("Ctrl-C stops it", err=True)
        name, code = first_exit(children)
        raise DeployError(f"{name} exited with code {code}; stopping the federation")
    except KeyboardInterrupt:
        stop_all(children)
        typer.echo("SuperLink stopped", err=True)
    except (DeployError, FlowerProcessError, ProxyError) as exc:
        stop_all(children)
        fail(f"{exc}; logs: {log_path}, {directory / PROXY_DIR / 'error.log'}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if relaying is not None:
            relaying.join(timeout=5)
        if not detach or not state_written:
            stop_all(children)
            if state_written:
                (directory / STATE_FILE).unlink(missing_ok=True)
            secret.unlink(missing_ok=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop(directory: DirOpt = Path(".")) -> None:
    """Stop a federation started with --detach (the proxy, the runner, the SuperLink)."""
    try:
        state = read_state(directory)
    except DeployError as exc:
        fail(str(exc))
    if state is None:
        fail(f"no federation started from {directory} is recorded ({STATE_FILE} is absent)")
    running = sum(pid_alive(pid) for pid in state.pids())
    if state.proxy_pid is not None:
        stop_group(state.proxy_pid)  # nginx's workers with it
    stop_pids(state.pids())
    (directory / STATE_FILE).unlink(missing_ok=True)
    (directory / SUPEREXEC_SECRET).unlink(missing_ok=True)
    typer.echo(f"stopped {running} process(es) of the federation in {directory}", err=True)


def build_app(
    directory: DirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Build the release's one app bundle (FAB): the bundle every run submits, and its sha256
    for the sites to approve (each site can compute it itself: fedrad-site approve --release).
    """
    from flwr.cli.build import build_fab_from_disk

    from fedrad.common.protocol.release_app import fab_sha256, release_fab, release_version

    try:
        app_dir = stage_release_app(directory)
    except (OSError, ValueError) as exc:
        fail(f"cannot write the release app under {directory}: {exc}")
    fab = release_fab()
    if build_fab_from_disk(app_dir) != fab:  # what `flwr run` will send is what sites approve
        fail(f"{app_dir} does not build the release bundle: remove the directory and retry")
    out = app_dir.parent / f"{app_dir.name}.fab"
    out.write_bytes(fab)
    digest = fab_sha256(fab)
    if as_json:
        emit_json(
            {"fab": str(out), "sha256": digest, "version": release_version(), "app": str(app_dir)}
        )
        return
    typer.echo(f"fedrad {release_version()} app bundle: {out}")
    typer.echo(f"  sha256 {digest}")
    typer.echo("each site approves it once: fedrad-site approve --release (computed at the site)")
    typer.echo(f"  or: fedrad-site approve {digest}")


def run(
    rounds: Annotated[int, typer.Option(help="Total rounds (a resumed run continues to it).")],
    foundation: Annotated[Path, run_option("foundation-dir", "--foundation")],
    directory: DirOpt = Path("."),
    run_dir: Annotated[Path | None, run_option("run-dir")] = None,
    sites: Annotated[
        int | None, typer.Option(help="Sites that must join (default: every registered site).")
    ] = None,
    epsilon: Annotated[float | None, run_option("epsilon")] = None,
    delta: Annotated[float | None, run_option("delta")] = None,
    strategy: Annotated[str | None, run_option("strategy")] = None,
    local_steps: Annotated[int | None, run_option("local-steps")] = None,
    batch_size: Annotated[int | None, run_option("batch-size")] = None,
    lr: Annotated[float | None, run_option("lr")] = None,
    seed: Annotated[int | None, run_option("seed")] = None,
    round_timeout: Annotated[float | None, run_option("round-timeout")] = None,
    connect_timeout: Annotated[float | None, run_option("connect-timeout")] = None,
    secagg: SecAggFlag = False,
    secagg_shares: SecAggShares = None,
    secagg_threshold: SecAggThreshold = None,
    min_sites: Annotated[int | None, run_option("min-sites", metavar="K")] = None,
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
    given = settings_among(locals())  # the run settings among this command's options
    setup_logging(verbose)
    run_dir = run_dir or new_run_dir_path(Path("runs"))
    problems = preflight_run(directory, foundation=foundation, run_dir=run_dir, num_sites=sites)
    if problems:
        fail("; ".join(problems))
    options: dict[str, RunValue | None] = {
        **given,
        "site-registry": str((directory / NODES_FILE).resolve()),
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
        completed = check_plan(config)
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
        app_dir = stage_release_app(directory)
        settings = write_run_config(run_path, config)
        run_id = parse_submit_reply(
            run_flwr(directory, submit_command(app_dir, settings, flwr=flwr))
        )
    except (DeployError, FlowerProcessError, ValueError) as exc:
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
        outcome = follow_run(directory, run_id, flwr, lambda line: typer.echo(line, err=True))
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
    failed = read_failed_rounds(run_path)
    if failed and not outcome.completed:
        result["failed_round"] = failed[-1]
        for line in failed[-1]["failures"]:
            typer.echo(f"round {failed[-1]['round']}: {line}", err=True)
    if as_json:
        emit_json(result)
    else:
        typer.echo(
            f"run {run_id} {outcome.status}: {len(records)} of {rounds} rounds committed in "
            f"{run_path}" + (f" ({outcome.details})" if outcome.details else "")
        )
    if not outcome.completed:
        raise typer.Exit(EXIT_FINDINGS)


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
