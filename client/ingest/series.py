"""Reading CT and MR series into checked 3-D volumes, or a one-line reason they are not one.

A radiograph is one file; a CT or MR volume is many files (or many frames of one file) that only
become an image once ordered in space, and a PACS export mixes localizers, repeated phases,
re-sent copies and missing slices into a series. A volume with a slice missing or two phases
interleaved still looks like anatomy to a model, so slices are ordered by their position along
the plane normal (never by file name or InstanceNumber) and any doubt is refused, not guessed at.
Reading reuses `dicom_io` (bounded parsing and decoding); reasons never quote header values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from fedrad.client.ingest.decode_limits import mib
from fedrad.client.ingest.dicom_io import (
    GRAYSCALE,
    READ_ERRORS,
    DicomFile,
    UnusableError,
    decode_pixels,
    shown_term,
)

logger = logging.getLogger(__name__)

VOLUME_MODALITIES: Final[frozenset[str]] = frozenset({"CT", "MR"})
MIN_SLICES: Final[int] = 3
MAX_VOLUME_VOXELS: Final[int] = 160 * 1024 * 1024
"""Memory bound of one assembled volume (640 MiB as float32), checked before stacking."""

LOCALIZER_TYPES: Final[frozenset[str]] = frozenset({"LOCALIZER", "SCOUT"})
LOCALIZER_REASON: Final[str] = "localizer image, not part of the volume"

ORIENTATION_TOLERANCE: Final[float] = 1e-3
"""Largest difference between two slices' direction cosines that still counts as one plane."""
ORTHONORMAL_TOLERANCE: Final[float] = 1e-2
PIXEL_SPACING_TOLERANCE: Final[float] = 0.01
"""Relative: slices whose pixel spacings differ by more than this are not one grid."""
SAME_POSITION_MM: Final[float] = 0.01
"""Two slices closer than this along the normal are at one position (a copy, or another phase)."""
STEP_TOLERANCE: Final[float] = 0.10
STEP_TOLERANCE_MM: Final[float] = 0.1
"""A step between slices may differ from the series' step by 10% or 0.1 mm, whichever is more
(headers round positions)."""
IN_PLANE_TOLERANCE: Final[float] = 0.5
"""Pixels a slice may sit off the line through the first slice along the normal: more and the
stack is sheared (a tilted gantry), which a plain voxel grid would misplace."""

TIME_POINTERS: Final[frozenset[int]] = frozenset(
    {
        0x00181063,  # FrameTime
        0x00181065,  # FrameTimeVector
        0x00181060,  # TriggerTime
        0x00540070,  # TimeSlotVector
        0x00540100,  # TimeSliceVector
    }
)
"""FrameIncrementPointer targets saying a classic multi-frame object's frames are time points
(a cine), not slices: its frames are then phases at one position, never a derived stack."""


@dataclass(frozen=True)
class Frame:
    """One 2-D frame of a file with the geometry that places it; picklable (it crosses a process
    pool), so a site walk decodes files in workers and assembles series in the parent."""

    rel_path: str
    frame_index: int
    modality: str
    study_uid: str
    series_uid: str
    accession: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    spacing_between: float | None
    image_type: tuple[str, ...]
    phase: str
    instance_number: int | None
    pixels: np.ndarray  # float32 (rows, cols), modality LUT applied (HU for CT), not inverted


@dataclass(frozen=True)
class Volume:
    """Slices in spatial order (ascending along the normal) on one regular grid."""

    voxels: np.ndarray  # float32 (slices, rows, cols)
    spacing: tuple[float, float, float]  # (slice step, row spacing, column spacing) mm
    orientation: tuple[float, ...]
    origin: tuple[float, float, float]
    modality: str
    study_uid: str
    series_uid: str
    accession: str
    set_aside: tuple[tuple[str, str], ...]


def is_volume_candidate(ds: Dataset) -> bool:
    """Modality CT or MR with pixel data: such a file goes down the series path rather than the
    radiograph path (which refuses it). A header too broken to say is not a candidate."""
    try:
        kind = str(ds.get("Modality", "") or "").strip().upper()
        return kind in VOLUME_MODALITIES and "PixelData" in ds
    except READ_ERRORS:
        return False


# ---------------------------------------------------------------------------------------------
# Reading one file into frames


def read_frames(
    dicom: DicomFile, *, rel_path: str = "", modalities: frozenset[str] = VOLUME_MODALITIES
) -> list[Frame]:
    """The frames of one CT/MR file with their geometry, decoded and in modality units (HU for
    CT). The header is checked before any decoder runs. Classic single- and multi-frame objects
    and enhanced objects (functional groups) are read; a multi-frame object with one position
    gets its frames' positions derived along the normal. UnusableError(reason) otherwise."""
    ds = dicom.dataset
    with warnings.catch_warnings():  # pydicom's warnings quote header values
        warnings.simplefilter("ignore")
        try:
            count, modality = _check_volume_header(ds, modalities)
            geometry = _frame_geometry(ds, count)
            study_uid = _text(ds, "StudyInstanceUID")
            series_uid = _text(ds, "SeriesInstanceUID")
            accession = _text(ds, "AccessionNumber")
            instance = _integer(ds.get("InstanceNumber"))
        except READ_ERRORS as exc:
            raise UnusableError(f"malformed header ({type(exc).__name__})") from exc
        if not series_uid:
            raise UnusableError("no SeriesInstanceUID (its slices cannot be grouped)")
        raw = decode_pixels(dicom)
        stack = _frame_stack(raw, count, ds)
        values = _modality_values(stack, ds, geometry)
    return [
        Frame(
            rel_path=rel_path,
            frame_index=index,
            modality=modality,
            study_uid=study_uid,
            series_uid=series_uid,
            accession=accession,
            position=geo.position,
            orientation=geo.orientation,
            pixel_spacing=geo.pixel_spacing,
            thickness=geo.thickness,
            spacing_between=geo.spacing_between,
            image_type=geo.image_type,
            phase=geo.phase,
            instance_number=instance,
            pixels=values[index],
        )
        for index, geo in enumerate(geometry)
    ]


def _check_volume_header(ds: Dataset, modalities: frozenset[str]) -> tuple[int, str]:
    """(number of frames, modality), or UnusableError when the header says this is not a
    grayscale CT/MR image that a volume could be built from."""
    if "PixelData" not in ds:
        raise UnusableError("no pixel data")
    kind = str(ds.get("Modality", "") or "").strip().upper()
    if not kind:
        raise UnusableError("no Modality in header")
    if kind not in modalities:
        raise UnusableError(
            f"modality {shown_term(kind)} is not a volume modality "
            f"(accepted: {', '.join(sorted(modalities))})"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in GRAYSCALE:
        shown = shown_term(photometric) if photometric else "missing"
        raise UnusableError(
            f"unsupported photometric interpretation {shown} "
            "(a CT/MR slice is MONOCHROME1/MONOCHROME2)"
        )
    samples = _integer(ds.get("SamplesPerPixel", 1))
    if samples not in (None, 1):
        raise UnusableError(f"{samples} samples per pixel (a CT/MR slice has 1)")
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        count = int(frames_raw if frames_raw not in (None, "") else 1)
    except (TypeError, ValueError) as exc:
        raise UnusableError("malformed header (NumberOfFrames is not a number)") from exc
    if count < 1:
        raise UnusableError("malformed header (NumberOfFrames is below 1)")
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise UnusableError("burned-in annotation flagged (pixels may show identifiers)")
    return count, kind


@dataclass(frozen=True)
class _Geometry:
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    spacing_between: float | None
    image_type: tuple[str, ...]
    phase: str
    rescale: tuple[float, float] | None  # (slope, intercept) from a functional group


def _frame_geometry(ds: Dataset, count: int) -> list[_Geometry]:
    """Each frame's geometry: per-frame functional group, else shared group, else the top-level
    attribute. Without per-frame positions, a multi-frame object's positions are derived."""
    per_frame = _group_items(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) != count:
        raise UnusableError(
            f"malformed header (PerFrameFunctionalGroupsSequence has {len(per_frame)} items "
            f"for {count} frames)"
        )
    shared_items = _group_items(ds, "SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else None
    top_type = _image_type(ds.get("ImageType"))
    top_position = _numbers(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
    top_orientation = _numbers(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
    top_spacing = _numbers(ds.get("PixelSpacing"), 2, "PixelSpacing")
    top_thickness = _number(ds.get("SliceThickness"), "SliceThickness")
    top_between = _number(ds.get("SpacingBetweenSlices"), "SpacingBetweenSlices")
    frames: list[_Geometry] = []
    grouped_positions = False
    for index in range(count):
        item = per_frame[index] if per_frame else None
        plane = _macro("PlanePositionSequence", item, shared)
        position = None
        if plane is not None:
            position = _numbers(plane.get("ImagePositionPatient"), 3, "ImagePositionPatient")
            grouped_positions = grouped_positions or position is not None
        orient = _macro("PlaneOrientationSequence", item, shared)
        orientation = (
            _numbers(orient.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
            if orient is not None
            else None
        ) or top_orientation
        measures = _macro("PixelMeasuresSequence", item, shared)
        spacing, thickness, between = top_spacing, top_thickness, top_between
        if measures is not None:
            spacing = _numbers(measures.get("PixelSpacing"), 2, "PixelSpacing") or spacing
            thickness = _number(measures.get("SliceThickness"), "SliceThickness") or thickness
            between = (
                _number(measures.get("SpacingBetweenSlices"), "SpacingBetweenSlices") or between
            )
        frame_type = _macro("MRImageFrameTypeSequence", item, shared) or _macro(
            "CTImageFrameTypeSequence", item, shared
        )
        image_type = _image_type(frame_type.get("FrameType")) if frame_type is not None else ()
        frames.append(
            _Geometry(
                position=cast("tuple[float, float, float] | None", position),
                orientation=orientation,
                pixel_spacing=cast("tuple[float, float] | None", spacing),
                thickness=thickness,
                spacing_between=between,
                image_type=image_type or top_type,
                phase=_phase(ds, item, shared),
                rescale=_rescale(_macro("PixelValueTransformationSequence", item, shared)),
            )
        )
    if grouped_positions:
        return frames
    if count == 1:
        return [_replace_position(frames[0], top_position)]
    return _derived_positions(ds, frames, top_position)


def _derived_positions(
    ds: Dataset, frames: list[_Geometry], first: tuple[float, ...] | None
) -> list[_Geometry]:
    """A multi-frame object with one ImagePositionPatient: frame i lies i steps along the normal
    (SpacingBetweenSlices, else SliceThickness), the layout such objects use. Frames that are
    time points (FrameIncrementPointer to a time, or differing phases) all get the one position,
    so assembly refuses them as phases; frames indexed by anything else get no position."""
    pointers = _pointers(ds.get("FrameIncrementPointer"))
    if first is not None and pointers & TIME_POINTERS:
        return [
            _replace_position(geo, first, phase=f"{geo.phase};frame={index}".lstrip(";"))
            for index, geo in enumerate(frames)
        ]
    if first is not None and len({geo.phase for geo in frames}) > 1:
        return [_replace_position(geo, first) for geo in frames]
    step = frames[0].spacing_between or frames[0].thickness
    orientation = frames[0].orientation
    if pointers or first is None or orientation is None or not step:
        return [_replace_position(geo, None) for geo in frames]
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    length = float(np.linalg.norm(normal))
    if length == 0:
        return [_replace_position(geo, None) for geo in frames]
    normal = normal / length
    origin = np.asarray(first, dtype=np.float64)
    return [
        _replace_position(geo, tuple(float(v) for v in origin + index * step * normal))
        for index, geo in enumerate(frames)
    ]


def _replace_position(
    geo: _Geometry, position: tuple[float, ...] | None, *, phase: str | None = None
) -> _Geometry:
    return dataclasses.replace(
        geo,
        position=cast("tuple[float, float, float] | None", position),
        phase=geo.phase if phase is None else phase,
    )


def _phase(ds: Dataset, item: Dataset | None, shared: Dataset | None) -> str:
    """What tells phases or time points at one position apart: temporal position, trigger
    time, acquisition number and diffusion b-value, per frame where the object has groups."""
    content = _macro("FrameContentSequence", item, shared)
    cardiac = _macro("CardiacSynchronizationSequence", item, shared)
    diffusion = _macro("MRDiffusionSequence", item, shared)
    parts = {
        "tpi": _first(content, ds, "TemporalPositionIndex", "TemporalPositionIndex"),
        "trigger": _first(cardiac, ds, "NominalCardiacTriggerDelayTime", "TriggerTime"),
        "acq": _first(content, ds, "FrameAcquisitionNumber", "AcquisitionNumber"),
        "b": _first(diffusion, ds, "DiffusionBValue", "DiffusionBValue"),
    }
    return ";".join(
        f"{name}={_phase_value(value)}" for name, value in parts.items() if value not in (None, "")
    )


def _first(macro: Dataset | None, ds: Dataset, in_macro: str, at_top: str) -> object:
    """An attribute from a functional group macro when the object has one, else the top level."""
    if macro is not None and macro.get(in_macro) not in (None, ""):
        return macro.get(in_macro)
    return ds.get(at_top)


def _phase_value(value: object) -> str:
    try:
        return f"{float(value):g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value).strip()


def _rescale(item: Dataset | None) -> tuple[float, float] | None:
    if item is None or ("RescaleSlope" not in item and "RescaleIntercept" not in item):
        return None
    slope = _number(item.get("RescaleSlope"), "RescaleSlope")
    intercept = _number(item.get("RescaleIntercept"), "RescaleIntercept")
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _group_items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = ds.get(keyword)
    return list(value) if value else []


def _macro(keyword: str, item: Dataset | None, shared: Dataset | None) -> Dataset | None:
    """The first item of a functional group macro: the frame's own, else the shared one."""
    for group in (item, shared):
        if group is not None and keyword in group:
            value = group[keyword].value
            if value:
                return value[0]
    return None


def _items(value: object) -> list[Any]:
    """A header value's values: a multi-valued element is a list, a single one a list of one."""
    if isinstance(value, list | tuple | MultiValue):
        return list(value)
    return [value]


def _pointers(value: object) -> frozenset[int]:
    if value in (None, ""):
        return frozenset()
    return frozenset(int(v) for v in _items(value))


def _image_type(value: object) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    return tuple(str(v).strip().upper() for v in _items(value))


def _numbers(value: object, count: int, keyword: str) -> tuple[float, ...] | None:
    """`count` finite numbers, None when absent; UnusableError naming the attribute (never its
    value) when malformed."""
    if value is None or value == "":
        return None
    items = _items(value)
    if not items:
        return None
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError) as exc:
        raise UnusableError(f"malformed header ({keyword} is not {count} numbers)") from exc
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise UnusableError(f"malformed header ({keyword} is not {count} finite numbers)")
    return numbers


def _number(value: object, keyword: str) -> float | None:
    numbers = _numbers(value, 1, keyword)
    return None if numbers is None else numbers[0]


def _integer(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _frame_stack(raw: np.ndarray, count: int, ds: Dataset) -> np.ndarray:
    """The decoded pixels as (frames, rows, cols), checked against what the header declared."""
    rows, cols = _integer(ds.get("Rows")), _integer(ds.get("Columns"))
    expected = (count, rows, cols)
    stack = raw[np.newaxis] if raw.ndim == 2 else raw
    if stack.shape != expected:
        raise UnusableError(
            f"pixel array of shape {tuple(raw.shape)} does not match the header "
            f"({count} frame(s) of {rows} x {cols})"
        )
    return stack


def _modality_values(stack: np.ndarray, ds: Dataset, geometry: list[_Geometry]) -> np.ndarray:
    """float32 values in modality units (HU for CT), one frame at a time so that no float64
    copy of the whole object is made: each frame's Pixel Value Transformation when the object
    has functional groups, else the top-level Modality LUT or rescale."""
    values = np.empty(stack.shape, dtype=np.float32)
    try:
        top = _rescale(ds)
        lut = bool(ds.get("ModalityLUTSequence"))
        for index, geo in enumerate(geometry):
            if geo.rescale is None and lut:
                values[index] = apply_modality_lut(stack[index], ds)
            else:
                slope, intercept = geo.rescale or top or (1.0, 0.0)
                values[index] = stack[index] * slope + intercept
    except READ_ERRORS as exc:
        raise UnusableError(f"modality LUT could not be applied ({type(exc).__name__})") from exc
    if not np.isfinite(values).all():
        raise UnusableError("pixel values are not finite")
    return values


# ---------------------------------------------------------------------------------------------
# Assembling a series


def series_key(frame: Frame) -> tuple[str, str]:
    """(study UID, series UID): the slices of one volume share both."""
    return (frame.study_uid, frame.series_uid)


def group_series(frames: Iterable[Frame]) -> dict[tuple[str, str], list[Frame]]:
    """Frames by series, in the order each series was first seen."""
    groups: dict[tuple[str, str], list[Frame]] = {}
    for frame in frames:
        groups.setdefault(series_key(frame), []).append(frame)
    return groups


def assemble_series(frames: Sequence[Frame], *, max_voxels: int = MAX_VOLUME_VOXELS) -> Volume:
    """One volume from the frames of one series: localizers set aside, the rest checked to lie
    on one regular grid (one orientation, one pixel grid, evenly spaced, one frame per position)
    and stacked in ascending order along the normal. UnusableError(reason) otherwise."""
    kept: list[Frame] = []
    aside: list[tuple[str, str]] = []
    for frame in frames:
        if LOCALIZER_TYPES & set(frame.image_type):
            aside.append((frame.rel_path, LOCALIZER_REASON))
        else:
            kept.append(frame)
    if len(kept) < MIN_SLICES:
        note = f"; {len(aside)} localizer image(s) set aside" if aside else ""
        raise UnusableError(f"{len(kept)} slice(s), not a volume (needs >= {MIN_SLICES}{note})")
    _check_uniform(kept, max_voxels)
    orientation, normal = _common_orientation(kept)
    positions = np.array([cast("tuple[float, float, float]", f.position) for f in kept])
    depths = positions @ normal
    order = sorted(range(len(kept)), key=lambda i: (depths[i], kept[i].frame_index))
    ordered = [kept[i] for i in order]
    sorted_depths = depths[order]
    _check_one_frame_per_position(ordered, sorted_depths)
    step = _regular_step(np.diff(sorted_depths))
    row_spacing, col_spacing = ordered[0].pixel_spacing  # type: ignore[misc]
    _check_not_sheared(ordered, normal, min(row_spacing, col_spacing))
    voxels = np.stack([frame.pixels for frame in ordered]).astype(np.float32, copy=False)
    first = ordered[0]
    logger.debug("assembled a volume of %d slices", len(ordered))
    return Volume(
        voxels=voxels,
        spacing=(step, row_spacing, col_spacing),
        orientation=orientation,
        origin=first.position,  # type: ignore[arg-type]
        modality=first.modality,
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        accession=first.accession,
        set_aside=tuple(dict.fromkeys(aside)),
    )


def _check_uniform(frames: list[Frame], max_voxels: int) -> None:
    """One series, one modality, one pixel grid, and a size within the memory bound."""
    series = {series_key(frame) for frame in frames}
    if len(series) > 1:
        raise UnusableError(f"frames from {len(series)} series (a volume is one series)")
    if len({frame.modality for frame in frames}) > 1:
        raise UnusableError("inconsistent modality within the series")
    shapes = {frame.pixels.shape for frame in frames}
    if len(shapes) > 1:
        raise UnusableError("inconsistent image size (rows x columns) within the series")
    rows, cols = next(iter(shapes))
    if len(frames) * rows * cols > max_voxels:
        raise UnusableError(
            f"volume of {len(frames)} x {rows} x {cols} voxels exceeds the memory bound of "
            f"{max_voxels} voxels ({mib(max_voxels * 4)} as float32)"
        )
    spacings = [frame.pixel_spacing for frame in frames]
    if any(s is None for s in spacings) and any(s is not None for s in spacings):
        raise UnusableError("inconsistent pixel spacing within the series (missing on some)")
    reference = spacings[0]
    if reference is not None:
        if min(reference) <= 0:
            raise UnusableError("malformed pixel spacing (not positive)")
        for spacing in spacings:
            if any(
                abs(a - b) > PIXEL_SPACING_TOLERANCE * b
                for a, b in zip(spacing, reference, strict=True)  # type: ignore[arg-type]
            ):
                raise UnusableError(
                    "inconsistent pixel spacing within the series (more than 1% apart)"
                )
    if any(frame.position is None or frame.orientation is None for frame in frames):
        raise UnusableError("no slice position/orientation to order slices by")
    if reference is None:
        raise UnusableError("no pixel spacing to scale the volume by")


def _common_orientation(frames: list[Frame]) -> tuple[tuple[float, ...], np.ndarray]:
    """The series' direction cosines and unit normal, refused unless every slice shares them."""
    orientation = frames[0].orientation
    assert orientation is not None  # checked by _check_uniform
    cosines = np.asarray(orientation, dtype=np.float64)
    for frame in frames[1:]:
        if np.abs(np.asarray(frame.orientation) - cosines).max() > ORIENTATION_TOLERANCE:
            raise UnusableError("mixed orientation within the series")
    row, col = cosines[:3], cosines[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOLERANCE
        or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOLERANCE
        or abs(float(np.dot(row, col))) > ORTHONORMAL_TOLERANCE
    ):
        raise UnusableError("malformed image orientation (direction cosines are not orthonormal)")
    normal = np.cross(row, col)
    return orientation, normal / np.linalg.norm(normal)


def _check_one_frame_per_position(ordered: list[Frame], depths: np.ndarray) -> None:
    """Several frames at one position are phases (a 4-D series) or copies: either way, which
    one belongs in the volume is not for us to guess."""
    clusters: list[list[Frame]] = []
    start = -math.inf
    for frame, depth in zip(ordered, depths, strict=True):
        if depth - start > SAME_POSITION_MM:
            clusters.append([])
            start = depth
        clusters[-1].append(frame)
    crowded = [cluster for cluster in clusters if len(cluster) > 1]
    if not crowded:
        return
    phases = max(len({frame.phase for frame in cluster}) for cluster in crowded)
    if phases > 1:
        raise UnusableError(
            f"multi-phase / 4-D series ({phases} phases at each position): "
            "one phase per series expected"
        )
    raise UnusableError(
        f"duplicated slice at one position ({len(crowded)} position(s) hold more than one "
        "frame; which copy to keep is not guessed)"
    )


def _regular_step(steps: np.ndarray) -> float:
    """The median step between slices, refused unless every step is within tolerance of it;
    a step that is a whole multiple of the smallest one is named as missing slices."""
    median = float(np.median(steps))

    def tolerance(step: float) -> float:
        return max(STEP_TOLERANCE * step, STEP_TOLERANCE_MM)

    if all(abs(step - median) <= tolerance(median) for step in steps):
        return median
    base = float(steps.min())
    multiples = [round(step / base) for step in steps]
    if all(
        abs(step - k * base) <= tolerance(base) for step, k in zip(steps, multiples, strict=True)
    ):
        gap = float(steps.max())
        missing = sum(k - 1 for k in multiples)
        raise UnusableError(
            f"missing slice(s): a gap of {gap:.4g} mm ({missing} slice(s) missing) where "
            f"slices are {base:.4g} mm apart"
        )
    raise UnusableError(
        f"inconsistent slice spacing (steps from {base:.4g} to {float(steps.max()):.4g} mm)"
    )


def _check_not_sheared(ordered: list[Frame], normal: np.ndarray, pixel: float) -> None:
    """Every slice on the line through the first along the normal, within half a pixel."""
    first = np.asarray(ordered[0].position, dtype=np.float64)
    for frame in ordered[1:]:
        offset = np.asarray(frame.position, dtype=np.float64) - first
        in_plane = offset - np.dot(offset, normal) * normal
        if float(np.linalg.norm(in_plane)) > IN_PLANE_TOLERANCE * pixel + 1e-6:
            raise UnusableError(
                "slices are offset in-plane along the stack (a tilted gantry or shifted field "
                "of view): a regular grid would shear the volume"
            )
