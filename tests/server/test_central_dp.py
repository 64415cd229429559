"""Central DP on the coordinator (site-level): equal-weight clipped averaging, Gaussian noise of
std sigma * C / n, and the coordinator's own signed ledger of each release, audited the way
the sites' ledgers are, across crashes and resumes."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
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
from flwr.serverapp.strategy import FedAdam
from typer.testing import CliRunner

from fedrad.client.federation.app import simulation_client_app
from fedrad.common.audit.ledger_audit import audit_ledger, public_key_id, read_public_key
from fedrad.common.privacy.accounting import MechanismStep, cumulative_epsilon
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key
from fedrad.common.protocol.messages import (
    ARRAYS_KEY,
    METRICS_KEY,
    SITE_ID_FIELD,
    SITE_KEY,
    WEIGHT_KEY,
)
from fedrad.common.run_dir import ResumeError, read_metrics
from fedrad.server.app import build_plan_strategy, run_server
from fedrad.server.rounds import RunBook, ServerPlan
from fedrad.server.strategies import (
    UNIT_WEIGHT_KEY,
    CentralDP,
    build_strategy,
    with_central_dp,
)
from fedrad.simulations.cli import app as sim_cli
from fedrad.simulations.federated import FederatedConfig, config_from_toml
from tests.fl_fixtures import (
    InProcessGrid,
    micro_foundation,
    micro_site,
    round_config,
    training_entries,
)

SIGMA = 0.8
CLIP = 5.0
DELTA = 1e-4


pytestmark = pytest.mark.usefixtures("in_process_federation")


def _plan(
    run_dir: Path, foundation: Path, *, sites: int, rounds: int, **over: object
) -> ServerPlan:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        run_dir=run_dir,
        foundation_dir=foundation,
        num_sites=sites,
        rounds=rounds,
        round_config=round_config(
            planned_rounds=rounds, run_id=run_dir.name, eval_reports=0, eval_questions=0
        ),
        central_noise_multiplier=SIGMA,
        central_clipping_norm=CLIP,
        central_delta=DELTA,
    )
    settings.update(over)
    return ServerPlan(**settings)  # type: ignore[arg-type]


def _coordinator_ledger(run_dir: Path) -> tuple[Path, list[dict]]:
    path = run_dir / "coordinator" / "ledger.jsonl"
    key = load_or_create_signing_key(run_dir / "coordinator" / "ledger_key.pem")
    return path, Ledger(path, key).entries()


def _audit(path: Path) -> str:
    """What `fedrad-audit RUN_DIR` does with each ledger: the .pub beside it, recomputation."""
    key = read_public_key(path.parent / "ledger_key.pub")
    result = audit_ledger(path, {public_key_id(key): key})
    return result.status


def _epsilon(releases: list[float]) -> float:
    return cumulative_epsilon(
        [MechanismStep(sigma, 1.0, 1) for sigma in releases], delta=DELTA, accountant="rdp"
    )


# -- a fast stand-in for the site agent ------------------------------------------------------


def fake_sites(
    offsets: list[float], examples: list[int], *, refuse: int | None = None
) -> ClientApp:
    """Site i sends the global values + offsets[i] everywhere and claims examples[i] studies;
    site `refuse` raises (a refusal)."""
    app = ClientApp()

    def reply(message: Message, context: Context, arrays: RecordDict | None) -> Message:
        index = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        content = RecordDict(
            {
                METRICS_KEY: MetricRecord(
                    {WEIGHT_KEY: float(examples[index]), "epsilon": 1.0, "steps": 5.0}
                ),
                SITE_KEY: ConfigRecord({SITE_ID_FIELD: f"site_{index}"}),
            }
        )
        if arrays is not None:
            content[ARRAYS_KEY] = arrays  # type: ignore[assignment]
        return Message(content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        index = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        if index == refuse:
            raise RuntimeError("refused: this site's budget is spent")
        incoming = message.content.array_records[ARRAYS_KEY]
        moved = {k: Array(v.numpy() + offsets[index]) for k, v in incoming.items()}
        return reply(message, context, ArrayRecord(dict(reversed(moved.items()))))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return reply(message, context, None)

    return app


# -- the strategy ----------------------------------------------------------------------------


def _global(size: int = 20_000) -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {
            "b.weight": Array(rng.normal(size=(size // 2,)).astype(np.float32)),
            "a.weight": Array(rng.normal(size=(size // 4, 2)).astype(np.float32)),
        }
    )


def _replies(
    strategy: object, global_arrays: ArrayRecord, updates: list[np.ndarray], examples: list[int]
) -> list[Message]:
    """Replies to the strategy's own train messages: global + update, keys in reverse order."""
    grid = InProcessGrid(ClientApp(), len(updates))
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), grid))  # type: ignore[attr-defined]
    replies = []
    for message, update, n in zip(messages, updates, examples, strict=True):
        flat = np.concatenate([a.numpy().ravel() for a in global_arrays.values()]) + update
        arrays, start = {}, 0
        for key, array in global_arrays.items():
            size = int(np.prod(array.shape))
            arrays[key] = Array(flat[start : start + size].reshape(array.shape).astype(np.float32))
            start += size
        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord(dict(reversed(arrays.items()))),
                METRICS_KEY: MetricRecord({WEIGHT_KEY: float(n), "steps": float(n)}),
            }
        )
        replies.append(Message(content, reply_to=message))
    return replies


def _flat(arrays: ArrayRecord, order: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().ravel().astype(np.float64) for k in order])


def test_noise_has_the_expected_scale_around_the_equal_weight_mean(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "run", tmp_path / "f", sites=4, rounds=1)
    dp = build_plan_strategy(plan)
    assert isinstance(dp, CentralDP)
    plain = build_strategy("fedavg", num_sites=4, equal_weights=True)
    global_arrays = _global()
    rng = np.random.default_rng(1)
    updates = [rng.normal(scale=0.01, size=20_000) for _ in range(4)]  # norms ~1.4 < C
    examples = [3, 10, 40, 100]
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    noisy, metrics = dp.aggregate_train(1, _replies(dp, global_arrays, updates, examples))
    exact, _ = plain.aggregate_train(1, _replies(plain, global_arrays, updates, examples))
    assert noisy is not None and exact is not None and metrics is not None
    base = _flat(global_arrays, global_arrays)
    assert np.allclose(_flat(exact, global_arrays) - base, np.mean(updates, axis=0), atol=1e-5)
    noise = _flat(noisy, global_arrays) - _flat(exact, global_arrays)
    expected = SIGMA * CLIP / 4
    assert abs(float(np.mean(noise))) < 0.05 * expected
    assert float(np.std(noise)) == pytest.approx(expected, rel=0.05)
    # metrics still count studies, not sites; the coordinator's own weight key is not reported
    assert metrics["steps"] == pytest.approx(sum(n * n for n in examples) / sum(examples))
    assert UNIT_WEIGHT_KEY not in metrics


def test_central_dp_averages_clipped_updates_with_equal_weights(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "run", tmp_path / "f", sites=2, rounds=1)
    plan = dataclasses.replace(plan, central_noise_multiplier=1e-6)  # noise std 2.5e-6
    dp = build_plan_strategy(plan)
    weighted = build_strategy("fedavg", num_sites=2)
    global_arrays = _global()
    small = np.full(20_000, 0.02)  # norm 2.83 < C: kept
    large = np.full(20_000, -0.5)  # norm 70.7 > C: clipped to C
    examples = [1, 99]
    replies = _replies(dp, global_arrays, [small, large], examples)
    # a site cannot weigh itself up: the coordinator overwrites whatever is under its key
    next(iter(replies[1].content.metric_records.values()))[UNIT_WEIGHT_KEY] = 1000.0
    noisy, _ = dp.aggregate_train(1, replies)
    assert noisy is not None
    moved = _flat(noisy, global_arrays) - _flat(global_arrays, global_arrays)
    clipped = large * CLIP / np.linalg.norm(large)
    assert np.allclose(moved, (small + clipped) / 2, atol=1e-4)
    by_examples, _ = weighted.aggregate_train(
        1, _replies(weighted, global_arrays, [small, large], examples)
    )
    assert by_examples is not None
    unclipped = _flat(by_examples, global_arrays) - _flat(global_arrays, global_arrays)
    assert np.allclose(unclipped, (small * 1 + large * 99) / 100, atol=1e-4)  # the non-DP way


def test_fedadam_with_central_dp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fedadam"):
        _plan(tmp_path / "run", tmp_path / "f", sites=2, rounds=1, strategy="fedadam")
    with pytest.raises(ValueError, match="fedadam"):
        build_strategy("fedadam", num_sites=2, equal_weights=True)
    adam = build_strategy("fedadam", num_sites=2)
    assert isinstance(adam, FedAdam)
    with pytest.raises(ValueError, match="fedadam"):
        with_central_dp(adam, noise_multiplier=1.0, clipping_norm=1.0, num_sites=2)
    with pytest.raises(ValueError, match="equal weights"):
        with_central_dp(
            build_strategy("fedavg", num_sites=2),
            noise_multiplier=1.0,
            clipping_norm=1.0,
            num_sites=2,
        )
    with pytest.raises(ValueError, match="fedadam"):
        FederatedConfig(strategy="fedadam", central_noise=1.0)
    # fedprox is allowed, and keeps its proximal term
    prox = _plan(tmp_path / "run", tmp_path / "f", sites=2, rounds=1, strategy="fedprox")
    prox = dataclasses.replace(prox, proximal_mu=0.1)
    assert build_plan_strategy(prox).strategy.proximal_mu == 0.1  # type: ignore[attr-defined]


def _run_config(**extra: object) -> dict[str, object]:
    return {"run-dir": "runs/r", "foundation-dir": "f", "num-sites": 2, "num-rounds": 2, **extra}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"central-noise": -1.0}, "central noise multiplier must be positive"),
        ({"central-noise": math.nan}, "central noise multiplier must be positive"),
        ({"central-noise": 1.0, "central-clip": 0.0}, "central clipping norm must be positive"),
        ({"central-noise": 1.0, "central-clip": -2}, "central clipping norm must be positive"),
        ({"central-noise": 1.0, "central-delta": 0.0}, "central delta must be in (0, 1)"),
        ({"central-noise": 1.0, "central-delta": 1.0}, "central delta must be in (0, 1)"),
        ({"central-noise": "1.0"}, "'central-noise' must be a number, got str"),
        ({"central-noise": True}, "'central-noise' must be a number, got bool"),
        ({"central-clip": 2.0}, "need central-noise"),
        ({"central-noise": 1.0, "strategy": "fedadam"}, "fedadam"),
        ({"central-sigma": 1.0}, "unknown run config key(s): central-sigma"),
    ],
)
def test_bad_central_dp_run_config_is_refused(extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerPlan.from_run_config(_run_config(**extra))


def test_release_defaults_mean_not_set() -> None:
    """The release app declares central-noise 0 (off) and central-clip 1.0 in every run's
    config: those values are the same as leaving the keys out."""
    plan = ServerPlan.from_run_config(_run_config(**{"central-noise": 0.0, "central-clip": 1.0}))
    assert plan == ServerPlan.from_run_config(_run_config())
    assert plan.central_noise_multiplier is None


def test_central_dp_run_config_and_simulation_settings() -> None:
    plan = ServerPlan.from_run_config(
        _run_config(**{"central-noise": 1.2, "central-clip": 3, "central-delta": 1e-6})
    )
    assert plan.central_dp
    assert (plan.central_noise_multiplier, plan.central_clipping_norm) == (1.2, 3.0)
    assert plan.central_delta == 1e-6
    assert not ServerPlan.from_run_config(_run_config()).central_dp
    for settings, message in [
        ({"central_noise": 0.0}, "central_noise must be positive"),
        ({"central_noise": 1.0, "central_clip": 0.0}, "central_clip must be positive"),
        ({"central_noise": 1.0, "central_delta": 1.0}, "central_delta must be in (0, 1)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            FederatedConfig(**settings)  # type: ignore[arg-type]
    runner = CliRunner()
    result = runner.invoke(sim_cli, ["run", "--data", "nowhere", "--central-clip", "2"])
    assert result.exit_code != 0 and "need --central-noise" in result.output
    result = runner.invoke(sim_cli, ["run", "--data", "nowhere", "--central-noise", "-1"])
    assert result.exit_code != 0 and "central_noise must be positive" in result.output


def test_central_dp_settings_survive_config_toml(tmp_path: Path) -> None:
    from fedrad.common.run_dir import write_config

    for config in (
        FederatedConfig(central_noise=1.1, central_clip=0.5, central_delta=1e-6),
        FederatedConfig(),  # off: nothing to write (TOML has no null), read back as off
    ):
        write_config(tmp_path, {"federated": dataclasses.asdict(config)})
        assert config_from_toml(tmp_path / "config.toml") == config


# -- the round loop and the coordinator's ledger ---------------------------------------------


def test_two_rounds_with_central_and_local_dp_keep_an_audited_coordinator_ledger(
    tmp_path: Path,
) -> None:
    foundation = micro_foundation(tmp_path)
    specs = [micro_site(tmp_path / "sites", f"site_{i}", foundation, seed=i) for i in range(2)]
    run_dir = tmp_path / "run"
    plan = _plan(run_dir, foundation, sites=2, rounds=2)
    assert plan.round_config.dp  # the sites' own DP-SGD stays on: the two compose
    assert run_server(InProcessGrid(simulation_client_app(specs), 2), plan) == 2

    path, entries = _coordinator_ledger(run_dir)
    assert (path.parent / "ledger_key.pub").is_file()
    assert [e["round"] for e in entries] == [1, 2]
    for entry in entries:
        assert entry["site_id"] == "coordinator" and entry["run_id"] == run_dir.name
        assert (entry["sample_rate"], entry["steps"]) == (1.0, 1)
        assert (entry["noise_multiplier"], entry["max_grad_norm"]) == (SIGMA, CLIP)
        assert (entry["delta"], entry["accountant"]) == (DELTA, "rdp")
    assert [e["epsilon"] for e in entries] == pytest.approx([_epsilon([SIGMA] * k) for k in (1, 2)])
    assert _audit(path) == "ok"
    records = read_metrics(run_dir)
    assert [r["central_epsilon"] for r in records] == pytest.approx([e["epsilon"] for e in entries])
    for spec in specs:  # each site's record-level ledger is kept as before
        assert [e["round"] for e in training_entries(spec)] == [1, 2]
        assert set(records[-1]["epsilon"]) == {"site_0", "site_1"}


def test_resume_neither_loses_nor_doubles_coordinator_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before the release leaves no entry (round re-run once: one entry); a crash
    after the release but before the commit re-runs that round: a second, real, release."""
    foundation = micro_foundation(tmp_path)
    run_dir = tmp_path / "run"
    plan = _plan(run_dir, foundation, sites=2, rounds=3)
    grid = InProcessGrid(fake_sites([0.01, -0.02], [5, 50]), 2)
    real_send, real_commit = InProcessGrid.send_and_receive, RunBook.commit

    def sites_unreachable_in_round_2(self: InProcessGrid, messages, *, timeout):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].content["config"]["server-round"] == 2:
            raise RuntimeError("network down")
        return real_send(self, messages, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", sites_unreachable_in_round_2)
    with pytest.raises(RuntimeError, match="network down"):
        run_server(grid, plan)
    assert [e["round"] for e in _coordinator_ledger(run_dir)[1]] == [1]
    monkeypatch.setattr(InProcessGrid, "send_and_receive", real_send)

    def crash_committing_round_3(self: RunBook, round_no: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        if round_no == 3:
            raise RuntimeError("coordinator lost power")
        return real_commit(self, round_no, *args, **kwargs)

    monkeypatch.setattr(RunBook, "commit", crash_committing_round_3)
    with pytest.raises(RuntimeError, match="lost power"):
        run_server(grid, plan)
    assert [e["round"] for e in _coordinator_ledger(run_dir)[1]] == [1, 2, 3]
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]

    monkeypatch.setattr(RunBook, "commit", real_commit)
    assert run_server(grid, plan) == 3
    assert run_server(grid, plan) == 3  # nothing left: nothing appended
    path, entries = _coordinator_ledger(run_dir)
    assert [e["round"] for e in entries] == [1, 2, 3, 3]  # round 3 was released twice
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[-1]["central_epsilon"] == pytest.approx(_epsilon([SIGMA] * 4))
    assert _audit(path) == "ok"

    # a coordinator ledger that lost entries of committed rounds stops a resume
    path.unlink()
    longer = _plan(run_dir, foundation, sites=2, rounds=4)
    with pytest.raises(ResumeError, match=r"no entry for committed round\(s\) 1, 2, 3"):
        run_server(grid, longer)


def test_a_round_with_fewer_updates_records_the_noise_that_protected_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foundation = micro_foundation(tmp_path)
    run_dir = tmp_path / "run"
    plan = _plan(run_dir, foundation, sites=2, rounds=1)
    grid = InProcessGrid(fake_sites([0.01, -0.02], [5, 50], refuse=1), 2)
    with caplog.at_level(logging.WARNING, logger="fedrad.server"):
        assert run_server(grid, plan) == 1
    path, entries = _coordinator_ledger(run_dir)
    # noise sized for 2 sites (std sigma*C/2) on a mean of 1 update: sigma/2 protected it
    assert [e["noise_multiplier"] for e in entries] == pytest.approx([SIGMA / 2])
    record = read_metrics(run_dir)[0]
    assert record["central_epsilon"] == pytest.approx(_epsilon([SIGMA / 2]))
    assert any("budget is spent" in f for f in record["failures"])
    assert any("effective noise multiplier" in r.getMessage() for r in caplog.records)
    assert _audit(path) == "ok"


def test_without_central_dp_there_is_no_coordinator_ledger(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    run_dir = tmp_path / "run"
    plan = _plan(run_dir, foundation, sites=2, rounds=1, central_noise_multiplier=None)
    assert run_server(InProcessGrid(fake_sites([0.01, -0.02], [5, 50]), 2), plan) == 1
    assert not (run_dir / "coordinator").exists()
    assert "central_epsilon" not in read_metrics(run_dir)[0]


def test_the_coordinators_noise_is_not_numpys_global_generator() -> None:
    """Seeding numpy's global generator (as anyone replaying a run would) does not repeat the
    central noise: it comes from a CSPRNG-keyed stream, at std sigma * C / n."""
    strategy = with_central_dp(
        build_strategy("fedavg", num_sites=2, equal_weights=True),
        noise_multiplier=SIGMA,
        clipping_norm=CLIP,
        num_sites=2,
    )
    mean = ArrayRecord({"w": Array(np.zeros(50_000, dtype=np.float32))})
    draws = []
    for _ in range(2):
        np.random.seed(0)
        draws.append(strategy._add_noise_to_aggregated_arrays(mean)["w"].numpy())
    assert not np.array_equal(draws[0], draws[1])
    assert draws[0].dtype == np.float32
    assert float(draws[0].std()) == pytest.approx(SIGMA * CLIP / 2, rel=0.03)
