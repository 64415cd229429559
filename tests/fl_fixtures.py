"""Micro federations for tests: a foundation checkpoint, prepared site caches, site specs, and
an in-process Grid that delivers messages straight to a ClientApp (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedrad.client.dataset import SiteStudies
from fedrad.client.site_agent import SiteSpec
from fedrad.common.checkpoint import save_checkpoint
from fedrad.common.fl_protocol import RoundConfig
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
    """The two Grid calls a ServerApp round loop uses; node i runs partition i - 1."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            context = Context(
                run_id=0,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": self.num_nodes},
                state=RecordDict(),
                run_config={},
            )
            try:
                replies.append(self.client_app(message, context))
            except Exception as exc:  # what Flower's runtime does with a ClientApp exception
                replies.append(
                    Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                        reply_to=message,
                    )
                )
        return replies
