"""Identity from the coordinator's registry: in a deployment a reply's site id is the one the
registry gives the node its request went to, never the one the reply claims; a connected node
outside the registry gets no message and does not count; a malformed registry, or a deployed
ServerApp without one, stops with one line."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedrad.client.federation.app import simulation_client_app
from fedrad.common.protocol.messages import METRICS_KEY, SITE_ID_FIELD, SITE_KEY, WEIGHT_KEY
from fedrad.common.run_dir import read_metrics
from fedrad.server import app as server_app
from fedrad.server.app import _site_metrics, deployed_plan, load_registry, run_server
from fedrad.server.participation import (
    FederationError,
    Participation,
    RoundGrid,
    SiteRegistry,
    wait_for_sites,
)
from fedrad.server.rounds import ServerPlan
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
    training_entries,
)

pytestmark = pytest.mark.usefixtures("in_process_federation")

Answer = Callable[[Message], Message | None]


def _registry_file(tmp_path: Path, nodes: dict[str, int]) -> Path:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(nodes), encoding="utf-8")
    return path


class FakeGrid:
    """Lists `ids`; node n answers each message with `answer(message)` (None: silence). Every
    message gets an id when sent, as Flower's grids do; `sent` keeps them."""

    def __init__(self, ids: list[int], answer: Answer | None = None) -> None:
        self.ids = ids
        self.answer = answer or (lambda message: None)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            if (reply := self.answer(message)) is not None:
                out.append(reply)
        return out


def _report(request: Message, claimed: str | None, epsilon: float) -> Message:
    """A training reply's metrics, naming the site `claimed` (None: naming none)."""
    content = RecordDict({METRICS_KEY: MetricRecord({"epsilon": epsilon, WEIGHT_KEY: 4.0})})
    if claimed is not None:
        content[SITE_KEY] = ConfigRecord({SITE_ID_FIELD: claimed})
    return Message(content, reply_to=request)


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]


# -- the registry file -----------------------------------------------------------------------


def test_a_registry_maps_each_node_to_the_site_the_coordinator_admitted(tmp_path: Path) -> None:
    registry = SiteRegistry.load(_registry_file(tmp_path, {"site_0": 11, "hospital-b": 12}))
    assert registry.sites == {11: "site_0", 12: "hospital-b"} and len(registry) == 2
    assert registry.site_of(12) == "hospital-b" and registry.site_of(13) is None
    assert 11 in registry and 13 not in registry


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not readable (Expecting property name"),
        ("[11, 12]", "is not a JSON object of site id -> node id"),
        ('{"site_0": "11"}', "node id of site_0 is not an integer"),
        ('{"site_0": 11.0}', "node id of site_0 is not an integer"),
        ('{"site_0": true}', "node id of site_0 is not an integer"),
        ('{"site_0": 11, "site_1": 11}', "node 11 is listed for both site_0 and site_1"),
        ('{"site_0": 11, "site_0": 12}', "'site_0' is listed twice"),
        ('{"../site_0": 11}', "'../site_0' is not a site id"),
        ('{"": 11}', "'' is not a site id"),
        ('{"site_0\\n": 11}', "'site_0\\n' is not a site id"),  # `$` took a trailing newline
        ("{}", "lists no sites"),
    ],
)
def test_a_malformed_registry_is_refused_with_one_line(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "nodes.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(FederationError) as info:
        SiteRegistry.load(path)
    line = str(info.value)
    assert line.startswith(f"site registry {path}") and message in line
    assert "\n" not in line


def test_an_unreadable_registry_is_refused_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "nodes.json").mkdir()
    with pytest.raises(FederationError, match=r"^site registry .* is not readable \(") as info:
        SiteRegistry.load(tmp_path / "nodes.json")
    assert "\n" not in str(info.value)


def test_a_registry_with_fewer_sites_than_the_plan_is_refused(tmp_path: Path) -> None:
    plan = ServerPlan(
        run_dir=tmp_path / "run",
        foundation_dir=tmp_path / "f",
        num_sites=3,
        rounds=1,
        round_config=round_config(planned_rounds=1),
        site_registry=_registry_file(tmp_path, {"site_0": 11, "site_1": 12}),
    )
    with pytest.raises(FederationError, match=r"lists 2 sites, fewer than num-sites 3$"):
        load_registry(plan)
    assert load_registry(dataclasses.replace(plan, site_registry=None)) is None


# -- who takes part --------------------------------------------------------------------------


def test_a_node_outside_the_registry_gets_no_message_and_is_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    registry = SiteRegistry({"site_0": 11, "site_1": 12, "site_2": 13})
    grid = FakeGrid([11, 99, 12, 13])
    wait_for_sites(grid, 3, 0.1, registry)
    with pytest.raises(FederationError, match=r"^only 3 of 4 sites connected"):
        wait_for_sites(grid, 4, 0.1, registry)
    sites = Participation(num_sites=3, min_sites=2, timeout_s=0.1, registry=registry)
    step = sites.round_grid(grid, round_no=1, step="training")
    assert step.node_ids == step.get_node_ids() == [11, 12, 13] and step.absent == 0
    step.send_and_receive(_messages([11, 99, 12, 13]), timeout=1.0)  # as if 99 were addressed
    assert [m.metadata.dst_node_id for m in grid.sent] == [11, 12, 13]
    assert 99 not in step.problems
    grid.ids = [11, 99, 12]  # 99 does not make up for a missing site
    step = sites.round_grid(grid, round_no=1, step="evaluation")
    assert step.node_ids == [11, 12] and step.absent == 1
    strict = Participation(num_sites=3, min_sites=3, timeout_s=0.1, registry=registry)
    with pytest.raises(FederationError, match=r"^round 2 training: only 2 of 3 sites connected"):
        strict.sites(grid, round_no=2, step="training")
    line = "node 99 is connected but not in the site registry: ignored"
    assert caplog.text.count(line) == 1  # once per run, whatever asks


def test_a_reply_is_recorded_under_its_nodes_registry_id_not_the_one_it_claims(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)

    def answer(message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node == 11:  # claims to be another registered site
            return _report(message, "site_2", 1.5)
        if node == 12:
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="refused: no budget"),
                reply_to=message,
            )
        if node == 14:  # names no site at all
            return _report(message, None, 2.5)
        return None  # 13: silent

    registry = SiteRegistry({"site_0": 11, "site_1": 12, "site_2": 13, "site_3": 14})
    step = RoundGrid(
        FakeGrid([11, 12, 13, 14], answer), [11, 12, 13, 14], round_no=3, registry=registry
    )
    replies = step.send_and_receive(_messages([11, 12, 13, 14]), timeout=5.0)
    assert _site_metrics(replies, step) == {
        "site_0": {"epsilon": 1.5, WEIGHT_KEY: 4.0},
        "site_3": {"epsilon": 2.5, WEIGHT_KEY: 4.0},
    }
    assert step.failures() == [
        "site_1: refused: no budget",
        "site_2: no reply within 5 s (round-timeout)",
    ]
    assert (
        "round 3: node 11's reply claims site id 'site_2'; recorded as site_0, its id in the "
        "site registry" in caplog.text
    )
    # without a registry (a simulation) the reply's own word is all there is
    plain = RoundGrid(FakeGrid([11], answer), [11], round_no=3)
    assert set(_site_metrics(plain.send_and_receive(_messages([11]), timeout=5.0), plain)) == {
        "site_2"
    }
    assert plain.failures() == []


@pytest.mark.parametrize("claimed", ["a\nb", "site_1\n", "s" * 10_000, 7])
def test_a_simulated_reply_claiming_an_id_that_is_not_one_is_recorded_as_no_site(
    caplog: pytest.LogCaptureFixture, claimed: object
) -> None:
    """Without a registry a reply's claim is all there is: one that is not a site id names no
    site (neither str() of it nor its first 64 characters), with one short warning."""
    caplog.set_level(logging.WARNING, logger="fedrad.server.participation")

    def answer(message: Message) -> Message:
        node = message.metadata.dst_node_id
        content = RecordDict({METRICS_KEY: MetricRecord({"epsilon": 1.0, WEIGHT_KEY: 4.0})})
        content[SITE_KEY] = ConfigRecord({SITE_ID_FIELD: "site_0" if node == 11 else claimed})
        return Message(content, reply_to=message)

    step = RoundGrid(FakeGrid([11, 12], answer), [11, 12], round_no=5)
    replies = step.send_and_receive(_messages([11, 12]), timeout=5.0)
    assert _site_metrics(replies, step) == {"site_0": {"epsilon": 1.0, WEIGHT_KEY: 4.0}}
    assert step.site_id(12, claimed) is None  # asked again: still none, not warned again
    (record,) = caplog.records
    line = record.getMessage()
    assert "round 5: node 12's reply claims a site id that is not one" in line
    assert "recorded as no site" in line and "\n" not in line and len(line) < 160


def test_a_reply_from_another_node_than_the_addressed_one_is_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SuperLink lets only the addressed node answer; a reply that says otherwise counts
    for nobody (SecAgg+'s workflow would take it as the other node's)."""
    caplog.set_level(logging.WARNING)

    def answer(message: Message) -> Message:
        other = Message(RecordDict(), dst_node_id=12, message_type="train")
        other.metadata.__dict__["_message_id"] = message.metadata.message_id
        return _report(other, "site_1", 1.0)  # from node 12, answering node 11's request

    registry = SiteRegistry({"site_0": 11, "site_1": 12})
    step = RoundGrid(FakeGrid([11, 12], answer), [11], round_no=1, registry=registry)
    assert step.send_and_receive(_messages([11]), timeout=2.0) == []
    assert step.failures() == ["site_0: no reply within 2 s (round-timeout)"]
    assert "round 1: a reply to node 11 came from node 12: discarded" in caplog.text


def test_a_deployed_run_records_sites_by_registry_and_ignores_unregistered_nodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node 1 runs site_0's code but is site_1 in the registry (and the other way round);
    node 3 is connected but was never admitted."""
    caplog.set_level(logging.WARNING)
    foundation = micro_foundation(tmp_path)
    specs = [
        micro_site(tmp_path / "sites", f"site_{i}", foundation, seed=i, n=n)
        for i, n in enumerate((24, 12, 16))
    ]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    plan = ServerPlan(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=2,
        rounds=1,
        round_config=round_config(planned_rounds=1, run_id="run"),
        connect_timeout_s=0.5,
        site_registry=_registry_file(tmp_path, {"site_1": 1, "site_0": 2}),
    )
    grid = InProcessGrid(simulation_client_app(specs), 3)
    assert run_server(grid, plan) == 1
    assert {m.metadata.dst_node_id for m in grid.sent} == {1, 2}  # node 3 got nothing
    [record] = read_metrics(run_dir)
    assert record["failures"] == []
    spent = {}
    for spec in specs[:2]:
        spent[spec.site_id] = training_entries(spec)[-1]["epsilon"]
    assert spent["site_0"] != spent["site_1"]  # the sites differ in size, so in spend
    assert record["epsilon"] == {
        "site_1": pytest.approx(spent["site_0"]),
        "site_0": pytest.approx(spent["site_1"]),
    }
    assert set(record["per_site"]) == {"site_0", "site_1"}
    assert not specs[2].ledger_path.exists()
    assert caplog.text.count("node 3 is connected but not in the site registry: ignored") == 1
    assert "node 1's reply claims site id 'site_0'; recorded as site_1" in caplog.text


# -- the deployed ServerApp ------------------------------------------------------------------


def _context(run_config: dict[str, object]) -> Context:
    return Context(
        run_id=0,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=run_config,  # type: ignore[arg-type]
    )


def test_the_deployed_app_refuses_a_plan_without_the_site_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[ServerPlan] = []
    monkeypatch.setattr(server_app, "log_to_run_stream", lambda: None)
    monkeypatch.setattr(server_app, "run_server", lambda grid, plan: ran.append(plan))
    config: dict[str, object] = {
        "run-dir": str(tmp_path / "run"),
        "foundation-dir": str(tmp_path / "f"),
        "num-sites": 2,
        "num-rounds": 1,
    }
    with pytest.raises(FederationError) as info:
        server_app.main(FakeGrid([]), _context(config))  # type: ignore[arg-type]
    assert str(info.value) == (
        "a deployed run needs site-registry (fedrad-coordinator run sets it)"
    )
    with pytest.raises(FederationError, match="needs site-registry"):
        deployed_plan({**config, "site-registry": ""})  # the release app's "not set"
    assert ran == []
    registry = tmp_path / "coordinator" / "nodes.json"
    server_app.main(FakeGrid([]), _context({**config, "site-registry": str(registry)}))  # type: ignore[arg-type]
    [plan] = ran
    assert plan.site_registry == registry
