"""The site's Flower ClientApp (Message API): a thin adapter over `site_agent`.

`app` serves a deployed SuperNode, which names its site in `--node-config` (site-id, data-dir,
foundation-dir; see `SiteSpec.from_node_config`). `simulation_client_app(sites)` serves a
simulation, where each virtual node's `partition-id` picks one of the given sites. Every reply
passes the privacy mod on its way out. With SecAgg+ the coordinator names the other ClientApp,
`fedrad.client.federation.secure_aggregation:app`, an adapter over the same site agent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrad.client.federation.privacy_mod import make_privacy_mod
from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    declared_trainable,
    evaluate_site,
    train_site,
)
from fedrad.common.protocol.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LEDGER_HEAD_FIELD,
    METRICS_KEY,
    SITE_ID_FIELD,
    SITE_KEY,
    RoundConfig,
)

SiteResolver = Callable[[Context], SiteSpec]


def site_from_node_config(context: Context) -> SiteSpec:
    return SiteSpec.from_node_config(dict(context.node_config))


def _request(message: Message) -> tuple[dict, RoundConfig]:
    content = message.content
    if ARRAYS_KEY not in content.array_records or CONFIG_KEY not in content.config_records:
        raise SiteRefusalError("the message lacks the global arrays or the round config")
    arrays = {k: v.numpy() for k, v in content.array_records[ARRAYS_KEY].items()}
    return arrays, RoundConfig.from_record(dict(content.config_records[CONFIG_KEY]))


def _site_record(site_id: str, head: str) -> ConfigRecord:
    """Who replies, and its ledger head after this task (the coordinator keeps the last one it
    acknowledged and sends it back: a site whose ledger went back refuses to train)."""
    fields = {SITE_ID_FIELD: site_id}
    if head:
        fields[LEDGER_HEAD_FIELD] = head
    return ConfigRecord(fields)


def build_client_app(resolve: SiteResolver) -> ClientApp:
    """A ClientApp whose site comes from `resolve(context)`."""

    def declared(context: Context) -> frozenset[str]:
        return declared_trainable(resolve(context).foundation_dir)

    app = ClientApp(mods=[make_privacy_mod(declared)])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        spec = resolve(context)
        arrays, plan = _request(message)
        update = train_site(spec, arrays, plan)
        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in update.arrays.items()}),
                METRICS_KEY: MetricRecord(update.metrics),
                SITE_KEY: _site_record(spec.site_id, update.ledger_head),
            }
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        spec = resolve(context)
        arrays, plan = _request(message)
        released = evaluate_site(spec, arrays, plan)
        content = RecordDict(
            {
                METRICS_KEY: MetricRecord(released.metrics),
                SITE_KEY: _site_record(spec.site_id, released.ledger_head),
            }
        )
        return Message(content, reply_to=message)

    return app


def partition_resolver(sites: Sequence[SiteSpec]) -> SiteResolver:
    """In a simulation, virtual node `partition-id` i runs site i."""
    specs = tuple(sites)

    def resolve(context: Context) -> SiteSpec:
        index = context.node_config.get("partition-id")
        if not isinstance(index, int) or not 0 <= index < len(specs):
            raise SiteRefusalError(f"no site for partition {index!r}")
        return specs[index]

    return resolve


def simulation_client_app(sites: Sequence[SiteSpec]) -> ClientApp:
    """Virtual node `partition-id` i runs site i."""
    return build_client_app(partition_resolver(sites))


app = build_client_app(site_from_node_config)
