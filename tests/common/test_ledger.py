"""The site ledger: chained, signed, cumulative across runs, append-only, torn lines caught."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from fedrad.common.privacy.accounting import MechanismStep, cumulative_epsilon
from fedrad.common.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    TornLedgerError,
    canonical_json,
    key_id,
    load_or_create_signing_key,
    load_public_key,
    public_key_path,
    verify_ledger,
)

ROUND = dict(
    sample_rate=0.05,
    noise_multiplier=1.1,
    steps=40,
    max_grad_norm=1.0,
    delta=1e-5,
    accountant="rdp",
)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "ledger_key.pem"


def _append(ledger: Ledger, run_id: str, round_no: int, **over: object) -> dict:
    return ledger.append(site_id="site_a", run_id=run_id, round=round_no, **{**ROUND, **over})  # type: ignore[arg-type]


def test_key_is_private_reused_and_has_a_public_half(key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(key_path)
    assert again.public_key() == key.public_key()
    assert load_public_key(public_key_path(key_path)) == key.public_key()
    key_path.chmod(0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        load_or_create_signing_key(key_path)


def test_entries_chain_sign_and_accumulate_across_runs(tmp_path: Path, key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, key)
    first = _append(ledger, "run-1", 1)
    second = _append(ledger, "run-1", 2, noise_multiplier=1.3)
    # a new run (a new Ledger object) keeps counting everything before it
    third = _append(Ledger(path, key), "run-2", 1)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    assert first["prev_hash"] == GENESIS_HASH
    assert second["prev_hash"] == hashlib.sha256(lines[0]).hexdigest()
    assert third["prev_hash"] == hashlib.sha256(lines[1]).hexdigest()
    history = [MechanismStep(1.1, 0.05, 40), MechanismStep(1.3, 0.05, 40)]
    assert second["epsilon"] == pytest.approx(cumulative_epsilon(history, delta=1e-5))
    history.append(MechanismStep(1.1, 0.05, 40))
    assert third["epsilon"] == pytest.approx(cumulative_epsilon(history, delta=1e-5))
    assert first["epsilon"] < second["epsilon"] < third["epsilon"]
    reopened = Ledger(path, key)
    assert reopened.history() == history
    assert reopened.spent(1e-5) == pytest.approx(third["epsilon"])
    assert [e["run_id"] for e in reopened.entries()] == ["run-1", "run-1", "run-2"]
    for line in lines:  # each line is canonical JSON and its signature covers the rest
        entry = json.loads(line)
        assert canonical_json(entry) == line
        unsigned = {k: v for k, v in entry.items() if k != "signature"}
        key.public_key().verify(base64.b64decode(entry["signature"]), canonical_json(unsigned))
    assert verify_ledger(path, key.public_key()) == []


def test_spent_is_by_default_at_the_terms_of_the_latest_entry(
    tmp_path: Path, key_path: Path
) -> None:
    """What the ledger last recorded: the latest privacy entry's delta and accountant, over
    every entry; a refusal after it changes nothing."""
    ledger = Ledger(tmp_path / "ledger.jsonl", load_or_create_signing_key(key_path))
    assert ledger.terms() is None and ledger.spent() == 0.0
    _append(ledger, "run-1", 1)
    last = _append(ledger, "run-2", 1, delta=1e-6, accountant="prv")
    ledger.append_refusal(site_id="site_a", run_id="run-3", round=0, reason="declined")
    assert ledger.terms() == (1e-6, "prv")
    assert ledger.spent() == pytest.approx(last["epsilon"])
    steps = [MechanismStep(1.1, 0.05, 40)] * 2
    assert ledger.spent(1e-5, "rdp") == pytest.approx(cumulative_epsilon(steps, delta=1e-5))


def test_round_without_noise_is_recorded_as_unbounded(tmp_path: Path, key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    ledger = Ledger(tmp_path / "l.jsonl", key)
    entry = _append(ledger, "r", 1, noise_multiplier=0.0, max_grad_norm=None)
    assert entry["epsilon"] is None
    assert verify_ledger(tmp_path / "l.jsonl", key.public_key()) == []


def test_verify_finds_tampering_forgery_and_wrong_epsilon(tmp_path: Path, key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, key)
    for r in (1, 2, 3):
        _append(ledger, "run", r)
    lines = path.read_bytes().splitlines(keepends=True)

    # lowering the noise of an old entry breaks its signature and the next entry's chain
    entry = json.loads(lines[0])
    entry["noise_multiplier"] = 5.0
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(canonical_json(entry) + b"\n" + b"".join(lines[1:]))
    problems = verify_ledger(tampered, key.public_key())
    assert any("line 1: signature" in p for p in problems)
    assert any("line 2: prev_hash" in p for p in problems)
    with pytest.raises(LedgerError, match="does not verify"):
        Ledger(tampered, key)

    # dropping an entry breaks the chain
    dropped = tmp_path / "dropped.jsonl"
    dropped.write_bytes(lines[0] + lines[2])
    assert any("line 2: prev_hash" in p for p in verify_ledger(dropped, key.public_key()))

    # a different key's signatures do not verify
    other = load_or_create_signing_key(tmp_path / "other.pem")
    assert any("signature" in p for p in verify_ledger(path, other.public_key()))

    # a correctly signed entry whose epsilon understates the spend is caught on recomputation
    forged = json.loads(lines[1])
    forged["epsilon"] = 0.01
    forged.pop("signature")
    forged["signature"] = base64.b64encode(key.sign(canonical_json(forged))).decode()
    understated = tmp_path / "understated.jsonl"
    understated.write_bytes(lines[0] + canonical_json(forged) + b"\n")
    assert any("epsilon recorded 0.01" in p for p in verify_ledger(understated, key.public_key()))


def test_torn_last_line_is_reported_and_never_rewritten(tmp_path: Path, key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, key)
    _append(ledger, "run", 1)
    _append(ledger, "run", 2)
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    torn = whole + last[: len(last) // 2]  # a third append cut off mid-write
    path.write_bytes(torn)
    with pytest.raises(TornLedgerError, match="incomplete"):
        Ledger(path, key)
    with pytest.raises(TornLedgerError):
        _append(ledger, "run", 3)  # the open object re-reads under the lock and refuses too
    assert path.read_bytes() == torn  # nothing rewritten, nothing appended
    assert any("torn write" in p for p in verify_ledger(path, key.public_key()))


def test_a_ledger_belongs_to_one_site(tmp_path: Path, key_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.jsonl", load_or_create_signing_key(key_path))
    _append(ledger, "run", 1)
    with pytest.raises(LedgerError, match="belongs to site"):
        ledger.append(site_id="site_b", run_id="run", round=2, **ROUND)  # type: ignore[arg-type]


def test_append_is_one_write_with_fsync(
    tmp_path: Path, key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        calls.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    ledger = Ledger(tmp_path / "l.jsonl", load_or_create_signing_key(key_path))
    _append(ledger, "run", 1)  # creates the file
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    _append(ledger, "run", 2)
    assert calls == ["write", "fsync"]


# -- refusals --------------------------------------------------------------------------------


def _refuse(ledger: Ledger, run_id: str, round_no: int, reason: str = "site policy: no") -> dict:
    return ledger.append_refusal(site_id="site_a", run_id=run_id, round=round_no, reason=reason)


def test_refusals_are_signed_and_chained_but_spend_nothing(tmp_path: Path, key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, key)
    first = _append(ledger, "run-1", 1)
    refusal = _refuse(ledger, "run-1", 2, "site policy: this round's epsilon 3 is above 1")
    second = _append(ledger, "run-2", 1, noise_multiplier=2.0)
    _refuse(ledger, "run-3", 0)

    assert set(refusal) == {
        "event",
        "site_id",
        "run_id",
        "round",
        "reason",
        "timestamp",
        "key_id",
        "prev_hash",
        "signature",
    }
    assert (
        refusal["event"] == "refusal"
        and refusal["prev_hash"] == hashlib.sha256(path.read_bytes().splitlines()[0]).hexdigest()
    )
    assert "event" not in first and "event" not in second  # privacy entries as before
    reopened = Ledger(path, key)
    assert [e["run_id"] for e in reopened.entries()] == ["run-1", "run-2"]
    assert [(r["run_id"], r["round"]) for r in reopened.refusals()] == [("run-1", 2), ("run-3", 0)]
    steps = [MechanismStep(1.1, 0.05, 40), MechanismStep(2.0, 0.05, 40)]
    assert reopened.history() == steps
    assert reopened.history("run-2") == steps[1:] and reopened.history("run-3") == []
    assert reopened.spent(1e-5) == pytest.approx(cumulative_epsilon(steps, delta=1e-5))
    assert second["epsilon"] == pytest.approx(cumulative_epsilon(steps, delta=1e-5))
    assert verify_ledger(path, key.public_key()) == []


@pytest.mark.parametrize(
    ("reason", "words"),
    [("", "non-empty"), ("two\nlines", "one printable line"), ("x" * 301, "longer than")],
)
def test_a_refusal_reason_is_one_bounded_line(
    tmp_path: Path, key_path: Path, reason: str, words: str
) -> None:
    ledger = Ledger(tmp_path / "l.jsonl", load_or_create_signing_key(key_path))
    with pytest.raises(LedgerError, match=words):
        _refuse(ledger, "run", 1, reason)
    assert not (tmp_path / "l.jsonl").exists()


def _signed(key_path: Path, entry: dict) -> bytes:
    key = load_or_create_signing_key(key_path)
    entry = {**entry, "key_id": key_id(key.public_key())}
    entry["signature"] = base64.b64encode(key.sign(canonical_json(entry))).decode()
    return canonical_json(entry) + b"\n"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"steps": 40}, "carries spend field(s) steps"),
        ({"epsilon": 0.0, "noise_multiplier": 1.0}, "spend field(s) epsilon, noise_multiplier"),
        ({"event": "approval"}, "unknown event"),
        ({"note": "x"}, "unknown field(s) note"),
        ({"round": "1"}, "round must be"),
    ],
)
def test_a_signed_refusal_that_is_not_one_is_malformed(
    tmp_path: Path, key_path: Path, extra: dict, words: str
) -> None:
    """Correctly signed, yet refused: a spend must never hide where every epsilon skips it."""
    base = {
        "event": "refusal",
        "site_id": "site_a",
        "run_id": "run",
        "round": 1,
        "reason": "site policy: no",
        "timestamp": "2026-01-01T00:00:00.000+00:00",
        "prev_hash": GENESIS_HASH,
    }
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(_signed(key_path, {**base, **extra}))
    problems = verify_ledger(path, load_or_create_signing_key(key_path).public_key())
    assert any(words in p for p in problems), problems
    with pytest.raises(LedgerError, match="does not verify"):
        Ledger(path, load_or_create_signing_key(key_path))


def test_an_edited_or_dropped_refusal_is_caught(tmp_path: Path, key_path: Path) -> None:
    key = load_or_create_signing_key(key_path)
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, key)
    _append(ledger, "run", 1)
    _refuse(ledger, "run", 2)
    _append(ledger, "run", 2)
    lines = path.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[1])
    edited["reason"] = "site policy: something else"
    path.write_bytes(lines[0] + canonical_json(edited) + b"\n" + lines[2])
    assert any("line 2: signature" in p for p in verify_ledger(path, key.public_key()))
    path.write_bytes(lines[0] + lines[2])
    assert any("line 2: prev_hash" in p for p in verify_ledger(path, key.public_key()))


def test_the_parts_a_round_trained_are_signed_into_its_entry(
    tmp_path: Path, key_path: Path
) -> None:
    """What a site trained (its modality parts) is on the record, covered by the signature,
    and changes nothing in the accounting; a forged list breaks the signature."""
    from fedrad.common.audit.ledger_audit import audit_ledger

    key = load_or_create_signing_key(key_path)
    path = tmp_path / "ledger.jsonl"
    entry = _append(Ledger(path, key), "run-1", 1, trained={"radiograph", "CT"})
    plain = _append(Ledger(tmp_path / "other.jsonl", key), "run-1", 1)
    assert entry["trained"] == ["CT", "radiograph"] and "trained" not in plain
    assert entry["epsilon"] == plain["epsilon"]
    assert verify_ledger(path, key.public_key()) == []
    assert audit_ledger(path, {key_id(key.public_key()): key.public_key()}).status == "ok"
    forged = json.loads(path.read_bytes())
    forged["trained"] = ["radiograph"]
    path.write_bytes(canonical_json(forged) + b"\n")
    assert any("signature" in p for p in verify_ledger(path, key.public_key()))
    with pytest.raises(LedgerError, match="short names"):
        _append(Ledger(tmp_path / "x.jsonl", key), "run-1", 1, trained=["CT\nextra"])
