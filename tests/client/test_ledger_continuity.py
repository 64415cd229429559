"""A site whose ledger was lost, cut short or replaced refuses to train, to record, to report
its budget and to start, in one line; its privacy officer's `fedrad-site ledger recover` puts
the loss on record and the site goes on from what its ledger holds."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app as site_cli
from fedrad.client.federation import site_agent
from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    open_ledger,
    train_site,
    trainable_arrays,
)
from fedrad.client.site.config import (
    SiteConfig,
    SiteConfigError,
    load_site_config,
    site_budget,
)
from fedrad.client.site.policy import record_refusal
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key, verify_ledger
from fedrad.common.privacy.ledger_anchor import (
    LedgerContinuityError,
    default_anchor_path,
    ledger_head,
    open_site_ledger,
)
from tests.fl_fixtures import micro_foundation, micro_site, round_config

ROUND = dict(
    sample_rate=0.1,
    noise_multiplier=1.2,
    steps=20,
    max_grad_norm=1.0,
    delta=1e-5,
    accountant="rdp",
)
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("fresh_site_process")


def _spec(tmp_path: Path) -> SiteSpec:
    return SiteSpec(
        site_id="site_a",
        foundation_dir=tmp_path / "foundation",
        ledger_path=tmp_path / "site_a" / "ledger.jsonl",
        key_path=tmp_path / "site_a" / "keys" / "ledger_key.pem",
        manifest=tmp_path / "manifest.json",
    )


def _spend(ledger: Ledger, site_id: str, rounds: int) -> None:
    for round_no in range(1, rounds + 1):
        ledger.append(site_id=site_id, run_id="r1", round=round_no, **ROUND)  # type: ignore[arg-type]


def _roll_back(path: Path, keep: int) -> None:
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:keep]))


def test_open_ledger_refuses_a_rolled_back_ledger_as_a_site_refusal(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plan = round_config()
    ledger = open_ledger(spec, plan)
    _spend(ledger, "site_a", 3)
    head = ledger_head(ledger)
    assert ledger_head(open_ledger(spec, dataclasses.replace(plan, ledger_head=head))) == head
    _roll_back(spec.ledger_path, 2)
    with pytest.raises(LedgerContinuityError) as direct:
        open_site_ledger(spec.ledger_path, spec.key_path, site_id="site_a")
    with pytest.raises(SiteRefusalError) as refused:
        open_ledger(spec, plan)
    assert str(refused.value) == str(direct.value)  # the message, unchanged
    assert "the ledger has 2 entries, its anchor records 3" in str(refused.value)
    assert "fedrad-site ledger recover" in str(refused.value)


def test_open_ledger_refuses_a_ledger_behind_the_coordinator_head(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    ledger = open_ledger(spec, round_config())
    _spend(ledger, "site_a", 2)
    saved = spec.ledger_path.read_bytes(), default_anchor_path(spec.key_path).read_bytes()
    _spend(ledger, "site_a", 1)
    acknowledged = ledger_head(ledger)
    spec.ledger_path.write_bytes(saved[0])
    default_anchor_path(spec.key_path).write_bytes(saved[1])  # both files rolled back
    open_ledger(spec, round_config())  # without the coordinator's copy, nothing shows
    with pytest.raises(SiteRefusalError, match=r"the coordinator acknowledged entry 3 .*has 2"):
        open_ledger(spec, round_config(ledger_head=acknowledged))


def test_train_site_refuses_a_rolled_back_ledger_before_spending(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path, "site_a", foundation)
    start = trainable_arrays(site_agent.cached_model(foundation))
    train_site(spec, start, round_config(planned_rounds=2))
    _roll_back(spec.ledger_path, 0)  # the ledger truncated to nothing: a reset budget
    with pytest.raises(SiteRefusalError, match="ledger continuity: the ledger has 0 entries"):
        train_site(spec, start, round_config(planned_rounds=2, server_round=2))
    assert spec.ledger_path.read_bytes() == b""  # nothing spent, nothing recorded


def test_a_refusal_is_not_recorded_in_a_discontinuous_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = _spec(tmp_path)
    _spend(open_ledger(spec, round_config()), "site_a", 2)
    _roll_back(spec.ledger_path, 1)
    before = spec.ledger_path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fedrad.client.site.policy"):
        assert record_refusal(spec, "run", 1, "site policy: no") is None  # no second error
    assert any(
        "could not record the refusal" in r.getMessage() and "ledger continuity" in r.getMessage()
        for r in caplog.records
    )
    assert spec.ledger_path.read_bytes() == before


# -- the site's own commands -------------------------------------------------------------------


def _site(tmp_path: Path, *args: str) -> tuple[Path, SiteConfig]:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    made = runner.invoke(
        site_cli,
        ["init", str(tmp_path / "site"), "--site-id", "st_anna", "--data-dir", str(data), *args],
    )
    assert made.exit_code == 0, made.output
    config_path = tmp_path / "site" / "site.toml"
    return config_path, load_site_config(config_path)


def test_init_writes_the_anchor_beside_the_key_or_where_site_toml_says(tmp_path: Path) -> None:
    _, config = _site(tmp_path / "a")
    assert config.ledger_anchor is None
    assert config.ledger_anchor_path == config.ledger_key.with_name("ledger_key.anchor.json")
    assert config.ledger_anchor_path.is_file() and config.ledger.read_bytes() == b""
    elsewhere = tmp_path / "b" / "safe" / "anchor.json"
    _, moved = _site(tmp_path / "b", "--ledger-anchor", str(elsewhere))
    assert moved.ledger_anchor == elsewhere.resolve() and elsewhere.is_file()
    assert not default_anchor_path(moved.ledger_key).exists()
    spec = SiteSpec.from_site_config(moved, tmp_path / "foundation")
    assert spec.ledger_anchor == moved.ledger_anchor
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "site.toml").write_text(
        "[site]\nsite_id='a'\ndata_dir='d'\nepsilon=1.0\ndelta=1e-5\nledger_anchor='anchor.json'\n"
    )
    assert load_site_config(tmp_path / "c" / "site.toml").ledger_anchor == (
        tmp_path / "c" / "anchor.json"
    )
    (tmp_path / "c" / "site.toml").write_text(
        "[site]\nsite_id='a'\ndata_dir='d'\nepsilon=1.0\ndelta=1e-5\nledger_anchor='ledger.jsonl'\n"
    )
    with pytest.raises(SiteConfigError, match="ledger_anchor must be a file of its own"):
        load_site_config(tmp_path / "c" / "site.toml")


def test_budget_and_start_report_a_truncated_ledger(tmp_path: Path) -> None:
    config_path, config = _site(tmp_path)
    ledger = open_site_ledger(
        config.ledger, config.ledger_key, config.ledger_anchor_path, site_id="st_anna"
    )
    _spend(ledger, "st_anna", 2)
    _roll_back(config.ledger, 1)
    with pytest.raises(LedgerContinuityError, match="its anchor records 2"):
        site_budget(config)
    shown = runner.invoke(site_cli, ["budget", "--config", str(config_path)])
    assert shown.exit_code == 2
    assert shown.stderr.strip().splitlines() == [
        "error: ledger continuity: the ledger has 1 entry, its anchor records 2 (truncated, or "
        "replaced by an older copy); the site's privacy officer records the loss with "
        "`fedrad-site ledger recover`"
    ]


def test_recover_shows_asks_records_and_the_site_goes_on(tmp_path: Path) -> None:
    config_path, config = _site(tmp_path)
    ledger = open_site_ledger(
        config.ledger, config.ledger_key, config.ledger_anchor_path, site_id="st_anna"
    )
    _spend(ledger, "st_anna", 3)
    _roll_back(config.ledger, 2)
    truncated = config.ledger.read_bytes()
    args = ["ledger", "recover", "--config", str(config_path), "--reason", "restored by IT"]

    declined = runner.invoke(site_cli, args, input="n\n")
    assert declined.exit_code == 1, declined.output
    assert "found:   ledger continuity: the ledger has 2 entries, its anchor records 3" in (
        declined.stdout
    )
    assert "NOT restored" in declined.stdout
    assert config.ledger.read_bytes() == truncated  # nothing written

    done = runner.invoke(site_cli, [*args, "--yes", "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert out["recovered"] is True and out["entry"]["event"] == "recovery"
    assert out["entry"]["reason"] == "restored by IT"
    assert out["found"].startswith("ledger continuity: the ledger has 2 entries")
    assert out["previous_head"].startswith("3:") and out["ledger_head"].startswith("3:")
    public = load_or_create_signing_key(config.ledger_key).public_key()
    assert verify_ledger(config.ledger, public) == []

    status = site_budget(config)  # continuous again
    assert (status["rounds"], status["recoveries"]) == (2, 1)
    assert status["ledger_head"] == out["ledger_head"]
    text = runner.invoke(site_cli, ["budget", "--config", str(config_path)])
    assert text.exit_code == 0 and "1 ledger recoveries on record" in text.output

    again = runner.invoke(site_cli, [*args, "--yes"])
    assert again.exit_code == 0 and "nothing to recover" in again.stdout


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--reason", "two\nlines"], "--reason: the reason must be one printable line"),
        (["--reason", "x", "--acknowledged", "3:nothex"], "--acknowledged:"),
    ],
)
def test_recover_bad_input_is_one_line(tmp_path: Path, extra: list[str], words: str) -> None:
    config_path, _ = _site(tmp_path)
    result = runner.invoke(site_cli, ["ledger", "recover", "--config", str(config_path), *extra])
    assert result.exit_code == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_recover_refuses_a_ledger_that_does_not_verify(tmp_path: Path) -> None:
    config_path, config = _site(tmp_path)
    config.ledger.write_bytes(b'{"torn')
    result = runner.invoke(
        site_cli, ["ledger", "recover", "--config", str(config_path), "--reason", "x", "--yes"]
    )
    assert result.exit_code == 2 and "move this one aside" in result.stderr
    assert config.ledger.read_bytes() == b'{"torn'
