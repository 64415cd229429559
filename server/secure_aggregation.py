"""SecAgg+ on the coordinator: each training round through Flower's `SecAggPlusWorkflow`,
inside fedrad's own round loop (`server/app.py`), so checkpoints, metrics.jsonl, exact resume
and the central-DP ledger work as without it.

Of the sites' updates the coordinator only ever sees their unmasked weighted mean; their
metrics come in the clear, as without SecAgg+, under the site id the round's grid gives the
node, never the one they name. Central DP here (Flower's fl-dp-sa pattern: the sites clip, the
coordinator adds noise to the unmasked mean) protects each site against the other sites, not
against the coordinator, which sees the mean before adding the noise; DP-SGD at every site
(the default) protects against both. A site that fails or goes silent at any stage is left
out, and with at least `threshold` sites left the round completes without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.supercore.differential_privacy import compute_stdv

from fedrad.common.model.parts import declared_parts
from fedrad.common.privacy.randomness import MechanismRandomness
from fedrad.common.protocol.messages import SITE_FIELDS, SITE_ID_FIELD, WEIGHT_KEY
from fedrad.common.protocol.secagg import (
    adam_update_bound,
    array_order,
    mean_error_bound,
    quantization_range,
)
from fedrad.common.protocol.secagg_masks import MaskSeedError, install_full_strength_masks
from fedrad.server.ledger_heads import LedgerHeads
from fedrad.server.part_average import rescale_parts
from fedrad.server.participation import FederationError, RoundGrid
from fedrad.server.rounds import EvalOutcome, ServerPlan, TrainOutcome
from fedrad.server.strategies import add_central_noise, weighted_metrics

# Masks keyed by the whole seed, not Flower's 32-bit fold; every site must do the same.
install_full_strength_masks()

logger = logging.getLogger(__name__)

RoundValues = Mapping[str, int | float | str | bool]
# Trained values are float32: their rounding can take an update a hair past a bound that is
# exact in real arithmetic (Adam's first step is exactly lr). Derived ranges get this margin.
RANGE_MARGIN = (1.01, 1e-5)  # relative, absolute


def with_margin(bound: float) -> float:
    relative, absolute = RANGE_MARGIN
    return bound * relative + absolute


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of every round of a plan."""

    num_shares: int  # key shares per site
    threshold: int  # shares that reconstruct a key (a dropped site's masks, a live one's seed)
    clipping_range: float  # |weight / max_weight * update value| is at most this
    max_weight: float  # the largest weight a site may claim
    quantization_range: int  # levels per value; the sum of all sites never wraps

    @staticmethod
    def for_plan(plan: ServerPlan) -> SecAggSettings:
        """Ranges from what the sites send: AdamW's bound on an update value for the round's
        local steps and learning rate (or `secagg-clip`), within the central clipping norm
        when central DP is on (an L2 bound bounds every value), each with `RANGE_MARGIN`;
        unit weights under central DP. So `secaggplus_mod` clips nothing: a site whose update
        would still be clipped refuses the round instead.
        """
        config = plan.round_config
        clip = plan.secagg_clip or with_margin(
            adam_update_bound(lr=config.lr, steps=config.local_steps)
        )
        max_weight = plan.secagg_max_weight
        if plan.central_dp:
            clip = min(clip, with_margin(plan.central_clipping_norm))
            max_weight = 1.0
        return SecAggSettings(
            num_shares=plan.secagg_shares_count,
            threshold=plan.shares_threshold,
            clipping_range=clip,
            max_weight=max_weight,
            quantization_range=quantization_range(plan.num_sites),
        )


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with sites that left before handing out their key shares
    taken out of the round.

    Flower 1.41 counts such a site as dropped at the unmask stage and asks every other site
    for shares of its key, which nobody holds: every site fails and the round halts. Nobody
    masked with it either (a site adds pairwise masks only for the sites whose shares it
    received), so there is nothing to reconstruct: after the share-keys stage the round's
    sites are the ones that completed it.
    """

    def share_keys_stage(self, grid: Any, context: LegacyContext, state: WorkflowState) -> bool:
        done = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return done


class _OneRound(Strategy):
    """The legacy strategy the SecAgg+ workflow drives for one round (Flower 1.41 has SecAgg+
    only in its legacy API, in a `LegacyContext`): it gives the round's sites their FitIns (the
    global trainable arrays in `array_order`, and the round config) and receives the weighted
    mean of their updates that the workflow unmasked. The new global model is the old one plus
    that mean (FedAvg; FedProx differs only at the sites)."""

    def __init__(
        self,
        grid: RoundGrid,
        config: RoundValues,
        per_node: Callable[[int], Mapping[str, str]] | None = None,
    ) -> None:
        self.proxies = [GridClientProxy(node, grid, run_id=0) for node in grid.node_ids]  # type: ignore[arg-type]
        self.config = dict(config)
        self.per_node = per_node or (lambda node: {})  # a site's own config (its ledger head)
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            (proxy, FitIns(parameters, {**self.config, **self.per_node(proxy.node_id)}))  # type: ignore[attr-defined]
            for proxy in self.proxies
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Every result carries the same unmasked weighted mean: keep the round's results."""
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, *args: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


class _CentralNoise(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side-clipping central DP wrapper, except that a dropout does not void
    the round (Flower's drops any round with a failure): the noise stays sized for the
    configured sites, and the coordinator's ledger records the noise multiplier that actually
    protected the mean of fewer updates (sigma x updates / sites)."""

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's aggregate_fit, with the noise from the coordinator's CSPRNG
        (`add_central_noise`) instead of numpy's global generator."""
        aggregated, metrics = self.strategy.aggregate_fit(server_round, results, [])
        if aggregated is not None:
            std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
            noised = add_central_noise(
                parameters_to_ndarrays(aggregated), std, MechanismRandomness()
            )
            aggregated = ndarrays_to_parameters(noised)
            logger.info("central DP noise of std %.4g added to the unmasked mean", std)
        return aggregated, metrics


class SecureRounds:
    """Training and evaluation rounds of a SecAgg+ plan (the legacy-API ClientApp's format)."""

    def __init__(self, plan: ServerPlan, heads: LedgerHeads | None = None) -> None:
        if not plan.secagg:
            raise ValueError("SecureRounds needs a plan with secagg on")
        self.plan = plan
        self.heads = heads or LedgerHeads()  # each site's last acknowledged ledger head
        self.settings = SecAggSettings.for_plan(plan)
        logger.info("SecAgg+ settings: %s", asdict(self.settings))

    def state(self) -> dict[str, np.ndarray]:
        return {}  # FedAvg and FedProx carry nothing between rounds

    def train(
        self,
        grid: RoundGrid,
        round_no: int,
        arrays: Mapping[str, np.ndarray],
        config: RoundValues,
    ) -> TrainOutcome:
        names = array_order(arrays)
        if self.plan.strategy == "fedprox":  # as Flower's FedProx.configure_train does
            config = {**config, "proximal-mu": self.plan.proximal_mu}
        one_round = _OneRound(grid, config, lambda node: self.heads.config_for(grid, node))
        strategy: Strategy = one_round
        if self.plan.central_noise_multiplier is not None:
            strategy = _CentralNoise(
                one_round,
                noise_multiplier=self.plan.central_noise_multiplier,
                clipping_norm=self.plan.central_clipping_norm,
                num_sampled_clients=self.plan.num_sites,
            )
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=strategy,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: round_no}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([np.asarray(arrays[name]) for name in names]), keep_input=True
        )
        settings = self.settings
        logger.info(
            "round %d: SecAgg+ over %d sites (shares %d, threshold %d, clipping range %.4g)",
            round_no,
            len(grid.node_ids),
            settings.num_shares,
            settings.threshold,
            settings.clipping_range,
        )
        try:
            _SecAggPlus(
                settings.num_shares,
                settings.threshold,
                max_weight=settings.max_weight,
                clipping_range=settings.clipping_range,
                quantization_range=settings.quantization_range,
                timeout=self.plan.round_timeout_s,
            )(grid, context)  # type: ignore[arg-type]
        except MaskSeedError as exc:  # a site shared a seed too short to mask at full strength
            raise FederationError(f"round {round_no}: SecAgg+ refused: {exc}") from None
        results = one_round.results or []
        summed = {proxy.node_id for proxy, _ in results}  # type: ignore[attr-defined]
        failures = [
            grid.named(
                node,
                grid.problems.get(node, "left the SecAgg+ round before sending its masked update"),
            )
            for node in grid.node_ids
            if node not in summed
        ]
        if not results:
            return TrainOutcome(None, {}, {}, failures, 0, 0)
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        means = [bytes_to_ndarray(array.data) for array in record.values()]
        if [m.shape for m in means] != [np.shape(arrays[n]) for n in names]:
            raise ValueError("the unmasked mean does not match the global arrays")
        new = {
            name: (np.asarray(arrays[name], np.float64) + mean).astype(
                np.asarray(arrays[name]).dtype
            )
            for name, mean in zip(names, means, strict=True)
        }
        # each modality part over the sites that trained it (`part_average.py`): a site's
        # declaration travels beside its masked update, as its example count does
        declared = [declared_parts(res.metrics) for _, res in results]
        new = rescale_parts(new, arrays, [float(res.num_examples) for _, res in results], declared)
        # The workflow keys results by a reply's source, which the RoundGrid has checked is the
        # node the request went to.
        reported = [(proxy.node_id, res.metrics) for proxy, res in results]  # type: ignore[attr-defined]
        per_site = _per_site(grid, reported)
        self.heads.observe_metrics(grid, reported)
        weights = [float(res.num_examples) for _, res in results]
        bound = mean_error_bound(
            weights,
            clipping_range=settings.clipping_range,
            quantization=settings.quantization_range,
            max_weight=settings.max_weight,
        )
        return TrainOutcome(
            arrays=new,
            metrics=_weighted([_numbers(res.metrics) for _, res in results]),
            per_site=per_site,
            failures=failures,
            updates=len(results),
            update_bytes=max((grid.sent_bytes.get(node, 0) for node in summed), default=0),
            secagg={
                "sites_summed": float(len(results)),
                "shares": float(settings.num_shares),
                "threshold": float(settings.threshold),
                "clipping_range": settings.clipping_range,
                "quantization_range": float(settings.quantization_range),
                "error_bound": bound,
            },
        )

    def evaluate(
        self,
        grid: RoundGrid,
        round_no: int,
        arrays: Mapping[str, np.ndarray],
        config: RoundValues,
    ) -> EvalOutcome:
        """The global model on every site's held-out split, in the legacy format the SecAgg+
        ClientApp reads; evaluation metrics are aggregates and travel in the clear."""
        names = array_order(arrays)
        parameters = ndarrays_to_parameters([np.asarray(arrays[name]) for name in names])
        messages = [
            Message(
                content=compat.evaluateins_to_recorddict(
                    EvaluateIns(parameters, {**config, **self.heads.config_for(grid, node)}),
                    keep_input=True,
                ),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                group_id=str(round_no),
            )
            for node in grid.node_ids
        ]
        replies = grid.send_and_receive(messages, timeout=self.plan.round_timeout_s)
        results = [
            (grid.node_of(reply), compat.recorddict_to_evaluateres(reply.content).metrics)
            for reply in replies
            if not reply.has_error()
        ]
        reports = [_numbers(metrics) for _, metrics in results]
        failures = [f"evaluate: {line}" for line in grid.failures()]
        per_site = _per_site(grid, results)
        self.heads.observe_metrics(grid, results)
        return EvalOutcome(_weighted(reports) if reports else {}, failures, per_site=per_site)


def _per_site(
    grid: RoundGrid, results: list[tuple[int, Mapping[str, Scalar]]]
) -> dict[str, dict[str, float]]:
    """Each node's figures under the site id the grid gives it (the registry's when it has one;
    the id the site names in its metrics otherwise)."""
    out = {}
    for node, metrics in results:
        site = grid.site_id(node, metrics.get(SITE_ID_FIELD))
        if site is not None:
            out[site] = _numbers(metrics)
    return out


def _numbers(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """A legacy metrics dict without the site's id: numbers only."""
    return {
        key: float(value)  # type: ignore[arg-type]
        for key, value in metrics.items()
        if key not in SITE_FIELDS and not isinstance(value, str | bytes)
    }


def _weighted(rows: list[dict[str, float]]) -> dict[str, float]:
    """The same example-weighted aggregation the Message-API strategies use."""
    records = [RecordDict({"metrics": MetricRecord(row)}) for row in rows if WEIGHT_KEY in row]
    return dict(weighted_metrics(records, WEIGHT_KEY)) if records else {}  # type: ignore[arg-type]
