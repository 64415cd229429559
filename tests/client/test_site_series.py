"""CT and MR series at a site: a study is its best clean series, every other file says why it
was left out, and the cache holds the volume at the model's grid beside radiographs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedrad.client.ingest.dataset import SiteStudies, TrainingExamples
from fedrad.client.ingest.site_data import load_manifest, prepare_site, scan_site
from fedrad.common.model.preprocess import PreprocessConfig
from tests.conftest import write_radiograph, write_reports
from tests.model_fixtures import micro_model

SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT_REPORT = (
    "FINDINGS: 6 mm solid nodule in the right upper lobe. No pleural effusion.\n"
    "IMPRESSION: Right upper lobe nodule."
)


def _site(tmp_path: Path) -> Path:
    """One real CT study (accession 2) exported with three series (a clean 5-slice volume,
    two localizers, a 4-slice series with a 202 mm gap) and a radiograph; one radiograph study."""
    site = tmp_path / "site"
    shutil.copytree(SERIES / "98892001" / "CT5N", site / "ct" / "CT5N")
    shutil.copytree(SERIES / "98892001" / "CT2N", site / "ct" / "CT2N")
    shutil.copytree(SERIES / "77654033" / "CT2", site / "ct" / "CT2")
    write_radiograph(site / "ct" / "scout.dcm", accession="2")  # a radiograph of the study
    write_radiograph(site / "xr" / "IM1.dcm", accession="ACC0000001")
    write_reports(site / "reports.csv", [("2", CT_REPORT), ("ACC0000001", "No acute disease.")])
    return site


def test_a_study_is_its_longest_clean_series_and_every_other_file_says_why(
    tmp_path: Path,
) -> None:
    scan, _ = scan_site(_site(tmp_path), workers=1)
    summary = scan.summary()
    assert summary["usable"] == 2
    assert summary["usable_by_modality"] == {"CT": 1, "radiograph": 1}
    assert summary["series"] == {"seen": 3, "usable": 1}
    ct = next(s for s in scan.studies if s.accession == "2")
    assert (ct.modality, ct.slices) == ("CT", 5)
    assert ct.image_path.startswith("ct/CT5N/")
    assert ct.labels["nodule"] == 1 and ct.nodule_size_mm == 6.0
    reasons = {s.path: s.reason for s in scan.skipped}
    assert all(
        "localizer" in reasons[f"ct/CT2N/{p.name}"] for p in (SERIES / "98892001/CT2N").iterdir()
    )
    assert all(
        "missing slice" in reasons[f"ct/CT2/{p.name}"] for p in (SERIES / "77654033/CT2").iterdir()
    )
    assert "one is used" in reasons["ct/scout.dcm"]
    assert not any(s.path.startswith("ct/CT5N/") for s in scan.skipped)


def test_the_cache_holds_volumes_at_the_model_grid_and_trains(tmp_path: Path) -> None:
    model = micro_model(freeze_encoder=True)
    config = PreprocessConfig(
        image_size=model.config.image_size, volume_shape=model.config.volume_shape
    )
    _, manifest = prepare_site(_site(tmp_path), tmp_path / "cache", config=config, workers=1)
    studies = SiteStudies.from_manifest(manifest)
    shapes = {s.modality: img.shape for s, img in zip(studies.studies, studies.images, strict=True)}
    assert shapes == {
        "CT": (1, *model.config.volume_shape),
        "radiograph": (1, model.config.image_size, model.config.image_size),
    }
    assert {s.modality for s in load_manifest(manifest)} == {"CT", "radiograph"}
    volume = studies.images[[s.modality for s in studies.studies].index("CT")]
    assert np.isfinite(volume.astype(np.float32)).all() and float(volume.std()) > 0.1
    examples = TrainingExamples(studies, model.tokenizer, model.config, seed=0)
    image, vol, modality, *_ = examples[[s.modality for s in studies.studies].index("CT")]
    assert int(modality) == 1 and vol.shape == (1, *model.config.volume_shape)
    assert float(image.abs().sum()) == 0.0  # the radiograph slot of a CT row is empty


@pytest.mark.parametrize("accepted", [frozenset({"CR", "DX"}), frozenset({"CT", "CR"})])
def test_modalities_a_site_does_not_accept_are_refused_by_name(
    tmp_path: Path, accepted: frozenset[str]
) -> None:
    site = tmp_path / "site"
    shutil.copytree(SERIES / "98892003" / "MR700", site / "MR700")
    write_reports(site / "reports.csv", [("2", CT_REPORT)])
    scan, _ = scan_site(site, workers=1, modalities=accepted)
    assert scan.studies == []
    reasons = {s.reason for s in scan.skipped if s.path.startswith("MR700/")}
    assert len(reasons) == 1 and "MR" in reasons.pop()


def test_mr_studies_are_prepared_but_left_out_of_a_model_that_reads_ct(tmp_path: Path) -> None:
    site = _site(tmp_path)
    for source in sorted((SERIES / "98892001" / "CT5N").iterdir()):
        ds = pydicom.dcmread(source)
        ds.Modality, ds.AccessionNumber = "MR", "MR1"
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
        (site / "mr").mkdir(exist_ok=True)
        ds.save_as(site / "mr" / source.name)
    write_reports(
        site / "reports.csv",
        [("2", CT_REPORT), ("ACC0000001", "No acute disease."), ("MR1", "No acute disease.")],
    )
    model = micro_model(freeze_encoder=True)
    config = PreprocessConfig(image_size=32, volume_shape=model.config.volume_shape)
    _, manifest = prepare_site(site, tmp_path / "cache", config=config, workers=1)
    studies = SiteStudies.from_manifest(manifest)
    assert sorted(s.modality for s in studies.studies) == ["CT", "MR", "radiograph"]
    readable = studies.of_modalities(model.config.volume_modalities)
    assert sorted(s.modality for s in readable.studies) == ["CT", "radiograph"]
