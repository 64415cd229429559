"""`fedrad-coordinator`: the federation coordinator's command line."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NamedTuple

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
from fedrad.common.run_dir import (
    plot_run,
    read_failed_rounds,
    read_metrics,
    write_config,
    write_summary,
)
from fedrad.server.deploy import (
    DATABASE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOG_FILE,
    NODES_FILE,
    STATE_FILE,
    SUPEREXEC_LOG,
    SUPEREXEC_SECRET,
    DeployError,
    RunStatus,
    RunValue,
    SuperLinkState,
    accepts_connections,
    admit_sites,
    build_run_config,
    control_address,
    default_superlink_port,
    flower_environment,
    follow_command,
    loopback_name,
    new_superexec_secret,
    nodes_command,
    parse_nodes_reply,
    parse_runs_reply,
    parse_setting,
    parse_submit_reply,
    pid_alive,
    preflight_run,
    preflight_start,
    proxy_tls_name,
    read_nodes,
    read_state,
    run_flwr,
    runs_command,
    stage_release_app,
    stop_group,
    stop_pids,
    stop_process,
    submit_command,
    superexec_command,
    superlink_command,
    superlink_reachable,
    wait_until_ready,
    write_run_config,
    write_state,
)
from fedrad.server.fleet_proxy import (
    PROXY_DIR,
    ProxyError,
    find_nginx,
    nginx_command,
    nginx_config,
)
from fedrad.server.fleet_proxy import (
    check_config as check_proxy_config,
)
from fedrad.server.fleet_proxy import (
    write_config as write_proxy_config,
)
from fedrad.server.pki import (
    CA_CERT,
    CA_KEY,
    CA_PASSPHRASE_ENV,
    DEFAULT_CA_DAYS,
    DEFAULT_SERVER_DAYS,
    SERVER_CERT,
    SERVER_KEY,
    SITES_FILE,
    FederationSummary,
    PkiError,
    add_site,
    ca_key_is_encrypted,
    check_federation,
    describe_federation,
    flwr_environment,
    flwr_register_command,
    init_federation,
    list_sites,
    read_passphrase_file,
    renew_server_certificate,
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


@app.command("renew-cert")
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
    env = flower_environment(directory)
    log_path = directory / LOG_FILE
    children: list[_Child] = []
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
    children.append(_Child("flower-superlink", link))
    relay = None if detach else _relay(link, log_path)
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
        children.append(_Child("the ServerApp runner (flower-superexec)", runner))
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
        children.append(_Child("the Fleet proxy (nginx)", proxy, group=True))
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
        name, code = _first_exit(children)
        raise DeployError(f"{name} exited with code {code}; stopping the federation")
    except KeyboardInterrupt:
        _stop_all(children)
        typer.echo("SuperLink stopped", err=True)
    except (DeployError, FlowerProcessError, ProxyError) as exc:
        _stop_all(children)
        fail(f"{exc}; logs: {log_path}, {directory / PROXY_DIR / 'error.log'}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if relay is not None:
            relay.join(timeout=5)
        if not detach or not state_written:
            _stop_all(children)
            if state_written:
                (directory / STATE_FILE).unlink(missing_ok=True)
            secret.unlink(missing_ok=True)


def wait_for_proxy(
    process: subprocess.Popen[bytes], host: str, port: int, *, timeout: float
) -> None:
    """Returns once nginx accepts connections on the sites' address; ProxyError if it exits."""
    target = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while not accepts_connections(target, port, timeout=0.5):
        if process.poll() is not None:
            raise ProxyError(f"the Fleet proxy (nginx) exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise ProxyError(f"the Fleet proxy did not accept connections within {timeout:.0f} s")
        time.sleep(0.1)


class _Child(NamedTuple):
    """One process of the federation; `group`: it leads a process group to stop whole."""

    name: str
    process: subprocess.Popen[bytes]
    group: bool = False


def _first_exit(children: list[_Child]) -> tuple[str, int]:
    """Waits until one of the federation's processes exits; its name and code."""
    while True:
        for child in children:
            code = child.process.poll()
            if code is not None:
                return child.name, code
        time.sleep(0.5)


def _stop_all(children: list[_Child]) -> None:
    """The proxy first (no new site traffic), then the runner, then the SuperLink."""
    for child in reversed(children):
        if child.group:  # nginx: its workers outlive a killed master
            stop_group(child.process.pid)
            child.process.poll()
        else:
            stop_process(child.process, timeout=10)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
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


@app.command("build-app")
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
