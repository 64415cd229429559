"""The options more than one `fedrad-coordinator` command takes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DirOpt = Annotated[
    Path,
    typer.Option(
        "--dir",
        help="The coordinator directory made by `init`.",
        envvar="FEDRAD_COORDINATOR_DIR",
    ),
]
