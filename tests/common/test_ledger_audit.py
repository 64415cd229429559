"""The audit: independent recomputation, and one status with a reason for every kind of damage.

Ledgers are written by the site's own `Ledger`; the audit must recompute their epsilons with a
different library, catch every edit, and never rewrite a file."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrad.common.audit.ledger_audit import (
    IndependentAccountant,
    audit_ledger,
    claim_is_supported,
    epsilon_of,
    public_key_id,
    read_public_key,
    with_budget,
)
from fedrad.common.privacy.accounting import MechanismStep, cumulative_epsilon
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key, public_key_path
from fedrad.simulations.audit_cli import ledger_app, main

ROUND = {
    "sample_rate": 0.2,
    "noise_multiplier": 1.1,
    "steps": 10,
    "max_grad_norm": 1.0,
    "delta": 1e-5,
    "accountant": "rdp",
}


def _ledger(root: Path, rounds: int = 4, site: str = "site_a", **over: object) -> Path:
    key = load_or_create_signing_key(root / "ledger_key.pem")
    ledger = Ledger(root / "ledger.jsonl", key)
    for r in range(1, rounds + 1):
        ledger.append(site_id=site, run_id="run-1", round=r, **{**ROUND, **over})  # type: ignore[arg-type]
    return root / "ledger.jsonl"


def _keys(root: Path) -> dict:
    key = read_public_key(public_key_path(root / "ledger_key.pem"))
    return {public_key_id(key): key}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


# -- the accountant, against published values and a second library ---------------------------


def test_rdp_curve_reproduces_abadi_et_al_moments_accountant() -> None:
    """Abadi et al. 2016, section 3.1: q=0.01, sigma=4, T=10,000, delta=1e-5 gives epsilon
    about 1.26 with the moments accountant (the classic conversion min_a rdp(a) +
    log(1/delta)/(a-1)). The audit's RDP curve must give that; its own conversion is tighter."""
    acct = IndependentAccountant()
    acct.compose(sample_rate=0.01, noise_multiplier=4.0, steps=10_000)
    orders, curve = acct._rdp._orders, acct._rdp._rdp  # the curve itself
    classic = float(np.min(curve + math.log(1 / 1e-5) / (orders - 1)))
    assert classic == pytest.approx(1.26, rel=0.01)
    rdp_eps, pld_eps = epsilon_of([(4.0, 0.01, 10_000)], delta=1e-5)
    assert rdp_eps < classic and pld_eps is not None and pld_eps < rdp_eps


MODERATE = [  # (q, sigma, steps) with epsilon from 0.1 to about 15 at delta 1e-5
    (0.004, 0.8, 1000),
    (0.004, 1.1, 50),
    (0.05, 0.8, 50),
    (0.05, 1.1, 1000),
    (0.05, 2.0, 1000),
    (0.2, 1.1, 50),
    (0.2, 2.0, 50),
    (0.5, 2.0, 50),
]
EXTREME = [(0.2, 0.8, 1000), (0.5, 0.8, 50), (0.5, 1.1, 1000), (0.2, 2.0, 1000)]


@pytest.mark.parametrize(("q", "sigma", "steps"), MODERATE)
def test_rdp_agrees_with_opacus_within_one_percent(q: float, sigma: float, steps: int) -> None:
    ours, _ = epsilon_of([(sigma, q, steps)], delta=1e-5)
    opacus = cumulative_epsilon([MechanismStep(sigma, q, steps)], delta=1e-5, accountant="rdp")
    assert ours == pytest.approx(opacus, rel=0.01)


@pytest.mark.parametrize(("q", "sigma", "steps"), EXTREME)
def test_at_extreme_epsilon_honest_claims_stay_within_the_bounds(
    q: float, sigma: float, steps: int
) -> None:
    """Where dp_accounting drops small RDP orders its bound is looser than Opacus': an honest
    Opacus claim must still be accepted, and it must not be below the tight bound."""
    rdp_eps, pld_eps = epsilon_of([(sigma, q, steps)], delta=1e-5)
    opacus = cumulative_epsilon([MechanismStep(sigma, q, steps)], delta=1e-5, accountant="rdp")
    assert pld_eps is not None and pld_eps <= opacus <= rdp_eps * 1.0001
    assert claim_is_supported(opacus, rdp_eps, pld_eps)
    assert not claim_is_supported(pld_eps * 0.9, rdp_eps, pld_eps)
    assert not claim_is_supported(rdp_eps * 1.05, rdp_eps, pld_eps)


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(0.01, 1.0, 1000), (0.2, 1.1, 40), (0.05, 0.8, 300), (0.5, 2.0, 20)]
)
def test_pld_agrees_with_opacus_prv_within_one_percent(q: float, sigma: float, steps: int) -> None:
    _, ours = epsilon_of([(sigma, q, steps)], delta=1e-5)
    prv = cumulative_epsilon([MechanismStep(sigma, q, steps)], delta=1e-5, accountant="prv")
    assert ours == pytest.approx(prv, rel=0.01)


def test_composition_over_heterogeneous_rounds_matches_opacus() -> None:
    history = [(1.1, 0.2, 10), (0.9, 0.25, 5), (1.4, 0.1, 30)]
    ours, _ = epsilon_of(history, delta=1e-5)
    steps = [MechanismStep(s, q, t) for s, q, t in history]
    assert ours == pytest.approx(cumulative_epsilon(steps, delta=1e-5), rel=0.01)


def test_no_noise_is_unbounded_and_no_steps_is_free() -> None:
    assert epsilon_of([(1.0, 0.1, 10), (0.0, 0.1, 1)], delta=1e-5) == (math.inf, math.inf)
    assert epsilon_of([(1.0, 0.1, 0)], delta=1e-5) == (0.0, 0.0)


# -- statuses --------------------------------------------------------------------------------


def test_an_intact_ledger_is_ok_with_both_recomputations(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    result = audit_ledger(path, _keys(tmp_path), budget=10.0)
    assert result.status == "ok", result.reason
    assert result.entries == 4 and result.site_id == "site_a"
    claimed = json.loads(_lines(path)[-1])["epsilon"]
    assert result.claimed_epsilon == claimed
    assert result.recomputed_rdp == pytest.approx(claimed, rel=0.01)
    assert result.recomputed_pld is not None and result.recomputed_pld < result.recomputed_rdp
    assert result.head_hash == hashlib.sha256(_lines(path)[-1].rstrip("\n").encode()).hexdigest()


def test_a_round_without_noise_verifies_as_unbounded(tmp_path: Path) -> None:
    path = _ledger(tmp_path, rounds=2, noise_multiplier=0.0)
    result = audit_ledger(path, _keys(tmp_path))
    assert result.status == "ok" and result.unbounded
    assert result.to_dict()["recomputed_rdp"] is None
    assert audit_ledger(path, _keys(tmp_path), budget=100.0).status == "over budget"


def _damaged(tmp_path: Path, damage: str) -> Path:
    path = _ledger(tmp_path)
    lines = _lines(path)
    if damage == "empty":
        path.write_text("")
    elif damage == "not json":
        lines[1] = "this is not json\n"
        path.write_text("".join(lines))
    elif damage == "torn":
        path.write_text("".join(lines) + lines[0][:40])
    elif damage == "reordered":
        lines[1], lines[2] = lines[2], lines[1]
        path.write_text("".join(lines))
    elif damage == "deleted middle":
        del lines[1]
        path.write_text("".join(lines))
    elif damage == "deleted first":
        del lines[0]
        path.write_text("".join(lines))
    elif damage in ("edited steps", "edited epsilon"):
        entry = json.loads(lines[2])
        if damage == "edited steps":
            entry["steps"] = 1
        else:
            entry["epsilon"] = entry["epsilon"] / 2
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        path.write_text("".join(lines))
    elif damage == "missing field":
        entry = json.loads(lines[0])
        del entry["noise_multiplier"]
        lines[0] = json.dumps(entry) + "\n"
        path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    ("damage", "status", "words"),
    [
        ("empty", "empty", "no complete entries"),
        ("not json", "malformed", "line 2: not valid JSON"),
        ("missing field", "malformed", "line 1: missing noise_multiplier"),
        ("torn", "torn", "line 5: incomplete last line"),
        ("reordered", "broken chain", "line 2: prev_hash"),
        ("deleted middle", "broken chain", "line 2: prev_hash"),
        ("deleted first", "broken chain", "lines before it were removed"),
        ("edited steps", "tampered", "line 3: signature does not verify"),
        ("edited epsilon", "tampered", "line 3: signature does not verify"),
    ],
)
def test_each_damage_has_its_own_status_and_reason(
    tmp_path: Path, damage: str, status: str, words: str
) -> None:
    path = _damaged(tmp_path, damage)
    before = path.read_bytes()
    result = audit_ledger(path, _keys(tmp_path))
    assert (result.status, damage) == (status, damage)
    assert words in result.reason
    assert "\n" not in result.reason
    assert path.read_bytes() == before  # the audit never writes


def test_edits_are_caught_by_recomputation_even_without_a_key(tmp_path: Path) -> None:
    path = _damaged(tmp_path, "edited steps")
    result = audit_ledger(path, {})
    assert result.status == "tampered"
    assert "line 3: epsilon recorded" in result.reason and "recomputed" in result.reason


def test_an_intact_ledger_without_a_key_is_unverifiable(tmp_path: Path) -> None:
    result = audit_ledger(_ledger(tmp_path), {})
    assert result.status == "unverifiable" and "no public key" in result.reason


def test_a_wrong_public_key_is_unverifiable_not_tampered(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "a")
    _ledger(tmp_path / "b", site="site_b")
    result = audit_ledger(path, _keys(tmp_path / "b"))
    assert result.status == "unverifiable"
    assert "not by the public key given" in result.reason


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert audit_ledger(tmp_path / "nope.jsonl", {}).status == "missing"
    assert audit_ledger(tmp_path, {}).status == "missing"


def test_budget_smaller_than_spent_is_over_budget(tmp_path: Path) -> None:
    path = _ledger(tmp_path)
    result = audit_ledger(path, _keys(tmp_path), budget=0.5)
    assert result.status == "over budget"
    assert "> budget 0.5" in result.reason


@pytest.mark.parametrize("budget", [0.5, 100.0, None])
def test_judging_a_finished_audit_against_a_budget_equals_auditing_with_it(
    tmp_path: Path, budget: float | None
) -> None:
    path = _ledger(tmp_path)
    direct = audit_ledger(path, _keys(tmp_path), budget=budget)
    later = with_budget(audit_ledger(path, _keys(tmp_path)), budget)
    assert later.to_dict() == direct.to_dict()


def test_a_truncated_tail_is_caught_against_an_earlier_audit(tmp_path: Path) -> None:
    from fedrad.common.audit.ledger_audit import Anchor

    path = _ledger(tmp_path)
    earlier = audit_ledger(path, _keys(tmp_path))
    assert earlier.head_hash is not None
    anchor = Anchor(earlier.entries, earlier.head_hash)
    path.write_text("".join(_lines(path)[:-1]))  # the last entry removed: the chain still holds
    assert audit_ledger(path, _keys(tmp_path)).status == "ok"
    rolled = audit_ledger(path, _keys(tmp_path), anchor=anchor)
    assert rolled.status == "broken chain" and "rolled back" in rolled.reason


def test_a_signed_but_wrong_claim_is_tampered(tmp_path: Path) -> None:
    """A site whose software (or whose stolen key) signs an understated epsilon."""
    from fedrad.common.privacy.ledger import GENESIS_HASH, _sign, canonical_json, line_hash

    key = load_or_create_signing_key(tmp_path / "ledger_key.pem")
    entry = {
        "site_id": "site_a",
        "run_id": "r",
        "round": 1,
        "mechanism": "subsampled_gaussian",
        **ROUND,
        "epsilon": 0.01,
        "timestamp": "2026-01-01T00:00:00.000+00:00",
        "key_id": public_key_id(key.public_key()),
        "prev_hash": GENESIS_HASH,
    }
    entry["signature"] = _sign(entry, key)
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(canonical_json(entry) + b"\n")
    assert line_hash(canonical_json(entry))
    result = audit_ledger(path, _keys(tmp_path))
    assert result.status == "tampered" and "epsilon recorded 0.01" in result.reason


# -- refusals -------------------------------------------------------------------------------


def _with_refusals(root: Path) -> Path:
    """Four rounds as `_ledger` writes them, with refusals before, between and after."""
    ledger = Ledger(root / "ledger.jsonl", load_or_create_signing_key(root / "ledger_key.pem"))

    def refuse(round_no: int) -> None:
        ledger.append_refusal(
            site_id="site_a", run_id="run-1", round=round_no, reason="site policy: no"
        )

    refuse(0)
    for r in range(1, 5):
        ledger.append(site_id="site_a", run_id="run-1", round=r, **ROUND)  # type: ignore[arg-type]
        if r in (2, 4):
            refuse(r + 1)
    return root / "ledger.jsonl"


def test_refusals_verify_count_and_leave_every_epsilon_as_it_was(tmp_path: Path) -> None:
    plain = audit_ledger(_ledger(tmp_path / "plain"), _keys(tmp_path / "plain"))
    path = _with_refusals(tmp_path / "refusals")
    result = audit_ledger(path, _keys(tmp_path / "refusals"), budget=10.0)
    assert result.status == "ok", result.reason
    assert (result.entries, result.refusals, plain.refusals) == (7, 3, 0)
    assert "3 of them refusals" in result.reason
    assert result.recomputed_rdp == plain.recomputed_rdp
    assert result.recomputed_pld == plain.recomputed_pld
    assert result.claimed_epsilon == plain.claimed_epsilon
    assert result.to_dict()["refusals"] == 3


@pytest.mark.parametrize(
    ("damage", "status", "words"),
    [
        ("edited reason", "tampered", "line 4: signature does not verify"),
        ("deleted refusal", "broken chain", "line 4: prev_hash"),
        ("spend added", "malformed", "line 4: a refusal carries spend field(s) steps"),
        ("unknown event", "malformed", "line 4: unknown event"),
    ],
)
def test_a_damaged_refusal_is_caught(tmp_path: Path, damage: str, status: str, words: str) -> None:
    from fedrad.common.privacy.ledger import _sign

    path = _with_refusals(tmp_path)
    lines = _lines(path)
    refusal = json.loads(lines[3])
    assert refusal["event"] == "refusal"
    if damage == "deleted refusal":
        del lines[3]
    else:
        if damage == "edited reason":
            refusal["reason"] = "site policy: something milder"
        else:
            refusal.pop("signature")
            if damage == "spend added":
                refusal["steps"] = 10  # signed by the site's own key: still no spend allowed
            else:
                refusal["event"] = "approval"
            refusal["signature"] = _sign(
                refusal, load_or_create_signing_key(tmp_path / "ledger_key.pem")
            )
        lines[3] = json.dumps(refusal, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    result = audit_ledger(path, _keys(tmp_path))
    assert (result.status, damage) == (status, damage)
    assert words in result.reason


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_table_json_and_exit_codes(tmp_path: Path) -> None:
    run = tmp_path / "run" / "sites"
    _ledger(run / "site_a")
    _ledger(run / "site_b", site="site_b")
    runner = CliRunner()
    ok = runner.invoke(ledger_app, [str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert "site_a" in ok.output and "site_b" in ok.output and "all 2 ok" in ok.output
    over = runner.invoke(ledger_app, [str(tmp_path / "run"), "--budget", "site_b=0.5", "--json"])
    assert over.exit_code == 1
    payload = json.loads(over.stdout)
    assert payload["status"] == "over budget"
    assert {r["site_id"]: r["status"] for r in payload["ledgers"]} == {
        "site_a": "ok",
        "site_b": "over budget",
    }


def test_cli_previous_audit_detects_rollback(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site")
    runner = CliRunner()
    first = runner.invoke(ledger_app, [str(path), "--json"])
    saved = tmp_path / "audit.json"
    saved.write_text(first.stdout)
    path.write_text("".join(_lines(path)[:-1]))
    again = runner.invoke(ledger_app, [str(path), "--previous", str(saved)])
    assert again.exit_code == 1 and "rolled back" in again.output


@pytest.mark.parametrize(
    "args",
    [["--budget", "-1"], ["--budget", "lots"], ["--public-key", "/no/such.pub"]],
)
def test_cli_bad_options_exit_2_in_one_line(tmp_path: Path, args: list[str]) -> None:
    path = _ledger(tmp_path)
    result = CliRunner().invoke(ledger_app, [str(path), *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.splitlines()) == 1


def test_cli_given_key_must_have_signed(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "a")
    _ledger(tmp_path / "b")
    other = public_key_path(tmp_path / "b" / "ledger_key.pem")
    result = CliRunner().invoke(ledger_app, [str(path), "--public-key", str(other), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ledgers"][0]["status"] == "unverifiable"


def test_main_routes_empirical_and_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["empirical", "--help"])
    assert done.value.code == 0 and "canary" in capsys.readouterr().out.lower()
    path = _ledger(tmp_path)
    with pytest.raises(SystemExit) as done:
        main([str(path)])
    assert done.value.code == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--data", "/no/such/cohort"], "cohort"),
        (["--data", "COHORT", "--site", "site_9"], "site_9"),
        (["--data", "COHORT", "--epsilon", "-1"], "epsilon must be positive"),
        (["--data", "COHORT", "--canaries", "1"], "canaries must be >= 2"),
    ],
)
def test_empirical_cli_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    cohort = tmp_path / "cohort"
    (cohort / "site_1").mkdir(parents=True)
    args = [a.replace("COHORT", str(cohort)) for a in args]
    with pytest.raises(SystemExit) as done:
        main(["empirical", *args])
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1


def _rsa_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x00\xffnot a key at all", "is not a PEM or OpenSSH public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "PEM or OpenSSH"),
        (b"ssh-dss AAAAB3NzaC1kc3MAAACBAP== x", "is not a PEM or OpenSSH public key"),
        (None, "is not an Ed25519 public key"),
    ],
)
def test_a_public_key_file_that_is_no_ed25519_key_is_one_line(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    key = tmp_path / "key.pub"
    key.write_bytes(_rsa_public_pem() if content is None else content)
    with pytest.raises(ValueError, match=reason):
        read_public_key(key)
    result = CliRunner().invoke(ledger_app, [str(_ledger(tmp_path)), "--public-key", str(key)])
    assert result.exit_code == 2, result.output
    assert reason in result.output and "Traceback" not in result.output


def test_an_editor_re_save_is_read_past_but_an_edit_under_it_is_not(tmp_path: Path) -> None:
    """CRLF endings, a byte-order mark and blank lines change no entry byte: still ok, said."""
    path = _ledger(tmp_path)
    lines = _lines(path)
    resaved = tmp_path / "resaved.jsonl"
    resaved.write_bytes(
        b"\xef\xbb\xbf"
        + "".join(lines[:2]).replace("\n", "\r\n").encode()
        + b"\r\n"
        + "".join(lines[2:]).replace("\n", "\r\n").encode()
        + b"\r\n\r\n"
    )
    result = audit_ledger(resaved, _keys(tmp_path))
    assert (result.status, result.entries) == ("ok", 4)
    assert result.read_past == ["a byte-order mark", "CRLF line endings", "3 blank lines"]
    assert "read past a byte-order mark, CRLF line endings, 3 blank lines" in result.reason
    assert result.head_hash == audit_ledger(path, _keys(tmp_path)).head_hash
    assert result.recomputed_rdp == audit_ledger(path, _keys(tmp_path)).recomputed_rdp

    # a deleted entry under the same re-save is still a broken chain, named by file line
    del lines[1]
    resaved.write_bytes("\n".join(lines).replace("\n\n", "\n\n\n").replace("\n", "\r\n").encode())
    broken = audit_ledger(resaved, _keys(tmp_path))
    assert broken.status == "broken chain"
    assert broken.reason.startswith("line 4: prev_hash does not match line 1")  # file lines
