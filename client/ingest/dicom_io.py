"""Reading one DICOM file into a checked, decoded grayscale radiograph, or a reason it is unusable.

Every failure becomes a one-line reason instead of an exception, because a hospital export holds
whatever its PACS wrote: files without a preamble, structured reports, colour ultrasound,
truncated pixel data. Reasons never contain header values (they may be identifying).
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import (
    _read_file_meta_info,  # public `read_file_meta_info` takes only a path
    read_dataset,
    read_partial,
    read_preamble,
)
from pydicom.pixels import apply_modality_lut
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from fedrad.client.ingest.decode_limits import (
    DEFAULT_LIMITS,
    CostError,
    DecodeLimits,
    check_decode_cost,
    check_file_size,
    mib,
)
from fedrad.client.ingest.site_files import RefusedFileError, open_regular_file

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

UID_SHAPE: Final[re.Pattern[str]] = re.compile(r"[0-9.]{1,64}")

DEFINED_TERM: Final[re.Pattern[str]] = re.compile(r"[A-Z0-9_ ]{1,16}")

PIXEL_TAGS: Final[frozenset[BaseTag]] = frozenset(
    Tag(keyword) for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
)

DEFLATE_PEEK_BYTES: Final[int] = 4 << 20
"""How much of a deflated dataset is inflated to read its header (headers are kilobytes)."""

MIN_SIDE: Final[int] = 32
"""Images smaller than this carry too little to resize into the model input honestly."""

# What pydicom and its plugins raise on malformed input; anything else is a bug and propagates.
READ_ERRORS: Final[tuple[type[BaseException], ...]] = (
    InvalidDicomError,
    BytesLengthException,
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


def read_dicom(path: Path, *, limits: DecodeLimits = DEFAULT_LIMITS) -> DicomFile:
    """A file a person named (a scan to read, a test file): opened only if it is a regular file,
    then read as `read_dicom_handle` does."""
    try:
        with open_regular_file(path) as (handle, size):
            return read_dicom_handle(handle, size, limits=limits)
    except RefusedFileError as exc:
        raise UnusableError(str(exc)) from exc


def read_dicom_handle(
    handle: BinaryIO, size: int, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> DicomFile:
    """Parses an open file as DICOM, bounded: the file meta and the header before the pixel data
    are read first and the pixel data's decoded size is checked against `limits`; only then is
    the whole dataset read (a deflated one inflated under a cap). Files without a preamble or
    meta header are read if plausible."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check_file_size(size, limits)
            ds = _read_bounded(handle, size, limits)
            meta = getattr(ds, "file_meta", None)
            if meta is None:
                meta = FileMetaDataset()
                ds.file_meta = meta
            if "TransferSyntaxUID" not in meta:
                meta.TransferSyntaxUID = _guess_syntax(ds)
            syntax = UID(meta.TransferSyntaxUID)
            if syntax.is_transfer_syntax:
                name = syntax.name
            elif UID_SHAPE.fullmatch(str(syntax)):
                name = f"unknown transfer syntax {syntax}"
            else:
                name = "malformed transfer syntax UID"
        except CostError as exc:
            raise UnusableError(str(exc)) from exc
        except READ_ERRORS as exc:  # anything pydicom raises on hostile bytes
            raise UnusableError(f"unreadable DICOM ({type(exc).__name__})") from exc
    return DicomFile(ds, name)


def _read_bounded(handle: BinaryIO, size: int, limits: DecodeLimits) -> Dataset:
    """The file meta first, to learn whether the dataset is deflated; then the dataset."""
    preamble = read_preamble(handle, force=True)
    meta = _read_file_meta_info(handle)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _read_deflated(handle, size, preamble, meta, limits)
    return _read_plain(handle, size, limits)


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in PIXEL_TAGS


def _read_plain(handle: BinaryIO, size: int, limits: DecodeLimits) -> Dataset:
    """Header to the pixel data, its cost checked, then the whole file."""
    handle.seek(0)
    forced = False
    try:
        header = read_partial(handle, stop_when=_at_pixel_data)
    except InvalidDicomError:
        forced = True
        handle.seek(0)
        header = _read_forced(handle)
    checked = handle.tell() < size  # stopped at the pixel data
    if checked:
        check_decode_cost(header, size, limits)
    handle.seek(0)
    ds = dcmread(handle, force=forced)
    if not checked and any(tag in ds for tag in PIXEL_TAGS):
        check_decode_cost(ds, size, limits)  # the header pass never reached them
    return ds


def _read_forced(handle: BinaryIO) -> Dataset:
    """The header of a file lacking the DICM preamble, accepted only if it is image-like."""
    try:
        ds = read_partial(handle, stop_when=_at_pixel_data, force=True)
    except READ_ERRORS as exc:
        raise UnusableError("not a DICOM file") from exc
    try:
        plausible = len(ds) > 0 and any(
            tag in ds for tag in ("SOPClassUID", "Modality", "StudyInstanceUID", "Rows")
        )
    except READ_ERRORS:
        plausible = False
    if not plausible:
        raise UnusableError("not a DICOM file")
    return ds


def _read_deflated(
    handle: BinaryIO,
    size: int,
    preamble: bytes | None,
    meta: FileMetaDataset,
    limits: DecodeLimits,
) -> Dataset:
    """A Deflated Explicit VR Little Endian dataset, inflated in two bounded steps: enough to
    read the header and check its pixel data's cost, then the rest up to what the header
    declared (never past `limits.max_inflated_bytes`). pydicom would inflate it whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    cap = limits.max_inflated_bytes
    try:
        compressed = handle.read()
        chunks = [inflater.decompress(compressed, min(DEFLATE_PEEK_BYTES, cap))]
        del compressed
        peek = DicomBytesIO(chunks[0])
        header = read_dataset(peek, False, True, stop_when=_at_pixel_data)
        checked = peek.tell() < len(chunks[0])  # stopped at the pixel data
        if checked:
            check_decode_cost(header, size, limits)
        total = len(chunks[0])
        while inflater.unconsumed_tail:
            if total >= cap:
                raise CostError(f"deflated dataset inflates past the {mib(cap)} limit")
            chunks.append(inflater.decompress(inflater.unconsumed_tail, cap - total))
            total += len(chunks[-1])
        chunks.append(inflater.flush())
        if total + len(chunks[-1]) > cap:
            raise CostError(f"deflated dataset inflates past the {mib(cap)} limit")
        buffer = DicomBytesIO(b"".join(chunks))
        del chunks
        dataset = read_dataset(buffer, False, True)
        if not checked and any(tag in dataset for tag in PIXEL_TAGS):
            check_decode_cost(dataset, size, limits)  # a header longer than the peek
    except READ_ERRORS as exc:
        raise UnusableError(f"unreadable deflated DICOM ({type(exc).__name__})") from exc
    ds = FileDataset("", dataset, preamble=preamble, file_meta=meta, is_implicit_VR=False)
    ds.set_original_encoding(False, True, dataset._character_set)
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
        shown = shown_term(photometric) if photometric else "missing"
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
            f"modality {shown_term(kind)} is not a projection radiograph "
            f"(accepted: {', '.join(sorted(modalities))})"
        )


def shown_term(value: str) -> str:
    """A coded header value (a modality, a photometric interpretation) as a reason may show it:
    as it is when it has the shape of a DICOM defined term (CS: upper case, digits, space,
    underscore, 16 characters), else not at all, since a crafted header can put anything
    there, identifiers included."""
    return value if DEFINED_TERM.fullmatch(value) else "(not a DICOM code string)"


def _sop_name(ds: Dataset) -> str:
    try:
        uid = UID(str(ds.get("SOPClassUID", "") or ""))
    except READ_ERRORS:
        return ""
    return uid.name if uid and uid.name != str(uid) else ""


def decode_pixels(dicom: DicomFile) -> np.ndarray:
    """Raw stored pixels, or UnusableError with the decoder's short complaint. Every DicomFile
    came through `read_dicom_handle`, so its decoded size was checked already."""
    ds = dicom.dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = ds.pixel_array
        except MemoryError as exc:
            raise UnusableError(
                f"pixel data could not be decoded within this process's memory limit "
                f"({dicom.transfer_syntax})"
            ) from exc
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust decoder's panic is a BaseException (pyo3)
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
    """The whole read -> check -> decode path for one file a person named."""
    return decode_radiograph(read_dicom(path), modalities=modalities)


def decode_radiograph(
    dicom: DicomFile,
    *,
    modalities: frozenset[str],
    on_decoded: Callable[[], None] | None = None,
) -> Radiograph:
    """Checks the header (modality, frames, photometric interpretation), then decodes: a file
    that is not a radiograph never reaches a decoder."""
    with warnings.catch_warnings():  # pydicom's warnings quote header values
        warnings.simplefilter("ignore")
        check_image_header(dicom.dataset, modalities=modalities)
        raw = decode_pixels(dicom)
        if on_decoded is not None:
            on_decoded()
        return Radiograph(pixels=to_display(raw, dicom.dataset), dataset=dicom.dataset)
