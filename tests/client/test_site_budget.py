"""The site's own budget: its config and keys, the refusals, and never an overrun."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedrad.client.cli import app as site_cli
from fedrad.client.federation.site_agent import (
    SiteRefusalError,
    SiteSpec,
    cached_model,
    check_round_against_budget,
    clear_caches,
    train_site,
    trainable_arrays,
)
from fedrad.client.site.config import (
    SiteConfigError,
    init_site,
    load_site_config,
    site_budget,
)
from fedrad.common.privacy.accounting import (
    CalibrationError,
    MechanismStep,
    calibrate_noise,
    cumulative_epsilon,
)
from fedrad.common.privacy.ledger import Ledger, load_or_create_signing_key
from tests.fl_fixtures import micro_foundation, micro_site, round_config

# -- never an overrun ------------------------------------------------------------------------

steps_strategy = st.builds(
    MechanismStep,
    noise_multiplier=st.floats(0.5, 5.0),
    sample_rate=st.sampled_from([0.01, 0.05, 0.2, 0.5]),
    steps=st.integers(1, 40),
)


@pytest.mark.slow
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    history=st.lists(steps_strategy, max_size=3),
    budget=st.floats(0.2, 12.0),
    sample_rate=st.sampled_from([0.02, 0.1, 0.25, 0.6]),
    local_steps=st.integers(1, 30),
    rounds=st.integers(1, 3),
    repeats=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_no_schedule_ever_spends_past_the_budget(
    history: list[MechanismStep],
    budget: float,
    sample_rate: float,
    local_steps: int,
    rounds: int,
    repeats: list[bool],
) -> None:
    """Whatever was spent before (other runs), however rounds repeat after crashes: every
    round either fits within the budget or is refused before anything is spent."""
    spent = list(history)
    round_no = 1
    for attempt in range(rounds + 2):
        if round_no > rounds:
            break
        remaining = (rounds - round_no + 1) * local_steps
        try:
            sigma = calibrate_noise(
                spent,
                sample_rate=sample_rate,
                steps=remaining,
                target_epsilon=budget,
                delta=1e-5,
                accountant="rdp",
            )
        except CalibrationError:
            break
        spent.append(MechanismStep(sigma, sample_rate, local_steps))
        after = cumulative_epsilon(spent, delta=1e-5)
        assert after <= budget * (1 + 1e-9), (after, budget)
        if not repeats[attempt % 3]:  # a repeated round (crash before commit) runs again
            round_no += 1
    assert cumulative_epsilon(spent, delta=1e-5) <= max(
        budget, cumulative_epsilon(history, delta=1e-5)
    ) * (1 + 1e-9)


def test_an_exhausted_budget_is_refused_before_training(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = dataclasses.replace(micro_site(tmp_path, "site_a", foundation), epsilon=2.0)
    start = trainable_arrays(cached_model(foundation))
    plan = round_config(planned_rounds=1, target_epsilon=50.0)  # the coordinator asks for more
    update = train_site(spec, start, plan)
    assert update.metrics["epsilon"] <= 2.0 * (1 + 1e-6)  # the site's own cap held
    second = train_site(spec, start, round_config(run_id="another-run", planned_rounds=1))
    assert second.metrics["epsilon"] <= 2.0 * (1 + 1e-6)  # what is left, at more noise
    assert second.metrics["noise_multiplier"] > update.metrics["noise_multiplier"]
    before = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path)).entries()
    lowered = dataclasses.replace(spec, epsilon=1.5)  # the hospital lowers its cap
    with pytest.raises(SiteRefusalError, match="budget exhausted"):
        train_site(lowered, start, round_config(run_id="third-run", planned_rounds=1))
    after = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    assert after.entries() == before  # nothing spent; the refusal is on record
    (refusal,) = after.refusals()
    assert refusal["run_id"] == "third-run" and "budget exhausted" in refusal["reason"]
    clear_caches()


def test_rounds_the_budget_can_never_allow_are_refused() -> None:
    spec = SiteSpec(
        site_id="s",
        foundation_dir=Path("f"),
        ledger_path=Path("l"),
        key_path=Path("k"),
        manifest=Path("m"),
        epsilon=4.0,
        delta=1e-6,
    )
    with pytest.raises(SiteRefusalError, match="without DP"):
        check_round_against_budget(spec, round_config(dp=False))
    with pytest.raises(SiteRefusalError, match="delta 1e-05, above this site's delta budget"):
        check_round_against_budget(spec, round_config(delta=1e-5))
    check_round_against_budget(spec, round_config(delta=1e-7))


def test_a_delta_not_below_one_over_n_is_refused(tmp_path: Path) -> None:
    foundation = micro_foundation(tmp_path)
    spec = micro_site(tmp_path, "site_a", foundation)  # 16 studies, some held out
    start = trainable_arrays(cached_model(foundation))
    with pytest.raises(SiteRefusalError, match="not below 1/N"):
        train_site(spec, start, round_config(delta=0.1))
    ledger = Ledger(spec.ledger_path, load_or_create_signing_key(spec.key_path))
    assert ledger.entries() == [] and ledger.spent(1e-5) == 0.0  # refused on record, nothing spent
    assert [r["reason"] for r in ledger.refusals()] == [
        "delta 0.1 is not below 1/N for this site's 14 training studies"
    ]
    clear_caches()


# -- site config and keys --------------------------------------------------------------------


def test_init_makes_private_keys_and_a_config_it_can_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = init_site(
        tmp_path / "site", site_id="st_anna", data_dir=data, epsilon=3.0, coordinator="fl:9092"
    )
    assert config == load_site_config(tmp_path / "site" / "site.toml")
    assert (config.epsilon, config.delta, config.coordinator) == (3.0, 1e-5, "fl:9092")
    for private in (config.ledger_key, config.node_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    node = load_ssh_private_key(config.node_key.read_bytes(), password=None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert isinstance(
        load_ssh_public_key(config.node_key.with_suffix(".pub").read_bytes()),
        ec.EllipticCurvePublicKey,
    )
    key_before = config.ledger_key.read_bytes()
    with pytest.raises(SiteConfigError, match="already exists"):
        init_site(tmp_path / "site", site_id="st_anna", data_dir=data)
    assert config.ledger_key.read_bytes() == key_before


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[site]\nsite_id='a'\ndata_dir='d'\nepsilon=1.0\n", "missing delta"),
        ("[site]\nsite_id='a'\ndata_dir='d'\nepsilon=1.0\ndelta=1e-5\nbudget=2\n", "unknown key"),
        ("[site]\nsite_id='a'\ndata_dir='d'\nepsilon='x'\ndelta=1e-5\n", "wrong type"),
        ("[site]\nsite_id='a'\ndata_dir='d'\nepsilon=-1.0\ndelta=1e-5\n", "must be positive"),
        ("[site]\nsite_id='a b'\ndata_dir='d'\nepsilon=1.0\ndelta=1e-5\n", "site id"),
        # `$` took a trailing newline (a TOML basic string can hold one)
        ("[site]\nsite_id=\"a\\n\"\ndata_dir='d'\nepsilon=1.0\ndelta=1e-5\n", "site id"),
        (
            "[site]\nsite_id='a'\ndata_dir='d'\nepsilon=1.0\ndelta=1e-5\n"
            'coordinator="fl:9092\\n"\n',
            "is not HOST:PORT",
        ),
        ("[site]\nsite_id='a'\ndata_dir='d'\nepsilon=1.0\ndelta=2.0\n", "delta must be"),
        ("site_id = 'a'\n", "exactly one [site] table"),
        ("[site\n", "not a readable TOML"),
    ],
)
def test_bad_site_configs_are_refused_in_one_line(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(SiteConfigError, match=None) as info:
        load_site_config(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_deployed_site_takes_everything_from_its_site_config(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = init_site(tmp_path / "site", site_id="st_anna", data_dir=data, epsilon=3.0)
    spec = SiteSpec.from_node_config(
        {"site-config": str(tmp_path / "site" / "site.toml"), "foundation-dir": "/f"}
    )
    assert (spec.site_id, spec.epsilon, spec.delta) == ("st_anna", 3.0, 1e-5)
    assert spec.ledger_path == config.ledger and spec.data_dir == data.resolve()
    assert spec.cache_dir is None  # prepared inside the data directory
    with pytest.raises(SiteRefusalError, match="no site config"):
        SiteSpec.from_node_config({"site-config": str(tmp_path / "nope.toml")})


def test_a_site_with_a_read_only_export_prepares_its_data_elsewhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "site.toml").write_text(
        f"[site]\nsite_id='a'\ndata_dir='{data}'\nepsilon=1.0\ndelta=1e-5\ncache_dir='prepared'\n"
    )
    config = load_site_config(tmp_path / "site" / "site.toml")
    assert config.cache_dir == tmp_path / "site" / "prepared"  # relative to site.toml
    spec = SiteSpec.from_site_config(config, tmp_path / "foundation")
    assert spec.cache_dir == config.cache_dir
    node = SiteSpec.from_node_config(
        {"site-id": "a", "data-dir": str(data), "foundation-dir": "/f", "cache-dir": "/c"}
    )
    assert node.cache_dir == Path("/c")


# -- fedrad-site init / budget ---------------------------------------------------------------


def test_budget_cli_reports_spent_and_left(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    runner = CliRunner()
    made = runner.invoke(
        site_cli,
        [
            "init",
            str(tmp_path / "site"),
            "--site-id",
            "st_anna",
            "--data-dir",
            str(data),
            "--epsilon",
            "4",
        ],
    )
    assert made.exit_code == 0, made.output
    assert "node_key.pub" in made.output and "ledger_key.pub" in made.output
    config_path = tmp_path / "site" / "site.toml"
    config = load_site_config(config_path)
    ledger = Ledger(config.ledger, load_or_create_signing_key(config.ledger_key))
    for round_no in (1, 2):
        ledger.append(
            site_id="st_anna",
            run_id="r1",
            round=round_no,
            sample_rate=0.1,
            noise_multiplier=1.2,
            steps=20,
            max_grad_norm=1.0,
            delta=1e-5,
            accountant="rdp",
        )
    shown = runner.invoke(site_cli, ["budget", "--config", str(config_path), "--json"])
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.stdout)
    assert status == site_budget(config)
    assert status["rounds"] == 2 and status["runs"] == 1 and status["refusals"] == 0
    assert status["spent_epsilon"] == pytest.approx(ledger.entries()[-1]["epsilon"])
    assert status["left_epsilon"] == pytest.approx(4.0 - status["spent_epsilon"])
    text = runner.invoke(site_cli, ["budget", "--config", str(config_path)])
    assert "spent epsilon" in text.output and "of 4" in text.output


def test_budget_is_reported_at_the_terms_the_site_last_enforced(tmp_path: Path) -> None:
    """A run at a smaller delta than the site's (and with PRV) is reported as its ledger
    recorded it and as the site enforced it, not at the site's delta."""
    data = tmp_path / "data"
    data.mkdir()
    config = init_site(tmp_path / "site", site_id="st_anna", data_dir=data, epsilon=4.0)
    status = site_budget(config)
    assert (status["delta"], status["accountant"], status["spent_epsilon"]) == (1e-5, "rdp", 0.0)
    ledger = Ledger(config.ledger, load_or_create_signing_key(config.ledger_key))
    for round_no in (1, 2):
        last = ledger.append(
            site_id="st_anna",
            run_id="r1",
            round=round_no,
            sample_rate=0.1,
            noise_multiplier=2.0,
            steps=20,
            max_grad_norm=1.0,
            delta=1e-7,
            accountant="prv",
        )
    status = site_budget(config)
    assert (status["delta"], status["accountant"]) == (1e-7, "prv")
    assert status["spent_epsilon"] == pytest.approx(last["epsilon"])
    assert status["spent_epsilon"] > ledger.spent(config.delta, "prv")  # the site's delta
    assert status["left_epsilon"] == pytest.approx(4.0 - status["spent_epsilon"])
    assert status["left_epsilon"] > 0 and not status["exhausted"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["init", "SITE", "--site-id", "a", "--data-dir", "/no/such/dir"], "does not exist"),
        (["budget", "--config", "/no/such/site.toml"], "no site config"),
        (
            ["init", "SITE", "--site-id", "a", "--data-dir", "DATA", "--ca-file", "NOTCERT"],
            "is not a PEM certificate",
        ),
        (
            ["init", "SITE", "--site-id", "a", "--data-dir", "DATA", "--ca-file", "/no/ca.pem"],
            "does not exist",
        ),
    ],
)
def test_site_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "not-a-cert.pem").write_text("ssh-ed25519 AAAA not a certificate\n")
    replace = {
        "SITE": tmp_path / "site",
        "DATA": tmp_path / "data",
        "NOTCERT": tmp_path / "not-a-cert.pem",
    }
    args = [str(replace.get(a, a)) for a in args]
    result = CliRunner().invoke(site_cli, args)
    assert result.exit_code == 2
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()  # refused before any key is made


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--site-id", "site_9\n", "site id 'site_9\\n'"),
        ("--site-id", "site_9 ", "site id 'site_9 '"),
        ("--site-id", "\nsite_9", "site id '\\nsite_9'"),
        ("--coordinator", "localhost:9092\n", "coordinator 'localhost:9092\\n' is not HOST:PORT"),
        ("--coordinator", " localhost:9092", "is not HOST:PORT"),
        ("--coordinator", "localhost:\u0669\u0660\u0669\u0662", "is not HOST:PORT"),
        ("--coordinator", "localhost:0", "is not HOST:PORT"),
        ("--coordinator", "localhost:99999", "is not HOST:PORT"),
    ],
)
def test_init_refuses_an_id_or_address_that_is_not_all_of_the_text(
    tmp_path: Path, option: str, value: str, words: str
) -> None:
    """`$` matched before a trailing newline, so "site_9\\n" was a site id and
    "localhost:9092\\n" an address: each is refused in one line, before anything is made."""
    (tmp_path / "data").mkdir()
    given = {"--site-id": "site_9", "--coordinator": "localhost:9092", option: value}
    args = ["init", str(tmp_path / "site"), "--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(site_cli, [*args, *(a for pair in given.items() for a in pair)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and words in line
    assert not (tmp_path / "site").exists()
    ok = CliRunner().invoke(site_cli, [*args, "--site-id", "site_9", "--coordinator", "fl:9092"])
    assert ok.exit_code == 0, ok.output
