"""The coordinator keeps each site's last acknowledged ledger head and sends it back in that
site's next round config, plain or under SecAgg+; a head that goes back is logged, not kept;
with no head known, messages are as before; a resumed run keeps the heads."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedrad.client.federation import secure_aggregation as client_secagg
from fedrad.client.federation.secure_aggregation import simulation_secure_client_app
from fedrad.client.federation.site_agent import cached_model, trainable_arrays
from fedrad.common.protocol.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LEDGER_HEAD_FIELD,
    METRICS_KEY,
    SITE_ID_FIELD,
    SITE_KEY,
    WEIGHT_KEY,
    RoundConfig,
)
from fedrad.server.app import run_server
from fedrad.server.ledger_heads import HEADS_FILE, LedgerHeads, heads_file
from fedrad.server.participation import FederationError, RoundGrid, SiteRegistry
from fedrad.server.rounds import ServerPlan
from fedrad.server.secure_aggregation import SecureRounds
from tests.fl_fixtures import InProcessGrid, micro_foundation, micro_site, round_config

pytestmark = pytest.mark.usefixtures("in_process_federation")


def head(site: str, lines: int) -> str:
    return f"{lines}:{hashlib.sha256(f'{site}/{lines}'.encode()).hexdigest()}"


class Sites:
    """Fake sites whose ledgers grow by one line per reply; `seen` is what each received."""

    def __init__(self, *, back: dict[str, int] | None = None) -> None:
        self.lines: dict[str, int] = {}
        self.seen: list[tuple[str, str, str]] = []  # (site, message type, ledger-head)
        self.back = back or {}  # site -> the reply number at which it reports 1 line

    def reported(self, site: str) -> str:
        self.lines[site] = self.lines.get(site, 0) + 1
        lines = 1 if self.back.get(site) == self.lines[site] else self.lines[site]
        return head(site, lines)

    def app(self) -> ClientApp:
        app = ClientApp()

        def reply(message: Message, context: Context, arrays: ArrayRecord | None) -> Message:
            site = f"site_{context.node_config['partition-id']}"
            config = message.content.config_records[CONFIG_KEY]
            RoundConfig.from_record(dict(config))  # the site reads it as it would
            self.seen.append(
                (site, message.metadata.message_type, str(config.get(LEDGER_HEAD_FIELD, "")))
            )
            content = RecordDict(
                {
                    METRICS_KEY: MetricRecord({WEIGHT_KEY: 10.0, "epsilon": 1.0}),
                    SITE_KEY: ConfigRecord(
                        {SITE_ID_FIELD: site, LEDGER_HEAD_FIELD: self.reported(site)}
                    ),
                }
            )
            if arrays is not None:
                content[ARRAYS_KEY] = arrays  # type: ignore[assignment]
            return Message(content, reply_to=message)

        @app.train()
        def train(message: Message, context: Context) -> Message:
            incoming = message.content.array_records[ARRAYS_KEY]
            return reply(
                message,
                context,
                ArrayRecord({k: Array(v.numpy() + 0.01) for k, v in incoming.items()}),
            )

        @app.evaluate()
        def evaluate(message: Message, context: Context) -> Message:
            return reply(message, context, None)

        return app


def _plan(run_dir: Path, foundation: Path, rounds: int, **over: object) -> ServerPlan:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=2,
        rounds=rounds,
        round_config=round_config(planned_rounds=rounds, run_id=run_dir.name),
        connect_timeout_s=1.0,
        round_timeout_s=5.0,
    )
    settings.update(over)
    return ServerPlan(**settings)  # type: ignore[arg-type]


def test_each_site_gets_back_its_last_head_and_a_resumed_run_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foundation = micro_foundation(tmp_path)
    run_dir = tmp_path / "run"
    sites = Sites(back={"site_1": 3})  # site_1's third reply goes back to 1 line
    with caplog.at_level(logging.WARNING, logger="fedrad.server.ledger_heads"):
        assert run_server(InProcessGrid(sites.app(), 2), _plan(run_dir, foundation, 2)) == 2
    sent = {(site, kind): [] for site in ("site_0", "site_1") for kind in ("train", "evaluate")}
    for site, kind, value in sites.seen:
        sent[(site, kind)].append(value)
    # round 1 training: nothing known, nothing sent; then the head of each site's last reply
    assert sent[("site_0", "train")] == ["", head("site_0", 2)]
    assert sent[("site_0", "evaluate")] == [head("site_0", 1), head("site_0", 3)]
    # site_1's third reply (round 2 training) went back: its evaluation still gets head 2
    assert sent[("site_1", "train")] == ["", head("site_1", 2)]
    assert sent[("site_1", "evaluate")] == [head("site_1", 1), head("site_1", 2)]
    [warning] = [r.getMessage() for r in caplog.records if r.name.endswith("ledger_heads")]
    assert (
        "site site_1 reported ledger head 1:" in warning and "below the acknowledged 2:" in warning
    )
    stored = json.loads((run_dir / HEADS_FILE).read_text())
    assert stored == {"site_0": head("site_0", 4), "site_1": head("site_1", 4)}

    resumed = Sites()
    resumed.lines = dict(sites.lines)  # the same sites: their ledgers go on
    assert run_server(InProcessGrid(resumed.app(), 2), _plan(run_dir, foundation, 3)) == 3
    # a simulation learns which node is which site from its first reply, then sends heads
    first = [v for site, kind, v in resumed.seen if kind == "train"]
    assert first == ["", ""]
    evaluate = {site: v for site, kind, v in resumed.seen if kind == "evaluate"}
    assert evaluate == {"site_0": head("site_0", 5), "site_1": head("site_1", 5)}
    warned = [r for r in caplog.records if r.name == "fedrad.server.ledger_heads"]
    assert len(warned) == 1  # nothing went back this time


def test_a_deployment_sends_stored_heads_from_the_first_message(tmp_path: Path) -> None:
    """With a registry the site of a node is known before it replies; the heads live beside
    the registry (the coordinator's directory), across runs."""
    foundation = micro_foundation(tmp_path)
    registry = tmp_path / "coord" / "nodes.json"
    registry.parent.mkdir()
    registry.write_text(json.dumps({"site_0": 1, "site_1": 2}))
    path = heads_file(tmp_path / "run", registry)
    assert path == tmp_path / "coord" / HEADS_FILE
    path.write_text(json.dumps({"site_1": head("site_1", 7)}))
    sites = Sites()
    sites.lines["site_1"] = 7
    plan = _plan(tmp_path / "run", foundation, 1, site_registry=registry)
    assert run_server(InProcessGrid(sites.app(), 2), plan) == 1
    assert ("site_1", "train", head("site_1", 7)) in sites.seen
    assert ("site_0", "train", "") in sites.seen
    assert json.loads(path.read_text()) == {
        "site_0": head("site_0", 2),
        "site_1": head("site_1", 9),
    }


def test_a_head_that_is_not_one_is_ignored_and_a_bad_file_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heads = LedgerHeads(tmp_path / HEADS_FILE)
    grid = RoundGrid(object(), [1], round_no=4, registry=SiteRegistry({"site_0": 1}))
    with caplog.at_level(logging.WARNING, logger="fedrad.server.ledger_heads"):
        heads.observe(grid, 1, None, "12:not-a-hash")
        heads.observe(grid, 1, "whoever", head("site_0", 3))  # stored under the registry's id
        heads.observe(grid, 1, None, head("x", 3))  # same count, another hash: not kept
    heads.save()
    assert heads.heads == {"site_0": head("site_0", 3)}
    messages = [r.getMessage() for r in caplog.records]
    assert "not <lines>:<sha256>: ignored" in messages[0]
    assert "differing from the acknowledged" in messages[-1]
    (tmp_path / HEADS_FILE).write_text("[1, 2]")
    with pytest.raises(FederationError, match="not a JSON object of site id"):
        LedgerHeads(tmp_path / HEADS_FILE)


def test_a_head_with_a_trailing_newline_is_not_a_head(tmp_path: Path) -> None:
    """`$` matched before a final newline: neither a reply nor the heads file may carry one."""
    heads = LedgerHeads(tmp_path / HEADS_FILE)
    grid = RoundGrid(object(), [1], round_no=2, registry=SiteRegistry({"site_0": 1}))
    heads.observe(grid, 1, None, head("site_0", 3) + "\n")
    assert heads.heads == {}
    (tmp_path / HEADS_FILE).write_text(json.dumps({"site_0": head("site_0", 3) + "\n"}))
    with pytest.raises(FederationError, match="not a JSON object of site id"):
        LedgerHeads(tmp_path / HEADS_FILE)


@pytest.mark.parametrize("claimed", ["a\nb", "site_1\n", "s" * 10_000, 5])
def test_a_simulated_claim_that_is_not_a_site_id_stores_no_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, claimed: object
) -> None:
    """Without a registry the reply names its site: a claim that is not a site id is no site
    (not str() of it, not its first 64 characters), so its head is kept under no name."""
    heads = LedgerHeads(tmp_path / HEADS_FILE)
    grid = RoundGrid(object(), [1, 2], round_no=2)
    with caplog.at_level(logging.WARNING):
        heads.observe(grid, 1, claimed, head("x", 3))
        heads.observe(grid, 2, "site_2", head("site_2", 3))
        heads.observe(grid, 1, claimed, head("x", 4))  # warned once per node and step
    heads.save()
    assert heads.heads == {"site_2": head("site_2", 3)}
    assert heads.site_of(grid, 1) is None and heads.site_of(grid, 2) == "site_2"
    assert json.loads((tmp_path / HEADS_FILE).read_text()) == {"site_2": head("site_2", 3)}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "recorded as no site" in line and "\n" not in line and len(line) < 160


def test_secagg_sends_each_site_its_head_in_its_fit_and_evaluate_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foundation = micro_foundation(tmp_path)
    specs = [micro_site(tmp_path, f"site_{i}", foundation, seed=i) for i in range(3)]
    sites = Sites()
    offsets = [0.01, -0.02, 0.015]

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        plan, _ = client_secagg._plan(config)
        site = self.spec.site_id
        sites.seen.append((site, "train", plan.ledger_head))
        index = int(site.split("_")[1])
        new = [(p + offsets[index]).astype(p.dtype) for p in parameters]
        metrics = {WEIGHT_KEY: 10.0, "epsilon": 1.0, SITE_ID_FIELD: site}
        return new, 10, {**metrics, LEDGER_HEAD_FIELD: sites.reported(site)}

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        plan, _ = client_secagg._plan(config)
        site = self.spec.site_id
        sites.seen.append((site, "evaluate", plan.ledger_head))
        metrics = {WEIGHT_KEY: 10.0, SITE_ID_FIELD: site, LEDGER_HEAD_FIELD: sites.reported(site)}
        return float("nan"), 10, metrics

    monkeypatch.setattr(client_secagg.SiteClient, "fit", fit)
    monkeypatch.setattr(client_secagg.SiteClient, "evaluate", evaluate)
    plan = _plan(
        tmp_path / "run",
        foundation,
        1,
        num_sites=3,
        secagg=True,
        secagg_clip=0.05,
        secagg_max_weight=100.0,
    )
    heads = LedgerHeads(tmp_path / "run" / HEADS_FILE)
    rounds = SecureRounds(plan, heads)
    grid = InProcessGrid(simulation_secure_client_app(specs), 3)
    arrays = trainable_arrays(cached_model(foundation))
    config = plan.config_for(1).to_record()
    assert LEDGER_HEAD_FIELD not in config  # no head known: the config as before
    outcome = rounds.train(RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, config)
    assert outcome.arrays is not None and outcome.failures == []
    rounds.evaluate(RoundGrid(grid, [1, 2, 3], round_no=1), 1, outcome.arrays, config)
    rounds.train(RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, config)
    by_site: dict[str, list[str]] = {}
    for site, _, value in sites.seen:
        by_site.setdefault(site, []).append(value)
    for site in ("site_0", "site_1", "site_2"):
        assert by_site[site] == ["", head(site, 1), head(site, 2)]
    assert json.loads((tmp_path / "run" / HEADS_FILE).read_text()) == {
        f"site_{i}": head(f"site_{i}", 3) for i in range(3)
    }
    assert np.isfinite(next(iter(outcome.arrays.values()))).all()
