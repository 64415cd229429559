"""Reading one DICOM file into a checked, decoded grayscale radiograph, or a reason it is unusable.

Every failure becomes a one-line reason instead of an exception, because a hospital export holds
whatever its PACS wrote: files without a preamble, structured reports, colour ultrasound,
truncated pixel data. Reasons never contain header values (they may be identifying).
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

logger = logging.getLogger(__name__)

# pydicom logs decoder tracebacks and "invalid value" warnings that quote header values, which may
# be identifying; the site sees our one-line reasons instead.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)

RADIOGRAPH_MODALITIES: Final[frozenset[str]] = frozenset({"CR", "DX", "DR", "RG"})
"""Projection radiography: what the model reads. Other modalities are reported and skipped."""

GRAYSCALE: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})

COLOUR: Final[frozenset[str]] = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
)
"""Colour encodings pydicom decodes to RGB. A radiograph exported as colour (a secondary
capture, a teaching-file export) is accepted when its picture is grey, as its luminance."""

GREY_TOLERANCE: Final[float] = 0.02
"""How far the channels of a grey picture may differ, as a fraction of the pixel range, at the
99th percentile: lossy chroma subsampling leaves about 1% on a grey image."""

MIN_SIDE: Final[int] = 32
"""Images smaller than this carry too little to resize into the model input honestly."""

# What pydicom and its plugins raise on malformed input; anything else is a bug and propagates.
READ_ERRORS: Final[tuple[type[BaseException], ...]] = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    AttributeError,
    TypeError,
    IndexError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    MemoryError,
    struct.error,
    zlib.error,
    UnicodeDecodeError,
)


@dataclass(frozen=True)
class DicomFile:
    """A readable DICOM dataset (pixels not yet decoded) and its transfer syntax name."""

    dataset: Dataset
    transfer_syntax: str


@dataclass(frozen=True)
class Radiograph:
    """Decoded pixels in display orientation (higher = brighter) plus the header it came from."""

    pixels: np.ndarray  # float32, 2-D
    dataset: Dataset


class UnusableError(Exception):
    """A file that cannot be used, with the one-line reason shown to the site."""


def read_dicom(path: Path) -> DicomFile:
    """Parses a file as DICOM; files without a preamble or meta header are read if plausible."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path)
        except InvalidDicomError:
            ds = _read_forced(path)
        except READ_ERRORS as exc:
            raise UnusableError(f"unreadable DICOM ({type(exc).__name__})") from exc
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = _guess_syntax(ds)
    syntax = UID(meta.TransferSyntaxUID)
    return DicomFile(ds, syntax.name if syntax.is_transfer_syntax else str(syntax))


def _read_forced(path: Path) -> Dataset:
    """Reads a file lacking the DICM preamble; accepts it only if it parses to image-like data."""
    try:
        ds = dcmread(path, force=True)
    except READ_ERRORS as exc:
        raise UnusableError("not a DICOM file") from exc
    try:
        plausible = len(ds) > 0 and any(
            tag in ds for tag in ("SOPClassUID", "PixelData", "Modality", "StudyInstanceUID")
        )
    except READ_ERRORS:
        plausible = False
    if not plausible:
        raise UnusableError("not a DICOM file")
    return ds


def _guess_syntax(ds: Dataset) -> UID:
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def check_image_header(ds: Dataset, *, modalities: frozenset[str]) -> None:
    """Raises UnusableError when the header says this is not a single grayscale radiograph."""
    try:
        has_pixels = "PixelData" in ds
        kind = str(ds.get("Modality", "") or "").strip().upper()
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        frames_raw = ds.get("NumberOfFrames", 1)
        burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    except READ_ERRORS as exc:
        raise UnusableError(f"malformed header ({type(exc).__name__})") from exc
    if not has_pixels:
        sop = _sop_name(ds)
        raise UnusableError(f"no pixel data ({sop})" if sop else "no pixel data")
    try:
        frames = int(frames_raw or 1)
    except (TypeError, ValueError) as exc:
        raise UnusableError("malformed header (NumberOfFrames is not a number)") from exc
    if photometric not in GRAYSCALE | COLOUR:
        shown = photometric or "missing"
        raise UnusableError(
            f"unsupported photometric interpretation {shown} "
            "(expects MONOCHROME1/MONOCHROME2, or a grey picture stored as RGB/YBR)"
        )
    if frames > 1:
        raise UnusableError(
            f"multi-frame image ({frames} frames; expects one projection radiograph)"
        )
    if burned == "YES":
        raise UnusableError("burned-in annotation flagged (pixels may show identifiers)")
    if not kind:
        raise UnusableError("no Modality in header")
    if kind not in modalities:
        raise UnusableError(
            f"modality {kind} is not a projection radiograph "
            f"(accepted: {', '.join(sorted(modalities))})"
        )


def _sop_name(ds: Dataset) -> str:
    try:
        uid = UID(str(ds.get("SOPClassUID", "") or ""))
    except READ_ERRORS:
        return ""
    return uid.name if uid and uid.name != str(uid) else ""


def decode_pixels(dicom: DicomFile) -> np.ndarray:
    """Raw stored pixels, or UnusableError with the decoder's short complaint."""
    ds = dicom.dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = ds.pixel_array
        except READ_ERRORS as exc:
            raise UnusableError(
                f"pixel data could not be decoded ({dicom.transfer_syntax})"
            ) from exc
    if arr.size == 0:
        raise UnusableError("empty pixel data")
    return arr


def grey_from_colour(arr: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R BT.601) of an RGB picture whose channels agree; a colour picture (an
    ultrasound with Doppler, a photograph) is refused: the model reads radiographs."""
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnusableError(f"colour pixel array of shape {arr.shape} (expects rows x columns x 3)")
    rgb = arr.astype(np.float32)
    full = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else 1.0
    spread = float(np.percentile(np.ptp(rgb, axis=-1), 99))
    if spread > GREY_TOLERANCE * full:
        raise UnusableError(
            f"colour image (channels differ by {spread / full:.0%} of the range; "
            "a radiograph stored as colour must be grey)"
        )
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_display(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT applied and MONOCHROME1 inverted, so brighter always means denser tissue;
    a grey picture stored as colour becomes its luminance first."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in COLOUR:
        arr = grey_from_colour(arr)
    if arr.ndim != 2:
        raise UnusableError(f"pixel array has {arr.ndim} dimensions (expects a 2-D image)")
    if min(arr.shape) < MIN_SIDE:
        raise UnusableError(f"image too small ({arr.shape[1]}x{arr.shape[0]} pixels)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except READ_ERRORS as exc:
            raise UnusableError(
                f"modality LUT could not be applied ({type(exc).__name__})"
            ) from exc
    if not np.isfinite(values).all():
        raise UnusableError("pixel values are not finite")
    if float(values.max()) == float(values.min()):
        raise UnusableError("blank image (all pixels equal)")
    if photometric == "MONOCHROME1":
        values = values.max() - values + values.min()
    return values


def load_radiograph(
    path: Path, *, modalities: frozenset[str] = RADIOGRAPH_MODALITIES
) -> Radiograph:
    """The whole read -> check -> decode path for one file."""
    return decode_radiograph(read_dicom(path), modalities=modalities)


def decode_radiograph(
    dicom: DicomFile,
    *,
    modalities: frozenset[str],
    on_decoded: Callable[[], None] | None = None,
) -> Radiograph:
    """Decodes first (so a site learns which files its decoders can read), then checks."""
    raw = None
    if "PixelData" in dicom.dataset:
        raw = decode_pixels(dicom)
        if on_decoded is not None:
            on_decoded()
    check_image_header(dicom.dataset, modalities=modalities)
    if raw is None:  # check_image_header refuses files without pixel data; kept for type safety
        raise UnusableError("no pixel data")
    return Radiograph(pixels=to_display(raw, dicom.dataset), dataset=dicom.dataset)
