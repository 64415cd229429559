"""Deployment on the coordinator: the Flower 1.41 command lines for the SuperLink, its
ServerApp runner, site admission, run submission and status, their preflight checks, and the
replies they parse.

Everything that decides something is a pure function (command lines, environments, run
configs, parsers, preflight problems), tested without Flower; `fedrad-coordinator start`,
`run` and `status` run the commands.

How Flower 1.41 is driven (read from its source and checked in a live run):

- `flower-superlink` serves Fleet, Control and Runtime APIs over HTTPS on one listener: it
  binds 127.0.0.1, and the sites reach the Fleet API through the proxy (`fleet_proxy.py`).
  `--database DIR/superlink.db` keeps registrations and runs across restarts. With
  `--isolation process` the ServerApp runner is a `flower-superexec` started here, and claiming
  a task needs a secret written fresh at every start.
- A registered site's key is admitted with `flwr supernode register KEY.pub CONNECTION`, run
  with `FLWR_HOME=DIR/flwr`; it exits 0 even when it fails, so its JSON reply decides.
  "Public key already in use" for a key from our own registry means that very key is admitted.
- Every run submits the release's one app (`common/protocol/release_app.py`, staged once in
  `DIR/apps/fedrad-<version>/`), whose pyproject declares every setting; a run's values
  travel as `flwr run --run-config RUN_DIR/run_config.toml`, so the bundle's sha256 is the one
  the sites approved.
- `flwr run --format json` answers with the run id; `flwr log RUN_ID --stream` follows it
  until it ends; `flwr ls --run-id RUN_ID --format json` then says how it ended.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from fedrad.common.flower_process import (
    FlowerProcessError,
    flower_executable,
    flower_process_env,
    port_in_use,
    write_fresh_secret,
)
from fedrad.common.protocol.release_app import (
    RunValue,
    release_version,
    run_config_toml,
    write_release_app,
)
from fedrad.server.fleet_proxy import ProxyError, find_nginx
from fedrad.server.pki import (
    CA_CERT,
    FLWR_CONNECTION,
    FLWR_HOME_DIR,
    SERVER_CERT,
    PkiError,
    certificate_hosts,
    check_federation,
    flwr_register_command,
    list_sites,
    load_certificate,
    split_address,
    superlink_tls_args,
)

logger = logging.getLogger(__name__)

DEFAULT_HOST: Final[str] = "0.0.0.0"  # bind address of `fedrad-coordinator start`
DEFAULT_PORT: Final[int] = 8000  # flower-superlink's own default
DATABASE: Final[str] = "superlink.db"
LOG_FILE: Final[str] = "superlink.log"
STATE_FILE: Final[str] = "superlink.json"  # pid, address: written by `start`
NODES_FILE: Final[str] = "nodes.json"  # site id -> node id as the SuperLink assigned it
APPS_DIR: Final[str] = "apps"
_BIND_ALL: Final[frozenset[str]] = frozenset({"0.0.0.0", "::", ""})


class DeployError(Exception):
    """The deployment step cannot go ahead; the message says why in one line."""


# -- executables and environments ----------------------------------------------------------


def flower_environment(
    directory: Path, base: Mapping[str, str] | None = None, *, bin_dir: Path | None = None
) -> dict[str, str]:
    """The environment of every Flower process the coordinator starts, with
    `FLWR_HOME=DIR/flwr` (the CLI connection and the apps the SuperLink installs)."""
    return flower_process_env(Path(directory).resolve() / FLWR_HOME_DIR, base, bin_dir=bin_dir)


# -- addresses -------------------------------------------------------------------------------


def check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise DeployError(f"port {port} is not in 1..65535")


def control_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def accepts_connections(host: str, port: int, *, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- the SuperLink ---------------------------------------------------------------------------


SUPEREXEC_SECRET: Final[str] = "superexec.secret"  # 0600, new at every start
SUPEREXEC_LOG: Final[str] = "superexec.log"


def default_superlink_port(port: int) -> int:
    """The SuperLink's own loopback port when not given: the one after the proxy's."""
    return port + 1 if port < 65535 else port - 1


def superlink_command(
    directory: Path, *, port: int, executable: str, secret_file: Path
) -> list[str]:
    """`flower-superlink` on 127.0.0.1:`port` only (the Fleet proxy is the sites' door), with
    TLS from the coordinator directory, node authentication, state in `DIR/superlink.db`, no
    dependency installation at run time, and process isolation: the ServerApp runner is
    `superexec_command`, and claiming a task needs the secret in `secret_file`."""
    check_port(port)
    directory = Path(directory).resolve()
    return [
        executable,
        *superlink_tls_args(directory),
        "--database",
        str(directory / DATABASE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret_file),
    ]


def superexec_command(
    directory: Path, *, address: str, executable: str, secret_file: Path, parent_pid: int
) -> list[str]:
    """Flower's ServerApp runner, attached to the SuperLink's loopback Runtime API over TLS."""
    directory = Path(directory).resolve()
    return [
        executable,
        "--runtime-api-address",
        address,
        "--root-certificates",
        str(directory / CA_CERT),
        "--superexec-auth-secret-file",
        str(secret_file),
        "--parent-pid",
        str(parent_pid),
    ]


def new_superexec_secret(directory: Path) -> Path:
    """A fresh random secret for this start, 0600: only our runner may claim ServerApp tasks."""
    return write_fresh_secret(Path(directory).resolve() / SUPEREXEC_SECRET)


def proxy_tls_name(directory: Path) -> str:
    """The name nginx verifies the SuperLink certificate by (it reaches 127.0.0.1 but checks a
    DNS name: nginx does not match IP addresses): localhost, else the first DNS name."""
    cert = load_certificate(Path(directory) / SERVER_CERT, "SuperLink certificate")
    names = [h for h in certificate_hosts(cert) if not _is_ip(h)]
    if not names:
        raise DeployError(
            "the SuperLink certificate names no DNS host, which the Fleet proxy verifies it "
            f"by: fedrad-coordinator renew-cert --dir {directory} --loopback"
        )
    return "localhost" if "localhost" in names else names[0]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def loopback_name(directory: Path) -> str:
    """The loopback name the SuperLink certificate covers (the CLI and the proxy verify the
    SuperLink by it), or a one-line DeployError naming the fix."""
    cert = load_certificate(Path(directory) / SERVER_CERT, "SuperLink certificate")
    hosts = certificate_hosts(cert)
    for name in ("127.0.0.1", "localhost"):
        if name in hosts:
            return name
    raise DeployError(
        "the SuperLink certificate does not cover 127.0.0.1 or localhost, which the "
        f"coordinator's own CLI and the Fleet proxy use: fedrad-coordinator renew-cert --dir "
        f"{directory} --loopback"
    )


def preflight_start(
    directory: Path, *, host: str, port: int, superlink_port: int | None = None
) -> list[str]:
    """Every reason `start` would fail, one line each, before anything starts."""
    directory = Path(directory)
    inner = default_superlink_port(port) if superlink_port is None else superlink_port
    try:
        check_port(port)
        check_port(inner)
    except DeployError as exc:
        return [str(exc)]
    if inner == port:
        return [f"the SuperLink's own port {inner} is the proxy's port: pick another"]
    problems: list[str] = []
    try:
        find_nginx()
    except ProxyError as exc:
        problems.append(str(exc))
    try:
        state = read_state(directory)
    except DeployError as exc:
        problems.append(str(exc))
        state = None
    if state is not None and pid_alive(state.pid):
        problems.append(
            f"a SuperLink started from {directory} is already running (pid {state.pid}, "
            f"{state.address})"
        )
    named = [] if host in _BIND_ALL else [host]
    try:
        problems += check_federation(directory, named)
    except PkiError as exc:
        return [str(exc)]
    try:
        sites = list_sites(directory)
    except PkiError as exc:
        problems.append(str(exc))
    else:
        if not sites:
            problems.append(
                f"no registered sites in {directory}: add each site's key with "
                "fedrad-coordinator add-site first"
            )
    try:
        if port_in_use(host, port):
            problems.append(f"port {port} on {host or '0.0.0.0'} is already in use")
        if port_in_use("127.0.0.1", inner):
            problems.append(
                f"port {inner} on 127.0.0.1 (the SuperLink's own) is already in use: pick "
                "another with --superlink-port"
            )
    except FlowerProcessError as exc:
        problems.append(str(exc))
    if (directory / SERVER_CERT).is_file():
        for check in (loopback_name, proxy_tls_name):
            try:
                check(directory)
            except (DeployError, PkiError) as exc:
                problems.append(str(exc))
    return problems


@dataclass(frozen=True)
class SuperLinkState:
    """What `start` leaves in DIR/superlink.json for `run`, `status` and a later `start`."""

    pid: int  # the SuperLink
    host: str  # the Fleet proxy's bind address (what sites reach)
    port: int  # the Fleet proxy's port
    address: str  # what the coordinator's CLI connects to (127.0.0.1:PORT, TLS)
    database: str
    log: str
    superlink_port: int | None = None  # the SuperLink's own, on 127.0.0.1
    proxy_pid: int | None = None
    superexec_pid: int | None = None

    def pids(self) -> list[int]:
        return [p for p in (self.proxy_pid, self.superexec_pid, self.pid) if p is not None]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_state(directory: Path, state: SuperLinkState) -> Path:
    path = Path(directory) / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state.as_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_state(directory: Path) -> SuperLinkState | None:
    path = Path(directory) / STATE_FILE
    try:
        return SuperLinkState(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise DeployError(f"{path} is not a readable SuperLink state file ({exc!s:.60})") from exc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cli_address(directory: Path) -> str:
    """The SuperLink address the coordinator's `flwr` connection names (DIR/flwr/config.toml)."""
    path = Path(directory) / FLWR_HOME_DIR / "config.toml"
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
        return str(config["superlink"][FLWR_CONNECTION]["address"])
    except FileNotFoundError as exc:
        raise DeployError(
            f"{path} is missing: is {directory} a coordinator directory (fedrad-coordinator init)?"
        ) from exc
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise DeployError(f"{path} has no [superlink.{FLWR_CONNECTION}] address") from exc


def superlink_reachable(directory: Path) -> str:
    """The CLI address when a SuperLink accepts connections there; else a one-line error."""
    address = cli_address(directory)
    host, port = split_address(address)
    if port is None or not accepts_connections(host, port):
        raise DeployError(
            f"no SuperLink answers at {address}: start it with fedrad-coordinator start "
            f"--dir {directory}"
        )
    return address


# -- admitting the registered sites ----------------------------------------------------------

AdmissionStatus = Literal["registered", "already registered", "failed"]


@dataclass(frozen=True)
class Admission:
    site_id: str
    status: AdmissionStatus
    node_id: int | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def parse_json_reply(text: str) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (anything before it, such
    as a notice, is skipped); a one-line DeployError when there is none."""
    start = text.find("{")
    if start < 0:
        raise DeployError(f"flwr printed no JSON ({text.strip()[:80]!r})")
    try:
        reply = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise DeployError(f"flwr printed malformed JSON ({exc.msg})") from exc
    if not isinstance(reply, dict):
        raise DeployError("flwr printed JSON that is not an object")
    return reply


def flwr_error(reply: Mapping[str, Any]) -> str:
    """Flower's error message, on one line, without its 'Using SuperLink' preamble."""
    message = str(reply.get("error-message", "unknown error"))
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip() and not line.startswith("Using SuperLink")
    ]
    return " ".join(lines) or "unknown error"


def parse_register_reply(site_id: str, stdout: str) -> Admission:
    """`flwr supernode register --format json` -> Admission. The key comes from our own
    registry, so "already in use" means this very key is admitted (e.g. a restarted SuperLink
    with its database)."""
    try:
        reply = parse_json_reply(stdout)
    except DeployError as exc:
        return Admission(site_id, "failed", message=str(exc))
    if reply.get("success") is True:
        node = reply.get("node-id")
        return Admission(site_id, "registered", node_id=None if node is None else int(node))
    message = flwr_error(reply)
    if "already in use" in message.lower():
        return Admission(site_id, "already registered", message=message)
    return Admission(site_id, "failed", message=message)


def register_commands(directory: Path, *, flwr: str) -> list[tuple[str, list[str]]]:
    """(site id, command) for every site in the registry, in registry order."""
    return [
        (record.site_id, flwr_register_command(directory, record.site_id, flwr=flwr))
        for record in list_sites(directory)
    ]


def read_nodes(directory: Path) -> dict[str, int]:
    path = Path(directory) / NODES_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path} is not readable ({exc!s:.60})") from exc
    return {str(k): int(v) for k, v in raw.items()}


def record_nodes(directory: Path, admissions: Sequence[Admission]) -> dict[str, int]:
    """Keeps site id -> node id for `status` (a re-admitted key keeps its earlier id)."""
    nodes = read_nodes(directory)
    for admission in admissions:
        if admission.node_id is not None:
            nodes[admission.site_id] = admission.node_id
    path = Path(directory) / NODES_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(nodes, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return nodes


# -- a run -----------------------------------------------------------------------------------

# Run config keys the ServerApp reads (ServerPlan.from_run_config) that are paths.
PATH_KEYS: Final[tuple[str, ...]] = ("run-dir", "foundation-dir")


def check_foundation(foundation: Path) -> list[str]:
    """Problems with a foundation checkpoint directory, without loading the model."""
    foundation = Path(foundation)
    if not foundation.exists():
        return [f"foundation {foundation} does not exist"]
    if not foundation.is_dir():
        return [f"foundation {foundation} is not a checkpoint directory"]
    missing = [n for n in ("model.safetensors", "metadata.json") if not (foundation / n).is_file()]
    if missing:
        return [f"foundation {foundation} is not a fedrad checkpoint (no {', '.join(missing)})"]
    try:
        meta = json.loads((foundation / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"foundation {foundation}/metadata.json is not readable JSON"]
    trainable = meta.get("trainable") if isinstance(meta, dict) else None
    if not isinstance(trainable, list) or not trainable:
        return [f"foundation {foundation} declares no trainable parameters"]
    return []


def build_run_config(
    *,
    run_dir: Path,
    foundation: Path,
    rounds: int,
    num_sites: int,
    options: Mapping[str, RunValue | None] | None = None,
) -> dict[str, RunValue]:
    """The ServerApp's run config (hyphenated keys, absolute paths); options set to None
    are left to the ServerApp's defaults. Validate it with `ServerPlan.from_run_config`."""
    if rounds < 1:
        raise DeployError(f"--rounds must be at least 1, got {rounds}")
    if num_sites < 1:
        raise DeployError(f"the run needs at least one site, got {num_sites}")
    config: dict[str, RunValue] = {
        "run-dir": str(Path(run_dir).expanduser().resolve()),
        "foundation-dir": str(Path(foundation).expanduser().resolve()),
        "num-sites": int(num_sites),
        "num-rounds": int(rounds),
    }
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in config:
            raise DeployError(f"run config key {key!r} is set by its own option")
        if not isinstance(value, int | float | str | bool):
            raise DeployError(f"run config {key!r} must be a number, string or bool")
        config[key] = value
    return config


def parse_setting(text: str) -> tuple[str, RunValue]:
    """`KEY=VALUE` with a TOML value (`delta=1e-5`, `dp=false`, `accountant="prv"`); a bare
    word is taken as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise DeployError(f"{text!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if not isinstance(value, int | float | str | bool):
        raise DeployError(f"{text!r}: the value must be a number, string or bool")
    return key, value


def release_app_dir(directory: Path) -> Path:
    """DIR/apps/fedrad-<version>: the release's one app, the same bundle for every run."""
    return Path(directory).resolve() / APPS_DIR / f"fedrad-{release_version()}"


def stage_release_app(directory: Path) -> Path:
    """Writes the release app directory (its pyproject only); returns it."""
    return write_release_app(release_app_dir(directory))


def write_run_config(run_dir: Path, run_config: Mapping[str, RunValue]) -> Path:
    """RUN_DIR/run_config.toml: this run's settings, as `flwr run --run-config` reads them."""
    try:
        text = run_config_toml(run_config)
    except ValueError as exc:
        raise DeployError(str(exc)) from exc
    path = Path(run_dir) / "run_config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def submit_command(app_dir: Path, run_config_file: Path, *, flwr: str) -> list[str]:
    return [
        flwr,
        "run",
        str(app_dir),
        FLWR_CONNECTION,
        "--run-config",
        str(run_config_file),
        "--format",
        "json",
    ]


def follow_command(run_id: int, *, flwr: str) -> list[str]:
    return [flwr, "log", str(run_id), FLWR_CONNECTION, "--stream"]


def runs_command(*, flwr: str, run_id: int | None = None) -> list[str]:
    command = [flwr, "ls", FLWR_CONNECTION, "--format", "json"]
    if run_id is not None:
        command += ["--run-id", str(run_id)]
    return command


def nodes_command(*, flwr: str) -> list[str]:
    return [flwr, "supernode", "list", FLWR_CONNECTION, "--format", "json"]


def parse_submit_reply(stdout: str) -> int:
    """The run id from `flwr run --format json`, or a one-line DeployError."""
    reply = parse_json_reply(stdout)
    if reply.get("success") is not True or "run-id" not in reply:
        raise DeployError(f"the SuperLink refused the run: {flwr_error(reply)}")
    return int(reply["run-id"])


@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str  # Flower's: pending, starting, running, finished:completed|failed|stopped
    details: str
    elapsed_s: float

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def parse_runs_reply(stdout: str) -> list[RunStatus]:
    reply = parse_json_reply(stdout)
    if reply.get("success") is not True:
        raise DeployError(f"cannot list runs: {flwr_error(reply)}")
    runs = []
    for run in reply.get("runs", []):
        details = str(run.get("status-details", ""))
        runs.append(
            RunStatus(
                run_id=int(run["run-id"]),
                status=str(run.get("status", "unknown")),
                details="" if details == "N/A" else details,
                elapsed_s=float(run.get("elapsed", 0.0) or 0.0),
            )
        )
    return runs


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    site_id: str | None  # from DIR/nodes.json; None for a node fedrad did not admit
    status: str  # Flower's: registered (never connected), online, offline, unregistered
    online_since: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_nodes_reply(stdout: str, nodes: Mapping[str, int]) -> list[NodeStatus]:
    reply = parse_json_reply(stdout)
    if reply.get("success") is not True:
        raise DeployError(f"cannot list SuperNodes: {flwr_error(reply)}")
    by_id = {node_id: site for site, node_id in nodes.items()}
    out = []
    for node in reply.get("nodes", []):
        node_id = int(node["node-id"])
        status = str(node.get("status", "unknown"))
        online = node.get("online-at") if status == "online" else None
        out.append(
            NodeStatus(
                node_id=node_id,
                site_id=by_id.get(node_id),
                status=status,
                online_since=None if online in (None, "N/A") else str(online),
            )
        )
    return out


def preflight_run(
    directory: Path, *, foundation: Path, run_dir: Path, num_sites: int | None
) -> list[str]:
    """Every reason `run` would fail before anything is submitted, one line each."""
    directory = Path(directory)
    if not (directory / CA_CERT).is_file():
        return [f"{directory} is not a coordinator directory (no {CA_CERT}; run init)"]
    problems = check_foundation(foundation)
    try:
        registered = len(list_sites(directory))
    except PkiError as exc:
        problems.append(str(exc))
        registered = 0
    if registered == 0:
        problems.append(f"no registered sites in {directory}")
    elif num_sites is not None and num_sites > registered:
        problems.append(f"--sites {num_sites} but only {registered} sites are registered")
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        problems.append(f"run directory {run_dir} exists and is not a directory")
    try:
        superlink_reachable(directory)
    except DeployError as exc:
        problems.append(str(exc))
    return problems


# -- running them ------------------------------------------------------------------------------
# Thin wrappers over subprocess, used by the CLI; the decisions are in the functions above.

FLWR_TIMEOUT_S: Final[float] = 120.0  # one `flwr` CLI call (register, ls, run submission)


def run_flwr(directory: Path, command: Sequence[str], *, timeout: float = FLWR_TIMEOUT_S) -> str:
    """Runs one `flwr` CLI command against the coordinator's connection; its stdout."""
    try:
        done = subprocess.run(
            list(command),
            env=flower_environment(directory),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        what = f"{Path(command[0]).name} {command[1]}"
        raise DeployError(f"{what} timed out after {timeout:.0f} s") from exc
    except OSError as exc:
        raise DeployError(f"cannot run {command[0]}: {exc.strerror}") from exc
    if done.returncode != 0 and "{" not in done.stdout:
        last = (done.stderr or done.stdout).strip().splitlines()
        raise DeployError(
            f"{Path(command[0]).name} {command[1]} failed: {last[-1] if last else done.returncode}"
        )
    return done.stdout


def admit_sites(directory: Path) -> list[Admission]:
    """Registers every key of the site registry with the running SuperLink."""
    flwr = flower_executable("flwr")
    admissions = []
    for site_id, command in register_commands(directory, flwr=flwr):
        try:
            admission = parse_register_reply(site_id, run_flwr(directory, command))
        except DeployError as exc:
            admission = Admission(site_id, "failed", message=str(exc))
        logger.info("site %s: %s", site_id, admission.status)
        admissions.append(admission)
    record_nodes(directory, admissions)
    return admissions


def wait_until_ready(
    process: subprocess.Popen[Any], host: str, port: int, *, timeout: float
) -> None:
    """Returns once the SuperLink accepts connections; DeployError if it exits or hangs."""
    deadline = time.monotonic() + timeout
    while not accepts_connections(host, port, timeout=0.5):
        code = process.poll()
        if code is not None:
            raise DeployError(f"flower-superlink exited with code {code} during start-up")
        if time.monotonic() > deadline:
            raise DeployError(f"flower-superlink did not accept connections within {timeout:.0f} s")
        time.sleep(0.25)


def stop_group(leader: int, *, timeout: float = 10.0) -> None:
    """SIGTERM to the process group `leader` leads (nginx and its workers), then SIGKILL."""
    try:
        os.killpg(leader, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it if it is ours: no zombie
            os.waitpid(leader, os.WNOHANG)
        try:
            os.killpg(leader, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)


def stop_pids(pids: Sequence[int], *, timeout: float = 20.0) -> int:
    """SIGTERM to each live pid, then SIGKILL to any left after `timeout`; how many lived."""
    alive = [pid for pid in pids if pid_alive(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return len(alive)


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 20.0) -> int:
    """SIGTERM (Flower shuts down cleanly on it), then SIGKILL after `timeout`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM for %.0f s: killing it", process.pid, timeout)
            process.kill()
            process.wait()
    return int(process.returncode)
