"""The site's own ClientApp runner decides before anything of a bundle is used: an unapproved
bundle (by sha256) is refused unread, a plan outside the site's policy is refused, and an
approved run gets fedrad's installed ClientApp from a fixed allow-list."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedrad.client.site import app_runner
from fedrad.client.site.app_runner import Verdict, judge_task, read_secret
from fedrad.client.site.config import SiteConfig, SiteConfigError, init_site
from fedrad.client.site.supernode import new_runner_secret, runner_command
from fedrad.common.protocol.release_app import (
    RELEASE_RUN_CONFIG,
    fab_sha256,
    release_fab,
)

FAB = b"PK\x03\x04 a flower app bundle, as the SuperNode hands it to the runner"


def _site(tmp_path: Path, *, approved: tuple[str, ...] = (), **policy: object) -> SiteConfig:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    return init_site(
        tmp_path / "site",
        site_id="st_anna",
        data_dir=data,
        approved_apps=approved,
        **policy,  # type: ignore[arg-type]
    )


def _run_config(**over: object) -> dict[str, object]:
    """What the runner sees: Flower fuses the run's values over the bundle's declared ones."""
    config: dict[str, object] = dict(RELEASE_RUN_CONFIG)
    config.update({"run-dir": "/srv/runs/r1", "foundation-dir": "/srv/f", "num-sites": 3})
    config.update(over)
    return config


def test_an_unapproved_bundle_is_refused_unread(tmp_path: Path) -> None:
    config = _site(tmp_path)
    verdict, digest = judge_task(config, FAB, _run_config())
    assert digest == fab_sha256(FAB)
    assert verdict.app is None and verdict.bundle_refused
    assert verdict.reason.startswith(
        f"this site has not approved app bundle sha256 {digest[:16]}..."
    )
    assert "fedrad-site approve" in verdict.reason and "\n" not in verdict.reason


def test_a_bundle_with_one_byte_changed_is_refused(tmp_path: Path) -> None:
    config = _site(tmp_path, approved=(fab_sha256(FAB),))
    assert judge_task(config, FAB, _run_config())[0].app is not None
    changed = FAB[:-1] + bytes([FAB[-1] ^ 1])
    verdict, digest = judge_task(config, changed, _run_config())
    assert digest != fab_sha256(FAB)
    assert verdict.app is None and verdict.bundle_refused


def test_the_bundle_is_judged_before_the_plan(tmp_path: Path) -> None:
    """A refused bundle is refused as a bundle, whatever its plan says."""
    config = _site(tmp_path, require_secagg=True)
    verdict, _ = judge_task(config, FAB, _run_config(secagg=False))
    assert verdict.bundle_refused and "not approved app bundle" in verdict.reason


def test_an_approved_bundle_within_a_permissive_policy_runs_the_installed_clientapp(
    tmp_path: Path,
) -> None:
    config = _site(tmp_path, approved=(fab_sha256(FAB),))
    verdict, digest = judge_task(config, FAB, _run_config())
    assert verdict == Verdict("fedrad.client.federation.app:app")
    assert digest == fab_sha256(FAB)
    # the bundle cannot name another ClientApp
    verdict, _ = judge_task(config, FAB, _run_config(clientapp="evil.module:app"))
    assert verdict.app == "fedrad.client.federation.app:app"


def test_the_release_bundle_approved_runs(tmp_path: Path) -> None:
    fab = release_fab()
    config = _site(tmp_path, approved=(fab_sha256(fab),))
    assert judge_task(config, fab, _run_config())[0].app == "fedrad.client.federation.app:app"


def test_a_secagg_run_gets_the_secure_clientapp(tmp_path: Path) -> None:
    config = _site(tmp_path, approved=(fab_sha256(FAB),))
    verdict, _ = judge_task(config, FAB, _run_config(secagg=True))
    assert verdict == Verdict("fedrad.client.federation.secure_aggregation:app")
    verdict, _ = judge_task(config, FAB, {"secagg": True})
    assert verdict.app == "fedrad.client.federation.secure_aggregation:app"


def test_an_approved_bundle_with_a_non_bool_secagg_is_refused(tmp_path: Path) -> None:
    config = _site(tmp_path, approved=(fab_sha256(FAB),))
    verdict, _ = judge_task(config, FAB, _run_config(secagg=1))
    assert verdict.app is None and not verdict.bundle_refused
    assert "secagg" in verdict.reason


@pytest.mark.parametrize(
    ("policy", "plan", "words"),
    [
        (
            {"require_secagg": True},
            {"secagg": False},
            "site policy: this site requires SecAgg+ and the run has secagg = false",
        ),
        (
            {"max_epsilon_per_run": 4.0},
            {"epsilon": 6.0},
            "site policy: the run's epsilon 6 is above this site's max_epsilon_per_run 4",
        ),
        (
            {"max_epsilon_per_run": 4.0},
            {},  # the declared default epsilon 8.0
            "site policy: the run's epsilon 8 is above this site's max_epsilon_per_run 4",
        ),
    ],
)
def test_an_approved_bundle_outside_the_policy_is_refused_with_the_policy_reason(
    tmp_path: Path, policy: dict[str, object], plan: dict[str, object], words: str
) -> None:
    config = _site(tmp_path, approved=(fab_sha256(FAB),), **policy)
    verdict, digest = judge_task(config, FAB, _run_config(**plan))
    assert verdict.app is None
    assert not verdict.bundle_refused
    assert verdict.reason == words
    assert digest == fab_sha256(FAB)


def test_an_approved_bundle_within_a_strict_policy_runs(tmp_path: Path) -> None:
    config = _site(
        tmp_path, approved=(fab_sha256(FAB),), require_secagg=True, max_epsilon_per_run=4.0
    )
    verdict, _ = judge_task(config, FAB, _run_config(secagg=True, epsilon=3.0))
    assert verdict.app == "fedrad.client.federation.secure_aggregation:app"


# -- the runner's secret and command line ------------------------------------------------------


def test_read_secret_refuses_a_short_file(tmp_path: Path) -> None:
    short = tmp_path / "short.secret"
    short.write_bytes(b"x" * 15)
    with pytest.raises(SiteConfigError, match="holds no usable runner secret"):
        read_secret(short)
    short.write_bytes(b"")
    with pytest.raises(SiteConfigError):
        read_secret(short)
    with pytest.raises(FileNotFoundError):
        read_secret(tmp_path / "missing.secret")
    secret = new_runner_secret(tmp_path / "site" / "site.toml")
    assert read_secret(secret) == secret.read_bytes() and len(read_secret(secret)) >= 16


def test_the_runner_takes_the_command_line_the_site_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _site(tmp_path)
    config_path = tmp_path / "site" / "site.toml"
    secret = new_runner_secret(config_path)
    command = runner_command(config_path, secret_file=secret, port=9400)
    assert command[:3] == [sys.executable, "-m", "fedrad.client.site.app_runner"]
    started: list[tuple[Path, str, bytes]] = []

    class FakeRunner:
        def __init__(self, path: Path, address: str, key: bytes) -> None:
            started.append((path, address, key))
            self.stopping = None

        def serve(self) -> None:
            return None

    monkeypatch.setattr(app_runner, "Runner", FakeRunner)
    monkeypatch.setattr(app_runner, "_preload", lambda: None)
    monkeypatch.setattr(app_runner, "log_to_stderr", lambda: None)  # the process's, not pytest's
    monkeypatch.setattr(app_runner.signal, "signal", lambda *a: None)
    app_runner.main(command[3:])
    assert started == [(config_path.resolve(), "127.0.0.1:9400", secret.read_bytes())]


def test_the_runner_refuses_to_start_with_a_bad_secret_or_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _site(tmp_path)
    config_path = tmp_path / "site" / "site.toml"
    monkeypatch.setattr(app_runner, "Runner", lambda *a: pytest.fail("started a runner"))
    monkeypatch.setattr(app_runner, "log_to_stderr", lambda: None)
    short = tmp_path / "short.secret"
    short.write_bytes(b"tiny")
    base = ["--runtime-api-address", "127.0.0.1:9400"]
    with pytest.raises(SystemExit) as exit_info:
        app_runner.main(["--config", str(config_path), *base, "--secret-file", str(short)])
    assert exit_info.value.code == 2
    assert "no usable runner secret" in capsys.readouterr().err
    secret = new_runner_secret(config_path)
    with pytest.raises(SystemExit) as exit_info:
        app_runner.main(
            ["--config", str(tmp_path / "none.toml"), *base, "--secret-file", str(secret)]
        )
    assert exit_info.value.code == 2
    assert "no site config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "run",
    [
        {},
        {"secagg": False},
        {"epsilon": 50.0},
        {"strategy": "fedadam"},
        {"secagg": "yes"},
    ],
)
def test_a_refusal_carries_nothing_of_the_site(tmp_path: Path, run: dict[str, object]) -> None:
    """What a refusal sends to the coordinator names the bundle and the policy, never the
    site's paths, ids or data (the runner's reply bypasses the ClientApp's privacy mod)."""
    secret_dir = tmp_path / "PATIENT_Doe_John_MRN12345"
    config = _site(secret_dir, require_secagg=True, max_epsilon_per_run=4.0, strategies=("fedavg",))
    for bundle, approved in ((FAB, ()), (FAB, (fab_sha256(FAB),))):
        site = (
            config
            if not approved
            else _site(
                secret_dir / "b",
                approved=approved,
                require_secagg=True,
                max_epsilon_per_run=4.0,
                strategies=("fedavg",),
            )
        )
        verdict, _ = judge_task(site, bundle, _run_config(**run))
        if verdict.app is None:
            for forbidden in ("PATIENT", "Doe", "MRN", "st_anna", str(tmp_path)):
                assert forbidden not in verdict.reason, verdict.reason
            assert "\n" not in verdict.reason and len(verdict.reason) < 300
