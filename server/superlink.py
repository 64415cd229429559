"""The federation's processes on the coordinator host: Flower's SuperLink (loopback only, TLS,
node authentication, its state kept in a database), its ServerApp runner, and the Fleet proxy
that alone faces the sites. Their command lines and the checks before `start` are pure
functions; starting, watching and stopping them are thin wrappers over subprocess."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from fedrad.common.flower_process import FlowerProcessError, port_in_use, write_fresh_secret
from fedrad.server.certificates import (
    CA_CERT,
    FLWR_CONNECTION,
    FLWR_HOME_DIR,
    SERVER_CERT,
    SERVER_KEY,
    PkiError,
    certificate_hosts,
    check_federation,
    load_certificate,
    split_address,
)
from fedrad.server.fleet_proxy import ProxyError, find_nginx
from fedrad.server.flwr_cli import DeployError
from fedrad.server.site_registry import list_sites

logger = logging.getLogger(__name__)

DEFAULT_HOST: Final[str] = "0.0.0.0"  # bind address of `fedrad-coordinator start`
DEFAULT_PORT: Final[int] = 8000  # flower-superlink's own default
DATABASE: Final[str] = "superlink.db"
LOG_FILE: Final[str] = "superlink.log"
STATE_FILE: Final[str] = "superlink.json"  # pid, address: written by `start`
SUPEREXEC_SECRET: Final[str] = "superexec.secret"  # 0600, new at every start
SUPEREXEC_LOG: Final[str] = "superexec.log"
_BIND_ALL: Final[frozenset[str]] = frozenset({"0.0.0.0", "::", ""})


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


def default_superlink_port(port: int) -> int:
    """The SuperLink's own loopback port when not given: the one after the proxy's."""
    return port + 1 if port < 65535 else port - 1


# -- command lines and the names the SuperLink is verified by -----------------------------------


def superlink_tls_args(directory: Path) -> list[str]:
    """`flower-superlink` flags for TLS with this directory's files and node authentication."""
    directory = Path(directory).resolve()
    return [
        "--ssl-ca-certfile",
        str(directory / CA_CERT),
        "--ssl-certfile",
        str(directory / SERVER_CERT),
        "--ssl-keyfile",
        str(directory / SERVER_KEY),
        "--enable-supernode-auth",
    ]


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


# -- what `start` leaves for `run`, `status` and `stop` ----------------------------------------


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


# -- running them -----------------------------------------------------------------------------


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


class Child(NamedTuple):
    """One process of the federation; `group`: it leads a process group to stop whole."""

    name: str
    process: subprocess.Popen[bytes]
    group: bool = False


def relay(
    process: subprocess.Popen[bytes], log_path: Path, echo: Callable[[str], None]
) -> threading.Thread:
    """Copies the child's output to its log file and to `echo` (the terminal), line by line."""

    def copy() -> None:
        assert process.stdout is not None
        with log_path.open("ab") as log:
            for raw in process.stdout:
                log.write(raw)
                log.flush()
                echo(raw.decode("utf-8", "replace").rstrip("\n"))

    thread = threading.Thread(target=copy, name="superlink-log", daemon=True)
    thread.start()
    return thread


def first_exit(children: Sequence[Child]) -> tuple[str, int]:
    """Waits until one of the federation's processes exits; its name and code."""
    while True:
        for child in children:
            code = child.process.poll()
            if code is not None:
                return child.name, code
        time.sleep(0.5)


def stop_all(children: Sequence[Child]) -> None:
    """The proxy first (no new site traffic), then the runner, then the SuperLink."""
    for child in reversed(children):
        if child.group:  # nginx: its workers outlive a killed master
            stop_group(child.process.pid)
            child.process.poll()
        else:
            stop_process(child.process, timeout=10)


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
