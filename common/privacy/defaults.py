"""The epsilon and delta every budget and run falls back to, named once. A module of its own
so that the coordinator and the wire protocol read them without loading Opacus and torch."""

from __future__ import annotations

from typing import Final

DEFAULT_EPSILON: Final[float] = 8.0
"""Each site's epsilon for a run's whole planned schedule when the run sets none, and a new
site's budget over its whole ledger when `fedrad-site init` is given none."""
DEFAULT_DELTA: Final[float] = 1e-5
"""The delta every epsilon holds at when a run or a site sets none (central DP's too)."""
