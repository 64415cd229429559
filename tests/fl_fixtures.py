"""Micro federations for tests: a foundation checkpoint, prepared site caches, site specs, and
an in-process Grid that delivers messages straight to a ClientApp (no Ray, no SuperLink)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from uuid import uuid4

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from fedrad.client.federation.site_agent import SiteSpec
from fedrad.client.ingest.dataset import SiteStudies
from fedrad.common.model.checkpoint import save_checkpoint
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key
from fedrad.common.protocol.messages import RoundConfig
from tests.model_fixtures import micro_model, micro_studies


def set_task_identity() -> None:
    """Flower stamps new messages with the process's task identity, which its runtime sets;
    tests that build messages outside a runtime set one as `run_simulation` does."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def micro_foundation(root: Path) -> Path:
    return save_checkpoint(micro_model(), root / "foundation-micro", metadata={"kind": "test"})


def write_manifest(root: Path, studies: SiteStudies) -> Path:
    """A prepared cache in `prepare_site`'s layout."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for study, image in zip(studies.studies, studies.images, strict=True):
        np.save(root / study.image_file, image, allow_pickle=False)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"studies": [asdict(s) for s in studies.studies]}))
    return manifest


def micro_site(
    root: Path, site_id: str, foundation: Path, *, n: int = 16, seed: int = 0
) -> SiteSpec:
    manifest = write_manifest(root / site_id / "cache", micro_studies(n, 32, seed))
    return SiteSpec(
        site_id=site_id,
        foundation_dir=foundation,
        ledger_path=root / site_id / "ledger.jsonl",
        key_path=root / site_id / "ledger_key.pem",
        manifest=manifest,
    )


def round_config(**over: object) -> RoundConfig:
    base: dict[str, object] = dict(
        server_round=1,
        run_id="test-run",
        planned_rounds=2,
        local_steps=2,
        batch_size=4,
        lr=1e-2,
        seed=0,
        target_epsilon=5.0,
        delta=1e-5,
        eval_reports=2,
        eval_questions=4,
    )
    base.update(over)
    return RoundConfig(**base)  # type: ignore[arg-type]


class InProcessGrid:
    """The two Grid calls a ServerApp round loop uses; node i runs partition i - 1.

    As in Flower's runtime, each message gets an id when sent, each node keeps one Context
    (its state persists between messages, which SecAgg+ needs) and receives its own copy of a
    message (as if serialized: the workflow sends one RecordDict to every node, and
    secaggplus_mod edits what it receives). `offline` nodes are not listed, and the SuperLink
    answers for them with its "node unavailable" error (from its own node id, as it does);
    `silent` nodes are listed but never answer (a hung site: the call's timeout ends the
    wait). `sent` keeps every message, `replies` every reply.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.offline: set[int] = set()
        self.silent: set[int] = set()
        self.contexts = {
            node: Context(
                run_id=0,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }

    def get_node_ids(self) -> list[int]:
        return [n for n in range(1, self.num_nodes + 1) if n not in self.offline]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.offline:
                replies.append(
                    create_message_error_unavailable_res_message(message.metadata, "node")
                )
                continue
            try:
                reply = self.client_app(copy.deepcopy(message), self.contexts[node])
            except Exception as exc:  # what Flower's runtime does with a ClientApp exception
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                    reply_to=message,
                )
            replies.append(reply)
        self.replies += replies
        return replies


def training_entries(spec: SiteSpec) -> list[dict]:
    """A site's DP-SGD ledger entries, without its evaluation releases (one Gaussian step at
    sample rate 1 each; no round of these tests trains a single step on its whole split)."""
    ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    return [e for e in ledger.entries() if (e["sample_rate"], e["steps"]) != (1.0, 1)]
