"""The site privacy ledger: one signed, hash-chained JSON line per privacy spend (a local
training round, an evaluation release) and per event (a refusal, a recovery).

A site's spending must survive crashes, resumes and new runs, and a privacy officer must be able
to check it without trusting the site's software: so every round's raw DP-SGD parameters are
appended (never rewritten) under the site's Ed25519 key, and every epsilon is recomputed from
them. The format is the contract `common/audit` checks independently; it is described beside
the field lists below.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrad.common.atomic_file import fsync_dir
from fedrad.common.privacy.accounting import AccountantName, MechanismStep, cumulative_epsilon
from fedrad.common.privacy.ledger_head import head_is_valid

logger = logging.getLogger(__name__)

# One UTF-8 JSON object per line, in canonical form (sorted keys, no spaces, ASCII only,
# newline-terminated). A privacy entry has exactly REQUIRED_FIELDS:
# - site_id, run_id, round: where the spend happened;
# - mechanism (MECHANISM), sample_rate, noise_multiplier, steps, max_grad_norm, delta,
#   accountant: the raw DP-SGD parameters of that round;
# - epsilon: cumulative for the site after this entry, over EVERY privacy entry of the file
#   (across runs), recomputed from the raw parameters with `accounting.cumulative_epsilon` at
#   that entry's delta and accountant; null means unbounded (a round without noise);
# - timestamp (UTC, ISO 8601), key_id (first 16 hex of SHA-256 of the raw public key);
# - prev_hash: SHA-256 hex of the previous line's bytes, newline excluded (GENESIS_HASH first);
# - signature: base64 Ed25519 signature by the site key over the canonical JSON of the entry
#   without signature.
# A refusal (a round or run the site declined before spending anything) is signed and chained
# the same way, has exactly REFUSAL_FIELDS (event = "refusal", reason: one line) and no
# mechanism field: every epsilon skips it. Privacy entries have no event field, so ledgers
# written before refusals existed verify as they are.
# A recovery (the privacy officer's record that the ledger was found discontinuous: missing,
# truncated, replaced; `ledger_anchor.py`) is an event too, with exactly RECOVERY_FIELDS
# (event = "recovery", reason: the officer's one line, found: what was found, one line,
# previous_head: "<lines>:<sha256>" of the last known head, or "none") and no spend field.
# A line is appended with one os.write and an fsync under an exclusive lock; a torn last line
# (a crash mid-write) raises TornLedgerError and is left for a person to inspect.
MECHANISM: Final[str] = "subsampled_gaussian"
GENESIS_HASH: Final[str] = "0" * 64
ACCOUNTANTS: Final[frozenset[str]] = frozenset({"rdp", "prv"})
PART_NAME: Final[re.Pattern[str]] = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
"""A privacy entry may also hold `trained`: the sorted names of the model parts the round
trained (entries written before parts existed have none)."""
REQUIRED_FIELDS: Final[tuple[str, ...]] = (
    "site_id",
    "run_id",
    "round",
    "mechanism",
    "sample_rate",
    "noise_multiplier",
    "steps",
    "max_grad_norm",
    "delta",
    "accountant",
    "epsilon",
    "timestamp",
    "key_id",
    "prev_hash",
    "signature",
)
EPSILON_TOLERANCE: Final[float] = 1e-6  # relative; the accountants are deterministic
REFUSAL_EVENT: Final[str] = "refusal"
REFUSAL_FIELDS: Final[tuple[str, ...]] = (
    "event",
    "site_id",
    "run_id",
    "round",
    "reason",
    "timestamp",
    "key_id",
    "prev_hash",
    "signature",
)
# what a privacy entry spends with: an event carrying any of these is malformed
SPEND_FIELDS: Final[frozenset[str]] = frozenset(REQUIRED_FIELDS) - frozenset(REFUSAL_FIELDS)
MAX_REASON_CHARS: Final[int] = 300
RECOVERY_EVENT: Final[str] = "recovery"
RECOVERY_FIELDS: Final[tuple[str, ...]] = (
    "event",
    "site_id",
    "reason",
    "found",
    "previous_head",
    "timestamp",
    "key_id",
    "prev_hash",
    "signature",
)
MAX_FOUND_CHARS: Final[int] = 600
EVENT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    REFUSAL_EVENT: REFUSAL_FIELDS,
    RECOVERY_EVENT: RECOVERY_FIELDS,
}


class LedgerError(Exception):
    """The ledger cannot be used as it is; the message says why in one line."""


class TornLedgerError(LedgerError):
    """The last line is incomplete: a write was interrupted. Earlier entries are intact."""


# -- encoding --------------------------------------------------------------------------------


def canonical_json(entry: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed and written: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def line_hash(line: bytes) -> str:
    """SHA-256 hex of one ledger line without its newline terminator."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _sign(entry: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(canonical_json(entry))).decode("ascii")


def is_event(entry: Mapping[str, Any]) -> bool:
    """Whether a ledger line is an event (a refusal, a recovery) rather than a privacy spend."""
    return "event" in entry


is_refusal = is_event  # the name from before recoveries existed: any event spends nothing


def reason_problem(reason: object) -> str | None:
    """Why `reason` cannot be a refusal's reason (one printable line, bounded), or None."""
    if not isinstance(reason, str) or not reason.strip():
        return "the reason must be a non-empty string"
    if len(reason) > MAX_REASON_CHARS:
        return f"the reason is longer than {MAX_REASON_CHARS} characters"
    if not reason.isprintable():
        return "the reason must be one printable line"
    return None


# -- keys ------------------------------------------------------------------------------------


def public_key_path(key_path: Path) -> Path:
    """Where the shareable public half of a signing key lives: ``<name>.pub`` beside it."""
    return key_path.with_suffix(".pub")


def write_public_key(path: Path, public_key: Ed25519PublicKey) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise LedgerError(f"cannot read public key {path}: {type(exc).__name__}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 ledger key (PKCS#8 PEM, mode 0600); created with its .pub if absent.

    A key readable by group or others is refused, as ssh refuses one: whoever can read it can
    forge the site's ledger. The key itself is never logged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_signing_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    write_public_key(public_key_path(path), key.public_key())
    logger.info("created a ledger signing key (key id %s)", key_id(key.public_key()))
    return key


def _load_signing_key(path: Path) -> Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise LedgerError(
            f"signing key {path} is readable by others (mode {mode:o}); run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"signing key {path} is not a readable PEM key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"signing key {path} is not an Ed25519 key")
    return key


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    lines: list[bytes]  # complete lines, newline stripped
    entries: list[dict[str, Any]]
    torn: bytes | None  # an incomplete last line, if any
    problems: list[str]


def _parse(data: bytes) -> _Parsed:
    """Splits and decodes; bytes after the last newline are a torn (interrupted) write: a whole
    line is written with its newline in one call, so only a crash leaves a partial one."""
    raw = data.split(b"\n")
    tail = raw.pop()  # bytes after the last newline ("" when the file ends cleanly)
    lines: list[bytes] = []
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    torn: bytes | None = tail or None
    for number, line in enumerate(raw, start=1):
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"line {number}: not valid JSON")
            entry = {}
        if not isinstance(entry, dict):
            problems.append(f"line {number}: not a JSON object")
            entry = {}
        lines.append(line)
        entries.append(entry)
    return _Parsed(lines, entries, torn, problems)


def _history_step(entry: Mapping[str, Any]) -> MechanismStep:
    return MechanismStep(
        float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])
    )


def _check_entry(
    number: int,
    entry: Mapping[str, Any],
    line: bytes,
    prev_line: bytes | None,
    public_key: Ed25519PublicKey | None,
    history: list[MechanismStep],
    site_id: str | None,
    recompute: bool,
) -> list[str]:
    """Problems with one entry; `history` is every earlier privacy entry's mechanism step."""
    where = f"line {number}"
    if is_event(entry):
        return _check_event(where, entry, prev_line, public_key, site_id)
    missing = [f for f in REQUIRED_FIELDS if f not in entry]
    if missing:
        return [f"{where}: missing {', '.join(missing)}"]
    problems = _check_signed(where, entry, prev_line, public_key, site_id)
    if entry["mechanism"] != MECHANISM:
        problems.append(f"{where}: unknown mechanism {entry['mechanism']!r}")
    if entry["accountant"] not in ACCOUNTANTS:
        problems.append(f"{where}: unknown accountant {entry['accountant']!r}")
        return problems
    try:
        step = _history_step(entry)
        delta = float(entry["delta"])
        if not 0 < delta < 1:
            raise ValueError("delta out of range")
    except (TypeError, ValueError):
        problems.append(f"{where}: invalid mechanism parameters")
        return problems
    if not recompute:
        return problems
    recomputed = cumulative_epsilon([*history, step], delta=delta, accountant=entry["accountant"])
    recorded = entry["epsilon"]
    if recorded is None:
        if not math.isinf(recomputed):
            problems.append(f"{where}: epsilon recorded as unbounded, recomputed {recomputed:.6g}")
    elif math.isinf(recomputed) or not math.isclose(
        float(recorded), recomputed, rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9
    ):
        problems.append(
            f"{where}: epsilon recorded {float(recorded):.6g}, recomputed {recomputed:.6g}"
        )
    return problems


def _check_signed(
    where: str,
    entry: Mapping[str, Any],
    prev_line: bytes | None,
    public_key: Ed25519PublicKey | None,
    site_id: str | None,
) -> list[str]:
    """Chain, signature and site: what every kind of entry must satisfy."""
    problems: list[str] = []
    expected_prev = GENESIS_HASH if prev_line is None else line_hash(prev_line)
    if entry["prev_hash"] != expected_prev:
        problems.append(f"{where}: prev_hash does not match the previous line (chain broken)")
    if public_key is not None:
        unsigned = {k: v for k, v in entry.items() if k != "signature"}
        try:
            public_key.verify(
                base64.b64decode(str(entry["signature"]), validate=True),
                canonical_json(unsigned),
            )
        except (InvalidSignature, binascii.Error, ValueError):
            problems.append(f"{where}: signature does not verify")
    if site_id is not None and entry["site_id"] != site_id:
        problems.append(f"{where}: site_id {entry['site_id']!r} differs from {site_id!r}")
    return problems


def _check_event(
    where: str,
    entry: Mapping[str, Any],
    prev_line: bytes | None,
    public_key: Ed25519PublicKey | None,
    site_id: str | None,
) -> list[str]:
    """An event (refusal, recovery) has exactly its own fields: one that carries a spend field
    is malformed, so a spend can never be recorded where every epsilon skips it."""
    kind = entry["event"]
    fields = EVENT_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return [f"{where}: unknown event {str(kind)[:40]!r}"]
    spend = sorted(SPEND_FIELDS & set(entry))
    if spend:
        return [f"{where}: a {kind} carries spend field(s) {', '.join(spend)}"]
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        return [f"{where}: a {kind} has unknown field(s) {', '.join(unknown)}"]
    missing = [f for f in fields if f not in entry]
    if missing:
        return [f"{where}: missing {', '.join(missing)}"]
    problems = _check_signed(where, entry, prev_line, public_key, site_id)
    if kind == REFUSAL_EVENT:
        round_no = entry["round"]
        if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 0:
            problems.append(f"{where}: a refusal's round must be a non-negative integer")
        if not isinstance(entry["run_id"], str):
            problems.append(f"{where}: a refusal's run_id must be a string")
    else:
        found = recovery_found_problem(entry["found"])
        if found is not None:
            problems.append(f"{where}: {found}")
        if not head_is_valid(entry["previous_head"], allow_none=True):
            problems.append(f"{where}: a recovery's previous_head is not <lines>:<sha256> or none")
    bad_reason = reason_problem(entry["reason"])
    if bad_reason is not None:
        problems.append(f"{where}: {bad_reason}")
    return problems


def recovery_found_problem(found: object) -> str | None:
    """Why `found` cannot be a recovery's finding (one printable line, bounded), or None."""
    if not isinstance(found, str) or not found.strip():
        return "a recovery's found must be a non-empty string"
    if len(found) > MAX_FOUND_CHARS or not found.isprintable():
        return f"a recovery's found must be one printable line of at most {MAX_FOUND_CHARS}"
    return None


def _verify_parsed(
    parsed: _Parsed, public_key: Ed25519PublicKey | None, *, recompute: bool = True
) -> tuple[list[str], list[MechanismStep]]:
    """Problems and the mechanism history (privacy entries only: events spend nothing).
    `recompute=False` skips recomputing each recorded epsilon (quadratic in the number of
    entries); signatures and the chain are always checked."""
    problems = list(parsed.problems)
    history: list[MechanismStep] = []
    site_id: str | None = None
    prev: bytes | None = None
    for number, (line, entry) in enumerate(zip(parsed.lines, parsed.entries, strict=True), 1):
        if entry:
            problems += _check_entry(
                number, entry, line, prev, public_key, history, site_id, recompute
            )
            site_id = site_id if site_id is not None else entry.get("site_id")
            if not is_event(entry):
                with contextlib.suppress(KeyError, TypeError, ValueError):  # reported above
                    history.append(_history_step(entry))
        prev = line
    if parsed.torn is not None:
        problems.append(
            f"line {len(parsed.lines) + 1}: incomplete last line ({len(parsed.torn)} bytes, "
            "a torn write)"
        )
    return problems, history


def verify_ledger(path: Path, public_key: Ed25519PublicKey) -> list[str]:
    """Every problem found (empty list = the ledger verifies): signatures, chain, one site,
    known mechanism and accountant, each epsilon recomputed from the raw parameters, and
    events (refusals, recoveries) that spend nothing."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [f"ledger not found: {path}"]
    except OSError as exc:
        return [f"cannot read ledger {path}: {exc.strerror}"]
    problems, _ = _verify_parsed(_parse(data), public_key)
    return problems


# -- the ledger ------------------------------------------------------------------------------


class Ledger:
    """One site's ledger file, read and verified with the site's own key on open."""

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self._key = signing_key
        self._public = signing_key.public_key()
        self._key_id = key_id(self._public)
        self._entries: list[dict[str, Any]] = []
        self._history: list[MechanismStep] = []
        self._last_line: bytes | None = None
        self._lines: list[bytes] = []  # every complete line, newline stripped
        if self.path.exists():
            self._load(self.path.read_bytes())

    def _load(self, data: bytes) -> None:
        parsed = _parse(data)
        if parsed.torn is not None:
            raise TornLedgerError(
                f"ledger {self.path}: the last line is incomplete ({len(parsed.torn)} bytes after "
                f"entry {len(parsed.lines)}); a write was interrupted. Earlier entries are "
                "intact; move the file aside or truncate the partial line after inspection"
            )
        # The site's own signed entries: chain and signatures are checked; the budget is
        # always recomputed from the raw parameters (history), never read from "epsilon".
        problems, history = _verify_parsed(parsed, self._public, recompute=False)
        if problems:
            raise LedgerError(
                f"ledger {self.path} does not verify with this site's key: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            )
        self._entries = parsed.entries  # every line: privacy entries and events
        self._history = history
        self._last_line = parsed.lines[-1] if parsed.lines else None
        self._lines = list(parsed.lines)

    def entries(self) -> list[dict[str, Any]]:
        """The privacy entries (training rounds and evaluation releases), in order; events are
        apart."""
        return [dict(e) for e in self._entries if not is_event(e)]

    def refusals(self) -> list[dict[str, Any]]:
        """The refusal entries, in order: rounds and runs the site declined, spending nothing."""
        return [dict(e) for e in self._entries if e.get("event") == REFUSAL_EVENT]

    def recoveries(self) -> list[dict[str, Any]]:
        """The recovery entries, in order: discontinuities the privacy officer recorded."""
        return [dict(e) for e in self._entries if e.get("event") == RECOVERY_EVENT]

    def site_id(self) -> str | None:
        """The site the ledger's lines name (every line names it); None when empty."""
        for entry in self._entries:
            if isinstance(entry.get("site_id"), str):
                return str(entry["site_id"])
        return None

    def head(self) -> tuple[int, str]:
        """(number of lines, SHA-256 hex of the last line): GENESIS_HASH when empty."""
        if not self._lines:
            return 0, GENESIS_HASH
        return len(self._lines), line_hash(self._lines[-1])

    def hash_at(self, lines: int) -> str | None:
        """The hash a head of `lines` lines has in this ledger (GENESIS_HASH for 0), or None
        when the ledger is shorter."""
        if lines == 0:
            return GENESIS_HASH
        if not 0 < lines <= len(self._lines):
            return None
        return line_hash(self._lines[lines - 1])

    def history(self, run_id: str | None = None) -> list[MechanismStep]:
        """Opacus accountant history shape, one step per privacy entry: what the site has
        spent, over every run or (`run_id`) in one run."""
        if run_id is None:
            return list(self._history)
        return [_history_step(e) for e in self.entries() if e["run_id"] == run_id]

    def terms(self) -> tuple[float, AccountantName] | None:
        """(delta, accountant) of the latest privacy entry: the terms its epsilon was recorded
        at, and the site enforced its budget at, last; None before anything was spent."""
        for entry in reversed(self._entries):
            if not is_event(entry):
                return float(entry["delta"]), entry["accountant"]
        return None

    def spent(self, delta: float | None = None, accountant: AccountantName | None = None) -> float:
        """Cumulative epsilon over every privacy entry (inf after a round without noise), at
        `delta` with `accountant`, each by default the latest entry's (`terms`): what the
        ledger last recorded. 0 before anything was spent; events spend nothing."""
        latest = self.terms()
        if latest is None:
            return 0.0
        return cumulative_epsilon(
            self._history,
            delta=latest[0] if delta is None else delta,
            accountant=latest[1] if accountant is None else accountant,
        )

    def append(
        self,
        *,
        site_id: str,
        run_id: str,
        round: int,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        max_grad_norm: float | None,
        delta: float,
        accountant: AccountantName,
        trained: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Appends one round's spend and returns the entry written (with cumulative epsilon
        over every earlier privacy entry). `trained` names the model parts the round trained
        (the modality parts, `common/model/parts.py`): recorded, signed, never accounted (one
        DP-SGD mechanism covers every part it trained)."""
        parts = None if trained is None else sorted({str(p) for p in trained})
        if parts is not None and not all(PART_NAME.fullmatch(p) for p in parts):
            raise LedgerError("trained parts must be short names")
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"unknown accountant {accountant!r}")
        if not 0 < delta < 1:
            raise LedgerError(f"delta must be in (0, 1), got {delta}")
        step = MechanismStep(float(noise_multiplier), float(sample_rate), int(steps))

        def build() -> dict[str, Any]:
            epsilon = cumulative_epsilon([*self._history, step], delta=delta, accountant=accountant)
            return {
                "site_id": site_id,
                "run_id": run_id,
                "round": int(round),
                "mechanism": MECHANISM,
                "sample_rate": float(sample_rate),
                "noise_multiplier": float(noise_multiplier),
                "steps": int(steps),
                "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
                "delta": float(delta),
                "accountant": accountant,
                "epsilon": None if math.isinf(epsilon) else epsilon,
                **({} if parts is None else {"trained": parts}),
            }

        entry = self._append_signed(site_id, build)
        self._history.append(step)
        epsilon = math.inf if entry["epsilon"] is None else float(entry["epsilon"])
        logger.info(
            "ledger: site %s round %d spent %d steps at sigma %.3f, q %.4f; cumulative epsilon %s",
            site_id,
            round,
            steps,
            noise_multiplier,
            sample_rate,
            "unbounded" if math.isinf(epsilon) else f"{epsilon:.3f}",
        )
        return dict(entry)

    def append_refusal(
        self, *, site_id: str, run_id: str, round: int, reason: str
    ) -> dict[str, Any]:
        """Appends a refusal: signed and chained like a spend, so that what the site declined
        is on the same tamper-evident record, but spending nothing (no mechanism fields)."""
        problem = reason_problem(reason)
        if problem is not None:
            raise LedgerError(f"refusal not recorded: {problem}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise LedgerError(f"refusal not recorded: round must be >= 0, got {round!r}")
        entry = self._append_signed(
            site_id,
            lambda: {
                "event": REFUSAL_EVENT,
                "site_id": site_id,
                "run_id": str(run_id),
                "round": round,
                "reason": reason,
            },
        )
        return dict(entry)

    def append_recovery(
        self, *, site_id: str, reason: str, found: str, previous_head: str
    ) -> dict[str, Any]:
        """Appends a recovery: the privacy officer's signed record that this ledger was found
        discontinuous (`found`), why they accept it (`reason`) and the last head known before
        (`previous_head`, "<lines>:<sha256>" or "none"). It spends nothing and restores
        nothing: what the lost entries spent is not in this ledger."""
        problem = reason_problem(reason) or recovery_found_problem(found)
        if problem is not None:
            raise LedgerError(f"recovery not recorded: {problem}")
        if not head_is_valid(previous_head, allow_none=True):
            raise LedgerError(
                f"recovery not recorded: previous head {previous_head[:80]!r} is not "
                "<lines>:<sha256> or none"
            )
        entry = self._append_signed(
            site_id,
            lambda: {
                "event": RECOVERY_EVENT,
                "site_id": site_id,
                "reason": reason,
                "found": found,
                "previous_head": previous_head,
            },
        )
        return dict(entry)

    def _append_signed(self, site_id: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Writes `build()` plus timestamp, key id, chain and signature as one line, under an
        exclusive lock and after re-reading the file (`build` sees the current history)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Re-read under the lock: another process may have appended since we opened.
            self._load(self.path.read_bytes())
            if self._entries and self._entries[-1]["site_id"] != site_id:
                raise LedgerError(
                    f"ledger {self.path} belongs to site {self._entries[-1]['site_id']!r}, "
                    f"not {site_id!r}"
                )
            entry = build()
            entry["timestamp"] = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            entry["key_id"] = self._key_id
            entry["prev_hash"] = (
                GENESIS_HASH if self._last_line is None else line_hash(self._last_line)
            )
            entry["signature"] = _sign(entry, self._key)
            line = canonical_json(entry)
            data = line + b"\n"
            written = os.write(fd, data)
            if written != len(data):
                raise LedgerError(
                    f"ledger {self.path}: short write ({written} of {len(data)} bytes)"
                )
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        if created:
            fsync_dir(self.path.parent)
        self._entries.append(entry)
        self._last_line = line
        self._lines.append(line)
        return entry
