"""The privacy officer's check of site ledgers, independent of the code that wrote them.

Signatures and the hash chain are verified with the site's public key; every recorded epsilon
is recomputed from the raw mechanism parameters with Google's `dp_accounting` (its RDP
accountant and its PLD accountant), not with Opacus, which the sites use to claim. The two
RDP implementations compute the same bound and agree to machine precision; the site's PRV
claims are compared with the PLD accountant, a different tight method, within a stated
tolerance. Refusal entries (a site declining a round: signed and chained, spending nothing)
are verified like the others, counted, and left out of every epsilon. So are recovery entries
(the site's privacy officer recording that the ledger was found missing, cut short or replaced,
and accepted as it is): a recovery is not tampering, so the status stays as the rest of the
ledger makes it, but each one is listed as a "recovery" finding, because the entries it stands
for (and what they spent) are no longer in the file. Nothing here writes to a ledger.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import dp_accounting
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting import pld, rdp

Status = Literal[
    "ok",
    "over budget",
    "tampered",
    "broken chain",
    "unverifiable",
    "torn",
    "malformed",
    "empty",
    "missing",
    "recovery",
]
STATUS_ORDER: Final[tuple[Status, ...]] = (
    "missing",
    "empty",
    "malformed",
    "tampered",
    "broken chain",
    "torn",
    "unverifiable",
    "over budget",
    "ok",
)
"""Most severe first: a ledger's status is the most severe of its findings. A "recovery"
finding is information, never a status: the entries before it verify as they are."""
INFORMATION: Final[frozenset[str]] = frozenset({"recovery"})

MECHANISMS: Final[frozenset[str]] = frozenset({"subsampled_gaussian"})
CLAIM_ACCOUNTANTS: Final[frozenset[str]] = frozenset({"rdp", "prv"})
GENESIS_HASH: Final[str] = "0" * 64
RDP_TOLERANCE: Final[float] = 0.01  # relative, above the loose bound
TIGHT_TOLERANCE: Final[float] = 0.02  # relative and absolute, below the tight bound (PRV vs PLD)
PLD_DISCRETIZATION: Final[float] = 1e-3  # 1e-4 changed epsilon by < 1e-5 here, 10x slower
PLD_LIMIT: Final[float] = 500.0  # RDP epsilon above which the tight bound is not attempted
FIELDS: Final[tuple[str, ...]] = (
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
    "prev_hash",
    "signature",
)
REFUSAL_EVENT: Final[str] = "refusal"
REFUSAL_FIELDS: Final[tuple[str, ...]] = (
    "event",
    "site_id",
    "run_id",
    "round",
    "reason",
    "timestamp",
    "prev_hash",
    "signature",
)
# what a privacy entry spends with; an event carrying any of them is malformed
SPEND_FIELDS: Final[frozenset[str]] = frozenset(FIELDS) - frozenset(REFUSAL_FIELDS)
MAX_REASON_CHARS: Final[int] = 300
RECOVERY_EVENT: Final[str] = "recovery"
RECOVERY_FIELDS: Final[tuple[str, ...]] = (
    "event",
    "site_id",
    "reason",
    "found",
    "previous_head",
    "timestamp",
    "prev_hash",
    "signature",
)
MAX_FOUND_CHARS: Final[int] = 600
HEAD_PATTERN: Final[re.Pattern[str]] = re.compile(r"[0-9]+:[0-9a-f]{64}")  # fullmatch, not $


@dataclass(frozen=True)
class Finding:
    status: Status
    reason: str


@dataclass
class LedgerAudit:
    """One ledger's verdict; `reason` is the first line a person should read."""

    path: str
    status: Status
    reason: str
    site_id: str | None = None
    entries: int = 0  # well-formed entries, refusals included
    refusals: int = 0  # of them, refusals: signed and chained, composing nothing
    recoveries: int = 0  # of them, recoveries: a gap the privacy officer recorded
    key_ids: list[str] = field(default_factory=list)  # keys that signed the entries
    key_source: str | None = None  # "given" (--public-key) or "beside the ledger"
    delta: float | None = None
    claimed_epsilon: float | None = None  # the last entry's; None = unbounded or none
    recomputed_rdp: float | None = None
    recomputed_pld: float | None = None
    unbounded: bool = False
    budget: float | None = None
    head_hash: str | None = None  # SHA-256 of the last complete line: anchor it
    findings: list[Finding] = field(default_factory=list)
    read_past: list[str] = field(default_factory=list)  # an editor's re-save, not content

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an unbounded epsilon is null (with `unbounded` true), never Infinity."""
        out = asdict(self)
        for name in ("claimed_epsilon", "recomputed_rdp", "recomputed_pld"):
            if out[name] is not None and math.isinf(out[name]):
                out[name] = None
        out["findings"] = [asdict(f) for f in self.findings]
        return out


@dataclass(frozen=True)
class Anchor:
    """A ledger's length and head hash at an earlier audit: later lines may only be added."""

    entries: int
    head_hash: str


# -- keys ------------------------------------------------------------------------------------


def public_key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex of SHA-256 of the raw key, as the ledger's `key_id` field."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def read_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM (SubjectPublicKeyInfo) or OpenSSH Ed25519 public key; ValueError in one line."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read public key {path}: {exc.strerror}") from exc
    loaders = (serialization.load_pem_public_key, serialization.load_ssh_public_key)
    for load in loaders:
        try:
            key = load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if isinstance(key, Ed25519PublicKey):
            return key
        raise ValueError(f"{path} is not an Ed25519 public key")
    raise ValueError(f"{path} is not a PEM or OpenSSH public key")


# -- accounting ------------------------------------------------------------------------------


class IndependentAccountant:
    """RDP and PLD accountants of `dp_accounting`, fed one ledger entry at a time."""

    def __init__(self) -> None:
        self._rdp = rdp.RdpAccountant()
        self._pld = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        self._pld_ok = True
        self.unbounded = False
        self.any_steps = False

    def compose(self, *, sample_rate: float, noise_multiplier: float, steps: int) -> None:
        if steps == 0:
            return
        self.any_steps = True
        if noise_multiplier == 0:
            self.unbounded = True
            return
        if self.unbounded:
            return
        event = dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
        self._rdp.compose(event, steps)
        if self._pld_ok:
            if self._rdp.get_epsilon(1e-5) > PLD_LIMIT:
                self._pld_ok = False  # astronomically spent: the RDP bound says enough
            else:
                self._pld.compose(event, steps)

    def rdp_epsilon(self, delta: float) -> float:
        if self.unbounded:
            return math.inf
        return float(self._rdp.get_epsilon(delta)) if self.any_steps else 0.0

    def pld_epsilon(self, delta: float) -> float | None:
        if self.unbounded:
            return math.inf
        if not self.any_steps:
            return 0.0
        return float(self._pld.get_epsilon(delta)) if self._pld_ok else None


def epsilon_of(
    history: Sequence[tuple[float, float, int]], *, delta: float
) -> tuple[float, float | None]:
    """(RDP, PLD) epsilon of (noise_multiplier, sample_rate, steps) releases: the audit's
    numbers, for tests and for anyone who wants them without a ledger."""
    acct = IndependentAccountant()
    for sigma, q, steps in history:
        acct.compose(sample_rate=q, noise_multiplier=sigma, steps=steps)
    return acct.rdp_epsilon(delta), acct.pld_epsilon(delta)


def claim_is_supported(claimed: float | None, rdp_eps: float, pld_eps: float | None) -> bool:
    """Whether a recorded cumulative epsilon lies within the independent bounds.

    Both recomputations are valid upper bounds on the same mechanism: the PLD one is tight,
    the RDP one is loose, and at large epsilon (small RDP orders, which dp_accounting skips
    when its series does not converge) looser than Opacus' RDP. A claim between them, with
    the stated tolerance, is a correct statement of what was spent; one below the tight bound
    understates the spend, one above the loose bound belongs to other parameters.
    """
    if math.isinf(rdp_eps) or claimed is None:
        return claimed is None and math.isinf(rdp_eps)
    bounds = [rdp_eps] if pld_eps is None else [rdp_eps, pld_eps]
    low = min(bounds) * (1 - TIGHT_TOLERANCE) - TIGHT_TOLERANCE
    high = max(bounds) * (1 + RDP_TOLERANCE) + 1e-9
    return low <= claimed <= high


# -- the audit -------------------------------------------------------------------------------


def _canonical(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _fmt(value: float | None) -> str:
    return "unbounded" if value is None or math.isinf(value) else f"{value:.4g}"


def _number(entry: Mapping[str, Any], name: str, kind: type) -> Any:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(name)
    if kind is int and float(value) != int(value):
        raise ValueError(name)
    return kind(value)


def _mechanism(entry: Mapping[str, Any]) -> tuple[float, float, int, float]:
    """(sample_rate, noise_multiplier, steps, delta), ValueError naming a bad field."""
    q = _number(entry, "sample_rate", float)
    sigma = _number(entry, "noise_multiplier", float)
    steps = _number(entry, "steps", int)
    delta = _number(entry, "delta", float)
    if not 0 < q <= 1:
        raise ValueError("sample_rate")
    if not sigma >= 0 or math.isinf(sigma):
        raise ValueError("noise_multiplier")
    if steps < 0:
        raise ValueError("steps")
    if not 0 < delta < 1:
        raise ValueError("delta")
    return q, sigma, steps, delta


def _one_line_problem(value: object, limit: int) -> bool:
    return (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > limit
        or not value.isprintable()
    )


def _event_fields_problem(entry: Mapping[str, Any], kind: str, fields: Sequence[str]) -> str | None:
    """An event of `kind` holds exactly `fields` (key_id aside): one carrying a spend field
    could hide a spend from every epsilon, so it is malformed, whatever its signature says."""
    if entry["event"] != kind:
        return "unknown event"
    spend = sorted(SPEND_FIELDS & set(entry))
    if spend:
        return f"a {kind} carries spend field(s) {', '.join(spend)}"
    unknown = sorted(set(entry) - set(fields) - {"key_id"})
    if unknown:
        return f"a {kind} has unknown field(s) {', '.join(unknown)}"
    missing = [f for f in fields if f not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def recovery_problem(entry: Mapping[str, Any]) -> str | None:
    """Why an entry with event "recovery" is not a well-formed recovery, or None: exactly its
    own fields (no spend field), one-line reason and finding, and a previous head that reads
    "<lines>:<sha256>" or "none"."""
    problem = _event_fields_problem(entry, RECOVERY_EVENT, RECOVERY_FIELDS)
    if problem is not None:
        return problem
    if _one_line_problem(entry["reason"], MAX_REASON_CHARS):
        return "invalid reason (one printable line expected)"
    if _one_line_problem(entry["found"], MAX_FOUND_CHARS):
        return "invalid found (one printable line expected)"
    head = entry["previous_head"]
    if head != "none" and not (isinstance(head, str) and HEAD_PATTERN.fullmatch(head)):
        return "invalid previous_head (<lines>:<sha256> or none expected)"
    return None


def event_problem(entry: Mapping[str, Any]) -> str | None:
    """Why an entry with an `event` field is not a well-formed refusal or recovery, or None."""
    if entry["event"] == RECOVERY_EVENT:
        return recovery_problem(entry)
    return refusal_problem(entry)


def refusal_problem(entry: Mapping[str, Any]) -> str | None:
    """Why an entry with an `event` field is not a well-formed refusal, or None. A refusal
    has exactly its own fields: one carrying a spend field could hide a spend from every
    epsilon, so it is malformed, whatever its signature says."""
    problem = _event_fields_problem(entry, REFUSAL_EVENT, REFUSAL_FIELDS)
    if problem is not None:
        return problem
    round_no = entry["round"]
    if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 0:
        return "invalid round"
    if not isinstance(entry["run_id"], str):
        return "invalid run_id"
    if _one_line_problem(entry["reason"], MAX_REASON_CHARS):
        return "invalid reason (one printable line expected)"
    return None


def audit_ledger(
    path: Path,
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    key_source: str | None = None,
    budget: float | None = None,
    anchor: Anchor | None = None,
) -> LedgerAudit:
    """Verifies one ledger file and recomputes every epsilon; never raises for bad content.

    `public_keys` maps key id -> key; an empty mapping means signatures cannot be checked
    (status at best "unverifiable"). `anchor` is what an earlier audit saw: a ledger that
    no longer begins with those lines was rolled back or rewritten.
    """
    path = Path(path)
    result = LedgerAudit(path=str(path), status="ok", reason="", budget=budget)
    result.key_source = key_source
    findings = result.findings
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _finish(result, [Finding("missing", "no such file")])
    except IsADirectoryError:
        return _finish(result, [Finding("missing", "a directory, not a ledger file")])
    except OSError as exc:
        return _finish(result, [Finding("missing", f"cannot read: {exc.strerror}")])

    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
        result.read_past.append("a byte-order mark")
    raw_lines = data.split(b"\n")
    torn = raw_lines.pop()
    lines = _content_lines(raw_lines, result.read_past)
    if torn:
        findings.append(
            Finding(
                "torn",
                f"line {len(raw_lines) + 1}: incomplete last line ({len(torn)} bytes without a "
                "newline, an interrupted write); the lines before it were audited",
            )
        )
    if not lines:
        findings.append(Finding("empty", "no complete entries"))
        return _finish(result, findings)

    acct = IndependentAccountant()
    prev_line: bytes | None = None
    signed_by: list[str] = []
    chain_ok = True
    signatures_checked = bool(public_keys)
    claim_problems: list[tuple[Finding, bool]] = []  # (finding, line's signature verified)
    # the last well-formed entry: (claimed, delta, RDP, PLD); later bad lines compose nothing
    last_claim: tuple[float | None, float, float, float | None] | None = None
    for index, (number, line) in enumerate(lines):
        where = f"line {number}"
        expected_prev = GENESIS_HASH if prev_line is None else hashlib.sha256(prev_line).hexdigest()
        prev_line = line
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            findings.append(Finding("malformed", f"{where}: not valid JSON"))
            chain_ok = False
            continue
        if not isinstance(entry, dict):
            findings.append(Finding("malformed", f"{where}: not a JSON object"))
            continue
        event = "event" in entry
        if event:
            problem = event_problem(entry)
            if problem is not None:
                findings.append(Finding("malformed", f"{where}: {problem}"))
                continue
        else:
            missing = [f for f in FIELDS if f not in entry]
            if missing:
                findings.append(Finding("malformed", f"{where}: missing {', '.join(missing)}"))
                continue
        result.entries += 1
        site = entry["site_id"]
        if result.site_id is None:
            result.site_id = str(site)
        elif site != result.site_id:
            findings.append(
                Finding("tampered", f"{where}: site_id {site!r}, earlier {result.site_id!r}")
            )
        if entry["prev_hash"] != expected_prev:
            chain_ok = False
            findings.append(
                Finding(
                    "broken chain",
                    f"{where}: prev_hash does not match line {lines[index - 1][0]}"
                    if index > 0
                    else f"{where}: the first entry does not start the chain (lines before it "
                    "were removed)",
                )
            )
        entry_key = str(entry.get("key_id", ""))
        if entry_key not in signed_by:
            signed_by.append(entry_key)
        verified = False
        if signatures_checked:
            key = public_keys.get(entry_key)
            if key is None:
                findings.append(
                    Finding(
                        "unverifiable",
                        f"{where}: signed by key {entry_key or '?'}, not by the public key given "
                        f"({', '.join(sorted(public_keys))})",
                    )
                )
            else:
                unsigned = {k: v for k, v in entry.items() if k != "signature"}
                try:
                    key.verify(
                        base64.b64decode(str(entry["signature"]), validate=True),
                        _canonical(unsigned),
                    )
                    verified = True
                except (InvalidSignature, binascii.Error, ValueError):
                    findings.append(
                        Finding("tampered", f"{where}: signature does not verify (edited entry)")
                    )
        if event and entry["event"] == RECOVERY_EVENT:
            result.recoveries += 1  # it composes nothing, but a verified one is shown
            if signatures_checked and not verified:
                continue  # "tampered" or "unverifiable" above says what it is
            findings.append(
                Finding(
                    "recovery",
                    f"{where}: recovery recorded by the site's privacy officer at "
                    f"{entry['timestamp']}: found {entry['found']!r}; reason {entry['reason']!r}; "
                    f"previous head {entry['previous_head']} (what the lost entries spent is not "
                    "in this ledger)",
                )
            )
            continue
        if event:
            result.refusals += 1  # verified above; it composes nothing
            continue
        if entry["mechanism"] not in MECHANISMS:
            findings.append(Finding("malformed", f"{where}: unknown mechanism"))
            continue
        accountant = entry["accountant"]
        if accountant not in CLAIM_ACCOUNTANTS:
            findings.append(Finding("malformed", f"{where}: unknown accountant"))
            continue
        try:
            q, sigma, steps, delta = _mechanism(entry)
            claimed_raw = entry["epsilon"]
            claimed = None if claimed_raw is None else _number(entry, "epsilon", float)
        except (ValueError, TypeError) as exc:
            findings.append(Finding("malformed", f"{where}: invalid {exc.args[0]}"))
            continue
        acct.compose(sample_rate=q, noise_multiplier=sigma, steps=steps)
        rdp_eps, pld_eps = acct.rdp_epsilon(delta), acct.pld_epsilon(delta)
        if not claim_is_supported(claimed, rdp_eps, pld_eps):
            claim = Finding(
                "tampered",
                f"{where}: epsilon recorded {_fmt(claimed)}, recomputed "
                f"{_fmt(pld_eps)} (PLD) to {_fmt(rdp_eps)} (RDP) from its parameters",
            )
            claim_problems.append((claim, verified))
        last_claim = (claimed, delta, rdp_eps, pld_eps)
    result.key_ids = signed_by
    result.head_hash = hashlib.sha256(lines[-1][1]).hexdigest()
    # A signed line whose claim disagrees with its own parameters was written that way; but
    # when lines were reordered or deleted, every later cumulative claim shifts: the chain
    # finding says why, and those mismatches are its consequence, reported as a count.
    shifted = [f for f, signed in claim_problems if signed and not chain_ok]
    findings.extend(f for f, signed in claim_problems if not (signed and not chain_ok))
    if shifted:
        findings.append(
            Finding(
                "broken chain",
                f"{len(shifted)} signed cumulative epsilon claims no longer match the lines "
                "above them",
            )
        )
    if anchor is not None:
        findings.extend(_check_anchor([line for _, line in lines], anchor))
    if last_claim is not None:
        claimed, delta, rdp_eps, pld_eps = last_claim
        result.delta = delta
        result.claimed_epsilon = claimed
        result.recomputed_rdp = rdp_eps
        result.recomputed_pld = pld_eps
        result.unbounded = acct.unbounded
    over = budget_finding(result, budget)
    if over is not None:
        findings.append(over)
    if not signatures_checked:
        findings.append(
            Finding("unverifiable", "no public key for this ledger: signatures not checked")
        )
    return _finish(result, findings)


def budget_finding(audit: LedgerAudit, budget: float | None) -> Finding | None:
    """ "over budget" when what was spent exceeds `budget`. Both recomputations are valid
    upper bounds: the tighter one is what was provably spent. The site's own claim counts
    too: a site that says it overspent did."""
    if budget is None or audit.delta is None or audit.recomputed_rdp is None:
        return None
    bounds = [b for b in (audit.recomputed_rdp, audit.recomputed_pld) if b is not None]
    provable = min(bounds)
    claimed = audit.claimed_epsilon
    spent = max(provable, math.inf if claimed is None else claimed)
    if spent <= budget * (1 + 1e-9):
        return None
    which = "claimed" if claimed is not None and claimed >= provable else "recomputed"
    return Finding("over budget", f"{which} epsilon {_fmt(spent)} > budget {budget:g}")


def with_budget(audit: LedgerAudit, budget: float | None) -> LedgerAudit:
    """The same audit judged against another budget, without recomputing anything: the budget
    of a site is known only once its ledger has been read."""
    findings = [f for f in audit.findings if f.status != "over budget"]
    over = budget_finding(audit, budget)
    if over is not None:
        findings.append(over)
    return _finish(dataclasses.replace(audit, budget=budget, findings=[]), findings)


def _content_lines(raw_lines: list[bytes], read_past: list[str]) -> list[tuple[int, bytes]]:
    """(file line number, line) of the entries, past what an editor's re-save adds: CRLF line
    endings and blank lines. Neither can hide an edit: entries, signatures and the chain are
    over the entry bytes, which these leave as written."""
    if any(line.endswith(b"\r") for line in raw_lines):
        read_past.append("CRLF line endings")
    stripped = [line.removesuffix(b"\r") for line in raw_lines]
    lines = [(n, line) for n, line in enumerate(stripped, start=1) if line.strip()]
    if len(lines) < len(stripped):
        blank = len(stripped) - len(lines)
        read_past.append(f"{blank} blank line{'s' if blank > 1 else ''}")
    return lines


def _check_anchor(lines: list[bytes], anchor: Anchor) -> list[Finding]:
    if anchor.entries > len(lines):
        return [
            Finding(
                "broken chain",
                f"rolled back: {anchor.entries} entries at the earlier audit, {len(lines)} now",
            )
        ]
    if anchor.entries and hashlib.sha256(lines[anchor.entries - 1]).hexdigest() != (
        anchor.head_hash
    ):
        return [
            Finding(
                "broken chain",
                f"rewritten: line {anchor.entries} differs from the one the earlier audit saw",
            )
        ]
    return []


def _finish(result: LedgerAudit, findings: list[Finding]) -> LedgerAudit:
    result.findings = findings
    serious = [f for f in findings if f.status not in INFORMATION]
    if not serious:
        result.status = "ok"
        result.reason = f"{result.entries} entries verified, epsilon recomputed"
        if result.refusals:
            result.reason += f" ({result.refusals} of them refusals, spending nothing)"
        if result.recoveries:
            result.reason += (
                f"; {result.recoveries} recover{'ies' if result.recoveries > 1 else 'y'} "
                "recorded by the privacy officer: entries were lost, and what they spent is "
                "not counted here"
            )
        if result.read_past:
            result.reason += f" (read past {', '.join(result.read_past)}: formatting only)"
        if result.key_source == "beside the ledger":
            result.reason += " (key read beside the ledger: pass --public-key to check it)"
        return result
    worst = min(serious, key=lambda f: STATUS_ORDER.index(f.status))
    result.status = worst.status
    more = len(findings) - 1
    result.reason = worst.reason + (f" (+{more} more)" if more else "")
    return result


def worst_status(audits: Sequence[LedgerAudit]) -> Status:
    return min((a.status for a in audits), key=STATUS_ORDER.index, default="ok")
