"""The ledger's anchor: a deleted, truncated, replaced or rewritten ledger is refused in one
line, a crash between an append and the anchor's rewrite is not, and the privacy officer's
recovery is a signed event that the ledger's own check and the independent audit accept."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedrad.common.audit.ledger_audit import audit_ledger, public_key_id
from fedrad.common.privacy.accounting import MechanismStep
from fedrad.common.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    canonical_json,
    line_hash,
    load_or_create_signing_key,
    verify_ledger,
)
from fedrad.common.privacy.ledger_anchor import (
    RECOVER_COMMAND,
    LedgerContinuityError,
    default_anchor_path,
    ledger_head,
    open_site_ledger,
    read_anchor,
    recover_ledger,
    write_anchor,
)
from fedrad.common.privacy.ledger_head import head_is_valid, parse_head
from fedrad.common.protocol.messages import ProtocolError, RoundConfig

ROUND = dict(
    sample_rate=0.05,
    noise_multiplier=1.1,
    steps=40,
    max_grad_norm=1.0,
    delta=1e-5,
    accountant="rdp",
)
SITE = "site_a"


class Site:
    """A site's ledger, key and (default) anchor under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ledger = root / "ledger.jsonl"
        self.key = root / "keys" / "ledger_key.pem"
        self.anchor = default_anchor_path(self.key)

    def open(self, acknowledged: str | None = None) -> Ledger:
        return open_site_ledger(self.ledger, self.key, None, acknowledged, site_id=SITE)

    def spend(self, ledger: Ledger, round_no: int, run_id: str = "run-1") -> dict:
        return ledger.append(site_id=SITE, run_id=run_id, round=round_no, **ROUND)  # type: ignore[arg-type]

    def public(self) -> Ed25519PublicKey:
        return load_or_create_signing_key(self.key).public_key()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def _refused(site: Site, acknowledged: str | None = None) -> str:
    with pytest.raises(LedgerContinuityError) as info:
        site.open(acknowledged)
    message = str(info.value)
    assert "\n" not in message and message.startswith("ledger continuity: ")
    assert f"`{RECOVER_COMMAND}" in message
    assert str(site.root) not in message  # sent back to the coordinator: no paths
    return message


def test_a_fresh_site_gets_an_empty_ledger_and_its_anchor_beside_the_key(site: Site) -> None:
    ledger = site.open()
    assert site.anchor == site.root / "keys" / "ledger_key.anchor.json"
    assert site.anchor.parent != site.ledger.parent  # not where the ledger is
    assert site.ledger.read_bytes() == b""
    assert stat.S_IMODE(site.anchor.stat().st_mode) == 0o600
    assert ledger_head(ledger) == f"0:{GENESIS_HASH}"
    anchor = read_anchor(site.anchor, site.public())
    assert anchor is not None and (anchor.site_id, anchor.lines) == (SITE, 0)
    assert ledger_head(site.open()) == f"0:{GENESIS_HASH}"  # and it opens again


def test_every_append_keeps_the_anchor_current(site: Site) -> None:
    ledger = site.open()
    site.spend(ledger, 1)
    ledger.append_refusal(site_id=SITE, run_id="run-1", round=2, reason="site policy: no")
    site.spend(ledger, 3)
    lines = site.ledger.read_bytes().splitlines()
    anchor = read_anchor(site.anchor, site.public())
    assert anchor is not None
    assert (anchor.lines, anchor.head_hash) == (3, line_hash(lines[-1]))
    assert ledger_head(ledger) == anchor.head == f"3:{line_hash(lines[-1])}"
    assert json.loads(site.anchor.read_text())["kind"] == "fedrad-ledger-anchor"
    assert ledger_head(site.open(acknowledged=anchor.head)) == anchor.head


def _three_entries(site: Site) -> bytes:
    """Three spends; returns the file as it was after two."""
    ledger = site.open()
    site.spend(ledger, 1)
    site.spend(ledger, 2)
    after_two = site.ledger.read_bytes()
    site.spend(ledger, 3)
    return after_two


def test_a_deleted_ledger_is_refused(site: Site) -> None:
    _three_entries(site)
    site.ledger.unlink()
    message = _refused(site)
    assert "the ledger is missing, its anchor records 3 entries" in message
    assert not site.ledger.exists()  # nothing was recreated


def test_a_ledger_truncated_by_one_entry_is_refused(site: Site) -> None:
    _three_entries(site)
    lines = site.ledger.read_bytes().splitlines(keepends=True)
    site.ledger.write_bytes(b"".join(lines[:-1]))
    assert verify_ledger(site.ledger, site.public()) == []  # the chain alone cannot tell
    message = _refused(site)
    assert "the ledger has 2 entries, its anchor records 3 (truncated" in message


def test_an_older_copy_of_the_ledger_is_refused(site: Site) -> None:
    older = _three_entries(site)
    site.ledger.write_bytes(older)
    assert "its anchor records 3 (truncated, or replaced by an older copy)" in _refused(site)


def test_a_ledger_rewritten_to_the_same_length_is_refused(site: Site, tmp_path: Path) -> None:
    """Another history of the same length, signed with the site's own key (a restore of a
    different ledger): the anchor's line is not there."""
    _three_entries(site)
    other = Ledger(tmp_path / "other.jsonl", load_or_create_signing_key(site.key))
    for round_no in (1, 2, 3):
        other.append(site_id=SITE, run_id="run-0", round=round_no, **ROUND)  # type: ignore[arg-type]
    shutil.copy(tmp_path / "other.jsonl", site.ledger)
    message = _refused(site)
    assert "entry 3 of the ledger is" in message and "(rewritten or replaced)" in message


def test_a_deleted_anchor_beside_a_non_empty_ledger_is_refused(site: Site) -> None:
    _three_entries(site)
    site.anchor.unlink()
    assert "the ledger has 3 entries and its anchor is missing" in _refused(site)


def test_a_forged_anchor_is_refused(site: Site, tmp_path: Path) -> None:
    older = _three_entries(site)
    site.ledger.write_bytes(older)
    # an anchor edited to match the older copy no longer verifies
    raw = json.loads(site.anchor.read_text())
    raw["lines"], raw["head_hash"] = 2, line_hash(older.splitlines()[-1])
    site.anchor.write_bytes(canonical_json(raw) + b"\n")
    assert "the ledger anchor does not verify with this site's ledger key" in _refused(site)
    # nor does one signed with another key
    other = load_or_create_signing_key(tmp_path / "other" / "key.pem")
    write_anchor(site.anchor, other, site_id=SITE, lines=2, head_hash=raw["head_hash"])
    assert "does not verify" in _refused(site)
    site.anchor.write_text("not an anchor\n")
    assert "is not a fedrad anchor file" in _refused(site)


def test_an_anchor_of_another_site_is_refused(site: Site) -> None:
    _three_entries(site)
    write_anchor(
        site.anchor,
        load_or_create_signing_key(site.key),
        site_id="site_b",
        lines=3,
        head_hash=line_hash(site.ledger.read_bytes().splitlines()[-1]),
    )
    assert "the ledger anchor is for site 'site_b', this ledger for site 'site_a'" in _refused(site)


def test_a_coordinator_head_ahead_of_the_ledger_is_refused(site: Site) -> None:
    """Ledger and anchor rolled back together: only the coordinator's copy shows it."""
    ledger = site.open()
    site.spend(ledger, 1)
    site.spend(ledger, 2)
    saved = (site.ledger.read_bytes(), site.anchor.read_bytes())
    site.spend(ledger, 3)
    acknowledged = ledger_head(ledger)
    site.ledger.write_bytes(saved[0])
    site.anchor.write_bytes(saved[1])
    ledger_head(site.open())  # on its own, the pair is consistent
    message = _refused(site, acknowledged)
    short = acknowledged.split(":")[1][:8]
    assert f"the coordinator acknowledged entry 3 (hash {short}…), this ledger has 2" in message
    assert f"{RECOVER_COMMAND} --acknowledged {acknowledged}`" in message
    # a head the ledger holds, or none, is fine
    assert ledger_head(site.open(f"1:{line_hash(saved[0].splitlines()[0])}")).startswith("2:")
    assert ledger_head(site.open("")).startswith("2:")
    bad = f"1:{'0' * 64}"
    assert "this ledger's entry 1 is" in _refused(site, bad)


def test_a_crash_between_append_and_anchor_is_tolerated(site: Site) -> None:
    ledger = site.open()
    site.spend(ledger, 1)
    raw = Ledger(site.ledger, load_or_create_signing_key(site.key))  # appends, anchor untouched
    raw.append(site_id=SITE, run_id="run-1", round=2, **ROUND)  # type: ignore[arg-type]
    anchor = read_anchor(site.anchor, site.public())
    assert anchor is not None and anchor.lines == 1
    reopened = site.open()
    anchor = read_anchor(site.anchor, site.public())
    assert anchor is not None and anchor.head == ledger_head(reopened) and anchor.lines == 2


def test_a_ledger_replaced_while_open_is_not_appended_to(site: Site) -> None:
    older = _three_entries(site)
    ledger = site.open()
    site.ledger.write_bytes(older)
    with pytest.raises(LedgerContinuityError, match="changed while it was open"):
        site.spend(ledger, 4)
    assert site.ledger.read_bytes() == older


def test_recovery_is_a_signed_event_the_next_open_and_the_audit_accept(site: Site) -> None:
    older = _three_entries(site)
    lost_head = ledger_head(site.open())
    site.ledger.write_bytes(older)
    refusal = _refused(site)
    done = recover_ledger(
        site.ledger, site.key, site_id=SITE, reason="restored from Monday's backup (J. Doe)"
    )
    assert done.entry is not None and refusal.startswith(done.found)
    assert done.previous_head == lost_head
    entry = done.entry
    assert set(entry) == {
        "event",
        "site_id",
        "reason",
        "found",
        "previous_head",
        "timestamp",
        "key_id",
        "prev_hash",
        "signature",
    }
    assert entry["event"] == "recovery" and entry["site_id"] == SITE
    assert entry["prev_hash"] == line_hash(older.splitlines()[-1])
    anchor = read_anchor(site.anchor, site.public())
    assert anchor is not None and anchor.head == done.head and anchor.lines == 3
    ledger = site.open()  # continuous again
    assert [r["reason"] for r in ledger.recoveries()] == ["restored from Monday's backup (J. Doe)"]
    assert ledger.refusals() == []
    assert ledger.history() == [MechanismStep(1.1, 0.05, 40)] * 2  # only what it holds
    site.spend(ledger, 3)
    assert verify_ledger(site.ledger, site.public()) == []
    key = site.public()
    audit = audit_ledger(site.ledger, {public_key_id(key): key})
    assert audit.status == "ok" and audit.recoveries == 1 and audit.entries == 4
    [finding] = audit.findings
    assert finding.status == "recovery" and finding.reason.startswith("line 3: recovery")
    assert "restored from Monday's backup" in finding.reason and lost_head in finding.reason
    assert "1 recovery recorded by the privacy officer" in audit.reason
    # nothing more to recover: nothing written
    before = site.ledger.read_bytes()
    again = recover_ledger(site.ledger, site.key, site_id=SITE, reason="again")
    assert again.entry is None and site.ledger.read_bytes() == before


def test_a_deleted_ledger_recovers_into_one_that_starts_with_the_recovery(site: Site) -> None:
    _three_entries(site)
    site.ledger.unlink()
    done = recover_ledger(site.ledger, site.key, site_id=SITE, reason="disk replaced")
    assert done.entry is not None and done.entry["prev_hash"] == GENESIS_HASH
    assert "the ledger is missing" in done.found
    ledger = site.open()
    assert ledger.entries() == [] and ledger.spent() == 0.0  # the lost spend is not restored
    assert len(site.ledger.read_bytes().splitlines()) == 1
    key = site.public()
    audit = audit_ledger(site.ledger, {public_key_id(key): key})
    assert audit.status == "ok" and audit.recoveries == 1


def test_a_recovery_accepts_the_coordinator_head_it_records(site: Site) -> None:
    ledger = site.open()
    site.spend(ledger, 1)
    saved = (site.ledger.read_bytes(), site.anchor.read_bytes())
    site.spend(ledger, 2)
    acknowledged = ledger_head(ledger)
    site.ledger.write_bytes(saved[0])
    site.anchor.write_bytes(saved[1])
    _refused(site, acknowledged)
    plain = recover_ledger(site.ledger, site.key, site_id=SITE, reason="x")
    assert plain.entry is None  # locally all agrees: the coordinator's head must be named
    done = recover_ledger(
        site.ledger, site.key, site_id=SITE, reason="rolled back by IT", acknowledged=acknowledged
    )
    assert done.entry is not None and done.previous_head == acknowledged
    assert "the coordinator acknowledged entry 2" in done.found
    assert ledger_head(site.open(acknowledged)) == done.head  # accepted from now on
    with pytest.raises(LedgerError, match="--acknowledged"):
        recover_ledger(site.ledger, site.key, site_id=SITE, reason="x", acknowledged="2:zz")


def test_a_recovery_with_spend_fields_or_a_bad_head_is_malformed(site: Site) -> None:
    ledger = site.open()
    with pytest.raises(LedgerError, match="previous head"):
        ledger.append_recovery(site_id=SITE, reason="r", found="f", previous_head="3:abc")
    with pytest.raises(LedgerError, match="non-empty"):
        ledger.append_recovery(site_id=SITE, reason="", found="f", previous_head="none")
    entry = ledger.append_recovery(site_id=SITE, reason="r", found="f", previous_head="none")
    forged = {k: v for k, v in entry.items() if k != "signature"}
    forged["steps"] = 40
    key = load_or_create_signing_key(site.key)
    forged["signature"] = base64.b64encode(key.sign(canonical_json(forged))).decode()
    site.ledger.write_bytes(canonical_json(forged) + b"\n")
    problems = verify_ledger(site.ledger, key.public_key())
    assert any("a recovery carries spend field(s) steps" in p for p in problems), problems
    audit = audit_ledger(site.ledger, {public_key_id(key.public_key()): key.public_key()})
    assert audit.status == "malformed" and "spend field(s) steps" in audit.reason


def test_a_head_with_a_trailing_newline_is_no_head(site: Site) -> None:
    """`$` matched before a final newline: "<lines>:<sha256>\\n" (or with another script's
    digits) is refused wherever a head is read, as the coordinator's, an anchor's or a
    recovery's."""
    ledger = site.open()
    site.spend(ledger, 1)
    good = ledger_head(ledger)
    assert head_is_valid(good) and parse_head(good)[0] == 1
    for bad in (good + "\n", "\n" + good, good + " ", "\u0661" + good[1:]):
        assert not head_is_valid(bad)
        with pytest.raises(ValueError, match="is not <lines>:<sha256 hex>"):
            parse_head(bad)
    plan = dict(server_round=1, run_id="r", planned_rounds=1, local_steps=1, batch_size=1)
    with pytest.raises(ProtocolError, match="ledger_head must be"):
        RoundConfig(**plan, lr=0.1, seed=0, ledger_head=good + "\n")  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="previous head"):
        ledger.append_recovery(site_id=SITE, reason="r", found="f", previous_head=good + "\n")
    with pytest.raises(LedgerError, match="--acknowledged"):
        recover_ledger(site.ledger, site.key, site_id=SITE, reason="x", acknowledged=good + "\n")
    raw = json.loads(site.anchor.read_text())
    raw["head_hash"] += "\n"  # refused as no anchor, before its signature is looked at
    site.anchor.write_bytes(canonical_json(raw) + b"\n")
    assert "is not a fedrad anchor file" in _refused(site)


def test_the_audit_finds_a_signed_recovery_whose_previous_head_ends_in_a_newline(
    site: Site,
) -> None:
    ledger = site.open()
    entry = ledger.append_recovery(site_id=SITE, reason="r", found="f", previous_head="none")
    forged = {k: v for k, v in entry.items() if k != "signature"}
    forged["previous_head"] = f"0:{GENESIS_HASH}\n"
    key = load_or_create_signing_key(site.key)
    forged["signature"] = base64.b64encode(key.sign(canonical_json(forged))).decode()
    site.ledger.write_bytes(canonical_json(forged) + b"\n")
    audit = audit_ledger(site.ledger, {public_key_id(key.public_key()): key.public_key()})
    assert audit.status == "malformed" and "invalid previous_head" in audit.reason
