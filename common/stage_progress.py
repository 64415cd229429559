"""Progress of the one-time foundation build, reported to whichever CLI is running.

The public foundation is built inside whichever command needs it first (minutes, once per
machine). A CLI wraps its whole run in `showing_progress`; the builders ask `stage_reporter`
for a per-step callback, so no caller in between has to thread one through. Kept free of heavy
imports: the CLI enters it before it knows which command runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

StageProgress = Callable[[str, int, int], None]
"""(stage, done, total): how a CLI is told about the one-time foundation build (minutes)."""
_STAGE_PROGRESS: ContextVar[StageProgress | None] = ContextVar("stage_progress", default=None)


@contextmanager
def showing_progress(report: StageProgress) -> Iterator[None]:
    """Every foundation build inside the block reports its stages to `report`: CLIs wrap a
    whole run in it instead of threading a callback through every caller."""
    token = _STAGE_PROGRESS.set(report)
    try:
        yield
    finally:
        _STAGE_PROGRESS.reset(token)


def stage_reporter(stage: str, total: int) -> Callable[[int], None] | None:
    """A per-step callback for one stage, or None when nobody is listening."""
    report = _STAGE_PROGRESS.get()
    if report is None:
        return None
    return lambda done: report(stage, done, total)
