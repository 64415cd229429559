"""Shared fixtures: small DICOM radiographs with PHI in their headers, written at test time."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

PHI = {
    "PatientName": "Quackenbush^Theodora^M",
    "PatientID": "MRN7730912",
    "PatientBirthDate": "19520417",
    "InstitutionName": "Saint Hildegard Memorial Hospital",
    "ReferringPhysicianName": "Vandermeer^Octavia",
    "OperatorsName": "Pemberton^Silas",
}


def write_radiograph(
    path: Path,
    *,
    accession: str,
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    view: str = "PA",
    extra: dict[str, object] | None = None,
) -> Path:
    """A minimal but valid CR image file with identifying headers."""
    rng = np.random.default_rng(abs(hash(accession)) % 2**32)
    if pixels is None:
        pixels = (rng.random((96, 80)) * 4000).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.AccessionNumber = accession
    ds.StudyDate = "20230311"
    ds.PatientSex = "F"
    ds.PatientAge = "071Y"
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_reports(path: Path, rows: list[tuple[str, str]], *, indication: str = "") -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number", "report", "indication"])
        for accession, report in rows:
            writer.writerow([accession, report, indication])
    return path


@pytest.fixture
def radiograph_factory() -> Callable[..., Path]:
    return write_radiograph


@pytest.fixture
def reports_factory() -> Callable[..., Path]:
    return write_reports


@pytest.fixture
def fresh_site_process() -> Iterator[None]:
    """A site agent's process as a round finds it: no cached model or studies, one torch
    thread (two spin-waiting threads on a busy 2-core machine run 30x slower)."""
    import torch

    from fedrad.client.federation import site_agent

    site_agent.clear_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    site_agent.clear_caches()
