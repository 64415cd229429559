"""The coordinator's Flower ServerApp (Message API): a thin round loop over a strategy.

Flower's `Strategy.start` always counts rounds from 1 and keeps nothing on disk, so the loop
here drives the strategy's own configure/aggregate steps with absolute round numbers: that is
what makes resume exact (no round twice, FedAdam's bias correction continuing) and gives a
checkpoint and a metrics line per round (bookkeeping: `server/rounds.py`). Plain or SecAgg+
(`round_driver`), with or without central DP (`build_plan_strategy`), the loop around it is the
same, and every wait for sites is bounded (`server/participation.py`). `app` serves a
deployment, where each reply's site id comes from the coordinator's site registry by the node
the request went to, never from the reply; `simulation_server_app(plan)` serves a simulation.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedrad.common.model.parts import declared_parts
from fedrad.common.privacy.coordinator_ledger import CoordinatorLedger
from fedrad.common.protocol.messages import SITE_ID_FIELD, SITE_KEY, WEIGHT_KEY
from fedrad.common.run_dir import append_failed_round
from fedrad.server.ledger_heads import LedgerHeads, heads_file
from fedrad.server.part_average import partial_parts, rescale_parts
from fedrad.server.participation import (
    FederationError,
    Participation,
    RoundGrid,
    SiteRegistry,
    wait_for_sites,
)
from fedrad.server.rounds import (
    EvalOutcome,
    RunBook,
    ServerPlan,
    TrainOutcome,
    round_record,
)
from fedrad.server.strategies import (
    build_strategy,
    restore_strategy_state,
    size_to_sites,
    strategy_state,
    with_central_dp,
)

logger = logging.getLogger(__name__)

OnRound = Callable[[dict[str, Any]], None]
RoundValues = Mapping[str, int | float | str | bool]

__all__ = [
    "FederationError",
    "app",
    "deployed_plan",
    "run_server",
    "simulation_server_app",
    "wait_for_sites",
]


def _site_metrics(replies: list[Message], grid: RoundGrid) -> dict[str, dict[str, float]]:
    """Each site's figures, under the id the grid gives the reply's node (the registry's in a
    deployment; what the reply claims in a simulation)."""
    out: dict[str, dict[str, float]] = {}
    for reply in replies:
        if reply.has_error() or not reply.content.metric_records:
            continue
        named = reply.content.config_records.get(SITE_KEY)
        claimed = None if named is None else named.get(SITE_ID_FIELD)
        site = grid.site_id(grid.node_of(reply), claimed)
        if site is None:
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        out[site] = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
    return out


def build_plan_strategy(plan: ServerPlan) -> Strategy:
    """The plan's strategy, wrapped for central DP when the plan asks for it (equal-weight
    averaging, clipping, noise: `server/strategies.py`)."""
    strategy = build_strategy(
        plan.strategy,
        num_sites=plan.num_sites,
        proximal_mu=plan.proximal_mu,
        server_lr=plan.server_lr,
        equal_weights=plan.central_dp,
    )
    if plan.central_noise_multiplier is None:
        return strategy
    return with_central_dp(
        strategy,
        noise_multiplier=plan.central_noise_multiplier,
        clipping_norm=plan.central_clipping_norm,
        num_sites=plan.num_sites,
    )


class RoundDriver(Protocol):
    """How one round's training and evaluation travel (plain, or SecAgg+)."""

    def train(
        self, grid: RoundGrid, round_no: int, arrays: Mapping[str, np.ndarray], config: RoundValues
    ) -> TrainOutcome: ...

    def evaluate(
        self, grid: RoundGrid, round_no: int, arrays: Mapping[str, np.ndarray], config: RoundValues
    ) -> EvalOutcome: ...

    def state(self) -> dict[str, np.ndarray]: ...


class PlainRounds:
    """Flower's Message-API strategy, driven with absolute round numbers; each site's update
    reaches the coordinator as it is (DP-SGD at the site is what protects it). Each site's
    message carries its last acknowledged ledger head (`heads`), once one is known."""

    def __init__(
        self, plan: ServerPlan, state: dict[str, np.ndarray], heads: LedgerHeads | None = None
    ) -> None:
        self.plan = plan
        self.strategy = build_plan_strategy(plan)
        self.heads = heads or LedgerHeads()
        restore_strategy_state(self.strategy, state)

    def state(self) -> dict[str, np.ndarray]:
        return strategy_state(self.strategy)

    def train(
        self, grid: RoundGrid, round_no: int, arrays: Mapping[str, np.ndarray], config: RoundValues
    ) -> TrainOutcome:
        size_to_sites(self.strategy, len(grid.node_ids))
        record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        messages = self.strategy.configure_train(round_no, record, ConfigRecord(config), grid)
        messages = self.heads.stamp(grid, messages)
        replies = grid.send_and_receive(messages, timeout=self.plan.round_timeout_s)
        self.heads.observe_replies(grid, replies)
        updates = [r for r in replies if not r.has_error()]  # refusals are failures
        new_arrays, metrics = self.strategy.aggregate_train(round_no, updates)
        new = None if new_arrays is None else {k: v.numpy() for k, v in new_arrays.items()}
        if new is not None:
            new = self._per_part(new, arrays, updates)
        return TrainOutcome(
            arrays=new,
            metrics=dict(metrics or {}),  # type: ignore[arg-type]
            per_site=_site_metrics(replies, grid),
            failures=grid.failures(),
            updates=len(updates),
            update_bytes=max(grid.sent_bytes.values(), default=0),
        )

    def _per_part(
        self,
        new: dict[str, np.ndarray],
        previous: Mapping[str, np.ndarray],
        updates: list[Message],
    ) -> dict[str, np.ndarray]:
        """Each modality part averaged over the replies that trained it (`part_average.py`),
        with the weights the strategy averaged by."""
        metrics = [dict(next(iter(r.content.metric_records.values()))) for r in updates]
        declared = [declared_parts(m) for m in metrics]
        if self.plan.central_dp:
            weights = [1.0] * len(metrics)
        else:
            weights = [float(m.get(WEIGHT_KEY, 0.0)) for m in metrics]  # type: ignore[arg-type]
        if self.plan.strategy == "fedadam":
            partial = partial_parts(weights, declared)
            if partial:
                raise FederationError(
                    f"fedadam cannot average a part only some sites train "
                    f"({', '.join(partial)}): its server step is not linear in the mean; use "
                    "fedavg or fedprox"
                )
            return new  # every part trained by all sites or by none: Adam's step stands
        return rescale_parts(new, previous, weights, declared)

    def evaluate(
        self, grid: RoundGrid, round_no: int, arrays: Mapping[str, np.ndarray], config: RoundValues
    ) -> EvalOutcome:
        size_to_sites(self.strategy, len(grid.node_ids))
        record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        messages = self.strategy.configure_evaluate(round_no, record, ConfigRecord(config), grid)
        messages = self.heads.stamp(grid, messages)
        replies = grid.send_and_receive(messages, timeout=self.plan.round_timeout_s)
        self.heads.observe_replies(grid, replies)
        metrics = self.strategy.aggregate_evaluate(round_no, replies)
        return EvalOutcome(
            dict(metrics or {}),  # type: ignore[arg-type]
            [f"evaluate: {line}" for line in grid.failures()],
            per_site=_site_metrics(replies, grid),
        )


def round_driver(
    plan: ServerPlan, state: dict[str, np.ndarray], heads: LedgerHeads | None = None
) -> RoundDriver:
    """SecAgg+ when the plan asks for it (the coordinator sees only the sum of the sites'
    masked updates), else the plain Message-API strategy; either sends each site its last
    acknowledged ledger head (`heads`)."""
    if plan.secagg:
        from fedrad.server.secure_aggregation import SecureRounds

        if state:
            raise FederationError("this run's checkpoint holds strategy state SecAgg+ cannot use")
        return SecureRounds(plan, heads)
    return PlainRounds(plan, state, heads)


def load_registry(plan: ServerPlan) -> SiteRegistry | None:
    """The plan's site registry, checked against its sites; None in a simulation."""
    if plan.site_registry is None:
        return None
    registry = SiteRegistry.load(Path(plan.site_registry))
    if len(registry) < plan.num_sites:
        raise FederationError(
            f"{registry.source} lists {len(registry)} sites, fewer than num-sites {plan.num_sites}"
        )
    logger.info("site ids from %s (%d sites)", registry.source, len(registry))
    return registry


def run_server(grid: Grid, plan: ServerPlan, *, on_round: OnRound | None = None) -> int:
    """Runs the remaining rounds of the plan; returns the last committed round."""
    started = time.perf_counter()
    registry = load_registry(plan)
    book = RunBook(plan.run_dir, plan.foundation_dir)
    point = book.resume_point()
    if point.completed >= plan.rounds:
        logger.info("all %d rounds already committed in this run", plan.rounds)
        return point.completed
    if point.completed:
        logger.info("resuming after round %d of %d", point.completed, plan.rounds)
    # each site's last acknowledged ledger head, kept across rounds (and runs, in a deployment)
    heads = LedgerHeads(heads_file(plan.run_dir, plan.site_registry))
    driver = round_driver(plan, point.strategy_state, heads)
    ledger: CoordinatorLedger | None = None
    if plan.central_dp:
        ledger = CoordinatorLedger(
            plan.run_dir, run_id=plan.round_config.run_id, delta=plan.central_delta
        )
        ledger.check_covers(point.completed)
    arrays: dict[str, np.ndarray] = dict(point.arrays)
    wait_for_sites(grid, plan.num_sites, plan.connect_timeout_s, registry)
    sites = Participation(
        num_sites=plan.num_sites,
        min_sites=plan.required_sites,
        timeout_s=plan.connect_timeout_s,
        registry=registry,
    )
    for round_no in range(point.completed + 1, plan.rounds + 1):
        round_start = time.perf_counter()
        config = plan.config_for(round_no).to_record()
        train_step = sites.round_grid(grid, round_no=round_no, step="training")
        outcome = driver.train(train_step, round_no, arrays, config)
        for reason in outcome.failures:  # a site's refusal is its right: note it, carry on
            logger.warning("round %d: a site sent no update: %s", round_no, reason)
        if outcome.arrays is None:
            reasons = "; ".join(outcome.failures) or "no replies"
            append_failed_round(plan.run_dir, round_no, outcome.failures or ["no replies"])
            raise FederationError(f"round {round_no}: no usable update ({reasons})")
        central_epsilon = None
        # The release is on the ledger before the noisy model goes out for evaluation and
        # before the round is committed.
        if ledger is not None and plan.central_noise_multiplier is not None:
            central_epsilon = ledger.record_release(
                round_no,
                noise_multiplier=plan.central_noise_multiplier,
                clipping_norm=plan.central_clipping_norm,
                updates=outcome.updates,
                configured=plan.num_sites,
            )
        arrays = outcome.arrays
        eval_step = sites.round_grid(grid, round_no=round_no, step="evaluation")
        evaluation = driver.evaluate(eval_step, round_no, arrays, config)
        absent = [f"evaluate: {line}" for line in eval_step.absence()]
        record = round_record(
            round_no,
            train=outcome.metrics,
            evaluation=evaluation.metrics,
            epsilon={site: m["epsilon"] for site, m in outcome.per_site.items()},
            failures=train_step.absence() + outcome.failures + evaluation.failures + absent,
            update_bytes=outcome.update_bytes,
            round_s=time.perf_counter() - round_start,
            wall_s=time.perf_counter() - started,
            central_epsilon=central_epsilon,
            secagg=outcome.secagg,
            per_site=evaluation.per_site,
        )
        book.commit(round_no, arrays, record, driver.state())
        logger.info("round %d committed in %.1f s", round_no, record["round_s"])
        if on_round is not None:
            on_round(record)
    return book.completed


def simulation_server_app(plan: ServerPlan, *, on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp over a plan built in Python (run_simulation has no run config); its
    in-process sites may name themselves."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, plan, on_round=on_round)

    return app


def log_to_run_stream() -> None:
    """fedrad's own INFO lines (rounds committed, resumes, dropouts, SecAgg+ settings) into
    the output Flower mirrors to `flwr log`: nothing configures logging in the ServerApp's
    process, so without this only warnings would reach the coordinator's operator."""
    logger_ = logging.getLogger("fedrad")
    if not logger_.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger_.addHandler(handler)
        logger_.setLevel(logging.INFO)


def deployed_plan(run_config: Mapping[str, Any]) -> ServerPlan:
    """The deployed ServerApp's plan. Its sites are other parties: without the registry each
    site's figures (epsilon, metrics) would go under whatever id its replies claim."""
    plan = ServerPlan.from_run_config(dict(run_config))
    if plan.site_registry is None:
        raise FederationError("a deployed run needs site-registry (fedrad-coordinator run sets it)")
    return plan


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_run_stream()
    run_server(grid, deployed_plan(context.run_config))
