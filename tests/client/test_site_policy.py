"""A site's own policy: parsed from site.toml, checked against the coordinator's run plan and
inside each round before any training step, and every refusal on the ledger, spending nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
import stat
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app as site_cli
from fedrad.client.federation import site_agent
from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    train_site,
    trainable_arrays,
)
from fedrad.client.site.config import (
    SiteConfigError,
    add_approved_app,
    init_site,
    load_site_config,
    site_budget,
)
from fedrad.client.site.policy import (
    SitePolicy,
    check_round,
    check_run_plan,
    one_line,
    record_refusal,
)
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key, verify_ledger
from fedrad.common.privacy.ledger_anchor import open_site_ledger
from tests.fl_fixtures import micro_foundation, micro_site, round_config

SITE = "[site]\nsite_id='a'\ndata_dir='d'\nepsilon=8.0\ndelta=1e-5\n"
FAB = "ab" * 32


pytestmark = pytest.mark.usefixtures("fresh_site_process")


def _site(tmp_path: Path, **policy: object) -> Path:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    init_site(tmp_path / "site", site_id="st_anna", data_dir=data, **policy)  # type: ignore[arg-type]
    return tmp_path / "site" / "site.toml"


# -- site.toml [policy] ----------------------------------------------------------------------


def test_a_policy_table_is_read_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        SITE
        + "[policy]\nmax_epsilon_per_run=4\nmax_epsilon_per_round=1.5\nmin_noise_multiplier=0.8\n"
        "require_secagg=true\nstrategies=['fedavg','fedprox','fedavg']\nallow_central_dp=false\n"
        f"approved_apps=['{FAB}']\n"
    )
    config = load_site_config(path)
    assert config.policy == SitePolicy(
        max_epsilon_per_run=4.0,
        max_epsilon_per_round=1.5,
        min_noise_multiplier=0.8,
        require_secagg=True,
        strategies=("fedavg", "fedprox"),
        allow_central_dp=False,
        approved_apps=(FAB,),
    )
    assert config.data_dir == tmp_path / "d"  # relative paths as before
    spec = SiteSpec.from_site_config(config, tmp_path / "foundation")
    assert spec.policy == config.policy
    path.write_text(SITE)
    assert load_site_config(path).policy == SitePolicy() and SitePolicy().permissive


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("budget=2\n", "unknown [policy] key(s) budget"),
        ("max_epsilon_per_run='4'\n", "max_epsilon_per_run has the wrong type"),
        ("require_secagg=1\n", "require_secagg has the wrong type"),
        ("min_noise_multiplier=true\n", "min_noise_multiplier has the wrong type"),
        ("strategies='fedavg'\n", "strategies has the wrong type"),
        ("strategies=[1]\n", "must be a list of strings"),
        ("strategies=[]\n", "strategies is empty"),
        ("strategies=['fedsgd']\n", "fedsgd not among fedavg, fedprox, fedadam"),
        ("max_epsilon_per_round=0\n", "must be positive and finite"),
        ("max_epsilon_per_run=inf\n", "must be positive and finite"),
        (f"approved_apps=['{FAB[:-1]}']\n", "not a lowercase SHA-256"),
        (f"approved_apps=['{FAB.upper()}']\n", "not a lowercase SHA-256"),
        (f'approved_apps=["{FAB}\\n"]\n', "not a lowercase SHA-256"),  # `$` took a final newline
    ],
)
def test_a_bad_policy_is_refused_in_one_line(tmp_path: Path, policy: str, words: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE + "[policy]\n" + policy)
    with pytest.raises(SiteConfigError) as info:
        load_site_config(path)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [("policy=3\n" + SITE, "must be a [policy] table"), (SITE + "[other]\nx=1\n", "unknown table")],
)
def test_tables_other_than_site_and_policy_are_refused(
    tmp_path: Path, text: str, words: str
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(SiteConfigError, match=None) as info:
        load_site_config(path)
    assert words in str(info.value)


def test_init_writes_a_policy_only_when_given(tmp_path: Path) -> None:
    plain = _site(tmp_path / "plain")
    assert "[policy]" not in plain.read_text()
    path = _site(
        tmp_path / "strict",
        max_epsilon_per_run=4.0,
        min_noise_multiplier=1.0,
        require_secagg=True,
        strategies=["fedavg"],
    )
    assert tomllib.loads(path.read_text())["policy"] == {
        "max_epsilon_per_run": 4.0,
        "min_noise_multiplier": 1.0,
        "require_secagg": True,
        "strategies": ["fedavg"],
    }
    assert load_site_config(path).policy.strategies == ("fedavg",)
    with pytest.raises(SiteConfigError, match="positive and finite"):
        _site(tmp_path / "bad", max_epsilon_per_round=-1.0)
    assert not (tmp_path / "bad" / "site").exists()  # refused before any key is made


def test_init_cli_takes_the_policy_options(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    args = ["init", str(tmp_path / "site"), "--site-id", "a", "--data-dir", str(tmp_path / "data")]
    policy = ["--max-epsilon-per-run", "4", "--max-epsilon-per-round", "2", "--min-noise", "0.9"]
    policy += ["--require-secagg", "--strategy", "fedavg", "--strategy", "fedprox", "--json"]
    made = CliRunner().invoke(site_cli, args + policy)
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["policy"]["strategies"] == ["fedavg", "fedprox"]
    assert load_site_config(tmp_path / "site" / "site.toml").policy == SitePolicy(
        max_epsilon_per_run=4.0,
        max_epsilon_per_round=2.0,
        min_noise_multiplier=0.9,
        require_secagg=True,
        strategies=("fedavg", "fedprox"),
    )
    bad = CliRunner().invoke(site_cli, [args[0], str(tmp_path / "b"), *args[2:], "--strategy", "x"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_an_approved_app_is_added_once_and_the_file_stays_valid(tmp_path: Path) -> None:
    path = _site(tmp_path, max_epsilon_per_run=4.0)
    path.chmod(0o640)
    header = path.read_text().splitlines()[0]
    assert add_approved_app(path, FAB) is True
    assert add_approved_app(path, FAB.upper()) is False  # the same digest, already there
    other = "0" * 64
    assert add_approved_app(path, f"  {other}\n") is True
    config = load_site_config(path)
    assert config.policy.approved_apps == (FAB, other)
    assert config.policy.max_epsilon_per_run == 4.0  # the rest of the policy kept
    assert path.read_text().splitlines()[0] == header.strip() and header.startswith("#")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []
    before = path.read_bytes()
    with pytest.raises(SiteConfigError, match="not a SHA-256"):
        add_approved_app(path, "not-a-digest")
    assert path.read_bytes() == before


def test_an_approved_app_starts_a_policy_table_when_there_is_none(tmp_path: Path) -> None:
    path = _site(tmp_path)
    assert add_approved_app(path, FAB)
    assert load_site_config(path).policy == SitePolicy(approved_apps=(FAB,))


# -- the run plan ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "run_config", "words"),
    [
        (
            SitePolicy(max_epsilon_per_run=4),
            {"epsilon": 12.0},
            "the run's epsilon 12 is above this site's max_epsilon_per_run 4",
        ),
        (SitePolicy(max_epsilon_per_run=4), {}, "the run's epsilon 8 is above"),  # the default
        (
            SitePolicy(require_secagg=True),
            {"secagg": False},
            "this site requires SecAgg+ and the run has secagg = false",
        ),
        (SitePolicy(require_secagg=True), {}, "requires SecAgg+"),
        (
            SitePolicy(strategies=("fedavg", "fedprox")),
            {"strategy": "fedadam"},
            "strategy fedadam is not one this site takes part in (fedavg, fedprox)",
        ),
        (SitePolicy(strategies=("fedprox",)), {}, "strategy fedavg is not one"),
        (SitePolicy(strategies=("fedprox",)), {"strategy": "../etc/x"}, "strategy (unnamed)"),
        (SitePolicy(strategies=("fedprox",)), {"strategy": "fedavg\n"}, "strategy (unnamed)"),
        (SitePolicy(min_noise_multiplier=1), {"dp": False}, "dp = false"),
        (
            SitePolicy(allow_central_dp=False),
            {"central-noise": 0.5},
            "central DP noise and this site's allow_central_dp is false",
        ),
        (SitePolicy(max_epsilon_per_run=4), {"epsilon": "4"}, "epsilon is not a number"),
        (SitePolicy(require_secagg=True), {"secagg": "true"}, "secagg is not true or false"),
    ],
)
def test_a_run_outside_the_policy_is_refused_in_one_line(
    policy: SitePolicy, run_config: dict, words: str
) -> None:
    reason = check_run_plan(policy, run_config)
    assert reason is not None and reason.startswith("site policy: ") and "\n" not in reason
    assert words in reason


@pytest.mark.parametrize(
    ("policy", "run_config"),
    [
        (SitePolicy(), {"epsilon": 1e6, "dp": False, "strategy": "fedadam"}),
        (SitePolicy(max_epsilon_per_run=8), {}),
        (SitePolicy(max_epsilon_per_run=4), {"epsilon": 4}),
        (
            SitePolicy(require_secagg=True, strategies=("fedprox",)),
            {"secagg": True, "strategy": "fedprox"},
        ),
        (SitePolicy(allow_central_dp=False), {"central-noise": 0}),
        (SitePolicy(allow_central_dp=True), {"central-noise": 0.8}),
    ],
)
def test_a_run_inside_the_policy_is_taken(policy: SitePolicy, run_config: dict) -> None:
    assert check_run_plan(policy, run_config) is None


def test_round_rules_in_their_order() -> None:
    strict = SitePolicy(max_epsilon_per_run=4, max_epsilon_per_round=1, min_noise_multiplier=0.8)
    ok = dict(noise_multiplier=1.0, round_epsilon=0.5, run_epsilon=3.0)
    assert check_round(strict, **ok) is None  # type: ignore[arg-type]
    assert check_round(SitePolicy(), noise_multiplier=None, round_epsilon=0, run_epsilon=0) is None
    cases = [
        ({"noise_multiplier": None}, "no DP-SGD"),
        (
            {"noise_multiplier": 0.5},
            "noise multiplier 0.5 is below this site's min_noise_multiplier 0.8",
        ),
        (
            {"round_epsilon": 1.5},
            "this round's epsilon 1.5 is above this site's max_epsilon_per_round 1",
        ),
        (
            {"run_epsilon": 4.5},
            "this run's epsilon would reach 4.5, above this site's max_epsilon_per_run 4",
        ),
    ]
    for change, words in cases:
        reason = check_round(strict, **{**ok, **change})  # type: ignore[arg-type]
        assert reason is not None and words in reason, (change, reason)


# -- refusals on record ----------------------------------------------------------------------


def test_a_refusal_is_logged_and_recorded_spending_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_site_config(_site(tmp_path, require_secagg=True))
    reason = check_run_plan(config.policy, {"secagg": False})
    assert reason is not None
    with caplog.at_level(logging.WARNING, logger="fedrad.client.site.policy"):
        entry = record_refusal(config, "run-7", 0, reason + "\n  and more")
    assert entry is not None and entry["reason"] == reason + " and more"
    assert [r.getMessage() for r in caplog.records] == [
        f"site st_anna refused run run-7 round 0: {reason} and more"
    ]
    ledger = Ledger(config.ledger, load_or_create_signing_key(config.ledger_key))
    assert ledger.entries() == [] and ledger.history() == []
    assert [r["run_id"] for r in ledger.refusals()] == ["run-7"]
    status = site_budget(config)
    assert (status["refusals"], status["rounds"], status["spent_epsilon"]) == (1, 0, 0.0)
    budget = CliRunner().invoke(
        site_cli, ["budget", "--config", str(tmp_path / "site" / "site.toml")]
    )
    assert budget.exit_code == 0 and "1 refused" in budget.output
    assert one_line("x" * 400).endswith("...") and len(one_line("x" * 400)) == 300


def test_a_refusal_that_cannot_be_recorded_still_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_site_config(_site(tmp_path))
    config.ledger.write_bytes(b'{"torn')  # an interrupted write: the ledger refuses appends
    with caplog.at_level(logging.WARNING, logger="fedrad.client.site.policy"):
        assert record_refusal(config, "run", 1, "site policy: no") is None
    assert any("could not record" in r.getMessage() for r in caplog.records)
    assert config.ledger.read_bytes() == b'{"torn'


# -- inside a round, before any training step ------------------------------------------------


def _refused_round(
    tmp_path: Path, policy: SitePolicy, words: str, **plan: object
) -> tuple[SiteSpec, Ledger]:
    foundation = micro_foundation(tmp_path)
    spec = dataclasses.replace(micro_site(tmp_path, "site_a", foundation), policy=policy)
    start = trainable_arrays(site_agent.cached_model(foundation))
    with pytest.raises(SiteRefusalError, match=None) as info:
        train_site(spec, start, round_config(**plan))
    assert str(info.value).startswith("site policy: ") and words in str(info.value)
    ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    (refusal,) = ledger.refusals()
    assert refusal["reason"] == str(info.value) and refusal["round"] == plan.get("server_round", 1)
    return spec, ledger


def test_a_round_below_the_noise_floor_is_refused_before_training(tmp_path: Path) -> None:
    _, ledger = _refused_round(
        tmp_path,
        SitePolicy(min_noise_multiplier=5.0),
        "min_noise_multiplier 5",
        target_epsilon=50.0,
    )
    assert ledger.entries() == [] and ledger.spent(1e-5) == 0.0


def test_a_round_above_the_per_round_epsilon_is_refused_before_training(tmp_path: Path) -> None:
    _, ledger = _refused_round(
        tmp_path, SitePolicy(max_epsilon_per_round=0.05), "max_epsilon_per_round 0.05"
    )
    assert ledger.entries() == [] and ledger.spent(1e-5) == 0.0


def test_a_round_without_dp_is_refused_under_a_privacy_policy(tmp_path: Path) -> None:
    _, ledger = _refused_round(tmp_path, SitePolicy(max_epsilon_per_run=4.0), "no DP-SGD", dp=False)
    assert ledger.entries() == []


def test_a_run_past_its_per_run_epsilon_is_refused_before_training(tmp_path: Path) -> None:
    ledger = open_site_ledger(  # as the site agent opens it: with its anchor
        tmp_path / "site_a" / "ledger.jsonl",
        tmp_path / "site_a" / "ledger_key.pem",
        site_id="site_a",
    )
    ledger.append(  # round 1 of this run already spent more than the policy now allows
        site_id="site_a",
        run_id="test-run",
        round=1,
        sample_rate=0.3,
        noise_multiplier=1.0,
        steps=10,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="rdp",
    )
    before, spent = ledger.entries(), ledger.spent(1e-5)
    _, after = _refused_round(
        tmp_path,
        SitePolicy(max_epsilon_per_run=1.0),
        "max_epsilon_per_run 1",
        target_epsilon=1000.0,
        server_round=2,
    )
    assert after.entries() == before and after.spent(1e-5) == spent
    assert (
        verify_ledger(
            after.path,
            load_or_create_signing_key(tmp_path / "site_a" / "ledger_key.pem").public_key(),
        )
        == []
    )


def test_a_per_run_cap_below_the_plan_raises_the_noise_instead(tmp_path: Path) -> None:
    """The plan asks for epsilon 50; the site takes part at its own cap, with more noise."""
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path, "site_a", foundation)
    capped = dataclasses.replace(
        micro_site(tmp_path / "capped", "site_a", foundation),
        policy=SitePolicy(max_epsilon_per_run=1.0),
    )
    start = trainable_arrays(site_agent.cached_model(foundation))
    plan = round_config(planned_rounds=1, target_epsilon=50.0)
    free = train_site(spec, start, plan)
    held = train_site(capped, start, plan)
    assert held.metrics["epsilon"] <= 1.0 * (1 + 1e-6) < free.metrics["epsilon"]
    assert held.metrics["noise_multiplier"] > free.metrics["noise_multiplier"]
    ledger = Ledger(capped.ledger_path, load_or_create_signing_key(capped.key_path))
    assert len(ledger.entries()) == 1 and ledger.refusals() == []
