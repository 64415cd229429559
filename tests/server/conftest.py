"""What the in-process federation tests share: Flower's task identity set, each site's cached
model dropped, and one torch thread (three sites train in one process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedrad.client.federation import site_agent
from tests.fl_fixtures import set_task_identity


@pytest.fixture
def in_process_federation() -> Iterator[None]:
    set_task_identity()
    site_agent.clear_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
