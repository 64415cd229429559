"""Round participation: every wait for sites is bounded, a shortfall already accepted is not
waited for again, fewer than min-sites stops the run with one line, and a round step records
which site failed, stayed silent or was absent. Plain FedAvg included: a site that died for
good does not stall the next round (Flower's sampling would wait for it forever)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedrad.client.federation.app import simulation_client_app
from fedrad.common.run_dir import read_metrics
from fedrad.server.app import run_server
from fedrad.server.participation import FederationError, Participation, RoundGrid
from fedrad.server.rounds import ServerPlan
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
)

pytestmark = pytest.mark.usefixtures("in_process_federation")


class Nodes:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def test_a_shortfall_costs_one_bounded_wait(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sites = Participation(num_sites=3, min_sites=2, timeout_s=0.3)
    grid = Nodes([1, 2, 3])
    assert sites.sites(grid, round_no=1, step="training") == [1, 2, 3]
    grid.ids = [1, 3]
    started = time.monotonic()
    assert sites.sites(grid, round_no=1, step="evaluation") == [1, 3]
    assert 0.3 <= time.monotonic() - started < 2
    started = time.monotonic()
    assert sites.sites(grid, round_no=2, step="training") == [1, 3]  # no second wait
    assert time.monotonic() - started < 0.1
    assert caplog.text.count("going on without the others") == 1
    assert "round 1 evaluation: 2 of 3 sites connected after 0 s (connect-timeout)" in caplog.text
    grid.ids = [1]  # a new loss is waited for again, and is too many
    with pytest.raises(FederationError, match=r"^round 2 evaluation: only 1 of 3 sites"):
        sites.sites(grid, round_no=2, step="evaluation")
    grid.ids = [1, 2, 3]
    assert sites.sites(grid, round_no=3, step="training") == [1, 2, 3]
    with pytest.raises(ValueError):
        Participation(num_sites=3, min_sites=4, timeout_s=1.0)


def test_a_round_grid_records_failures_silence_absence_and_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    class Replies:
        def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
            out = []
            for message in messages:
                node = message.metadata.dst_node_id
                if node == 1:
                    content = RecordDict({"a": ArrayRecord({"w": Array(np.zeros(4, np.float32))})})
                    content["c"] = ConfigRecord({"k": [b"12345", b"678"]})
                    out.append(Message(content, reply_to=message))
                elif node == 2:
                    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="refused: x")
                    out.append(Message(error, reply_to=message))
            return out

    caplog.set_level(logging.WARNING)
    grid = RoundGrid(Replies(), [1, 2, 3], round_no=4, absent=1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    assert len(grid.send_and_receive(messages, timeout=7.0)) == 2
    assert grid.problems == {2: "refused: x", 3: "no reply within 7 s (round-timeout)"}
    assert grid.sent_bytes == {1: len(Array(np.zeros(4, np.float32)).data) + 8}
    assert grid.absence() == ["1 site(s) not connected"]
    assert "round 4: 1 site(s) sent no reply within 7 s (round-timeout)" in caplog.text


def test_plain_fedavg_does_not_stall_on_a_site_that_never_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    foundation = micro_foundation(tmp_path)
    specs = [micro_site(tmp_path / "sites", f"site_{i}", foundation, seed=i) for i in range(3)]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=3,
        rounds=2,
        round_config=round_config(planned_rounds=2, run_id="run"),
        connect_timeout_s=0.5,
    )
    grid = InProcessGrid(simulation_client_app(specs), 3)
    assert run_server(grid, plan, on_round=lambda record: grid.offline.add(2)) == 2
    first, second = read_metrics(run_dir)
    assert first["failures"] == [] and set(first["epsilon"]) == {"site_0", "site_1", "site_2"}
    assert set(second["epsilon"]) == {"site_0", "site_2"}
    assert second["failures"] == ["1 site(s) not connected", "evaluate: 1 site(s) not connected"]
    assert "round 2 training: 2 of 3 sites connected after 0 s" in caplog.text
