"""Tests of the synthetic cohort: DICOM validity, the site data contract, determinism, non-IID
sites, findings that really change the pixels, and argument checks. All tiny (128 px images)."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from fedrad.common.findings import FINDINGS, LATERAL_FINDINGS
from fedrad.common.synthetic import cohort as synth
from fedrad.common.synthetic.cohort import GROUND_TRUTH_COLUMNS, REPORT_COLUMNS, generate_cohort
from fedrad.common.synthetic.cxr_image import Finding, render_chest, sample_anatomy
from fedrad.common.synthetic.report_text import HeaderPHI, ReportStyle, write_report
from fedrad.common.synthetic.site_profiles import (
    BASE_PROFILES,
    SIZE_MULTIPLIERS,
    profile_for_site,
    studies_for_site,
)

SIZE = 128


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cohort") / "c"
    summary = generate_cohort(out, sites=4, studies_per_site=3, seed=11, workers=1, image_size=SIZE)
    return out, summary


def _dicoms(site_dir: Path) -> list[Path]:
    return sorted(p for p in (site_dir / "dicom").rglob("*") if p.is_file())


def test_layout_csv_columns_and_join(cohort: tuple[Path, dict]) -> None:
    out, summary = cohort
    assert sorted(p.name for p in out.iterdir()) == [
        "cohort.json",
        "site_1",
        "site_2",
        "site_3",
        "site_4",
    ]
    assert json.loads((out / "cohort.json").read_text())["sites"] == summary["sites"]
    for i in range(4):
        site = out / f"site_{i + 1}"
        cols, reports = _read_csv(site / "reports.csv")
        assert tuple(cols) == REPORT_COLUMNS
        gcols, truth = _read_csv(site / "ground_truth.csv")
        assert tuple(gcols) == GROUND_TRUTH_COLUMNS
        assert (
            len(reports)
            == len(truth)
            == studies_for_site(i, 3)
            == summary["sites"][f"site_{i + 1}"]["studies"]
        )
        for r in reports:
            assert r["report"].index("FINDINGS:") < r["report"].index("IMPRESSION:")
            assert "\n" in r["report"] and r["indication"]
            dt.date.fromisoformat(r["study_date"])
        files = _dicoms(site)
        accs = {pydicom.dcmread(p, stop_before_pixels=True).AccessionNumber for p in files}
        assert (
            accs
            == {r["accession_number"] for r in reports}
            == {t["accession_number"] for t in truth}
        )
        assert all(p.stem not in accs and len(p.relative_to(site).parts) == 4 for p in files)


def test_ground_truth_values_are_consistent(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    for site in sorted(out.glob("site_*")):
        for row in _read_csv(site / "ground_truth.csv")[1]:
            for f in FINDINGS:
                assert row[f] in ("0", "1") and row[f"report_{f}"] in ("1", "0", "-1")
                if row[f] == "0":  # the report never asserts what the image lacks
                    assert row[f"report_{f}"] == "0"
                if f in LATERAL_FINDINGS:
                    assert (row[f"{f}_side"] in ("left", "right", "bilateral")) == (row[f] == "1")
            assert (row["nodule_size_mm"] != "") == (row["nodule"] == "1")
            assert row["view"] in ("PA", "AP")


def test_every_dicom_decodes_with_its_sites_syntax(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    seen = set()
    for i in range(4):
        prof = profile_for_site(i)
        for p in _dicoms(out / f"site_{i + 1}"):
            ds = pydicom.dcmread(p)
            assert ds.file_meta.TransferSyntaxUID == prof.transfer_syntax
            seen.add(ds.file_meta.TransferSyntaxUID)
            arr = ds.pixel_array
            assert arr.shape == (ds.Rows, ds.Columns) and max(arr.shape) == SIZE
            assert arr.dtype == np.uint16 and int(arr.max()) < 2**ds.BitsStored
            assert arr.std() > 0.02 * 2**ds.BitsStored  # an image, not a constant
            assert ds.Modality == prof.modality and ds.BodyPartExamined == "CHEST"
            assert ds.PhotometricInterpretation == prof.photometric
            assert ds.ViewPosition in ("PA", "AP") and len(ds.PixelSpacing) == 2
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
    assert seen == {ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEGLSLossless}


def test_monochrome1_site_stores_inverted_values(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    mono1 = [i for i in range(4) if profile_for_site(i).photometric == "MONOCHROME1"]
    assert mono1
    ds = pydicom.dcmread(_dicoms(out / f"site_{mono1[0] + 1}")[0])
    arr = ds.pixel_array.astype(float)
    # lungs are dark on screen, so their stored values are HIGHER than the spine's in MONOCHROME1
    rows = slice(int(0.4 * SIZE), int(0.55 * SIZE))
    lung, spine = (
        arr[rows, int(0.2 * SIZE) : int(0.3 * SIZE)],
        arr[rows, int(0.48 * SIZE) : int(0.52 * SIZE)],
    )
    assert lung.mean() > spine.mean()


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEGLSLossless]
)
def test_each_encoding_round_trips_losslessly(syntax: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 2**12, size=(64, 48), dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 48, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    synth._encode(ds, arr, syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert back.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(back.pixel_array, arr)


def test_headers_carry_phi_for_the_deidentifier(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    accessions, uids = [], []
    for i in range(4):
        prof = profile_for_site(i)
        for p in _dicoms(out / f"site_{i + 1}"):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            assert "^" in str(ds.PatientName) and ds.PatientID.startswith("MRN")
            assert len(ds.PatientBirthDate) == 8 and ds.PatientSex in ("M", "F")
            assert ds.PatientAge.endswith("Y") and ds.InstitutionName == prof.institution
            for kw in (
                "InstitutionAddress",
                "ReferringPhysicianName",
                "OperatorsName",
                "StationName",
                "DeviceSerialNumber",
                "StudyID",
                "StudyDate",
                "StudyTime",
                "Manufacturer",
            ):
                assert str(ds.data_element(kw).value)
            assert ds.AccessionNumber.startswith("A") and len(ds.AccessionNumber) == 9
            accessions.append(ds.AccessionNumber)
            uids += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
            if prof.private_phi_tag:
                assert ds.PatientName.family_name in str(ds[0x0029, 0x1010].value)
    assert len(set(accessions)) == len(accessions) and len(set(uids)) == len(uids)


def test_reports_can_echo_header_phi() -> None:
    phi = HeaderPHI(
        given_name="Olivia",
        family_name="Rivera",
        mrn="MRN8124318",
        referring_family="Papadopoulos",
        study_date=dt.date(2020, 8, 20),
        study_time="0719",
        prior_date=dt.date(2019, 3, 2),
    )
    style = ReportStyle(phi_rate=1.0)
    finding = (Finding("pneumothorax", side="left", size="small"),)
    texts = [
        write_report(
            finding, view="PA", devices=(), style=style, phi=phi, rng=np.random.default_rng(s)
        ).text
        for s in range(30)
    ]
    for t in texts:
        assert any(x in t for x in ("Rivera", "8124318", "Papadopoulos"))
    assert any("Dr. Papadopoulos" in t for t in texts) and any("8124318" in t for t in texts)
    none = write_report(
        finding,
        view="PA",
        devices=(),
        style=ReportStyle(phi_rate=0.0),
        phi=phi,
        rng=np.random.default_rng(0),
    )
    assert not any(x in none.text for x in ("Rivera", "8124318", "Papadopoulos", "Olivia"))


def test_report_labels_follow_the_prose() -> None:
    phi = HeaderPHI("A", "B", "MRN1234567", "C", dt.date(2020, 1, 1), "1200", dt.date(2019, 1, 1))
    fs = (Finding("pleural_effusion", side="left", size="small"), Finding("cardiomegaly", ctr=0.6))
    for s in range(10):
        rng = np.random.default_rng(s)
        hedged = write_report(
            fs,
            view="AP",
            devices=(),
            style=ReportStyle(hedge_rate=1.0, miss_rate=0.0),
            phi=phi,
            rng=rng,
        )
        assert hedged.labels["pleural_effusion"] == hedged.labels["cardiomegaly"] == -1
        stated = write_report(
            fs,
            view="PA",
            devices=(),
            style=ReportStyle(hedge_rate=0.0, miss_rate=0.0),
            phi=phi,
            rng=rng,
        )
        assert stated.labels["pleural_effusion"] == stated.labels["cardiomegaly"] == 1
        assert "left" in stated.text.lower()
        missed = write_report(
            fs,
            view="PA",
            devices=(),
            style=ReportStyle(hedge_rate=0.0, miss_rate=1.0),
            phi=phi,
            rng=rng,
        )
        assert set(missed.labels.values()) == {0}
        normal = write_report((), view="PA", devices=(), style=ReportStyle(), phi=phi, rng=rng)
        assert set(normal.labels.values()) == {0} and "IMPRESSION:" in normal.text


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path: Path) -> None:
    kw = {"sites": 2, "studies_per_site": 2, "image_size": 96}
    generate_cohort(tmp_path / "a", seed=3, workers=1, **kw)
    ticks: list[int] = []
    generate_cohort(tmp_path / "b", seed=3, workers=2, progress=ticks.append, **kw)
    generate_cohort(tmp_path / "c", seed=4, workers=1, **kw)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert sum(ticks) == sum(studies_for_site(i, 2) for i in range(2))
    assert set(a.values()).isdisjoint(c.values())  # every file differs, cohort.json included


def test_sites_are_non_iid() -> None:
    rng = np.random.default_rng(0)
    prev = {}
    for p in BASE_PROFILES:
        draws = [p.draw_findings(rng) for _ in range(3000)]
        prev[p.kind] = {f: np.mean([f in d for d in draws]) for f in FINDINGS}
        prev[p.kind]["none"] = np.mean([not d for d in draws])
    assert prev["icu"]["pleural_effusion"] > 2 * prev["outpatient"]["pleural_effusion"]
    assert prev["icu"]["pneumothorax"] > 3 * prev["outpatient"]["pneumothorax"]
    assert prev["trauma"]["fracture"] > 4 * max(
        prev[k]["fracture"] for k in ("outpatient", "icu", "community")
    )
    assert prev["outpatient"]["nodule"] > 2 * max(
        prev[k]["nodule"] for k in ("icu", "trauma", "community")
    )
    assert prev["community"]["consolidation"] > prev["trauma"]["consolidation"]
    for k in prev:
        assert 0.2 < prev[k]["none"] < 0.5
    equipment = {
        (p.transfer_syntax, p.rows, p.cols, p.detector.bits_stored, p.modality)
        for p in BASE_PROFILES
    }
    assert len(equipment) == len(BASE_PROFILES)


def test_site_sizes_and_profile_cycling() -> None:
    assert [studies_for_site(i, 100) for i in range(4)] == [
        round(100 * m) for m in SIZE_MULTIPLIERS
    ]
    assert studies_for_site(2, 1) == 1  # never empty
    p5 = profile_for_site(5)
    assert p5.transfer_syntax == BASE_PROFILES[1].transfer_syntax
    assert p5.institution != BASE_PROFILES[1].institution and p5.name != BASE_PROFILES[1].name
    assert p5.finding_rates != BASE_PROFILES[1].finding_rates
    assert profile_for_site(5) == p5  # deterministic


# ---- findings are visible where they should be ------------------------------------------


def _pair(finding: Finding, *, view: str = "PA") -> tuple[np.ndarray, np.ndarray]:
    """(normal, with finding) for the same patient, 256 px, no rotation or shift."""
    a = sample_anatomy(np.random.default_rng(1), sex="M", view=view)
    a = dataclasses.replace(a, rotation_deg=0.0, shift_x=0.0, shift_y=0.0)
    kw = {"rows": 256, "cols": 256, "spacing_mm": 1.4, "view": view}
    base = render_chest(a, (), rng=np.random.default_rng(5), **kw)
    with_f = render_chest(a, (finding,), rng=np.random.default_rng(5), **kw)
    return base, with_f


def _small(img: np.ndarray) -> np.ndarray:
    return img.reshape(128, 2, 128, 2).mean(axis=(1, 3))  # what the model sees


def test_cardiomegaly_widens_the_heart() -> None:
    base, big = _pair(Finding("cardiomegaly", ctr=0.64))
    rows = slice(150, 175)  # lower chest, above the domes (image centre is row 128)
    thr = 0.5 * (np.median(base[rows, 40:70]) + np.median(base[rows, 120:136]))
    width_normal = (base[rows] > thr).sum(axis=1).mean()
    width_big = (big[rows] > thr).sum(axis=1).mean()
    assert width_big > 1.15 * width_normal
    assert (_small(big) - _small(base))[75:88, 64:110].mean() > 0.03  # patient left = image right


def test_effusion_brightens_the_lower_lung_on_its_side() -> None:
    base, eff = _pair(Finding("pleural_effusion", side="left", size="moderate"))
    d = _small(eff) - _small(base)
    left_lower, right_lower = d[70:95, 68:115].mean(), d[70:95, 13:60].mean()
    assert left_lower > 0.03 and abs(right_lower) < 1e-6


def test_pneumothorax_darkens_the_apex_on_its_side() -> None:
    base, ptx = _pair(Finding("pneumothorax", side="right", size="moderate"))
    d = _small(ptx) - _small(base)
    assert d[20:45, 13:55].mean() < -0.01 and np.abs(d[:, 70:]).max() < 1e-6


@pytest.mark.parametrize(
    "finding",
    [
        Finding("nodule", side="left", size_mm=10.0, zone="upper"),
        Finding("consolidation", side="left", zone="lower"),
        Finding("fracture", side="left", rib=6),
    ],
)
def test_focal_findings_change_only_their_side(finding: Finding) -> None:
    base, with_f = _pair(finding)
    d = _small(with_f) - _small(base)
    assert np.abs(d[:, 66:]).max() > 0.03  # visible at 128 px on the patient's left
    assert np.abs(d[:, :60]).max() < 1e-6


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sites"):
        generate_cohort(tmp_path / "x", sites=0, studies_per_site=1, seed=0)
    with pytest.raises(ValueError, match="studies_per_site"):
        generate_cohort(tmp_path / "x", sites=1, studies_per_site=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        generate_cohort(tmp_path / "x", sites=1, studies_per_site=1, seed=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        generate_cohort(tmp_path / "full", sites=1, studies_per_site=1, seed=0)
    assert not (tmp_path / "x").exists()
