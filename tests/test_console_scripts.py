"""Every console script the package declares is installed and answers --help."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

SCRIPTS = sorted(
    tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_installed_and_helps(script: str) -> None:
    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{script} is not installed beside {sys.executable}"
    done = subprocess.run(
        [str(path), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and "Traceback" not in done.stderr


def test_audit_help_names_both_commands() -> None:
    path = Path(sys.executable).parent / "fedrad-audit"
    out = subprocess.run([str(path), "--help"], capture_output=True, text=True, check=False)
    assert "LEDGERS" in out.stdout and "empirical" in out.stdout
