"""The coordinator's own `flwr` CLI: each call runs in `flower_process_env(flwr_home(DIR))`,
whose connection reaches the loopback SuperLink, and answers in JSON; `DeployError` is the
one-line failure of every deployment step."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from fedrad.common.flower_process import flower_process_env
from fedrad.server.certificates import flwr_home

FLWR_TIMEOUT_S: Final[float] = 120.0  # one `flwr` CLI call (register, ls, run submission)


class DeployError(Exception):
    """The deployment step cannot go ahead; the message says why in one line."""


def run_flwr(directory: Path, command: Sequence[str], *, timeout: float = FLWR_TIMEOUT_S) -> str:
    """Runs one `flwr` CLI command against the coordinator's connection; its stdout."""
    try:
        done = subprocess.run(
            list(command),
            env=flower_process_env(flwr_home(directory)),
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
