"""Synthetic cohort -> site check -> prepared cache: every study usable, and no header PHI (names,
IDs, accession numbers, birth dates, institution, private tags) anywhere ingestion writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from fedrad.client.cli import app as site_app
from fedrad.common.synthetic.cohort import generate_cohort

pytestmark = pytest.mark.integration


def _header_phi(site: Path) -> set[str]:
    values: set[str] = set()
    for path in site.rglob("*"):
        if not path.is_file() or path.suffix == ".csv":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in (
            "PatientName",
            "PatientID",
            "AccessionNumber",
            "PatientBirthDate",
            "InstitutionName",
            "ReferringPhysicianName",
            "OperatorsName",
            "StudyInstanceUID",
            "SOPInstanceUID",
        ):
            raw = str(ds.get(keyword, "") or "")
            values.update(p for p in raw.replace("^", " ").split() if len(p) > 3)
            if raw and keyword.endswith(("UID", "Number", "ID", "Date")):
                values.add(raw)
        for elem in ds:
            if elem.tag.is_private and isinstance(elem.value, str) and len(elem.value) > 3:
                values.add(elem.value)
    return values


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "c"
    generate_cohort(out, sites=3, studies_per_site=8, seed=5, workers=1, image_size=128)
    return out


def test_every_synthetic_study_is_usable(cohort: Path) -> None:
    runner = CliRunner()
    for site in sorted(p for p in cohort.iterdir() if p.is_dir()):
        result = runner.invoke(site_app, ["check", str(site), "--json", "--workers", "1"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["skipped"] == []
        assert summary["usable"] == summary["files_seen"] == summary["reports"]


def test_no_header_phi_in_cache_or_logs(
    cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    for site in sorted(p for p in cohort.iterdir() if p.is_dir()):
        cache = tmp_path / site.name
        result = runner.invoke(
            site_app, ["prepare", str(site), "--cache-dir", str(cache), "--workers", "1", "-v"]
        )
        assert result.exit_code == 0, result.output
        phi = _header_phi(site)
        assert len(phi) > 10
        written = [p.read_bytes() for p in cache.rglob("*") if p.is_file()]
        written.append(caplog.text.encode())
        for blob in written:
            text = blob.decode("utf-8", errors="ignore")
            leaked = sorted(v for v in phi if v in text)
            assert not leaked, leaked
