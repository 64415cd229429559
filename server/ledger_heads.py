"""The coordinator's copy of each site's ledger head: the last one it acknowledged, sent back.

A site reports its privacy ledger's head ("<lines>:<sha256 of the last line>", the site's
`ledger-head` field) in every reply; the coordinator keeps the last one per site and puts it in
that site's next round config (`RoundConfig.ledger_head`). A site whose ledger no longer holds
that line (deleted, cut short, replaced by an older copy, even together with its anchor)
refuses the round (`common/privacy/ledger_anchor.py`): the coordinator is the one copy of the
head the site's own host cannot roll back. Heads are stored under the site id the round's grid
gives the node (the registry's in a deployment), in `ledger_heads.json`: beside the site
registry in a deployment (the coordinator's directory, so it outlives runs), in the run
directory in a simulation. A reported head with fewer lines than the acknowledged one (or the
same count and another hash) is logged as a warning and not stored. Nothing else of a round
changes: with no head known, messages are exactly as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from flwr.app import ConfigRecord, Message, RecordDict

from fedrad.common.atomic_file import replace_file
from fedrad.common.privacy.ledger_head import head_is_valid, parse_head
from fedrad.common.protocol.messages import (
    CONFIG_KEY,
    LEDGER_HEAD_FIELD,
    SITE_ID_FIELD,
    SITE_KEY,
)
from fedrad.server.participation import FederationError, RoundGrid

logger = logging.getLogger(__name__)

HEADS_FILE: Final[str] = "ledger_heads.json"


def heads_file(run_dir: Path, site_registry: Path | None) -> Path:
    """Beside the site registry (the coordinator's directory) when there is one, else in the
    run directory."""
    return (Path(site_registry).parent if site_registry is not None else Path(run_dir)) / (
        HEADS_FILE
    )


def _lines(head: str) -> int:
    return parse_head(head)[0]


def _read(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise FederationError(
            f"ledger heads {path} is not readable ({reason:.80}): repair it, or remove it to "
            "forget every site's acknowledged head"
        ) from exc
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and head_is_valid(v) for k, v in raw.items()
    ):
        raise FederationError(
            f"ledger heads {path} is not a JSON object of site id -> <lines>:<sha256>"
        )
    return dict(raw)


class LedgerHeads:
    """Site id -> the last ledger head it reported and the coordinator acknowledged."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.heads: dict[str, str] = {} if self.path is None else _read(self.path)
        self._nodes: dict[int, str] = {}  # simulation: node -> the site its replies named
        self._dirty = False

    def head(self, site: str | None) -> str:
        return "" if site is None else self.heads.get(site, "")

    def site_of(self, grid: RoundGrid, node: int) -> str | None:
        """The registry's site for `node`, or in a simulation the one its replies named."""
        if grid.registry is not None:
            return grid.registry.site_of(node)
        return self._nodes.get(node)

    def config_for(self, grid: RoundGrid, node: int) -> dict[str, str]:
        """What `node`'s round config gains: its site's acknowledged head, when known."""
        head = self.head(self.site_of(grid, node))
        return {LEDGER_HEAD_FIELD: head} if head else {}

    def stamp(self, grid: RoundGrid, messages: Iterable[Message]) -> list[Message]:
        """Each message with its site's head in its round config. A strategy sends every node
        the same RecordDict: a message that gains a head gets its own copy (the same arrays,
        its own config record)."""
        out = list(messages)
        for message in out:
            extra = self.config_for(grid, message.metadata.dst_node_id)
            if not extra or CONFIG_KEY not in message.content.config_records:
                continue
            content = RecordDict(dict(message.content.items()))
            content[CONFIG_KEY] = ConfigRecord(
                {**message.content.config_records[CONFIG_KEY], **extra}
            )
            message.content = content
        return out

    def observe(self, grid: RoundGrid, node: int, claimed: object, reported: object) -> None:
        """One reply's head: stored under the site the grid gives `node`, unless it is not a
        head or goes back on the acknowledged one."""
        if grid.registry is not None:
            site = grid.registry.site_of(node)
        else:  # the claim, when it is a site id (claimed_site_id, via the grid)
            site = grid.site_id(node, claimed)
            if site is not None:
                self._nodes[node] = site
        if site is None or reported is None:
            return
        if not head_is_valid(reported):
            logger.warning(
                "round %d: site %s sent a ledger head that is not <lines>:<sha256>: ignored",
                grid.round_no,
                site,
            )
            return
        known = self.heads.get(site)
        if known == reported:
            return
        if known is not None and _lines(reported) <= _lines(known):
            logger.warning(
                "round %d: site %s reported ledger head %s, %s the acknowledged %s: not stored "
                "(its ledger was cut short or replaced, unless its privacy officer recorded a "
                "recovery)",
                grid.round_no,
                site,
                reported[:20] + "…",
                "below" if _lines(reported) < _lines(known) else "differing from",
                known[:20] + "…",
            )
            return
        self.heads[site] = reported
        self._dirty = True

    def observe_replies(self, grid: RoundGrid, replies: Iterable[Message]) -> None:
        """The heads of Message-API replies (in their site ConfigRecord), then saved."""
        for reply in replies:
            if reply.has_error():
                continue
            named = reply.content.config_records.get(SITE_KEY)
            if named is None:
                continue
            node = grid.node_of(reply)
            self.observe(grid, node, named.get(SITE_ID_FIELD), named.get(LEDGER_HEAD_FIELD))
        self.save()

    def observe_metrics(
        self, grid: RoundGrid, results: Iterable[tuple[int, Mapping[str, Any]]]
    ) -> None:
        """The heads of legacy (SecAgg+) replies, among their metrics, then saved."""
        for node, metrics in results:
            self.observe(grid, node, metrics.get(SITE_ID_FIELD), metrics.get(LEDGER_HEAD_FIELD))
        self.save()

    def save(self) -> None:
        """Writes the heads atomically when they changed, merged with the file as it is now
        (another run may have acknowledged a later head of the same site meanwhile)."""
        if not self._dirty or self.path is None:
            return
        merged = _read(self.path)
        for site, head in self.heads.items():
            if site not in merged or _lines(head) > _lines(merged[site]):
                merged[site] = head
        self.heads = merged
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(merged, indent=2, sort_keys=True) + "\n"
        replace_file(self.path, data.encode("utf-8"), mode=0o600)
        self._dirty = False
