"""The one Flower app bundle (FAB) of a fedrad release, built the same way on both sides.

A site runs only code it approved, so the app a coordinator submits must be the same bytes for
every run: its pyproject declares every run setting with a neutral default, and the values of
one run travel as `flwr run --run-config FILE.toml`. The FAB names only the installed
components (no source travels), and Flower's build is deterministic, so a site computes the
release's sha256 itself (`fedrad-site approve --release`) instead of trusting the coordinator's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Final

import tomli_w

from fedrad.common.protocol.run_config import RUN_SETTINGS, RunValue

SERVER_APP: Final[str] = "fedrad.server.app:app"
CLIENT_APP: Final[str] = "fedrad.client.federation.app:app"
# With SecAgg+ the sites run the legacy-API ClientApp (where Flower's secaggplus_mod lives).
SECURE_CLIENT_APP: Final[str] = "fedrad.client.federation.secure_aggregation:app"
# The only ClientApps a site's runner will run, by the run's `secagg` setting.
CLIENT_APPS: Final[dict[bool, str]] = {False: CLIENT_APP, True: SECURE_CLIENT_APP}

# Every run setting, with the value that means "not set" (`run_config.RUN_SETTINGS`).
RELEASE_RUN_CONFIG: Final[dict[str, RunValue]] = {s.key: s.default for s in RUN_SETTINGS}


def _same(value: object, default: RunValue) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default) and value == default
    if isinstance(default, int | float) and isinstance(value, int | float):
        return float(value) == float(default)
    return value == default


def given_settings(run_config: Mapping[str, object]) -> dict[str, object]:
    """The run config without the settings left at the release's declared default: what a
    run actually set. Keys the release does not declare stay (and are refused by the parser)."""
    return {
        key: value
        for key, value in run_config.items()
        if key not in RELEASE_RUN_CONFIG or not _same(value, RELEASE_RUN_CONFIG[key])
    }


def clientapp_for(run_config: Mapping[str, object]) -> str:
    """The ClientApp a run needs, from the allow-list (never a name the run sends)."""
    secagg = run_config.get("secagg", False)
    if not isinstance(secagg, bool):
        raise ValueError("run config 'secagg' must be true or false")
    return CLIENT_APPS[secagg]


def release_version() -> str:
    try:
        return importlib_metadata.version("fedrad")
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


def release_pyproject(version: str | None = None) -> bytes:
    """The release app's pyproject.toml: installed components, every setting declared."""
    document = {
        "project": {
            "name": "fedrad",
            "version": version or release_version(),
            "description": "fedrad federated run (the release's one app bundle)",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedrad",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": dict(RELEASE_RUN_CONFIG),
                }
            }
        },
    }
    return ("# fedrad's release app: one bundle per release.\n" + tomli_w.dumps(document)).encode()


def release_fab(version: str | None = None) -> bytes:
    """The FAB bytes `flwr run` builds from the release app directory (deterministic)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": release_pyproject(version)})[0]


def fab_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_release_app(directory: Path, version: str | None = None) -> Path:
    """DIR/pyproject.toml and nothing else (`flwr run DIR` bundles every file there)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stray in directory.iterdir():
        if stray.name != "pyproject.toml":
            raise ValueError(
                f"{directory} holds {stray.name}: the app directory must hold only pyproject.toml"
            )
    (directory / "pyproject.toml").write_bytes(release_pyproject(version))
    return directory


def run_config_toml(values: Mapping[str, RunValue]) -> str:
    """One run's settings as the TOML file `flwr run --run-config` reads; undeclared keys
    are refused here, before the SuperLink sees them."""
    unknown = sorted(set(values) - set(RELEASE_RUN_CONFIG))
    if unknown:
        raise ValueError(f"unknown run config key(s): {', '.join(unknown)}")
    return tomli_w.dumps(dict(values))
