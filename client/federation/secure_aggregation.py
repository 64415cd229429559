"""The site's SecAgg+ ClientApp: Flower's legacy API (where SecAgg+ lives) over the same site
agent as the default ClientApp, so choosing SecAgg+ is configuration, not another training path.

`SiteClient` is the whole adapter: `fit` calls `train_site`, `evaluate` calls `evaluate_site`;
the mods around it (`build_secure_client_app`) gate what leaves, mask, and refuse an update
that SecAgg+ would clip. `app` serves a deployed SuperNode (site from `--node-config`, as
`...federation.app:app`); `simulation_secure_client_app(sites)` serves a simulation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedrad.client.federation.app import SiteResolver, partition_resolver, site_from_node_config
from fedrad.client.federation.privacy_mod import make_secure_privacy_mod
from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    declared_trainable,
    evaluate_site,
    train_site,
)
from fedrad.common.protocol.messages import LEDGER_HEAD_FIELD, SITE_ID_FIELD, RoundConfig
from fedrad.common.protocol.secagg import SECAGG_STATE, array_order, weight_ratio
from fedrad.common.protocol.secagg_masks import install_full_strength_masks

# Masks keyed by the whole seed, not Flower's 32-bit fold; the coordinator must do the same.
install_full_strength_masks()

logger = logging.getLogger(__name__)

FIT_INS_CONFIG = "fitins.config"  # legacy FitIns: the round config


def _plan(config: dict[str, Scalar]) -> tuple[RoundConfig, bool]:
    """The round config, and whether central DP (client-side clipping) is on this round."""
    record = dict(config)
    central = record.pop(KEY_CLIPPING_NORM, None) is not None
    return RoundConfig.from_record(record), central


class SiteClient(NumPyClient):
    """The legacy-API face of one site: arrays travel in `array_order` of the declared names.

    A site's update counts by its training studies, or once under central DP (the noise is
    sized for an unweighted mean). Under SecAgg+ the weight travels inside the masked vector,
    so the coordinator cannot check it: it relies on the site running this ClientApp.
    """

    def __init__(self, spec: SiteSpec) -> None:
        self.spec = spec

    def _named(self, parameters: NDArrays) -> dict[str, np.ndarray]:
        names = array_order(declared_trainable(self.spec.foundation_dir))
        if len(parameters) != len(names):
            raise SiteRefusalError(
                f"the round sent {len(parameters)} arrays; the foundation declares {len(names)}"
            )
        return dict(zip(names, parameters, strict=True))

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        plan, central = _plan(config)
        update = train_site(self.spec, self._named(parameters), plan)
        names = array_order(update.arrays)
        weight = 1 if central else update.num_examples
        metrics: dict[str, Scalar] = {**update.metrics, SITE_ID_FIELD: self.spec.site_id}
        if update.ledger_head:
            metrics[LEDGER_HEAD_FIELD] = update.ledger_head
        return [update.arrays[name] for name in names], weight, metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        plan, _ = _plan(config)
        released = evaluate_site(self.spec, self._named(parameters), plan)
        metrics: dict[str, Scalar] = {
            **released.metrics,
            SITE_ID_FIELD: self.spec.site_id,
            LEDGER_HEAD_FIELD: released.ledger_head,
        }
        return float("nan"), released.num_examples, metrics


def check_secagg_range(updates: NDArrays, weight: int, state: dict[str, object]) -> float:
    """Refuses (SiteRefusalError) an update that `secaggplus_mod` would clip: every value,
    scaled by weight / max_weight as the mod scales it, must lie within its clipping range.
    Returns the largest scaled value's share of the range."""
    try:
        clipping = float(state["clipping_range"])  # type: ignore[arg-type]
        max_weight = float(state["max_weight"])  # type: ignore[arg-type]
        levels = int(state["target_range"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as exc:
        raise SiteRefusalError("no SecAgg+ setup is on record for this round") from exc
    if weight > max_weight:
        raise SiteRefusalError(
            f"this site's weight {weight} exceeds the SecAgg+ max weight {max_weight:g}: "
            "the coordinator must raise secagg-max-weight"
        )
    ratio = weight_ratio(weight, max_weight=max_weight, quantization=levels)
    peak = max((float(np.max(np.abs(u))) for u in updates if u.size), default=0.0)
    if not np.isfinite(peak):
        raise SiteRefusalError("the update is not finite")
    if peak * ratio > clipping:
        raise SiteRefusalError(
            f"the update reaches {peak * ratio:.4g} per value (scaled by its weight), beyond "
            f"the SecAgg+ clipping range {clipping:.4g}: SecAgg+ would clip it silently; the "
            "coordinator must raise secagg-clip"
        )
    return peak * ratio / clipping


def update_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """New trainable values -> the update (new minus global, float64), range-checked."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    sent = parameters_to_ndarrays(
        compat.recorddict_to_fitins(message.content, keep_input=True).parameters
    )
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    result = compat.recorddict_to_fitres(reply.content, keep_input=True)
    new = parameters_to_ndarrays(result.parameters)
    if [a.shape for a in new] != [a.shape for a in sent]:
        raise SiteRefusalError("the trained arrays do not match the global ones")
    updates = [n.astype(np.float64) - g.astype(np.float64) for n, g in zip(new, sent, strict=True)]
    record = context.state.config_records.get(SECAGG_STATE)
    share = check_secagg_range(updates, result.num_examples, dict(record or {}))
    logger.info("update within the SecAgg+ clipping range (peak at %.1f%% of it)", 100 * share)
    result.parameters = ndarrays_to_parameters(updates)
    reply.content = compat.fitres_to_recorddict(result, keep_input=True)
    return reply


def central_clipping_mod(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's `fixedclipping_mod` when the coordinator runs central DP, else nothing."""
    config = message.content.config_records.get(FIT_INS_CONFIG) or {}
    if message.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


def build_secure_client_app(resolve: SiteResolver) -> ClientApp:
    """The SecAgg+ ClientApp for the site `resolve(context)` names. Its mods, outermost first:

    1. the SecAgg+ privacy gate (`make_secure_privacy_mod`): only each stage's own fields leave;
    2. Flower's `secaggplus_mod`: keys, encrypted key shares, masking, unmasking;
    3. `update_mod`: the new trainable values become the update (new minus global, in float64
       so the quantization is as fine as the range allows), and an update that
       `secaggplus_mod` would clip silently is refused before masking: a clipped update is a
       wrong model;
    4. `central_clipping_mod`: Flower's `fixedclipping_mod`, only when the coordinator runs
       central DP (its `DifferentialPrivacyClientSideFixedClipping` sends the clipping norm).
    """

    def client_fn(context: Context) -> Client:
        return SiteClient(resolve(context)).to_client()

    def declared(context: Context) -> frozenset[str]:
        return declared_trainable(resolve(context).foundation_dir)

    return ClientApp(
        client_fn=client_fn,
        mods=[make_secure_privacy_mod(declared), secaggplus_mod, update_mod, central_clipping_mod],
    )


def simulation_secure_client_app(sites: Sequence[SiteSpec]) -> ClientApp:
    """Virtual node `partition-id` i runs site i."""
    return build_secure_client_app(partition_resolver(sites))


app = build_secure_client_app(site_from_node_config)
