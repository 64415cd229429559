"""The coordinator's Flower ServerApp (Message API): a thin round loop over a strategy.

Flower's `Strategy.start` always counts rounds from 1 and keeps nothing on disk, so the loop
here drives the strategy's own configure/aggregate steps with absolute round numbers: that is
what makes resume exact (no round twice, FedAdam's bias correction continuing) and gives a
checkpoint and a metrics line per round. Bookkeeping lives in `server/rounds.py`.

With central DP on (`ServerPlan.central_noise_multiplier`), the strategy is wrapped by
`with_central_dp` (equal-weight averaging, clipping, noise; see `server/strategies.py`) and
each round's release is appended to the coordinator's ledger right after aggregation, before
the noisy model goes out for evaluation and before the round is committed.

`app` reads its plan from the run config (`flwr run`); `simulation_server_app(plan)` closes
over a plan built in Python (run_simulation has no run config).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedrad.common.fl_protocol import ARRAYS_KEY, SITE_ID_FIELD, SITE_KEY
from fedrad.server.rounds import CoordinatorLedger, RunBook, ServerPlan, round_record
from fedrad.server.strategies import (
    build_strategy,
    restore_strategy_state,
    strategy_state,
    with_central_dp,
)

logger = logging.getLogger(__name__)

OnRound = Callable[[dict[str, Any]], None]


class FederationError(RuntimeError):
    """The federation cannot go on (sites missing, a round with no usable update)."""


def wait_for_sites(grid: Grid, num_sites: int, timeout_s: float) -> None:
    """Every configured site, or a clear error: never Flower's silent endless wait."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < num_sites:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {connected} of {num_sites} sites connected after {timeout_s:.0f} s"
            )
        time.sleep(0.2)


def _site_metrics(replies: list[Message]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for reply in replies:
        if reply.has_error() or SITE_KEY not in reply.content.config_records:
            continue
        site = str(reply.content.config_records[SITE_KEY][SITE_ID_FIELD])
        metrics = next(iter(reply.content.metric_records.values()))
        out[site] = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
    return out


def _update_bytes(replies: list[Message]) -> int:
    """Bytes of one site's update (the first valid reply): what each site sends per round."""
    for reply in replies:
        if not reply.has_error() and ARRAYS_KEY in reply.content.array_records:
            return sum(len(a.data) for a in reply.content.array_records[ARRAYS_KEY].values())
    return 0


def build_plan_strategy(plan: ServerPlan) -> Strategy:
    """The plan's strategy, wrapped for central DP when the plan asks for it."""
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


def run_server(grid: Grid, plan: ServerPlan, *, on_round: OnRound | None = None) -> int:
    """Runs the remaining rounds of the plan; returns the last committed round."""
    started = time.perf_counter()
    book = RunBook(plan.run_dir, plan.foundation_dir)
    point = book.resume_point()
    if point.completed >= plan.rounds:
        logger.info("all %d rounds already committed in this run", plan.rounds)
        return point.completed
    if point.completed:
        logger.info("resuming after round %d of %d", point.completed, plan.rounds)
    strategy = build_plan_strategy(plan)
    ledger: CoordinatorLedger | None = None
    if plan.central_dp:
        ledger = CoordinatorLedger(
            plan.run_dir, run_id=plan.round_config.run_id, delta=plan.central_delta
        )
        ledger.check_covers(point.completed)
    restore_strategy_state(strategy, point.strategy_state)
    arrays = ArrayRecord({k: Array(v) for k, v in point.arrays.items()})
    wait_for_sites(grid, plan.num_sites, plan.connect_timeout_s)
    for round_no in range(point.completed + 1, plan.rounds + 1):
        round_start = time.perf_counter()
        config = plan.config_for(round_no).to_record()
        messages = strategy.configure_train(round_no, arrays, ConfigRecord(config), grid)
        replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout_s))
        failures = [str(r.error.reason) for r in replies if r.has_error()]
        for reason in failures:  # a site's refusal is its right: note it, carry on
            logger.warning("round %d: a site sent no update: %s", round_no, reason)
        per_site = _site_metrics(replies)
        updates = [r for r in replies if not r.has_error()]  # refusals are noted above
        new_arrays, train_metrics = strategy.aggregate_train(round_no, updates)
        if new_arrays is None:
            raise FederationError(
                f"round {round_no}: no usable update ({'; '.join(failures) or 'no replies'})"
            )
        central_epsilon = None
        if ledger is not None and plan.central_noise_multiplier is not None:
            central_epsilon = ledger.record_release(
                round_no,
                noise_multiplier=plan.central_noise_multiplier,
                clipping_norm=plan.central_clipping_norm,
                updates=len(updates),
                configured=plan.num_sites,
            )
        arrays = new_arrays
        messages = strategy.configure_evaluate(round_no, arrays, ConfigRecord(config), grid)
        eval_replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout_s))
        failures += [f"evaluate: {r.error.reason}" for r in eval_replies if r.has_error()]
        eval_metrics = strategy.aggregate_evaluate(round_no, eval_replies)
        record = round_record(
            round_no,
            train=dict(train_metrics or {}),  # type: ignore[arg-type]
            evaluation=dict(eval_metrics or {}),  # type: ignore[arg-type]
            epsilon={site: m["epsilon"] for site, m in per_site.items()},
            failures=failures,
            update_bytes=_update_bytes(replies),
            round_s=time.perf_counter() - round_start,
            wall_s=time.perf_counter() - started,
            central_epsilon=central_epsilon,
            per_site=_site_metrics(eval_replies),
        )
        book.commit(
            round_no,
            {k: v.numpy() for k, v in arrays.items()},
            record,
            strategy_state(strategy),
        )
        logger.info("round %d committed in %.1f s", round_no, record["round_s"])
        if on_round is not None:
            on_round(record)
    return book.completed


def simulation_server_app(plan: ServerPlan, *, on_round: OnRound | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, plan, on_round=on_round)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, ServerPlan.from_run_config(dict(context.run_config)))
