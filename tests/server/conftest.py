"""What the coordinator's tests share: for in-process federations Flower's task identity set,
each site's cached model dropped and one torch thread (three sites train in one process); a
coordinator directory; and nginx found, whether this host has it or not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedrad.client.federation import site_agent
from fedrad.server import superlink
from fedrad.server.certificates import init_federation
from tests.fl_fixtures import set_task_identity


@pytest.fixture
def in_process_federation() -> Iterator[None]:
    set_task_identity()
    site_agent.clear_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    directory = tmp_path / "coord"
    init_federation(directory, hosts=["coord.example.org"])
    return directory


@pytest.fixture
def nginx_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight as on a coordinator with nginx installed, whether this host has it or not."""
    monkeypatch.setattr(superlink, "find_nginx", lambda: "/usr/sbin/nginx")
