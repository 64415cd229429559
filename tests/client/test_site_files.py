"""Containment at a site: only regular files inside the data directory are read, whatever the
directory holds (links out of it, pipes, devices, a linked report export)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app
from fedrad.client.ingest.site_data import (
    SiteDataError,
    cache_write_problem,
    prepare_site,
    scan_site,
)
from fedrad.client.ingest.site_files import (
    RefusedFileError,
    open_site_file,
    site_file,
    walk_site,
)
from fedrad.common.model.preprocess import PreprocessConfig
from tests.conftest import write_radiograph, write_reports

runner = CliRunner()


def _good_site(root: Path) -> Path:
    site = root / "site"
    write_radiograph(site / "a.dcm", accession="GOOD1")
    write_radiograph(site / "b" / "b.dcm", accession="GOOD2")
    write_reports(site / "reports.csv", [("GOOD1", "No acute disease."), ("GOOD2", "Normal.")])
    return site


def _check(site: Path) -> dict:
    result = runner.invoke(app, ["check", str(site), "--json", "--workers", "1"])
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_a_link_to_a_study_outside_is_not_followed(tmp_path: Path) -> None:
    site = _good_site(tmp_path)
    outside = write_radiograph(tmp_path / "elsewhere" / "secret.dcm", accession="OUT1")
    write_reports(
        site / "reports.csv",
        [("GOOD1", "No acute disease."), ("GOOD2", "Normal."), ("OUT1", "Normal.")],
    )
    (site / "link.dcm").symlink_to(outside)
    (site / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
    summary = _check(site)
    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert summary["usable"] == 2
    assert reasons["link.dcm"].startswith("symbolic link")
    assert reasons["linked_dir"].startswith("symbolic link to a folder")
    assert reasons["reports.csv:4"] == "report has no matching DICOM study"


def test_a_fifo_and_a_device_file_are_refused_without_blocking(tmp_path: Path) -> None:
    site = _good_site(tmp_path)
    os.mkfifo(site / "pipe.dcm")
    try:
        os.mknod(site / "zero.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    except PermissionError:
        pytest.skip("creating a device file needs root (CI runs as root)")
    summary = _check(site)
    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert summary["usable"] == 2
    assert reasons["pipe.dcm"] == "named pipe (not a regular file)"
    assert reasons["zero.dcm"] == "character device (not a regular file)"
    assert summary["files_seen"] == 4


def test_a_linked_report_export_is_refused(tmp_path: Path) -> None:
    site = _good_site(tmp_path)
    real = tmp_path / "exports" / "reports.csv"
    real.parent.mkdir()
    (site / "reports.csv").rename(real)
    (site / "reports.csv").symlink_to(real)
    result = runner.invoke(app, ["check", str(site), "--json", "--workers", "1"])
    assert result.exit_code == 1  # nothing usable: the studies have no report now
    summary = json.loads(result.stdout)
    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert reasons["reports.csv"].startswith("report export refused: symbolic link")
    assert reasons["a.dcm"] == "study has no report (reports.csv was refused)"
    assert summary["reports_file"] is False and summary["reports"] == 0


def test_a_file_swapped_for_a_link_after_the_walk_is_refused(tmp_path: Path) -> None:
    site = _good_site(tmp_path)
    listing = walk_site(site)
    entry = next(e for e in listing.files if e.rel_path == "a.dcm")
    secret = write_radiograph(tmp_path / "secret.dcm", accession="OUT1")
    (site / "a.dcm").rename(tmp_path / "kept.dcm")  # keeps its inode taken
    (site / "a.dcm").symlink_to(secret)
    with pytest.raises(RefusedFileError, match="cannot be opened"), open_site_file(entry):
        pass
    (site / "a.dcm").unlink()
    write_radiograph(site / "a.dcm", accession="GOOD1")  # a new file: another inode
    with pytest.raises(RefusedFileError, match="replaced"), open_site_file(entry):
        pass


def test_the_data_directory_itself_may_be_a_link(tmp_path: Path) -> None:
    """The site named the directory; only what lies inside it is judged."""
    site = _good_site(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(site, target_is_directory=True)
    scan, _ = scan_site(alias, workers=1)
    assert len(scan.studies) == 2 and not scan.skipped


def test_an_entry_outside_the_root_is_refused(tmp_path: Path) -> None:
    site = _good_site(tmp_path)
    other = write_radiograph(tmp_path / "other.dcm", accession="X")
    with pytest.raises(RefusedFileError, match="outside the data directory"):
        site_file(other, site.resolve())


def test_a_file_name_with_a_newline_stays_one_line_of_the_report(tmp_path: Path) -> None:
    site = _good_site(tmp_path)
    (site / "odd\nname.dcm").write_bytes(b"not dicom")
    result = runner.invoke(app, ["check", str(site), "--workers", "1"])
    assert result.exit_code == 0
    assert "  'odd\\nname.dcm': not a DICOM file" in result.stdout.splitlines()


def test_a_planted_cache_link_is_not_written_through(tmp_path: Path) -> None:
    """The default cache lives in the data directory, which the export's writer controls: a
    `.fedrad-cache` link, or a link inside a real one, would send the de-identified copy and
    the pseudonym key elsewhere."""
    site = _good_site(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (site / ".fedrad-cache").symlink_to(elsewhere, target_is_directory=True)
    result = runner.invoke(app, ["prepare", str(site), "--workers", "1"])
    assert result.exit_code == 2 and "is a symbolic link" in result.stderr
    assert not any(elsewhere.iterdir())
    assert "is a symbolic link" in (cache_write_problem(site) or "")
    (site / ".fedrad-cache").unlink()
    config = PreprocessConfig(image_size=32)
    (site / ".fedrad-cache").mkdir()
    (site / ".fedrad-cache" / config.fingerprint()).symlink_to(elsewhere)
    with pytest.raises(SiteDataError, match="leads out of the cache"):
        prepare_site(site, site / ".fedrad-cache", config=config, workers=1)
    assert not any(elsewhere.iterdir())
