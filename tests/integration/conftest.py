"""Fixtures of the multi-process integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.deployment_support import Process


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str], Path], Process]]:
    started: list[Process] = []

    def start(args: list[str], log: Path) -> Process:
        process = Process(args, log)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop(timeout=15)
