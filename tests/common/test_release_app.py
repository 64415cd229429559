"""The release's one Flower app bundle: the same bytes on the coordinator and at every site,
every run setting declared with a default that means "not set", and a run's values in a
separate TOML file that Flower fuses over those defaults."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedrad.common.protocol.messages import RoundConfig
from fedrad.common.protocol.release_app import (
    CLIENT_APP,
    RELEASE_RUN_CONFIG,
    SECURE_CLIENT_APP,
    SERVER_APP,
    clientapp_for,
    fab_sha256,
    given_settings,
    release_fab,
    release_pyproject,
    release_version,
    run_config_toml,
    write_release_app,
)
from fedrad.common.protocol.run_config import (
    REQUIRED_KEYS,
    RUN_SETTINGS,
    SETTINGS,
    settings_among,
)
from fedrad.server.rounds import ServerPlan


def _required(tmp_path: Path) -> dict[str, str | int]:
    return {
        "run-dir": str(tmp_path / "runs" / "r1"),
        "foundation-dir": str(tmp_path / "foundation"),
        "num-sites": 3,
        "num-rounds": 2,
    }


# -- the bundle ------------------------------------------------------------------------------


def test_release_fab_is_deterministic_and_what_flower_builds_from_the_app_dir(
    tmp_path: Path,
) -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = release_fab()
    assert fab == release_fab()
    assert fab_sha256(fab) == fab_sha256(release_fab())
    app_dir = write_release_app(tmp_path / "app")
    assert sorted(p.name for p in app_dir.iterdir()) == ["pyproject.toml"]
    assert (app_dir / "pyproject.toml").read_bytes() == release_pyproject()
    assert build_fab_from_disk(app_dir) == fab
    assert len(fab) < 10_000  # no source travels: the sites run their installed fedrad


def test_fab_sha256_is_the_plain_sha256_of_the_bytes() -> None:
    assert fab_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(fab_sha256(release_fab())) == 64


def test_one_byte_of_the_pyproject_changes_the_sha() -> None:
    from flwr.cli.build import build_fab_from_files

    pyproject = release_pyproject()
    # one byte of a declared setting (Flower re-serialises the pyproject, comments dropped)
    assert pyproject.count(b'accountant = "rdp"') == 1
    changed = pyproject.replace(b'accountant = "rdp"', b'accountant = "rdq"')
    assert len(changed) == len(pyproject) and changed != pyproject
    original = build_fab_from_files({"pyproject.toml": pyproject})[0]
    other = build_fab_from_files({"pyproject.toml": changed})[0]
    assert original == release_fab()
    assert fab_sha256(other) != fab_sha256(original)
    # another release is another bundle: a site approves each one
    assert fab_sha256(release_fab("9.9.9")) != fab_sha256(release_fab())


def test_the_release_pyproject_names_installed_components_and_declares_every_setting(
    tmp_path: Path,
) -> None:
    from flwr.common.config import validate_config

    document = tomllib.loads(release_pyproject().decode())
    assert document["project"]["version"] == release_version()
    app = document["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    assert app["config"] == RELEASE_RUN_CONFIG
    app_dir = write_release_app(tmp_path / "app")
    valid, errors, _ = validate_config(document, check_module=True, project_dir=app_dir)
    assert valid, errors
    assert tomllib.loads(release_pyproject("9.9").decode())["project"]["version"] == "9.9"


def test_write_release_app_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    app_dir = write_release_app(tmp_path / "app")
    assert write_release_app(app_dir) == app_dir  # rewriting the same app is fine
    (app_dir / "pyproject.toml").write_text("tampered")
    write_release_app(app_dir)
    assert (app_dir / "pyproject.toml").read_bytes() == release_pyproject()
    (app_dir / "extra.py").write_text("import os\n")
    with pytest.raises(ValueError, match=r"holds extra\.py"):
        write_release_app(app_dir)
    assert (app_dir / "extra.py").exists()


def test_every_round_setting_the_server_sends_is_declared() -> None:
    """Flower refuses a --run-config key the bundle does not declare (fuse_dicts)."""
    # derived by the server, or per site (the site's last acknowledged ledger head)
    derived = {"server-round", "planned-rounds", "target-epsilon", "ledger-head"}
    round_keys = {f.name.replace("_", "-") for f in fields(RoundConfig)} - derived
    assert round_keys <= set(RELEASE_RUN_CONFIG), round_keys - set(RELEASE_RUN_CONFIG)


# -- the one declaration of every run setting ------------------------------------------------


def test_every_run_setting_is_declared_once_with_a_default_of_its_type() -> None:
    keys = [setting.key for setting in RUN_SETTINGS]
    assert len(set(keys)) == len(keys) == len(SETTINGS)
    assert list(RELEASE_RUN_CONFIG) == keys  # the pyproject, and so the sha256, in this order
    assert {"run-dir", "foundation-dir", "num-sites", "num-rounds"} == REQUIRED_KEYS
    for setting in RUN_SETTINGS:
        assert type(setting.default) is setting.kind, setting.key  # no bool for an int
        assert RELEASE_RUN_CONFIG[setting.key] == setting.default
        assert setting.help and "\n" not in setting.help
        assert setting.name == setting.key.replace("-", "_")


def test_settings_among_a_command_s_parameters() -> None:
    params = {
        "run_dir": "runs/r1",  # a run's own: set by its own option
        "rounds": 3,  # not a setting's name
        "lr": 0.01,
        "epsilon": None,  # not given
        "secagg": False,  # a switch left off
        "dp": False,  # off is a value: the default is on
        "local_steps": 7,
    }
    assert settings_among(params) == {"lr": 0.01, "dp": False, "local-steps": 7}
    assert list(settings_among({"seed": 1, "delta": 1e-6})) == ["seed", "delta"]  # their order
    assert settings_among({"secagg": True}) == {"secagg": True}


# -- given settings and the server's reading of them -----------------------------------------


def test_given_settings_strips_only_declared_defaults() -> None:
    given = given_settings(
        {
            "epsilon": 8.0,  # the default
            "local-steps": 50,  # the default
            "strategy": "fedavg",  # the default
            "secagg": False,  # the default
            "num-rounds": 3,  # set
            "delta": 1e-6,  # set
            "accountant": "prv",  # set
            "bogus": 1,  # undeclared: kept, for the parser to refuse
        }
    )
    assert given == {"num-rounds": 3, "delta": 1e-6, "accountant": "prv", "bogus": 1}
    assert given_settings({"epsilon": 8}) == {}  # the number 8 is the default 8.0
    assert given_settings({}) == {}


def test_given_settings_keeps_bools_distinct_from_ints() -> None:
    assert given_settings({"secagg": 0}) == {"secagg": 0}  # 0 is not false
    assert given_settings({"dp": 1}) == {"dp": 1}  # 1 is not true
    assert given_settings({"min-sites": False}) == {"min-sites": False}  # false is not 0
    assert given_settings({"seed": False}) == {"seed": False}
    assert given_settings({"dp": True, "secagg": False}) == {}
    assert given_settings({"dp": False, "secagg": True}) == {"dp": False, "secagg": True}


def test_the_declared_defaults_mean_not_set(tmp_path: Path) -> None:
    required = _required(tmp_path)
    assert ServerPlan.from_run_config(RELEASE_RUN_CONFIG | required) == (
        ServerPlan.from_run_config(required)
    )


@pytest.mark.parametrize("key", sorted(RELEASE_RUN_CONFIG))
def test_every_declared_default_is_accepted_by_the_server(key: str, tmp_path: Path) -> None:
    required = _required(tmp_path)
    config = {**required, key: RELEASE_RUN_CONFIG[key]} if key not in required else required
    assert ServerPlan.from_run_config(config) == ServerPlan.from_run_config(required)


def test_a_run_config_file_reaches_the_server_as_flower_fuses_it(tmp_path: Path) -> None:
    from flwr.common.config import fuse_dicts, parse_config_args

    values = {**_required(tmp_path), "epsilon": 4.0, "secagg": True, "secagg-threshold": 2}
    path = tmp_path / "run_config.toml"
    path.write_text(run_config_toml(values))
    parsed = parse_config_args([str(path)])
    assert parsed == values
    fused = fuse_dicts(dict(RELEASE_RUN_CONFIG), parsed)
    plan = ServerPlan.from_run_config(fused)
    assert plan == ServerPlan.from_run_config(values)
    assert plan.secagg and plan.shares_threshold == 2
    assert plan.round_config.target_epsilon == 4.0


# -- the run config file ----------------------------------------------------------------------


def test_run_config_toml_round_trips_and_refuses_unknown_keys(tmp_path: Path) -> None:
    values = {
        **_required(tmp_path),
        "dp": False,
        "lr": 3e-4,
        "accountant": "prv",
        "seed": 7,
    }
    text = run_config_toml(values)
    assert tomllib.loads(text) == values
    back = tomllib.loads(text)
    assert type(back["dp"]) is bool and type(back["seed"]) is int and type(back["lr"]) is float
    with pytest.raises(ValueError, match="unknown run config key\\(s\\): bogus, zzz"):
        run_config_toml({**values, "zzz": 1, "bogus": "x"})
    assert run_config_toml({}) == ""


# -- the ClientApp a run needs ---------------------------------------------------------------


def test_clientapp_for_picks_from_the_allow_list() -> None:
    assert clientapp_for({}) == CLIENT_APP == "fedrad.client.federation.app:app"
    assert clientapp_for({"secagg": False}) == CLIENT_APP
    assert clientapp_for({"secagg": True}) == SECURE_CLIENT_APP
    assert SECURE_CLIENT_APP == "fedrad.client.federation.secure_aggregation:app"
    # a run cannot name its own ClientApp
    assert clientapp_for({"clientapp": "evil:app", "secagg": False}) == CLIENT_APP


@pytest.mark.parametrize("value", [1, 0, "true", "false", None, 1.0])
def test_clientapp_for_refuses_a_secagg_that_is_not_a_bool(value: object) -> None:
    with pytest.raises(ValueError, match="'secagg' must be true or false"):
        clientapp_for({"secagg": value})
