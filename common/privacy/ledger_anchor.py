"""A second copy of the site ledger's head, kept apart from it, so that losing entries is seen.

The ledger (`ledger.py`) is hash-chained and signed, but a chain only proves that each line
follows the one before: a ledger deleted, cut short by its last entries, or replaced by an
older copy of itself still verifies, and would silently reset the site's privacy budget. The
anchor closes that gap for anyone who cannot sign with the site's key. It is a small signed
JSON file (ANCHOR_FIELDS: the site, the number of lines of the ledger, the hash of its last
line) rewritten atomically after every append, by default beside the signing key
(`default_anchor_path`, in the site's keys folder: not the ledger's folder), and every opening
of the ledger for the site's own work (`open_site_ledger`) checks that the ledger still holds
the line it names. The coordinator's last acknowledged head of the site (`RoundConfig.
ledger_head`) is checked the same way, which also catches both files rolled back together.

A ledger that fails these checks is refused (`LedgerContinuityError`, one line naming
`RECOVER_COMMAND`) until the site's privacy officer records a recovery (`recover_ledger`): a
signed event in the ledger itself saying what was found and why it is accepted. A recovery
restores no spend: what the lost entries spent is not in the ledger, and every budget after it
counts only what the ledger holds. What the anchor cannot detect: anyone holding the site's
ledger key can rewrite the ledger and the anchor consistently.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrad.common.atomic_file import fsync_dir, replace_file
from fedrad.common.privacy.ledger import (
    GENESIS_HASH,
    MAX_FOUND_CHARS,
    Ledger,
    LedgerError,
    canonical_json,
    key_id,
    load_or_create_signing_key,
)
from fedrad.common.privacy.ledger_head import NO_HEAD, head_is_valid, parse_head

logger = logging.getLogger(__name__)

ANCHOR_KIND: Final[str] = "fedrad-ledger-anchor"
ANCHOR_FIELDS: Final[tuple[str, ...]] = (
    "kind",
    "site_id",  # "" until the ledger's first entry names the site, where it is not known
    "lines",  # complete lines of the ledger, events included
    "head_hash",  # SHA-256 hex of the last line (`ledger.line_hash`); GENESIS_HASH at 0
    "timestamp",
    "key_id",
    "signature",  # Ed25519 by the ledger key over the canonical JSON of the rest
)
ANCHOR_SUFFIX: Final[str] = ".anchor.json"
RECOVER_COMMAND: Final[str] = "fedrad-site ledger recover"
PREFIX: Final[str] = "ledger continuity: "


def recovery_hint(acknowledged: str | None = None) -> str:
    """What a refusal adds to its finding: the command that records the loss."""
    option = f" --acknowledged {acknowledged}" if acknowledged else ""
    return f"; the site's privacy officer records the loss with `{RECOVER_COMMAND}{option}`"


class LedgerContinuityError(LedgerError):
    """The ledger is not the continuation of what its anchor or the coordinator last saw
    (missing, truncated, an older copy, rewritten), or the anchor is; one line, no paths (it is
    sent back to the coordinator as the site's refusal)."""


@dataclass(frozen=True)
class Anchor:
    """What the anchor file says (signature verified)."""

    site_id: str
    lines: int
    head_hash: str

    @property
    def head(self) -> str:
        return f"{self.lines}:{self.head_hash}"


def default_anchor_path(key_path: Path) -> Path:
    """``<key>.anchor.json`` beside the ledger signing key (``keys/ledger_key.anchor.json``)."""
    key_path = Path(key_path)
    return key_path.with_name(key_path.stem + ANCHOR_SUFFIX)


def anchor_path_for(key_path: Path, anchor_path: Path | None) -> Path:
    return Path(anchor_path) if anchor_path is not None else default_anchor_path(key_path)


def ledger_head(ledger: Ledger) -> str:
    """The ledger's head as "<lines>:<sha256>", as sites report it ("0:" + GENESIS_HASH when
    empty)."""
    lines, head_hash = ledger.head()
    return f"{lines}:{head_hash}"


def _short(head_hash: str) -> str:
    return head_hash[:8] + "…"


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


# -- the anchor file -------------------------------------------------------------------------


def _signed_anchor(key: Ed25519PrivateKey, site_id: str, lines: int, head_hash: str) -> bytes:
    body: dict[str, Any] = {
        "kind": ANCHOR_KIND,
        "site_id": site_id,
        "lines": lines,
        "head_hash": head_hash,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "key_id": key_id(key.public_key()),
    }
    body["signature"] = base64.b64encode(key.sign(canonical_json(body))).decode("ascii")
    return canonical_json(body) + b"\n"


def write_anchor(
    path: Path, key: Ed25519PrivateKey, *, site_id: str, lines: int, head_hash: str
) -> None:
    """Replaces the anchor atomically (mode 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, _signed_anchor(key, site_id, lines, head_hash), mode=0o600)


def read_anchor(path: Path, public_key: Ed25519PublicKey) -> Anchor | None:
    """The anchor at `path`, None when there is none; LedgerContinuityError when it is not a
    well-formed anchor signed by `public_key`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerContinuityError(
            f"{PREFIX}the ledger anchor cannot be read ({exc.strerror})"
        ) from exc
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if (
        not isinstance(raw, dict)
        or set(raw) != set(ANCHOR_FIELDS)
        or raw["kind"] != ANCHOR_KIND
        or not isinstance(raw["site_id"], str)
        or isinstance(raw["lines"], bool)
        or not isinstance(raw["lines"], int)
        or raw["lines"] < 0
        or not isinstance(raw["head_hash"], str)
        or not head_is_valid(f"{raw['lines']}:{raw['head_hash']}")
        or (raw["lines"] == 0 and raw["head_hash"] != GENESIS_HASH)
    ):
        raise LedgerContinuityError(f"{PREFIX}the ledger anchor is not a fedrad anchor file")
    unsigned = {k: v for k, v in raw.items() if k != "signature"}
    try:
        public_key.verify(
            base64.b64decode(str(raw["signature"]), validate=True), canonical_json(unsigned)
        )
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise LedgerContinuityError(
            f"{PREFIX}the ledger anchor does not verify with this site's ledger key (forged, "
            "damaged, or written with another key)"
        ) from exc
    return Anchor(raw["site_id"], raw["lines"], raw["head_hash"])


# -- the checks ------------------------------------------------------------------------------


class AnchoredLedger(Ledger):
    """A Ledger that rewrites its anchor after every append (privacy entry, refusal,
    recovery: they all go through `_append_signed`), and refuses to append to a file that no
    longer continues what it read (replaced or cut short while open)."""

    def __init__(
        self, path: Path, signing_key: Ed25519PrivateKey, anchor_path: Path, site_id: str = ""
    ) -> None:
        self.anchor_path = Path(anchor_path)
        self.anchor_site = site_id  # what the anchor names until an entry names the site
        self._seen: tuple[int, str] | None = None
        super().__init__(path, signing_key)

    def _load(self, data: bytes) -> None:
        seen = self._seen
        super()._load(data)
        if seen is not None and self.hash_at(seen[0]) != seen[1]:
            lines, _ = self.head()
            raise LedgerContinuityError(
                f"{PREFIX}the ledger changed while it was open (it had {_entries(seen[0])}, now "
                f"{lines}{'' if lines < seen[0] else ' and a different entry ' + str(seen[0])})"
                f"{recovery_hint()}"
            )
        self._seen = self.head()

    def _append_signed(self, site_id: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        entry = super()._append_signed(site_id, build)
        self._seen = self.head()
        self.anchor_site = site_id
        self.write_anchor()
        return entry

    def write_anchor(self) -> None:
        lines, head_hash = self.head()
        write_anchor(
            self.anchor_path, self._key, site_id=self.anchor_site, lines=lines, head_hash=head_hash
        )


def anchor_problem(
    ledger: Ledger, *, ledger_exists: bool, anchor: Anchor | None, site_id: str | None = None
) -> str | None:
    """Why `ledger` is not the continuation of its `anchor`, in one line, or None."""
    lines, _ = ledger.head()
    if anchor is None:
        if lines > 0:
            return (
                f"{PREFIX}the ledger has {_entries(lines)} and its anchor is missing (deleted, or "
                "the ledger was written before anchors existed)"
            )
        return None
    for other in (site_id, ledger.site_id()):
        if anchor.site_id and other and anchor.site_id != other:
            return (
                f"{PREFIX}the ledger anchor is for site {anchor.site_id!r}, this ledger for "
                f"site {other!r}"
            )
    if not ledger_exists and anchor.lines > 0:
        return (
            f"{PREFIX}the ledger is missing, its anchor records {_entries(anchor.lines)} (head "
            f"{_short(anchor.head_hash)})"
        )
    if lines < anchor.lines:
        return (
            f"{PREFIX}the ledger has {_entries(lines)}, its anchor records {anchor.lines} "
            "(truncated, or replaced by an older copy)"
        )
    found = ledger.hash_at(anchor.lines)
    if found != anchor.head_hash:
        return (
            f"{PREFIX}entry {anchor.lines} of the ledger is {_short(str(found))}, its anchor "
            f"records {_short(anchor.head_hash)} (rewritten or replaced)"
        )
    return None


def acknowledged_problem(ledger: Ledger, acknowledged: str | None) -> str | None:
    """Why `ledger` lacks the coordinator's `acknowledged` head ("<lines>:<sha256>"; empty or
    None: nothing acknowledged), in one line, or None. A head a recovery event records as lost
    (its previous_head) is accepted: the privacy officer recorded that loss."""
    if not acknowledged:
        return None
    try:
        ack_lines, ack_hash = parse_head(acknowledged)
    except ValueError:
        return f"{PREFIX}the coordinator's acknowledged head is not <lines>:<sha256>"
    found = ledger.hash_at(ack_lines)
    if found == ack_hash:
        return None
    if any(r["previous_head"] == acknowledged for r in ledger.recoveries()):
        return None
    said = f"{PREFIX}the coordinator acknowledged entry {ack_lines} (hash {_short(ack_hash)})"
    if found is None:
        return f"{said}, this ledger has {ledger.head()[0]}"
    return f"{said}, this ledger's entry {ack_lines} is {_short(found)} (rewritten or replaced)"


@dataclass
class Inspection:
    """A ledger as found, with its anchor and what is wrong with them (None: continuous)."""

    ledger: AnchoredLedger
    ledger_exists: bool
    anchor: Anchor | None
    problem: str | None  # the finding, one line
    hint: str = ""  # the command that records it

    @property
    def message(self) -> str:
        """The refusal: the finding and the command that records the loss."""
        return f"{self.problem}{self.hint}"


def inspect_site_ledger(
    ledger_path: Path,
    key: Ed25519PrivateKey,
    anchor_path: Path,
    *,
    acknowledged: str | None = None,
    site_id: str | None = None,
) -> Inspection:
    """Reads the ledger (LedgerError when it does not verify with the key, or is torn) and
    its anchor, and checks one against the other and against `acknowledged`."""
    ledger_path = Path(ledger_path)
    ledger_exists = ledger_path.exists()
    ledger = AnchoredLedger(ledger_path, key, anchor_path)
    try:
        anchor = read_anchor(anchor_path, key.public_key())
    except LedgerContinuityError as exc:
        ledger.anchor_site = site_id or ledger.site_id() or ""
        return Inspection(ledger, ledger_exists, None, str(exc), recovery_hint())
    ledger.anchor_site = site_id or ledger.site_id() or (anchor.site_id if anchor else "")
    problem = anchor_problem(ledger, ledger_exists=ledger_exists, anchor=anchor, site_id=site_id)
    if problem is not None:
        return Inspection(ledger, ledger_exists, anchor, problem, recovery_hint())
    problem = acknowledged_problem(ledger, acknowledged)
    hint = recovery_hint(acknowledged) if problem is not None else ""
    return Inspection(ledger, ledger_exists, anchor, problem, hint)


def _create_empty(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    fsync_dir(path.parent)


def open_site_ledger(
    ledger_path: Path,
    key_path: Path,
    anchor_path: Path | None = None,
    acknowledged: str | None = None,
    *,
    site_id: str | None = None,
) -> AnchoredLedger:
    """The site's ledger, checked against its anchor (`anchor_path`, default beside the key)
    and the coordinator's `acknowledged` head ("<lines>:<sha256>", empty or None = unknown);
    every append through it rewrites the anchor.

    Refused (LedgerContinuityError, one line): the ledger missing while its anchor records
    entries; the anchor missing beside a non-empty ledger; fewer lines than the anchor records,
    or another line where it points; an anchor that does not verify or names another site; a
    ledger without the acknowledged line. A ledger longer than its anchor, where the anchor's
    line matches (a crash between an append and the anchor's rewrite), is accepted and the
    anchor rewritten; with neither file, both are created (a new site).
    """
    ledger_path, key_path = Path(ledger_path), Path(key_path)
    anchor_path = anchor_path_for(key_path, anchor_path)
    key = load_or_create_signing_key(key_path)
    found = inspect_site_ledger(
        ledger_path, key, anchor_path, acknowledged=acknowledged, site_id=site_id
    )
    if found.problem is not None:
        raise LedgerContinuityError(found.message)
    ledger = found.ledger
    if not found.ledger_exists:
        _create_empty(ledger_path)
    anchor = found.anchor
    if anchor is None or anchor.head != ledger_head(ledger) or anchor.site_id != ledger.anchor_site:
        if anchor is not None and anchor.lines < ledger.head()[0]:
            logger.info(
                "ledger anchor was %d entries behind the ledger (an interrupted append): rewritten",
                ledger.head()[0] - anchor.lines,
            )
        ledger.write_anchor()
    return ledger


# -- recovery --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    found: str  # the one-line finding open_site_ledger refused with (without the hint)
    previous_head: str  # the last head known before: "<lines>:<sha256>" or "none"
    entry: dict[str, Any] | None  # the recovery event appended; None: nothing to recover
    head: str  # the ledger's head afterwards (the anchor's)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _previous_head(found: Inspection, acknowledged: str | None) -> str:
    """The head recorded as lost: the coordinator's acknowledged one when the ledger lacks it
    (so that the coordinator's copy is accepted from then on), else the anchor's."""
    if acknowledged:
        lines, head_hash = parse_head(acknowledged)
        if found.ledger.hash_at(lines) != head_hash:
            return acknowledged
    return found.anchor.head if found.anchor is not None else NO_HEAD


def inspect_for_recovery(
    ledger_path: Path,
    key_path: Path,
    anchor_path: Path | None = None,
    *,
    site_id: str,
    acknowledged: str | None = None,
) -> Inspection:
    """What `recover_ledger` would find, without writing anything. The key must exist: a new
    one could sign nothing that continues this site's record."""
    key_path = Path(key_path)
    if not key_path.is_file():
        raise LedgerError(
            f"ledger key {key_path} is missing: a recovery is signed with the site's ledger key"
        )
    if acknowledged:
        try:
            parse_head(acknowledged)
        except ValueError as exc:
            raise LedgerError(f"--acknowledged: {exc}") from exc
    key = load_or_create_signing_key(key_path)
    return inspect_site_ledger(
        Path(ledger_path),
        key,
        anchor_path_for(key_path, anchor_path),
        acknowledged=acknowledged,
        site_id=site_id,
    )


def recover_ledger(
    ledger_path: Path,
    key_path: Path,
    anchor_path: Path | None = None,
    *,
    site_id: str,
    reason: str,
    acknowledged: str | None = None,
) -> Recovery:
    """The privacy officer's explicit recovery: appends a signed `recovery` event saying what
    was found (the same line `open_site_ledger` refuses with), why it is accepted (`reason`)
    and the last known head, then rewrites the anchor. A missing ledger starts anew with that
    event. Nothing is written when the ledger is continuous (`entry` None). A ledger that does
    not verify with the site's key, or is torn, raises LedgerError: move it aside (keep it for
    the audit) and recover again. No spend is restored."""
    found = inspect_for_recovery(
        ledger_path, key_path, anchor_path, site_id=site_id, acknowledged=acknowledged
    )
    ledger = found.ledger
    if found.problem is None:
        return Recovery("", NO_HEAD, None, ledger_head(ledger))
    finding = _one_line(found.problem, MAX_FOUND_CHARS)
    previous = _previous_head(found, acknowledged)
    entry = ledger.append_recovery(
        site_id=site_id, reason=reason, found=finding, previous_head=previous
    )
    logger.warning(
        "site %s: ledger recovery recorded (entry %d): %s", site_id, ledger.head()[0], finding
    )
    return Recovery(finding, previous, entry, ledger_head(ledger))
