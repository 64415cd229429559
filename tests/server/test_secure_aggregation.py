"""SecAgg+ inside fedrad's round loop, in-process (no Ray, no SuperLink): the unmasked mean is
the plain FedAvg mean of the same site updates within the quantization bound; a site whose
update would be clipped refuses instead; dropouts at every protocol stage, a site that never
comes back, a hung site; central DP under SecAgg+; resume; and the settings that are refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON

from fedrad.client.federation import secure_aggregation as client_secagg
from fedrad.client.federation import site_agent
from fedrad.client.federation.app import simulation_client_app
from fedrad.client.federation.secure_aggregation import simulation_secure_client_app
from fedrad.client.federation.site_agent import SiteSpec, SiteUpdate, cached_model, trainable_arrays
from fedrad.common.audit.ledger_audit import audit_ledger, public_key_id, read_public_key
from fedrad.common.protocol.messages import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY
from fedrad.common.protocol.secagg import (
    SECAGG_RECORD,
    STAGE_FIELD,
    adam_update_bound,
    quantization_range,
)
from fedrad.common.run_dir import read_metrics
from fedrad.server.app import FederationError, run_server
from fedrad.server.participation import RoundGrid
from fedrad.server.rounds import RunBook, ServerPlan
from fedrad.server.secure_aggregation import SecAggSettings, SecureRounds, with_margin
from fedrad.server.strategies import build_strategy
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
    training_entries,
)

pytestmark = pytest.mark.usefixtures("in_process_federation")


def _plan(run_dir: Path, foundation: Path, *, rounds: int = 1, **over: object) -> ServerPlan:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=3,
        rounds=rounds,
        round_config=round_config(planned_rounds=rounds, run_id=run_dir.name),
        secagg=True,
        connect_timeout_s=1.0,
        round_timeout_s=5.0,
    )
    settings.update(over)
    return ServerPlan(**settings)  # type: ignore[arg-type]


def _sites(root: Path, foundation: Path) -> list[SiteSpec]:
    """Three sites of different sizes (so the weights differ), one worker thread, drawing
    their DP noise reproducibly (a test compares two runs' updates; no deployment can)."""
    return [
        dataclasses.replace(
            micro_site(root, f"site_{i}", foundation, seed=i, n=12 + 8 * i),
            insecure_reproducible=True,
        )
        for i in range(3)
    ]


def _entries(spec: SiteSpec) -> list[int]:
    """The rounds a site trained in (its ledger's DP-SGD entries)."""
    return [int(e["round"]) for e in training_entries(spec)]


class DyingGrid(InProcessGrid):
    """Node `node` goes offline when its SecAgg+ message for `stage` arrives (it is lost)."""

    def __init__(self, app: ClientApp, num_nodes: int, *, node: int, stage: str) -> None:
        super().__init__(app, num_nodes)
        self.kill: tuple[int, str] | None = (node, stage)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        for message in messages:
            record = message.content.config_records.get(SECAGG_RECORD)
            stage = None if record is None else record.get(STAGE_FIELD)
            if self.kill == (message.metadata.dst_node_id, stage):
                self.offline.add(self.kill[0])
                self.kill = None
        return super().send_and_receive(messages, timeout=timeout)


# -- the unmasked mean is FedAvg's mean ------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_secagg_mean_equals_plain_fedavg_on_the_same_site_updates(
    tmp_path: Path, strategy: str
) -> None:
    """Sites train deterministically, so a plain run and a SecAgg+ run get the same updates
    (FedProx: the same proximal term at the sites, the same mean)."""
    foundation = micro_foundation(tmp_path)
    results = {}
    prox = {"strategy": strategy, "proximal_mu": 0.5 if strategy == "fedprox" else 0.0}
    for mode in ("plain", "secure"):
        site_agent.clear_caches()
        specs = _sites(tmp_path / mode, foundation)
        plan = _plan(tmp_path / mode / "run", foundation, secagg=mode == "secure", **prox)
        app = (simulation_secure_client_app if mode == "secure" else simulation_client_app)(specs)
        assert run_server(InProcessGrid(app, 3), plan) == 1
        results[mode] = (RunBook(plan.run_dir, foundation).resume_point().arrays, plan)
    (plain, _), (secure, plan) = results["plain"], results["secure"]
    record = read_metrics(plan.run_dir)[0]
    start = RunBook(plan.run_dir, foundation)._load_arrays(foundation)
    bound = record["secagg"]["error_bound"]
    assert record["secagg"]["sites_summed"] == 3 and 0 < bound < 1e-5
    moved = max(float(np.abs(plain[k] - start[k]).max()) for k in start)
    assert moved > 100 * bound  # the sites really moved the model
    for name in start:
        slack = bound + 2 * np.spacing(np.abs(plain[name]).astype(np.float32))
        assert np.all(np.abs(secure[name] - plain[name]) <= slack), name
    plain_record = read_metrics(tmp_path / "plain" / "run")[0]
    assert record["epsilon"] == plain_record["epsilon"]  # the same training, the same spend
    assert record["failures"] == [] and set(record["epsilon"]) == {"site_0", "site_1", "site_2"}


def _fake_sites(monkeypatch: pytest.MonkeyPatch, offsets: list[float], examples: list[int]) -> None:
    """Site i moves every value by offsets[i] (alternating sign) and weighs examples[i]."""

    def fake_train(spec: SiteSpec, arrays: dict[str, np.ndarray], plan: object) -> SiteUpdate:
        index = int(spec.site_id.split("_")[1])
        new = {}
        for name, value in arrays.items():
            signs = np.where(np.arange(value.size) % 2, 1.0, -1.0).reshape(value.shape)
            new[name] = (value + offsets[index] * signs).astype(value.dtype)
        metrics = {WEIGHT_KEY: float(examples[index]), "epsilon": 1.0, "steps": 5.0}
        return SiteUpdate(new, examples[index], metrics)

    monkeypatch.setattr(client_secagg, "train_site", fake_train)


def _fedavg(arrays: dict[str, np.ndarray], offsets: list[float], examples: list[int]) -> dict:
    """Flower's own (Message API) FedAvg over the same replies."""
    strategy = build_strategy("fedavg", num_sites=len(offsets))
    replies = []
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    for offset, n in zip(offsets, examples, strict=True):
        moved = {}
        for name, value in arrays.items():
            signs = np.where(np.arange(value.size) % 2, 1.0, -1.0).reshape(value.shape)
            moved[name] = Array((value + offset * signs).astype(value.dtype))
        content = RecordDict(
            {ARRAYS_KEY: ArrayRecord(moved), METRICS_KEY: MetricRecord({WEIGHT_KEY: float(n)})}
        )
        replies.append(Message(content, reply_to=request))
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    return {k: v.numpy() for k, v in aggregated.items()}


def test_uneven_weights_and_updates_near_the_range_keep_the_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foundation = micro_foundation(tmp_path)
    clip = 0.05
    offsets, examples = [0.9 * clip, -0.3 * clip, 0.01 * clip], [5, 50, 500]
    _fake_sites(monkeypatch, offsets, examples)
    plan = _plan(tmp_path / "run", foundation, secagg_clip=clip, secagg_max_weight=1000.0)
    rounds = SecureRounds(plan)
    grid = InProcessGrid(simulation_secure_client_app(_sites(tmp_path, foundation)), 3)
    arrays = trainable_arrays(cached_model(foundation))
    config = plan.config_for(1).to_record()
    outcome = rounds.train(RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, config)
    assert outcome.arrays is not None and outcome.secagg is not None
    expected = _fedavg(arrays, offsets, examples)
    bound = outcome.secagg["error_bound"]
    worst = max(float(np.abs(outcome.arrays[k] - expected[k]).max()) for k in arrays)
    assert worst <= bound + 1e-7
    assert outcome.metrics[WEIGHT_KEY] == sum(examples) and outcome.failures == []


def test_a_site_whose_update_would_be_clipped_refuses_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foundation = micro_foundation(tmp_path)
    clip = 0.05
    offsets, examples = [0.5 * clip, -0.5 * clip, 1.5 * clip], [10, 10, 10]
    _fake_sites(monkeypatch, offsets, examples)
    plan = _plan(tmp_path / "run", foundation, secagg_clip=clip, secagg_max_weight=10.0)
    grid = InProcessGrid(simulation_secure_client_app(_sites(tmp_path, foundation)), 3)
    arrays = trainable_arrays(cached_model(foundation))
    outcome = SecureRounds(plan).train(
        RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, plan.config_for(1).to_record()
    )
    assert outcome.arrays is not None and outcome.updates == 2
    [failure] = outcome.failures
    assert failure.startswith("refused: the update reaches 0.075") and "secagg-clip" in failure
    expected = _fedavg(arrays, offsets[:2], examples[:2])  # the other two, not a clipped third
    assert max(float(np.abs(outcome.arrays[k] - expected[k]).max()) for k in arrays) < 1e-6


def test_no_reply_a_coordinator_receives_holds_a_site_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foundation = micro_foundation(tmp_path)
    offsets, examples = [0.01, -0.02, 0.015], [10, 20, 30]
    _fake_sites(monkeypatch, offsets, examples)
    plan = _plan(tmp_path / "run", foundation, secagg_clip=0.05, secagg_max_weight=100.0)
    grid = InProcessGrid(simulation_secure_client_app(_sites(tmp_path, foundation)), 3)
    arrays = trainable_arrays(cached_model(foundation))
    SecureRounds(plan).train(
        RoundGrid(grid, [1, 2, 3], round_no=1), 1, arrays, plan.config_for(1).to_record()
    )
    assert len(grid.replies) == 12  # four stages, three sites
    for reply in grid.replies:
        assert not reply.content.array_records or all(
            len(record) == 0 for record in reply.content.array_records.values()
        )
        for record in reply.content.config_records.values():
            for value in record.values():
                values = value if isinstance(value, list) else [value]
                for item in values:
                    assert not isinstance(item, float) or not np.isclose(abs(item), 0.01)


# -- dropouts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "summed"),
    [("share_keys", 2), ("collect_masked_vectors", 2), ("unmask", 3)],
)
def test_a_site_lost_mid_round_does_not_sink_it_and_rejoins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stage: str, summed: int
) -> None:
    """Lost before its masked update, the round is the others' mean (its pairwise masks are
    reconstructed from their shares); lost after it, its update counts (its own mask is)."""
    caplog.set_level(logging.WARNING)
    foundation = micro_foundation(tmp_path)
    specs = _sites(tmp_path, foundation)
    plan = _plan(tmp_path / "run", foundation, rounds=2)
    grid = DyingGrid(simulation_secure_client_app(specs), 3, node=3, stage=stage)
    assert run_server(grid, plan, on_round=lambda record: grid.offline.clear()) == 2
    first, second = read_metrics(plan.run_dir)
    assert first["secagg"]["sites_summed"] == summed
    assert second["secagg"]["sites_summed"] == 3 and second["failures"] == []
    assert set(second["epsilon"]) == {"site_0", "site_1", "site_2"}  # it rejoined
    lost = [NODE_UNAVAILABLE_ERROR_REASON] if summed == 2 else []  # missing, or counted
    assert first["failures"] == [*lost, "evaluate: 1 site(s) not connected"]
    if summed == 2:
        assert set(first["epsilon"]) == {"site_0", "site_1"}
    assert "round 1 evaluation: 2 of 3 sites connected after 1 s" in caplog.text
    for spec in specs[:2]:
        assert _entries(spec) == [1, 2]
    # lost on the way to training, it never trained round 1; lost after, its spend is on record
    assert _entries(specs[2]) == ([1, 2] if stage == "unmask" else [2])


def test_a_site_that_never_returns_costs_one_bounded_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    foundation = micro_foundation(tmp_path)
    plan = _plan(tmp_path / "run", foundation, rounds=3)
    grid = DyingGrid(
        simulation_secure_client_app(_sites(tmp_path, foundation)), 3, node=2, stage="unmask"
    )
    assert run_server(grid, plan) == 3
    records = read_metrics(plan.run_dir)
    assert [r["secagg"]["sites_summed"] for r in records] == [3, 2, 2]
    assert all(set(r["epsilon"]) == {"site_0", "site_2"} for r in records[1:])
    assert records[2]["failures"] == [
        "1 site(s) not connected",
        "evaluate: 1 site(s) not connected",
    ]
    shortfalls = re.findall(r"going on without the others", caplog.text)
    assert len(shortfalls) == 1  # waited once, not once per round step


def test_fewer_sites_than_min_sites_stops_the_run_with_one_line(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    plan = _plan(tmp_path / "run", foundation, rounds=2, min_sites=3)
    grid = DyingGrid(
        simulation_secure_client_app(_sites(tmp_path, foundation)), 3, node=1, stage="unmask"
    )
    with pytest.raises(FederationError) as info:
        run_server(grid, plan)
    message = str(info.value)
    assert message == (
        "round 1 evaluation: only 2 of 3 sites connected after 1 s, fewer than min-sites 3"
    )
    assert read_metrics(plan.run_dir) == []  # round 1 was not committed


def test_a_hung_site_is_bounded_by_the_round_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    foundation = micro_foundation(tmp_path)
    plan = _plan(tmp_path / "run", foundation)
    grid = InProcessGrid(simulation_secure_client_app(_sites(tmp_path, foundation)), 3)
    grid.silent.add(2)
    assert run_server(grid, plan) == 1
    [record] = read_metrics(plan.run_dir)
    assert record["secagg"]["sites_summed"] == 2
    assert record["failures"] == [
        "no reply within 5 s (round-timeout)",
        "evaluate: no reply within 5 s (round-timeout)",
    ]
    assert "1 site(s) sent no reply within 5 s (round-timeout)" in caplog.text


def test_per_site_figures_and_failures_go_by_the_site_registry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployed SecAgg+ round names each site by the coordinator's registry, whatever id
    its metrics carry; a silent site's failure lines say which site it is."""
    caplog.set_level(logging.WARNING)
    foundation = micro_foundation(tmp_path)
    registry = tmp_path / "nodes.json"
    registry.write_text(json.dumps({"hospital-a": 1, "hospital-b": 2, "hospital-c": 3}))
    plan = _plan(tmp_path / "run", foundation, site_registry=registry)
    grid = InProcessGrid(simulation_secure_client_app(_sites(tmp_path, foundation)), 3)
    grid.silent.add(2)
    assert run_server(grid, plan) == 1
    [record] = read_metrics(plan.run_dir)
    assert record["secagg"]["sites_summed"] == 2
    assert set(record["epsilon"]) == set(record["per_site"]) == {"hospital-a", "hospital-c"}
    assert record["failures"] == [
        "hospital-b: no reply within 5 s (round-timeout)",
        "evaluate: hospital-b: no reply within 5 s (round-timeout)",
    ]
    assert "node 3's reply claims site id 'site_2'; recorded as hospital-c" in caplog.text


# -- central DP under SecAgg+ ----------------------------------------------------------------


def test_central_dp_under_secagg_is_the_plain_central_dp_mean_and_keeps_its_ledger(
    tmp_path: Path,
) -> None:
    """Client-side clipping + noise on the unmasked mean (Flower's fl-dp-sa pattern) gives the
    plain central-DP result (server-side clipping, equal weights) on the same updates."""
    foundation = micro_foundation(tmp_path)
    clip, sigma = 0.05, 1e-6  # the clip bites (updates of norm ~2); the noise is negligible
    results = {}
    for mode in ("plain", "secure"):
        site_agent.clear_caches()
        specs = _sites(tmp_path / mode, foundation)
        plan = _plan(
            tmp_path / mode / "run",
            foundation,
            secagg=mode == "secure",
            central_noise_multiplier=sigma,
            central_clipping_norm=clip,
        )
        app = (simulation_secure_client_app if mode == "secure" else simulation_client_app)(specs)
        assert run_server(InProcessGrid(app, 3), plan) == 1
        results[mode] = RunBook(plan.run_dir, foundation).resume_point().arrays
    start = RunBook(tmp_path / "plain" / "run", foundation)._load_arrays(foundation)
    step = np.sqrt(sum(float(np.sum((results["plain"][k] - start[k]) ** 2)) for k in start))
    assert 0.2 * clip < step <= clip * (1 + 1e-4)  # a mean of updates clipped to norm C
    record = read_metrics(tmp_path / "secure" / "run")[0]
    adam = adam_update_bound(lr=plan.round_config.lr, steps=plan.round_config.local_steps)
    assert record["secagg"]["clipping_range"] == with_margin(min(clip, adam))
    tolerance = record["secagg"]["error_bound"] + 10 * sigma * clip + 1e-7
    for name in start:
        assert np.all(np.abs(results["secure"][name] - results["plain"][name]) <= tolerance)
    ledger = tmp_path / "secure" / "run" / "coordinator" / "ledger.jsonl"
    key = read_public_key(ledger.parent / "ledger_key.pub")
    assert audit_ledger(ledger, {public_key_id(key): key}).status == "ok"
    assert (
        record["central_epsilon"] == read_metrics(tmp_path / "plain" / "run")[0]["central_epsilon"]
    )


def test_central_dp_under_secagg_counts_a_dropout_in_the_ledger(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    plan = _plan(
        tmp_path / "run",
        foundation,
        central_noise_multiplier=0.9,
        central_clipping_norm=0.05,
    )
    grid = DyingGrid(
        simulation_secure_client_app(_sites(tmp_path, foundation)),
        3,
        node=1,
        stage="collect_masked_vectors",
    )
    assert run_server(grid, plan) == 1
    lines = (plan.run_dir / "coordinator" / "ledger.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["noise_multiplier"] == pytest.approx(0.9 * 2 / 3)


# -- resume ----------------------------------------------------------------------------------


def test_a_crashed_secagg_run_resumes_without_counting_a_round_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foundation = micro_foundation(tmp_path)
    specs = _sites(tmp_path, foundation)
    plan = _plan(tmp_path / "run", foundation, rounds=3)  # round 2's rerun has budget left
    grid = InProcessGrid(simulation_secure_client_app(specs), 3)
    real_commit = RunBook.commit

    def crash_in_round_2(self: RunBook, round_no: int, *args: object, **kwargs: object) -> Path:
        if round_no == 2:
            raise RuntimeError("coordinator lost power")
        return real_commit(self, round_no, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RunBook, "commit", crash_in_round_2)
    with pytest.raises(RuntimeError, match="lost power"):
        run_server(grid, plan)
    monkeypatch.setattr(RunBook, "commit", real_commit)
    assert run_server(grid, plan) == 3
    assert [r["round"] for r in read_metrics(plan.run_dir)] == [1, 2, 3]
    for spec in specs:  # round 2 was trained twice: both spends stay on record
        assert _entries(spec) == [1, 2, 2, 3]


# -- settings --------------------------------------------------------------------------------


def _run_config(**extra: object) -> dict[str, object]:
    return {"run-dir": "runs/r", "foundation-dir": "f", "num-sites": 3, "num-rounds": 2, **extra}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"secagg": True, "strategy": "fedadam"}, "SecAgg+ supports fedavg and fedprox"),
        ({"secagg": True, "num-sites": 2}, "SecAgg+ needs at least 3 sites"),
        ({"secagg": True, "secagg-shares": 4}, "secagg-shares must be in 3..3"),
        ({"secagg": True, "secagg-threshold": 3}, "secagg-threshold must be in 2..2"),
        ({"secagg": True, "secagg-threshold": 1}, "secagg-threshold must be in 2..2"),
        ({"secagg": True, "secagg-clip": -1.0}, "secagg-clip must be positive"),
        ({"secagg": True, "secagg-max-weight": 0.5}, "secagg-max-weight must be >= 1"),
        ({"secagg": True, "min-sites": 1}, "min-sites 1 is below the SecAgg+ reconstruction"),
        ({"secagg": "yes"}, "'secagg' must be true or false"),
        ({"secagg": True, "secagg-shares": 3.0}, "'secagg-shares' must be int, got float"),
        ({"secagg-threshold": 2}, "secagg-threshold need secagg = true"),
        ({"min-sites": 4}, "min-sites must be in 1..3"),
        ({"min-sites": True}, "'min-sites' must be int, got bool"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_one_line(extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        ServerPlan.from_run_config(_run_config(**extra))
    assert "\n" not in str(info.value)


def test_ranges_come_from_what_the_sites_send(tmp_path: Path) -> None:
    plan = ServerPlan.from_run_config(
        _run_config(**{"secagg": True, "lr": 0.002, "local-steps": 50})
    )
    assert (plan.secagg_shares_count, plan.shares_threshold, plan.required_sites) == (3, 2, 2)
    settings = SecAggSettings.for_plan(plan)
    assert settings.clipping_range == with_margin(adam_update_bound(lr=0.002, steps=50))
    assert with_margin(1.0) == pytest.approx(1.01001)
    assert settings.quantization_range == quantization_range(3) == 2**29
    assert settings.max_weight == plan.secagg_max_weight
    central = dataclasses.replace(plan, central_noise_multiplier=1.0, central_clipping_norm=0.01)
    # an L2 bound bounds every value
    assert SecAggSettings.for_plan(central).clipping_range == with_margin(0.01)
    assert SecAggSettings.for_plan(central).max_weight == 1.0  # unit weights
    given = dataclasses.replace(plan, secagg_clip=0.5)
    assert SecAggSettings.for_plan(given).clipping_range == 0.5
    five = ServerPlan.from_run_config(_run_config(**{"secagg": True, "num-sites": 5}))
    assert (five.secagg_shares_count, five.shares_threshold) == (5, 3)
    assert ServerPlan.from_run_config(_run_config()).required_sites == 1
