"""Which sites take part in a round, and what each of them answered: every wait bounded.

Flower's strategies sample nodes by waiting, without a time limit, until their minimum number
is connected, so a site that dies and never comes back would stall the next round forever.
Here each round step (training, evaluation) first waits at most `connect-timeout` for every
configured site, then goes on with the sites connected if there are at least `min-sites`
(one clear log line names the shortfall), or stops the run with a one-line FederationError.
The step then sees a `RoundGrid`: a fixed set of node ids, so no strategy waits for a site
that has gone, plus a record of which site answered, failed (and why) or stayed silent past
`round-timeout`, and how many payload bytes each sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, Message

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often connected sites are counted while waiting


class FederationError(RuntimeError):
    """The federation cannot go on (sites missing, a round with no usable update)."""


def wait_for_sites(grid: Any, num_sites: int, timeout_s: float) -> None:
    """Every configured site, or a clear error: never Flower's silent endless wait."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < num_sites:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {connected} of {num_sites} sites connected after {timeout_s:.0f} s"
            )
        time.sleep(POLL_S)


class Participation:
    """Picks each round step's sites. A shortfall already accepted is not waited for again
    (a site that died for good costs one wait, not one per round); a new one is."""

    def __init__(self, *, num_sites: int, min_sites: int, timeout_s: float) -> None:
        if not 1 <= min_sites <= num_sites:
            raise ValueError("min_sites must be in 1..num_sites")
        self.num_sites = num_sites
        self.min_sites = min_sites
        self.timeout_s = timeout_s
        self._accepted: int | None = None  # a count below num_sites already gone on with

    def round_grid(self, grid: Any, *, round_no: int, step: str) -> RoundGrid:
        """The step's RoundGrid over `sites`, knowing how many configured sites are absent."""
        ids = self.sites(grid, round_no=round_no, step=step)
        return RoundGrid(grid, ids, round_no=round_no, absent=max(self.num_sites - len(ids), 0))

    def sites(self, grid: Any, *, round_no: int, step: str) -> list[int]:
        """Node ids for this step (all connected ones), or FederationError."""
        deadline = time.monotonic() + self.timeout_s
        while len(ids := list(grid.get_node_ids())) < self.num_sites:
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
        self, grid: Any, node_ids: Iterable[int], *, round_no: int, absent: int = 0
    ) -> None:
        self._grid = grid
        self.node_ids = list(node_ids)
        self.round_no = round_no
        self.absent = absent  # configured sites not connected when the step began
        self.problems: dict[int, str] = {}  # node id -> its last error or silence
        self.sent_bytes: dict[int, int] = {}  # node id -> payload bytes it sent

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def absence(self) -> list[str]:
        """The step's failure line for the sites that were not there at all."""
        return [f"{self.absent} site(s) not connected"] if self.absent else []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        # A reply names its request, which names the node: the SuperLink answers for a node
        # it has declared offline itself, with its own node id as the source.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        sent_to.pop("", None)  # a grid that gives no ids: the source names the node
        answered: dict[int, Message] = {}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered[node] = reply
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
        return replies

    def __getattr__(self, name: str) -> Any:  # anything else a strategy asks of the grid
        return getattr(self._grid, name)
