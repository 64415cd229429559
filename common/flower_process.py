"""What every Flower process fedrad starts shares, on the coordinator and at a site alike:
its environment, where its console scripts are, and whether its port is free."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from shutil import which
from typing import Final

# Every Flower process: no `uv sync` at run time (it would pull another torch), no update
# check, no telemetry.
FLOWER_ENV: Final[dict[str, str]] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    # Worker processes have no terminal: library progress bars (GGUF de-quantisation) would
    # only fill their logs line by line. Bars that fedrad draws itself pass `disable` and
    # are unaffected.
    "TQDM_DISABLE": "1",
}


class FlowerProcessError(Exception):
    """A Flower process cannot be started here; the message says why in one line."""


def flower_executable(name: str) -> str:
    """The Flower console script `name` of this Python environment (beside the interpreter),
    else the one on PATH; Flower processes start further Flower scripts by name, so
    `flower_process_env` puts this directory first on their PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = which(name)
    if found is None:
        raise FlowerProcessError(f"{name} not found: is flwr installed in this environment?")
    return found


def flower_process_env(
    flwr_home: Path, base: Mapping[str, str] | None = None, *, bin_dir: Path | None = None
) -> dict[str, str]:
    """The environment of every Flower process and `flwr` call fedrad makes, coordinator and
    site alike: `base` (the caller's own environment by default) plus FLOWER_ENV, `FLWR_HOME`,
    unbuffered output (the log is relayed line by line as it happens) and this environment's
    scripts first on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    scripts = str(bin_dir or Path(sys.executable).parent)
    path = env.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        env["PATH"] = scripts + (os.pathsep + path if path else "")
    return env


def write_fresh_secret(path: Path) -> Path:
    """32 random bytes at `path`, 0600, replacing any earlier one: the secret a Flower runner
    needs to claim tasks from its local Runtime API (new at every start, held by no one else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    return path


def port_in_use(host: str, port: int) -> bool:
    """True when `host:port` cannot be bound now (what the Flower process would hit at start);
    FlowerProcessError for any other reason it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise FlowerProcessError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    return False
