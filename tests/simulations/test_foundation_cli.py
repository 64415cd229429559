"""`fedrad-sim foundation`: bad input is refused before anything is built."""

from __future__ import annotations

from pathlib import Path

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
