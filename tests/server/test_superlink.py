"""The federation's processes as pure functions: the SuperLink's and its runner's command
lines, the names the proxy and the CLI verify the SuperLink by, the environment of every
Flower process, one-line preflight problems, the state file, and stopping; plus `start`
refusing bad input before anything starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.common.flower_process import FLOWER_ENV, flower_process_env
from fedrad.server import superlink
from fedrad.server.certificates import SERVER_KEY, flwr_home, init_federation
from fedrad.server.cli import app
from fedrad.server.fleet_proxy import ProxyError
from fedrad.server.flwr_cli import DeployError
from fedrad.server.superlink import (
    SuperLinkState,
    default_superlink_port,
    loopback_name,
    new_superexec_secret,
    preflight_start,
    proxy_tls_name,
    read_state,
    stop_group,
    stop_pids,
    superexec_command,
    superlink_command,
    superlink_tls_args,
    write_state,
)
from tests.server.coordinator_support import (
    free_port,
    free_ports,
    one_line_error,
    register_sites,
)

runner = CliRunner()


# -- command lines and environments ----------------------------------------------------------


def test_superlink_tls_args(coordinator: Path) -> None:
    args = superlink_tls_args(coordinator)
    assert args[-1] == "--enable-supernode-auth"
    assert args[args.index("--ssl-keyfile") + 1] == str(coordinator.resolve() / SERVER_KEY)


def test_superlink_command_has_tls_node_auth_and_a_database(coordinator: Path) -> None:
    secret = coordinator / "superexec.secret"
    command = superlink_command(coordinator, port=9100, executable="fsl", secret_file=secret)
    root = coordinator.resolve()
    assert command[0] == "fsl"
    assert all(isinstance(c, str) for c in command)
    assert command.count("--enable-supernode-auth") == 1
    flags = [c for c in command if c.startswith("--")]
    assert flags == [
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--database",
        "--host",
        "--port",
        "--disable-runtime-dependency-installation",
        "--isolation",
        "--superexec-auth-secret-file",
    ]
    index = command.index("--database")
    assert command[index + 1] == str(root / "superlink.db")
    assert command[command.index("--ssl-ca-certfile") + 1] == str(root / "ca.pem")
    assert command[command.index("--ssl-keyfile") + 1] == str(root / "superlink.key")
    assert command[command.index("--port") + 1] == "9100"
    with pytest.raises(DeployError, match="port"):
        superlink_command(coordinator, port=70000, executable="fsl", secret_file=secret)


def test_the_superlink_binds_loopback_only_with_process_isolation(coordinator: Path) -> None:
    """Its Control API has no access control: the sites reach only the Fleet proxy, and only
    the coordinator's own runner (holding the secret) may claim ServerApp tasks."""
    secret = coordinator / "superexec.secret"
    command = superlink_command(coordinator, port=9101, executable="fsl", secret_file=secret)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command.count("--host") == 1
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert "--insecure" not in command
    assert not any(c.startswith(("--fleet-api-address", "--control-api-address")) for c in command)


def test_superexec_command(coordinator: Path) -> None:
    secret = coordinator / "superexec.secret"
    command = superexec_command(
        coordinator,
        address="127.0.0.1:9101",
        executable="fse",
        secret_file=secret,
        parent_pid=4242,
    )
    assert command == [
        "fse",
        "--runtime-api-address",
        "127.0.0.1:9101",
        "--root-certificates",
        str(coordinator.resolve() / "ca.pem"),
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        "4242",
    ]
    assert "--insecure" not in command


def test_new_superexec_secret_is_0600_and_new_at_every_start(coordinator: Path) -> None:
    first = new_superexec_secret(coordinator)
    assert first == coordinator.resolve() / "superexec.secret"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    value = first.read_bytes()
    assert len(value) >= 32
    first.chmod(0o644)
    second = new_superexec_secret(coordinator)
    assert second == first
    assert second.read_bytes() != value
    assert stat.S_IMODE(second.stat().st_mode) == 0o600


def test_default_superlink_port() -> None:
    assert default_superlink_port(8000) == 8001
    assert default_superlink_port(9092) == 9093
    assert default_superlink_port(65535) == 65534


def test_flower_environment(coordinator: Path, tmp_path: Path) -> None:
    """The one environment of the coordinator's Flower processes and `flwr` calls."""
    env = flower_process_env(
        flwr_home(coordinator), {"PATH": "/usr/bin", "KEEP": "1"}, bin_dir=tmp_path
    )
    for key, value in FLOWER_ENV.items():
        assert env[key] == value
    assert env["FLWR_HOME"] == str(coordinator.resolve() / "flwr")
    assert env["PATH"].split(os.pathsep) == [str(tmp_path), "/usr/bin"]
    assert env["KEEP"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


# -- the names the proxy and the CLI verify the SuperLink by --------------------------------


def test_loopback_and_proxy_names_of_the_default_certificate(coordinator: Path) -> None:
    assert loopback_name(coordinator) == "127.0.0.1"
    assert proxy_tls_name(coordinator) == "localhost"  # nginx does not match IP addresses


def test_a_certificate_without_loopback_names(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, include_loopback=False, hosts=["coord.example.org"])
    with pytest.raises(DeployError, match=r"does not cover 127\.0\.0\.1 or localhost") as refused:
        loopback_name(directory)
    assert "renew-cert" in str(refused.value) and "--loopback" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert proxy_tls_name(directory) == "coord.example.org"


def test_a_certificate_with_only_an_ip(tmp_path: Path) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, include_loopback=False, hosts=["10.1.2.3"])
    with pytest.raises(DeployError, match="names no DNS host") as refused:
        proxy_tls_name(directory)
    assert "renew-cert" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(DeployError, match=r"does not cover 127\.0\.0\.1 or localhost"):
        loopback_name(directory)


# -- preflight -------------------------------------------------------------------------------


def test_preflight_start_ok_then_each_problem(
    coordinator: Path, tmp_path: Path, nginx_found: None
) -> None:
    port, inner = free_ports(2)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert len(problems) == 1 and problems[0].startswith("no registered sites")
    register_sites(coordinator, tmp_path, "site_a")
    assert preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner) == []
    assert preflight_start(coordinator, host="0.0.0.0", port=port, superlink_port=inner) == []

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=taken, superlink_port=inner)
    assert problems == [f"port {taken} on 127.0.0.1 is already in use"]

    problems = preflight_start(coordinator, host="10.9.9.9", port=port, superlink_port=inner)
    assert any("does not cover host 10.9.9.9" in p for p in problems)

    (coordinator / "superlink.key").chmod(0o644)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert any("readable by others" in p for p in problems)
    (coordinator / "superlink.key").chmod(0o600)

    write_state(
        coordinator,
        SuperLinkState(os.getpid(), "127.0.0.1", port, f"127.0.0.1:{port}", "db", "log"),
    )
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert problems == [
        f"a SuperLink started from {coordinator} is already running (pid {os.getpid()}, "
        f"127.0.0.1:{port})"
    ]
    for problem in problems:
        assert "\n" not in problem


def test_preflight_start_not_a_coordinator(tmp_path: Path, nginx_found: None) -> None:
    port, inner = free_ports(2)
    problems = preflight_start(tmp_path, host="127.0.0.1", port=port, superlink_port=inner)
    assert len(problems) == 1 and "not a coordinator directory" in problems[0]


def test_preflight_start_without_nginx(
    coordinator: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_sites(coordinator, tmp_path, "site_a")

    def missing() -> str:
        raise ProxyError("nginx not found: the coordinator's Fleet proxy needs it; install it")

    monkeypatch.setattr(superlink, "find_nginx", missing)
    port, inner = free_ports(2)
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=inner)
    assert problems == ["nginx not found: the coordinator's Fleet proxy needs it; install it"]


def test_preflight_start_with_the_superlink_port_in_use(
    coordinator: Path, tmp_path: Path, nginx_found: None
) -> None:
    register_sites(coordinator, tmp_path, "site_a")
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=taken)
    assert problems == [
        f"port {taken} on 127.0.0.1 (the SuperLink's own) is already in use: pick another "
        "with --superlink-port"
    ]
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=port)
    assert problems == [f"the SuperLink's own port {port} is the proxy's port: pick another"]
    problems = preflight_start(coordinator, host="127.0.0.1", port=port, superlink_port=70000)
    assert problems == ["port 70000 is not in 1..65535"]


def test_preflight_start_takes_the_port_after_the_proxy_s_by_default(
    coordinator: Path, tmp_path: Path, nginx_found: None
) -> None:
    register_sites(coordinator, tmp_path, "site_a")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        problems = preflight_start(coordinator, host="127.0.0.1", port=taken - 1)
    assert f"port {taken} on 127.0.0.1 (the SuperLink's own) is already in use" in problems[-1]


@pytest.mark.parametrize(
    ("hosts", "words"),
    [
        (["coord.example.org"], ["does not cover 127.0.0.1 or localhost"]),
        (["10.1.2.3"], ["does not cover 127.0.0.1 or localhost", "names no DNS host"]),
    ],
)
def test_preflight_start_with_a_certificate_the_proxy_cannot_verify(
    tmp_path: Path, nginx_found: None, hosts: list[str], words: list[str]
) -> None:
    directory = tmp_path / "coord"
    init_federation(directory, include_loopback=False, hosts=hosts)
    register_sites(directory, tmp_path, "site_a")
    port, inner = free_ports(2)
    problems = preflight_start(directory, host="0.0.0.0", port=port, superlink_port=inner)
    assert len(problems) == len(words), problems
    for problem, expected in zip(problems, words, strict=True):
        assert expected in problem and "renew-cert" in problem and "\n" not in problem


# -- state and stopping -------------------------------------------------------------------------


def test_superlink_state_round_trips_and_lists_every_pid(coordinator: Path) -> None:
    state = SuperLinkState(
        pid=11,
        host="0.0.0.0",
        port=9092,
        address="127.0.0.1:9093",
        database="db",
        log="log",
        superlink_port=9093,
        proxy_pid=12,
        superexec_pid=13,
    )
    write_state(coordinator, state)
    assert read_state(coordinator) == state
    assert state.pids() == [12, 13, 11]  # the proxy first: the sites' door closes first
    older = SuperLinkState(11, "0.0.0.0", 9092, "127.0.0.1:9092", "db", "log")
    assert older.pids() == [11]


def test_a_state_file_from_before_the_proxy_still_reads(coordinator: Path) -> None:
    (coordinator / "superlink.json").write_text(
        json.dumps(
            {
                "pid": 5,
                "host": "0.0.0.0",
                "port": 9092,
                "address": "127.0.0.1:9092",
                "database": "db",
                "log": "log",
            }
        )
    )
    state = read_state(coordinator)
    assert state is not None and state.pids() == [5] and state.superlink_port is None
    (coordinator / "superlink.json").write_text('{"pid": 5, "colour": "red"}')
    with pytest.raises(DeployError, match="not a readable SuperLink state file"):
        read_state(coordinator)
    (coordinator / "superlink.json").unlink()
    assert read_state(coordinator) is None


def _sleeper(*, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A child that sleeps, reaped by a thread as soon as it ends (as init reaps the detached
    processes `fedrad-coordinator stop` signals), so its pid is gone once it exits."""
    code = "import signal, sys, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(60)\n"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    threading.Thread(target=process.wait, daemon=True).start()
    return process


def test_stop_pids_ends_a_sleeping_process() -> None:
    process = _sleeper()
    try:
        assert stop_pids([process.pid], timeout=10.0) == 1
        process.wait(timeout=5)
        assert process.returncode == -signal.SIGTERM
        assert stop_pids([process.pid], timeout=1.0) == 0  # gone already: nothing to stop
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_pids_kills_a_process_that_ignores_sigterm() -> None:
    process = _sleeper(ignore_term=True)
    try:
        assert stop_pids([process.pid], timeout=0.5) == 1
        process.wait(timeout=5)
        assert process.returncode == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_group_ends_a_process_group() -> None:
    code = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        stop_group(process.pid, timeout=10.0)
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)
        stop_group(process.pid, timeout=10.0)  # gone already: returns at once
    finally:
        if process.poll() is None:
            process.kill()


# -- the CLI refuses before anything starts --------------------------------------------------


def test_start_refuses_without_sites(coordinator: Path, monkeypatch, nginx_found: None) -> None:
    started: list[object] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    args = ["start", "--dir", str(coordinator), "--port", str(free_port())]
    result = runner.invoke(app, [*args, "--host", "127.0.0.1"])
    line = one_line_error(result)
    assert "no registered sites" in line
    assert started == []
