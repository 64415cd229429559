"""`fedrad-site` end to end through typer's runner: JSON contract, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
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
        [
            ("X1", "No pleural effusion. Possible right lower lobe consolidation."),
            ("X2", "Normal."),
        ],
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
    assert result.exit_code == 2 and "no report column" in result.stderr
    assert "--column" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (
        "no column 'mrn'"
        in _run("label", str(tmp_path / "bad.csv"), "--column", "b", "--id-column", "mrn").stderr
    )
    assert "not both" in _run("label", str(tmp_path / "bad.csv"), "--text", "x").stderr
    assert _run("label").exit_code == 2
    (tmp_path / "empty").mkdir()
    assert "no report text files" in _run("label", str(tmp_path / "empty")).stderr
    (tmp_path / "blank.csv").write_text("report\n\n   \n")
    assert "no report to label" in _run("label", str(tmp_path / "blank.csv")).stderr


def test_label_refuses_pipes_and_skips_links_in_a_folder(tmp_path: Path) -> None:
    """A pipe named on the command line is refused at once instead of blocking the reader; in
    a folder of reports, links and pipes are not read."""
    os.mkfifo(tmp_path / "pipe.csv")
    result = _run("label", str(tmp_path / "pipe.csv"))
    assert result.exit_code == 2 and "named pipe (not a regular file)" in result.stderr
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "a.txt").write_text("Small right pneumothorax.")
    (tmp_path / "outside.txt").write_text("Large left pleural effusion.")
    (folder / "b.txt").symlink_to(tmp_path / "outside.txt")
    os.mkfifo(folder / "c.txt")
    result = _run("label", str(folder), "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"a"}


def test_label_refuses_an_export_larger_than_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedrad.client.ingest.report_sources.MAX_LABEL_CSV_BYTES", 100)
    path = tmp_path / "big.csv"
    path.write_text("report\n" + "No acute disease.\n" * 20)
    result = _run("label", str(path))
    assert result.exit_code == 2 and "split the export" in result.stderr


def test_label_reads_report_prose_in_the_shapes_it_comes_in(tmp_path: Path) -> None:
    """Any export's report column, one report per text file, a MIMIC-CXR-style folder."""
    (tmp_path / "export.csv").write_text(
        "Study_ID,Report_Text\nS1,Large right pneumothorax.\nS1,No pneumothorax.\n,Cardiomegaly.\n"
    )
    data = json.loads(_run("label", str(tmp_path / "export.csv"), "--json").stdout)
    assert list(data) == ["S1", "S1#2", "line 4"]
    assert (data["S1"]["pneumothorax"], data["S1#2"]["pneumothorax"]) == (1, 0)
    assert data["line 4"]["cardiomegaly"] == 1
    plain = _run("label", str(tmp_path / "export.csv"), "--column", "report_text")
    assert plain.stdout.splitlines()[0].startswith("study_id,nodule")

    folder = tmp_path / "files" / "p10" / "p10000032"
    folder.mkdir(parents=True)
    (folder / "s50414267.txt").write_text(
        "FINAL REPORT\nFINDINGS: There is no focal consolidation, pleural effusion or "
        "pneumothorax.\nIMPRESSION: No acute cardiopulmonary process.\n"
    )
    (folder / "s53189527.txt").write_text("IMPRESSION: Moderate left pleural effusion.\n")
    data = json.loads(_run("label", str(tmp_path / "files"), "--json").stdout)
    assert data["p10/p10000032/s53189527"]["pleural_effusion"] == 1
    assert set(data["p10/p10000032/s50414267"].values()) == {0}
    one = json.loads(_run("label", str(folder / "s53189527.txt"), "--json").stdout)
    assert one == {"s53189527": data["p10/p10000032/s53189527"]}
    inline = json.loads(_run("label", "--text", "Possible small nodule.", "--json").stdout)
    assert inline["text"]["nodule"] == -1


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


# -- fedrad-site approve -----------------------------------------------------------------------


def _approving_site(tmp_path: Path) -> Path:
    from fedrad.client.site.config import init_site

    (tmp_path / "data").mkdir(exist_ok=True)
    init_site(tmp_path / "site", site_id="st_anna", data_dir=tmp_path / "data")
    return tmp_path / "site" / "site.toml"


def _approved(config_path: Path) -> tuple[str, ...]:
    from fedrad.client.site.config import load_site_config

    return load_site_config(config_path).policy.approved_apps


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_approve_release_writes_this_release_s_sha_and_is_idempotent(tmp_path: Path) -> None:
    from fedrad.common.protocol.release_app import fab_sha256, release_fab, release_version

    config_path = _approving_site(tmp_path)
    before = config_path.read_text()
    digest = fab_sha256(release_fab())
    result = _run("approve", "--release", "--config", str(config_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"fedrad {release_version()} release bundle sha256 {digest} approved in {config_path}"
    )
    assert _approved(config_path) == (digest,)
    text = config_path.read_text()
    assert text.startswith(before.splitlines()[0])  # the header comment is kept
    assert "[policy]" in text and f'"{digest}"' in text
    again = _run("approve", "--release", "--config", str(config_path))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().endswith(f"{digest} was already approved in {config_path}")
    assert _approved(config_path) == (digest,)
    as_json = json.loads(
        _run("approve", "--release", "--config", str(config_path), "--json").stdout
    )
    assert as_json["sha256"] == digest and as_json["approved"] is True
    assert as_json["new"] is False


def test_approve_a_fab_file(tmp_path: Path) -> None:
    import hashlib

    config_path = _approving_site(tmp_path)
    fab = tmp_path / "other-app.fab"
    fab.write_bytes(b"PK\x03\x04 some app bundle")
    digest = hashlib.sha256(fab.read_bytes()).hexdigest()
    result = _run("approve", str(fab), "--config", str(config_path), "--json")
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert reply == {
        "sha256": digest,
        "approved": True,
        "new": True,
        "what": "app bundle other-app.fab",
    }
    assert _approved(config_path) == (digest,)


def test_approve_a_raw_sha256_keeps_earlier_approvals(tmp_path: Path) -> None:
    config_path = _approving_site(tmp_path)
    first, second = "ab" * 32, "0123456789ABCDEF" * 4
    assert _run("approve", first, "--config", str(config_path)).exit_code == 0
    result = _run("approve", second, "--config", str(config_path))
    assert result.exit_code == 0, result.output
    assert second.lower() in result.stdout and "approved in" in result.stdout
    assert _approved(config_path) == (first, second.lower())  # stored lowercase, in order


@pytest.mark.parametrize("args", [(), ("--release", "ab" * 32)])
def test_approve_needs_exactly_one_bundle(tmp_path: Path, args: tuple[str, ...]) -> None:
    config_path = _approving_site(tmp_path)
    before = config_path.read_text()
    line = _one_line_error(_run("approve", *args, "--config", str(config_path)))
    assert "give either a bundle (FAB file or sha256) or --release" in line
    assert config_path.read_text() == before


@pytest.mark.parametrize("bundle", ["missing.fab", "ab" * 31, "zz" * 32])
def test_approve_refuses_what_is_neither_a_fab_nor_a_sha256(tmp_path: Path, bundle: str) -> None:
    config_path = _approving_site(tmp_path)
    before = config_path.read_text()
    line = _one_line_error(_run("approve", str(tmp_path / bundle), "--config", str(config_path)))
    assert "is neither a FAB file nor a sha256 (64 hex digits)" in line
    line = _one_line_error(_run("approve", bundle, "--config", str(config_path)))
    assert "is neither a FAB file nor a sha256" in line
    assert config_path.read_text() == before


def test_approve_without_a_site_config_says_why_in_one_line(tmp_path: Path) -> None:
    line = _one_line_error(_run("approve", "ab" * 32, "--config", str(tmp_path / "site.toml")))
    assert "no site config at" in line


def test_approve_with_a_config_in_a_missing_folder_says_why_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "site.toml"
    line = _one_line_error(_run("approve", "ab" * 32, "--config", str(missing)))
    assert "no site config at" in line
