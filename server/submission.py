"""A run on the running federation. Every run submits the release's one app, staged once in
`DIR/apps/fedrad-<version>` (the bundle the sites approved, whatever the run sets); the run's
own values travel as `RUN_DIR/run_config.toml`. Command lines, replies and the checks before
anything is submitted are pure functions; following a run is a thin wrapper over `flwr`."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fedrad.common.flower_process import flower_process_env
from fedrad.common.protocol.release_app import release_version, run_config_toml, write_release_app
from fedrad.common.protocol.run_config import REQUIRED_KEYS, RunValue
from fedrad.server.certificates import CA_CERT, FLWR_CONNECTION, PkiError, flwr_home
from fedrad.server.flwr_cli import DeployError, flwr_error, parse_json_reply, run_flwr
from fedrad.server.site_registry import list_sites
from fedrad.server.superlink import stop_process, superlink_reachable

APPS_DIR: Final[str] = "apps"


# -- the run config and the release app ----------------------------------------------------


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
        if key in REQUIRED_KEYS:
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


def new_run_dir_path(root: Path) -> Path:
    """runs/federation-<UTC timestamp>, as new_run_dir names them (created later)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return root / f"federation-{stamp}"


def check_plan(config: Mapping[str, RunValue]) -> int:
    """Parses the run config as the ServerApp will (unknown keys, types, ranges refused now,
    not on the SuperLink); returns the rounds already committed in the run directory."""
    from fedrad.common.run_dir import ResumeError
    from fedrad.server.rounds import RunBook, ServerPlan

    plan = ServerPlan.from_run_config(config)
    if not plan.run_dir.is_dir():
        return 0
    try:
        return RunBook(plan.run_dir, plan.foundation_dir).completed
    except (ResumeError, OSError, ValueError, KeyError) as exc:  # e.g. a torn metrics line
        raise DeployError(f"cannot resume {plan.run_dir}: {exc}") from exc


# -- preflight ----------------------------------------------------------------------------


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


# -- flwr run, log, ls and supernode list --------------------------------------------------


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


def follow_run(directory: Path, run_id: int, flwr: str, echo: Callable[[str], None]) -> RunStatus:
    """Streams the run's log to `echo` until Flower ends it; then how the run ended."""
    process = subprocess.Popen(
        follow_command(run_id, flwr=flwr),
        env=flower_process_env(flwr_home(directory)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            echo(raw.decode("utf-8", "replace").rstrip("\n"))
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
