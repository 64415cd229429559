"""`fedrad-site` end to end through typer's runner: JSON contract, exit codes, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app
from tests.conftest import write_radiograph, write_reports

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["test_files", "data_store"])
def test_check_on_every_file_pydicom_ships(which: str) -> None:
    """pydicom's own edge cases and pydicom-data's real images: a reason per file, no crash."""
    if which == "test_files":
        root = Path(pydicom.__file__).parent / "data" / "test_files"
    else:
        root = Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm")).parent
    result = _run("check", str(root), "--json", "--workers", "2")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 1  # no reports.csv there: nothing usable, but every file explained
    summary = json.loads(result.stdout)
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert summary["files_seen"] == len(files)
    assert len(summary["skipped"]) == len(files)
    assert all(item["reason"] and "\n" not in item["reason"] for item in summary["skipped"])
    assert summary["images_decoded"] > 0
    if which == "data_store":
        reasons = {Path(i["path"]).name: i["reason"] for i in summary["skipped"]}
        assert reasons["RG1_J2KR.dcm"].startswith("study has no report")  # decoded and accepted


def test_check_json_contract_and_exit_codes(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_radiograph(site / "a.dcm", accession="A1")
    write_reports(site / "reports.csv", [("A1", "Small right pneumothorax.")])
    result = _run("check", str(site), "--json", "--workers", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("files_seen", "images_decoded", "usable", "skipped"):
        assert key in summary
    assert summary["usable"] == 1
    assert summary["labels_present"]["pneumothorax"] == 1
    human = _run("check", str(site), "--workers", "1")
    assert human.exit_code == 0 and "usable studies:  1" in human.stdout


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "empty"),
        ("badcsv", "not UTF-8"),
    ],
)
def test_check_fatal_errors_are_one_line(tmp_path: Path, setup: str, message: str) -> None:
    site = tmp_path / "site"
    if setup != "missing":
        site.mkdir()
    if setup == "badcsv":
        write_radiograph(site / "a.dcm", accession="A1")
        (site / "reports.csv").write_bytes(b"\xff\xfe\x00")
    result = _run("check", str(site))
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_label_json_maps_accession_to_labels(tmp_path: Path) -> None:
    path = write_reports(
        tmp_path / "r.csv",
        [("X1", "No pleural effusion. Possible right lower lobe pneumonia."), ("X2", "Normal.")],
    )
    result = _run("label", str(path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["X1"]["pleural_effusion"] == 0
    assert data["X1"]["consolidation"] == -1
    assert set(data["X2"].values()) == {0}


def test_label_bad_input(tmp_path: Path) -> None:
    assert _run("label", str(tmp_path / "none.csv")).exit_code == 2
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    result = _run("label", str(tmp_path / "bad.csv"))
    assert result.exit_code == 2 and "missing column" in result.stderr


def test_prepare_writes_manifest(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_radiograph(site / "a.dcm", accession="A1")
    write_reports(site / "reports.csv", [("A1", "Cardiomegaly.")])
    result = _run(
        "prepare", str(site), "--cache-dir", str(tmp_path / "c"), "--json", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["manifest"]).is_file()


def test_start_without_a_site_config_says_why_in_one_line(tmp_path: Path) -> None:
    result = _run("start", "--config", str(tmp_path / "site.toml"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no site config at"), result.stderr
