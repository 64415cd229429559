"""A ledger's head, "<lines>:<sha256 of the last line>": the one format the site's ledger, its
anchor, the round config and the coordinator's copy of every site's head all check.

A module of its own, without Opacus or torch, so that the wire protocol and the coordinator
validate heads with the ledger's own pattern. (The privacy officer's audit keeps its own copy on
purpose: it imports nothing of the code it checks.)
"""

from __future__ import annotations

import re
from typing import Final

# Always used with fullmatch (`$` would take "<head>\n"), ASCII digits only (\d takes any
# script's).
HEAD_PATTERN: Final[re.Pattern[str]] = re.compile(r"([0-9]+):([0-9a-f]{64})")
NO_HEAD: Final[str] = "none"


def head_is_valid(head: object, *, allow_none: bool = False) -> bool:
    """Whether `head` reads "<lines>:<sha256 hex>" (or "none", where allowed)."""
    if allow_none and head == NO_HEAD:
        return True
    return isinstance(head, str) and HEAD_PATTERN.fullmatch(head) is not None


def parse_head(head: str) -> tuple[int, str]:
    """(lines, hash) of "<lines>:<sha256>"; ValueError otherwise."""
    match = HEAD_PATTERN.fullmatch(head)
    if match is None:
        raise ValueError(f"{head[:80]!r} is not <lines>:<sha256 hex>")
    return int(match.group(1)), match.group(2)
