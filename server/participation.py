"""Which sites take part in a round, and what each of them answered. Every wait is bounded
(Flower's strategies wait for their nodes without a limit, so one dead site would stall the
federation), and in a deployment `SiteRegistry`, the coordinator's nodes.json, is the only
source of who a reply is from: never the reply itself. Simulated sites name themselves."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, Message

from fedrad.common.protocol.messages import SITE_ID_PATTERN, claimed_site_id

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often connected sites are counted while waiting


class FederationError(RuntimeError):
    """The federation cannot go on (sites missing, a round with no usable update)."""


class SiteRegistry:
    """Node id -> site id as the coordinator admitted each site's key: in a deployment the
    only source of who a reply is from (a reply's own claim is the site's word, not proof).
    Built from {site id: node id}, the layout of the coordinator's nodes.json."""

    def __init__(self, nodes: Mapping[str, object], *, source: str = "site registry") -> None:
        sites: dict[int, str] = {}
        for site, node in nodes.items():
            if not isinstance(site, str) or not SITE_ID_PATTERN.fullmatch(site):
                raise FederationError(f"{source}: {str(site)!r:.70} is not a site id")
            if isinstance(node, bool) or not isinstance(node, int):
                raise FederationError(f"{source}: node id of {site} is not an integer")
            if node in sites:
                raise FederationError(
                    f"{source}: node {node} is listed for both {sites[node]} and {site}"
                )
            sites[node] = site
        if not sites:
            raise FederationError(f"{source} lists no sites")
        self.source = source
        self.sites = sites
        self._ignored: set[int] = set()  # unregistered nodes already warned about

    @classmethod
    def load(cls, path: Path) -> SiteRegistry:
        """The registry in `path` (nodes.json), or a one-line FederationError."""
        source = f"site registry {path}"

        def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
            keys = [key for key, _ in pairs]
            if len(set(keys)) != len(keys):
                twice = next(key for key in keys if keys.count(key) > 1)
                raise FederationError(f"{source}: {twice!r:.70} is listed twice")
            return dict(pairs)

        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=unique)
        except FileNotFoundError as exc:
            raise FederationError(f"{source} does not exist") from exc
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())
            raise FederationError(f"{source} is not readable ({reason:.80})") from exc
        if not isinstance(raw, dict):
            raise FederationError(f"{source} is not a JSON object of site id -> node id")
        return cls(raw, source=source)

    def __contains__(self, node: object) -> bool:
        return node in self.sites

    def __len__(self) -> int:
        return len(self.sites)

    def site_of(self, node: int) -> str | None:
        return self.sites.get(node)

    def registered(self, node_ids: Iterable[int]) -> list[int]:
        """The registered ones of `node_ids`; each other node is named once per run (its id
        only: nothing else about it is known or trusted)."""
        out = []
        for node in node_ids:
            if node in self.sites:
                out.append(node)
            elif node not in self._ignored:
                self._ignored.add(node)
                logger.warning("node %d is connected but not in the site registry: ignored", node)
        return out


def connected_sites(grid: Any, registry: SiteRegistry | None = None) -> list[int]:
    """The grid's node ids that count as sites: all of them, or the registered ones."""
    ids = list(grid.get_node_ids())
    return ids if registry is None else registry.registered(ids)


def wait_for_sites(
    grid: Any, num_sites: int, timeout_s: float, registry: SiteRegistry | None = None
) -> None:
    """Every configured site, or a clear error: never Flower's silent endless wait."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(connected_sites(grid, registry))) < num_sites:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {connected} of {num_sites} sites connected after {timeout_s:.0f} s"
            )
        time.sleep(POLL_S)


class Participation:
    """Picks each round step's sites. A shortfall already accepted is not waited for again
    (a site that died for good costs one wait, not one per round); a new one is."""

    def __init__(
        self,
        *,
        num_sites: int,
        min_sites: int,
        timeout_s: float,
        registry: SiteRegistry | None = None,
    ) -> None:
        if not 1 <= min_sites <= num_sites:
            raise ValueError("min_sites must be in 1..num_sites")
        self.num_sites = num_sites
        self.min_sites = min_sites
        self.timeout_s = timeout_s
        self.registry = registry  # None: every connected node is a site (simulation)
        self._accepted: int | None = None  # a count below num_sites already gone on with

    def round_grid(self, grid: Any, *, round_no: int, step: str) -> RoundGrid:
        """The step's RoundGrid over `sites`, knowing how many configured sites are absent."""
        ids = self.sites(grid, round_no=round_no, step=step)
        absent = max(self.num_sites - len(ids), 0)
        return RoundGrid(grid, ids, round_no=round_no, absent=absent, registry=self.registry)

    def sites(self, grid: Any, *, round_no: int, step: str) -> list[int]:
        """Node ids for this step (all connected sites), or FederationError."""
        deadline = time.monotonic() + self.timeout_s
        while len(ids := connected_sites(grid, self.registry)) < self.num_sites:
            if self._accepted is not None and len(ids) >= self._accepted:
                break  # the same sites are still missing: no second wait
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if len(ids) >= self.num_sites:
            self._accepted = None
            return ids
        if len(ids) < self.min_sites:
            raise FederationError(
                f"round {round_no} {step}: only {len(ids)} of {self.num_sites} sites connected "
                f"after {self.timeout_s:.0f} s, fewer than min-sites {self.min_sites}"
            )
        if self._accepted != len(ids):
            logger.warning(
                "round %d %s: %d of %d sites connected after %.0f s (connect-timeout); going "
                "on without the others",
                round_no,
                step,
                len(ids),
                self.num_sites,
                self.timeout_s,
            )
        self._accepted = len(ids)
        return ids


def payload_bytes(message: Message) -> int:
    """What a reply carries: array data and byte strings (keys, shares, masked vectors)."""
    if message.has_error():
        return 0
    total = 0
    for record in message.content.values():
        for value in record.values():
            if isinstance(value, Array):
                total += len(value.data)
            elif isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


class RoundGrid:
    """A round step's view of the grid: its fixed sites, and what each of them answered."""

    def __init__(
        self,
        grid: Any,
        node_ids: Iterable[int],
        *,
        round_no: int,
        absent: int = 0,
        registry: SiteRegistry | None = None,
    ) -> None:
        self._grid = grid
        self.registry = registry  # None: a reply names its own site (simulation)
        self.node_ids = list(node_ids if registry is None else registry.registered(node_ids))
        self.round_no = round_no
        self.absent = absent  # configured sites not connected when the step began
        self.problems: dict[int, str] = {}  # node id -> its last error or silence
        self.sent_bytes: dict[int, int] = {}  # node id -> payload bytes it sent
        self._sent_to: dict[str, int] = {}  # request message id -> the node it went to
        self._bad_claims: set[int] = set()  # nodes whose claimed id was not one: warned once

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def absence(self) -> list[str]:
        """The step's failure line for the sites that were not there at all."""
        return [f"{self.absent} site(s) not connected"] if self.absent else []

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: the one its request went to."""
        return self._sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def site_id(self, node: int, claimed: object = None) -> str | None:
        """The site id to record `node`'s figures under: the registry's (a differing claim in
        its reply is noted, not used), or without a registry what its reply claims, when that
        is a site id (anything else names no site, with one warning per node and step)."""
        if self.registry is None:
            site = claimed_site_id(claimed)
            if site is None and claimed is not None and node not in self._bad_claims:
                self._bad_claims.add(node)
                logger.warning(
                    "round %d: node %d's reply claims a site id that is not one (%.40r): "
                    "recorded as no site",
                    self.round_no,
                    node,
                    claimed if isinstance(claimed, str) else type(claimed).__name__,
                )
            return site
        site = self.registry.site_of(node)
        if site is not None and claimed is not None and str(claimed) != site:
            logger.warning(
                "round %d: node %d's reply claims site id %.70r; recorded as %s, its id in the "
                "site registry",
                self.round_no,
                node,
                str(claimed),
                site,
            )
        return site

    def named(self, node: int, line: str) -> str:
        """A failure line naming its site by registry id (without a registry, as it is)."""
        site = None if self.registry is None else self.registry.site_of(node)
        return line if site is None else f"{site}: {line}"

    def failures(self) -> list[str]:
        """The step's failure lines for its sites that failed or stayed silent."""
        return [self.named(n, self.problems[n]) for n in self.node_ids if n in self.problems]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        if self.registry is not None:  # a node outside the registry never gets a message
            messages = [m for m in messages if m.metadata.dst_node_id in self.registry]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        # A reply names its request, which names the node: the SuperLink answers for a node
        # it has declared offline itself, with its own node id as the source.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        sent_to.pop("", None)  # a grid that gives no ids: the source names the node
        self._sent_to.update(sent_to)
        answered: dict[int, Message] = {}
        kept: list[Message] = []
        for reply in replies:
            node = self.node_of(reply)
            if not reply.has_error() and reply.metadata.src_node_id != node:
                # The SuperLink lets only the addressed node answer; whatever did not is not
                # counted for anyone (SecAgg+'s workflow goes by the source)
                logger.warning(
                    "round %d: a reply to node %d came from node %d: discarded",
                    self.round_no,
                    node,
                    reply.metadata.src_node_id,
                )
                continue
            answered[node] = reply
            kept.append(reply)
        silent = [
            m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered
        ]
        for node in silent:
            self.problems[node] = f"no reply within {timeout or 0:.0f} s (round-timeout)"
        if silent:
            logger.warning(
                "round %d: %d site(s) sent no reply within %.0f s (round-timeout); going on "
                "without them",
                self.round_no,
                len(silent),
                timeout or 0,
            )
        for node, reply in answered.items():
            if reply.has_error():
                self.problems[node] = str(reply.error.reason)
            else:
                self.sent_bytes[node] = self.sent_bytes.get(node, 0) + payload_bytes(reply)
        return kept

    def __getattr__(self, name: str) -> Any:  # anything else a strategy asks of the grid
        return getattr(self._grid, name)
