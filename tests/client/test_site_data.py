"""The site walk: joins, every bad-input reason, the cache, and no PHI in anything written."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from fedrad.client.ingest.report_export import MAX_LINE_CHARS, MAX_REPORT_CHARS
from fedrad.client.ingest.site_data import SiteDataError, load_manifest, prepare_site, scan_site
from fedrad.common.model.preprocess import PreprocessConfig
from tests.conftest import PHI, write_radiograph, write_reports

REPORT = (
    "FINDINGS: Small left pleural effusion. No pneumothorax. Discussed with Dr. Vandermeer.\n"
    "IMPRESSION: Left effusion."
)


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    write_radiograph(site / "p1" / "s1" / "IM1.dcm", accession="ACC0000001")
    write_radiograph(site / "p1" / "s1" / "IM2.dcm", accession="ACC0000001", view="LL")
    write_radiograph(site / "p2" / "IM1.dcm", accession="ACC0000002")
    write_radiograph(site / "p3" / "IM1.dcm", accession="ACC0000003")  # no report
    (site / "notes.txt").write_text("not an image")
    write_reports(
        site / "reports.csv",
        [("ACC0000001", REPORT), ("ACC0000002", "No acute disease."), ("ACC0000009", "Normal.")],
    )
    return site


def _reasons(scan) -> dict[str, str]:
    return {s.path: s.reason for s in scan.skipped}


def test_scan_joins_and_explains_every_skip(tmp_path: Path) -> None:
    scan, _ = scan_site(_site(tmp_path), workers=1)
    summary = scan.summary()
    assert summary["files_seen"] == 5
    assert summary["images_decoded"] == 4
    assert summary["usable"] == 2
    reasons = _reasons(scan)
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["p3/IM1.dcm"].startswith("study has no report")
    assert "additional image" in reasons["p1/s1/IM2.dcm"]
    assert reasons["reports.csv:5"] == "report has no matching DICOM study"  # its first line
    study = next(s for s in scan.studies if s.accession == "ACC0000001")
    assert study.image_path == "p1/s1/IM1.dcm"  # the frontal view, not the lateral
    assert study.labels["pleural_effusion"] == 1
    assert study.sides["pleural_effusion"] == "left"
    assert "Vandermeer" not in study.report


def test_scan_in_a_process_pool_matches_serial(tmp_path: Path) -> None:
    site = _site(tmp_path)
    for i in range(10):
        write_radiograph(site / "more" / f"{i}.dcm", accession=f"ACC10{i:05d}")
    serial, _ = scan_site(site, workers=1)
    pooled, _ = scan_site(site, workers=2)
    assert serial.summary() == pooled.summary()


def test_missing_reports_csv_is_not_fatal(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_radiograph(site / "a.dcm", accession="A1")
    scan, _ = scan_site(site, workers=1)
    assert scan.summary()["usable"] == 0
    assert "no reports.csv" in scan.skipped[0].reason


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (b"accession,text\nA1,hello\n", "missing column"),
    ],
)
def test_unreadable_reports_csv_is_fatal(tmp_path: Path, content: bytes, message: str) -> None:
    site = tmp_path / "s"
    write_radiograph(site / "a.dcm", accession="A1")
    (site / "reports.csv").write_bytes(content)
    with pytest.raises(SiteDataError, match=message):
        scan_site(site, workers=1)


def test_empty_and_missing_directories_are_fatal(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="does not exist"):
        scan_site(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteDataError, match="empty"):
        scan_site(tmp_path / "empty")


def test_bad_report_rows_are_skipped_with_reasons(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_radiograph(site / "a.dcm", accession="A1")
    write_reports(site / "reports.csv", [("A1", "Normal."), ("A1", "again"), ("", "x"), ("A2", "")])
    scan, _ = scan_site(site, workers=1)
    reasons = _reasons(scan)
    assert reasons["reports.csv:3"].startswith("duplicate report")
    assert reasons["reports.csv:4"] == "report row without accession_number"
    assert reasons["reports.csv:5"] == "empty report text"
    assert scan.summary()["usable"] == 1


def test_the_report_export_is_read_with_bounded_lines_and_fields(tmp_path: Path) -> None:
    """A report too long to be one is skipped; a line or a field of megabytes ends the read
    with one line before it is held whole; the csv module's limit is left as it was."""
    site = tmp_path / "s"
    write_radiograph(site / "a.dcm", accession="A1")
    write_radiograph(site / "b.dcm", accession="A2")
    long_report = "No acute disease. " * 5000  # 90 000 characters
    write_reports(site / "reports.csv", [("A1", "Normal."), ("A2", long_report), ("A" * 80, "x")])
    limit = csv.field_size_limit()
    scan, _ = scan_site(site, workers=1)
    reasons = _reasons(scan)
    assert reasons["reports.csv:3"] == f"report text longer than {MAX_REPORT_CHARS} characters"
    assert reasons["reports.csv:4"].startswith("accession_number longer than")
    assert [s.accession for s in scan.studies] == ["A1"]
    with (site / "reports.csv").open("a") as handle:
        handle.write("A3," + "x" * (MAX_LINE_CHARS + 10) + "\n")
    with pytest.raises(SiteDataError, match="line 5 is longer than"):
        scan_site(site, workers=1)
    write_reports(site / "reports.csv", [("A1", "Normal.")])
    with (site / "reports.csv").open("a") as handle:
        handle.write('A2,"' + ("x" * 1000 + "\n") * 1200 + '"\n')
    with pytest.raises(SiteDataError, match="field larger than field limit"):
        scan_site(site, workers=1)
    assert csv.field_size_limit() == limit


def test_cache_and_logs_hold_no_phi(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = _site(tmp_path)
    cache = tmp_path / "cache"
    caplog.set_level(logging.DEBUG)
    _, manifest = prepare_site(site, cache, config=PreprocessConfig(image_size=32), workers=1)
    studies = load_manifest(manifest)
    assert len(studies) == 2
    forbidden = ["ACC0000001", "ACC0000002", "IM1.dcm", "p1/s1", "20230311", "2023-03-11"]
    for value in PHI.values():
        forbidden.extend(p for p in value.split("^") if len(p) > 2)
    blobs = [p.read_bytes() for p in cache.rglob("*") if p.is_file()]
    blobs.append(caplog.text.encode())
    for blob in blobs:
        for value in forbidden:
            assert value.encode() not in blob, value
    data = json.loads(manifest.read_text())
    assert data["preprocess"]["image_size"] == 32
    assert {s.labels["pleural_effusion"] for s in studies} == {0, 1}


def test_a_patients_studies_link_by_keyed_pseudonym_and_shifted_day(tmp_path: Path) -> None:
    """Two studies of one patient share a pseudonym (never the PatientID) and keep their
    spacing in days (never the date); another patient's study has another pseudonym, and
    each report's graded sizes are kept."""
    site = tmp_path / "site"
    write_radiograph(site / "a" / "IM1.dcm", accession="ACC1", extra={"StudyDate": "20230101"})
    write_radiograph(site / "b" / "IM1.dcm", accession="ACC2", extra={"StudyDate": "20230311"})
    other = {"StudyDate": "20230105", "PatientID": "MRN5550001"}
    write_radiograph(site / "c" / "IM1.dcm", accession="ACC3", extra=other)
    write_reports(
        site / "reports.csv",
        [
            ("ACC1", "FINDINGS: Small right pleural effusion. 5 mm nodule in the right lung."),
            ("ACC2", "FINDINGS: Large right pleural effusion. 9 mm nodule in the right lung."),
            ("ACC3", "FINDINGS: Normal chest."),
        ],
    )
    _, manifest = prepare_site(
        site, tmp_path / "cache", config=PreprocessConfig(image_size=32), workers=1
    )
    studies = sorted(load_manifest(manifest), key=lambda s: s.day or 0)
    first, second = (s for s in studies if s.sizes)
    third = next(s for s in studies if not s.sizes)
    assert first.patient == second.patient != third.patient
    assert "MRN" not in first.patient and len(first.patient) == 16
    assert second.day - first.day == 69
    assert first.sizes == {"nodule": 5.0, "pleural_effusion": 1.0}
    assert second.sizes == {"nodule": 9.0, "pleural_effusion": 3.0}
