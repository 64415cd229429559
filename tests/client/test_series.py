"""CT/MR series: real multi-file series and enhanced objects become volumes or one-line reasons.

The series are pydicom's real test series (dicomdirtests, downsampled to 16 x 16) and pydicom-
data's enhanced MR and CT; the refusals are mutations of the one clean real series (5 axial CT
slices 2.5 mm apart), so each assertion states a fact about real headers.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import random
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from fedrad.client.ingest import series
from fedrad.client.ingest.dicom_io import DicomFile, UnusableError, read_dicom
from fedrad.client.ingest.series import (
    MIN_SLICES,
    Frame,
    Volume,
    assemble_series,
    group_series,
    is_volume_candidate,
    read_frames,
    series_key,
)

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT5N = "98892001/CT5N"  # the one clean volume: 5 axial CT slices, 2.5 mm apart
SYNTAX = "Explicit VR Little Endian"
EMRI_SYNTAXES = (
    "emri_small.dcm",
    "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
)
PATIENT = "Quackenbush^Theodora"


@cache
def _walk() -> tuple[tuple[Frame, ...], dict[str, str]]:
    """Every file under dicomdirtests read as frames; the files refused, with their reasons."""
    frames: list[Frame] = []
    refused: dict[str, str] = {}
    for path in sorted(p for p in DICOMDIR_TESTS.rglob("*") if p.is_file()):
        rel = path.relative_to(DICOMDIR_TESTS).as_posix()
        try:
            frames.extend(read_frames(read_dicom(path), rel_path=rel))
        except UnusableError as exc:
            refused[rel] = str(exc)
    return tuple(frames), refused


def _outcome(folder: str) -> list[Volume | str]:
    """The assembly outcome of every series with a file in `folder`."""
    frames, _ = _walk()
    out: list[Volume | str] = []
    for group in group_series(frames).values():
        if any(f.rel_path.startswith(folder + "/") for f in group):
            try:
                out.append(assemble_series(group))
            except UnusableError as exc:
                out.append(str(exc))
    return out


@cache
def _ct5n_source() -> tuple[tuple[str, Dataset], ...]:
    return tuple(
        (p.relative_to(DICOMDIR_TESTS).as_posix(), pydicom.dcmread(p))
        for p in sorted((DICOMDIR_TESTS / CT5N).iterdir())
    )


def _ct5n() -> list[tuple[str, Dataset]]:
    """Fresh deep copies of the real 5-slice CT series, in file-name order."""
    return [(rel, copy.deepcopy(ds)) for rel, ds in _ct5n_source()]


def _frames(datasets: list[tuple[str, Dataset]]) -> list[Frame]:
    return [
        frame for rel, ds in datasets for frame in read_frames(DicomFile(ds, SYNTAX), rel_path=rel)
    ]


def _by_z(datasets: list[tuple[str, Dataset]]) -> list[tuple[str, Dataset]]:
    return sorted(datasets, key=lambda item: float(item[1].ImagePositionPatient[2]))


def _reason(frames: list[Frame], **kwargs: int) -> str:
    with pytest.raises(UnusableError) as info:
        assemble_series(frames, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# The real series


def test_the_real_ct_series_assembles_in_ascending_order() -> None:
    [volume] = _outcome(CT5N)
    assert isinstance(volume, Volume)
    assert volume.voxels.shape == (5, 16, 16) and volume.voxels.dtype == np.float32
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert volume.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert volume.origin == pytest.approx((-72.2, -143.0, -1.2375))
    assert volume.modality == "CT" and volume.set_aside == ()
    # the files are named in descending z; the volume runs ascending along the normal (+z)
    ordered = _by_z(_ct5n())
    for index, (_, ds) in enumerate(ordered):
        expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        np.testing.assert_array_equal(volume.voxels[index], expected)  # HU: slope 1, -1024


def test_the_other_real_series_are_refused_for_what_they_are() -> None:
    """The 4-file CT is instances 18, 180, 181, 182 of a longer series; the 7-file MR is radial
    projection images at 7 angles; the 3-file MR series are three-plane scouts; the CT2N
    series holds only its two localizers."""
    assert _outcome("77654033/CT2") == [
        "missing slice(s): a gap of 202.5 mm (161 slice(s) missing) where slices are 1.25 mm apart"
    ]
    assert _outcome("98892001/CT2N") == [
        f"0 slice(s), not a volume (needs >= {MIN_SLICES}; 2 localizer image(s) set aside)"
    ]
    assert _outcome("98892003/MR700") == ["mixed orientation within the series"]
    assert _outcome("98892003/MR2") == [
        "1 slice(s), not a volume (needs >= 3)",
        "mixed orientation within the series",
        "mixed orientation within the series",
    ]
    assert _outcome("98892003/MR1") == ["1 slice(s), not a volume (needs >= 3)"] * 3


def test_the_walk_reads_every_ct_and_mr_file_and_refuses_the_rest() -> None:
    frames, refused = _walk()
    counts: dict[str, int] = {}
    for group in group_series(frames).values():
        modality = group[0].modality
        counts[modality] = counts.get(modality, 0) + len(group)
    assert counts == {"CT": 11, "MR": 17}  # 28 files, one frame each
    assert len(group_series(frames)) == 10
    assert all(series_key(f) == (f.study_uid, f.series_uid) for f in frames)
    assert {refused[f"77654033/CR{i}/{n}"] for i, n in ((1, 6154), (2, 6247), (3, 6278))} == {
        "modality CR is not a volume modality (accepted: CT, MR)"
    }
    assert refused["DICOMDIR"] == "no pixel data"
    assert refused["README.txt"] == "not a DICOM file"


def test_volume_candidates_are_ct_and_mr_with_pixels() -> None:
    assert is_volume_candidate(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    assert is_volume_candidate(pydicom.dcmread(get_testdata_file("emri_small.dcm")))
    assert not is_volume_candidate(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")))
    assert not is_volume_candidate(pydicom.dcmread(DICOMDIR_TESTS / "DICOMDIR"))


def test_a_radiograph_is_refused_before_decoding() -> None:
    with pytest.raises(UnusableError, match=r"^modality CR is not a volume modality"):
        read_frames(read_dicom(Path(get_testdata_file("RG1_UNCR.dcm"))))


def test_one_ct_slice_is_not_a_volume() -> None:
    frames = read_frames(read_dicom(Path(get_testdata_file("CT_small.dcm"))))
    assert len(frames) == 1 and frames[0].position is not None
    assert _reason(frames) == "1 slice(s), not a volume (needs >= 3)"


def test_frames_cross_a_process_boundary() -> None:
    frames = _frames(_ct5n())
    back = pickle.loads(pickle.dumps(frames))
    assert [f.position for f in back] == [f.position for f in frames]
    np.testing.assert_array_equal(back[2].pixels, frames[2].pixels)


# ---------------------------------------------------------------------------------------------
# Enhanced and multi-frame objects


def test_enhanced_ct_reads_its_per_frame_geometry_and_transformation() -> None:
    """eCT_Supplemental: two frames, per-frame Plane Position, shared orientation, pixel
    measures and Pixel Value Transformation (intercept -1024)."""
    dicom = read_dicom(Path(get_testdata_file("eCT_Supplemental.dcm")))
    frames = read_frames(dicom)
    assert [f.position for f in frames] == [(99.5, -301.5, -159.0), (99.5, -301.5, -149.0)]
    assert {f.orientation for f in frames} == {(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert {f.pixel_spacing for f in frames} == {(0.388672, 0.388672)}
    assert {f.thickness for f in frames} == {10.0}
    assert {f.image_type for f in frames} == {("DERIVED", "PRIMARY", "PERFUSION", "RCBF")}
    raw = dicom.dataset.pixel_array
    np.testing.assert_array_equal(frames[1].pixels, raw[1].astype(np.float32) - 1024)
    assert _reason(frames) == "2 slice(s), not a volume (needs >= 3)"


@pytest.mark.parametrize("name", EMRI_SYNTAXES)
def test_enhanced_mr_without_geometry_is_refused_alike_in_every_syntax(name: str) -> None:
    """emri_small carries no position, orientation or pixel spacing at all (no functional
    groups either): its ten frames decode identically but cannot be ordered."""
    frames = read_frames(read_dicom(Path(get_testdata_file(name))))
    reference = read_frames(read_dicom(Path(get_testdata_file("emri_small.dcm"))))
    assert len(frames) == 10
    assert {(f.position, f.orientation, f.pixel_spacing) for f in frames} == {(None, None, None)}
    assert {f.spacing_between for f in frames} == {1.2}
    for ours, theirs in zip(frames, reference, strict=True):
        np.testing.assert_array_equal(ours.pixels, theirs.pixels)
    assert _reason(frames) == "no slice position/orientation to order slices by"


def _with_one_position(ds: Dataset) -> Dataset:
    ds.ImagePositionPatient = [-20, -30, 40]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.6]
    return ds


def test_a_multi_frame_object_with_one_position_is_stacked_along_the_normal() -> None:
    """Given one ImagePositionPatient, frame i lies i x SpacingBetweenSlices (1.2 mm) along the
    normal; every transfer syntax gives the same volume."""
    volumes = []
    for name in EMRI_SYNTAXES:
        dicom = read_dicom(Path(get_testdata_file(name)))
        frames = read_frames(DicomFile(_with_one_position(dicom.dataset), dicom.transfer_syntax))
        assert [f.position for f in frames][:2] == [(-20.0, -30.0, 40.0), (-20.0, -30.0, 41.2)]
        volumes.append(assemble_series(frames))
    reference = volumes[0]
    assert reference.voxels.shape == (10, 64, 64)
    assert reference.spacing == pytest.approx((1.2, 0.5, 0.6))
    raw = pydicom.dcmread(get_testdata_file("emri_small.dcm")).pixel_array
    np.testing.assert_array_equal(reference.voxels, raw.astype(np.float32))
    for volume in volumes[1:]:
        np.testing.assert_array_equal(volume.voxels, reference.voxels)
        assert volume.spacing == reference.spacing and volume.origin == reference.origin


def test_a_cine_is_never_stacked_into_a_volume() -> None:
    """Frames indexed by time (FrameIncrementPointer -> FrameTime) are phases at one place."""
    ds = _with_one_position(pydicom.dcmread(get_testdata_file("emri_small.dcm")))
    ds.FrameIncrementPointer = Tag("FrameTime")
    ds.FrameTime = 40
    frames = read_frames(DicomFile(ds, SYNTAX))
    assert len({f.position for f in frames}) == 1
    assert _reason(frames).startswith("multi-phase / 4-D series (10 phases at each position)")


def _plant_groups(ds: Dataset, z_of_frame: list[float], temporal: list[int] | None = None) -> None:
    """Enhanced MR functional groups on emri_small's real pixels: shared orientation, pixel
    measures and transformation (slope 2, intercept -5); per-frame position and content."""
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.8]
    shared.PixelMeasuresSequence[0].SliceThickness = 1.2
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -5
    shared.PixelValueTransformationSequence[0].RescaleType = "US"
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for index, z in enumerate(z_of_frame):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [-20, -30, z]
        item.FrameContentSequence = Sequence([Dataset()])
        item.FrameContentSequence[0].StackID = "1"
        item.FrameContentSequence[0].InStackPositionNumber = index + 1
        if temporal is not None:
            item.FrameContentSequence[0].TemporalPositionIndex = temporal[index]
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)


def test_enhanced_mr_frames_are_ordered_by_their_own_positions() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    raw = ds.pixel_array.astype(np.float32)
    slot = [3, 0, 7, 1, 9, 2, 5, 8, 4, 6]  # frame i lies in slot[i] along +z
    _plant_groups(ds, [10.0 + 1.2 * s for s in slot])
    volume = assemble_series(read_frames(DicomFile(ds, SYNTAX)))
    assert volume.spacing == pytest.approx((1.2, 0.8, 0.8))
    assert volume.origin == pytest.approx((-20.0, -30.0, 10.0))
    for frame, s in enumerate(slot):
        np.testing.assert_array_equal(volume.voxels[s], raw[frame] * 2 - 5)


def test_enhanced_mr_with_two_temporal_positions_is_four_dimensional() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    _plant_groups(ds, [1.2 * (i % 5) for i in range(10)], temporal=[1 + i // 5 for i in range(10)])
    frames = read_frames(DicomFile(ds, SYNTAX))
    assert _reason(frames) == (
        "multi-phase / 4-D series (2 phases at each position): one phase per series expected"
    )


def test_a_per_frame_sequence_that_does_not_match_the_frames_is_refused() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    _plant_groups(ds, [1.2 * i for i in range(9)])
    with pytest.raises(UnusableError, match=r"9 items for 10 frames"):
        read_frames(DicomFile(ds, SYNTAX))


# ---------------------------------------------------------------------------------------------
# Mutations of the real CT series


def test_file_order_does_not_matter() -> None:
    reference = assemble_series(_frames(_ct5n()))
    for seed in range(3):
        shuffled = _ct5n()
        random.Random(seed).shuffle(shuffled)
        volume = assemble_series(_frames(shuffled))
        np.testing.assert_array_equal(volume.voxels, reference.voxels)
        assert (volume.spacing, volume.origin) == (reference.spacing, reference.origin)


def test_a_missing_middle_slice_is_named() -> None:
    datasets = _by_z(_ct5n())
    del datasets[2]
    assert _reason(_frames(datasets)) == (
        "missing slice(s): a gap of 5 mm (1 slice(s) missing) where slices are 2.5 mm apart"
    )


def test_a_duplicated_slice_is_refused_not_picked() -> None:
    datasets = _ct5n()
    rel, ds = datasets[1]
    datasets.append((rel + "-copy", copy.deepcopy(ds)))
    assert _reason(_frames(datasets)).startswith("duplicated slice at one position (1 position")


def test_two_phases_at_the_same_positions_are_refused() -> None:
    datasets = _ct5n()
    for rel, ds in list(datasets):
        second = copy.deepcopy(ds)
        second.TemporalPositionIndex = 2
        second.AcquisitionNumber = 9
        ds.TemporalPositionIndex = 1
        datasets.append((rel + "-phase2", second))
    assert _reason(_frames(datasets)) == (
        "multi-phase / 4-D series (2 phases at each position): one phase per series expected"
    )


def test_one_rotated_slice_is_mixed_orientation() -> None:
    datasets = _ct5n()
    datasets[3][1].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]  # 5.7 degrees
    assert _reason(_frames(datasets)) == "mixed orientation within the series"


def test_a_localizer_in_the_series_is_set_aside() -> None:
    """The real CT2N localizer (other orientation, other pixel spacing) filed into the series."""
    datasets = _ct5n()
    scout = pydicom.dcmread(DICOMDIR_TESTS / "98892001/CT2N/6293")
    assert list(scout.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SeriesInstanceUID = datasets[0][1].SeriesInstanceUID
    datasets.insert(2, ("98892001/CT2N/6293", scout))
    volume = assemble_series(_frames(datasets))
    assert volume.voxels.shape == (5, 16, 16)
    assert volume.set_aside == (("98892001/CT2N/6293", "localizer image, not part of the volume"),)


def test_the_memory_bound_is_checked_before_stacking(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _frames(_ct5n())

    def no_stack(*args: object, **kwargs: object) -> None:
        raise AssertionError("stacked before the bound was checked")

    monkeypatch.setattr(series.np, "stack", no_stack)
    assert _reason(frames, max_voxels=1000) == (
        "volume of 5 x 16 x 16 voxels exceeds the memory bound of 1000 voxels (4 KiB as float32)"
    )


def test_uneven_spacing_is_refused() -> None:
    datasets = _by_z(_ct5n())
    datasets[-1][1].ImagePositionPatient[2] += 1.0  # the last step 3.5 mm instead of 2.5
    assert _reason(_frames(datasets)) == "inconsistent slice spacing (steps from 2.5 to 3.5 mm)"


def test_a_tilted_gantry_stack_is_refused() -> None:
    datasets = _by_z(_ct5n())
    for index, (_, ds) in enumerate(datasets):
        ds.ImagePositionPatient[1] -= 0.5 * index  # each slice half a mm further in y
    assert _reason(_frames(datasets)).startswith("slices are offset in-plane along the stack")


def test_a_slice_without_a_position_is_refused() -> None:
    datasets = _ct5n()
    del datasets[4][1].ImagePositionPatient
    assert _reason(_frames(datasets)) == "no slice position/orientation to order slices by"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: dataclasses.replace(f, modality="MR"), "inconsistent modality"),
        (lambda f: dataclasses.replace(f, pixels=f.pixels[:8]), "inconsistent image size"),
        (lambda f: dataclasses.replace(f, pixel_spacing=(0.5, 0.5)), "inconsistent pixel spacing"),
        (lambda f: dataclasses.replace(f, series_uid="1.2.3"), "frames from 2 series"),
    ],
)
def test_frames_that_are_not_one_grid_are_refused(
    change: Callable[[Frame], Frame], reason: str
) -> None:
    frames = _frames(_ct5n())
    frames[2] = change(frames[2])
    assert _reason(frames).startswith(reason)


# ---------------------------------------------------------------------------------------------
# Reasons never quote the header


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """An element as a file would hold it, unchecked until read."""
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True, True, False)


def _refusal(kind: str) -> str:
    datasets = _ct5n()
    for _, ds in datasets:
        ds.PatientName = PATIENT
        ds.SeriesDescription = PATIENT
    ds = datasets[1][1]
    if kind == "modality":
        ds.Modality = PATIENT
    elif kind == "photometric":
        ds.PhotometricInterpretation = PATIENT
    elif kind == "burned-in":
        ds.BurnedInAnnotation = "YES"
    elif kind == "no pixels":
        del ds.PixelData
    elif kind == "malformed position":
        _raw(ds, "ImagePositionPatient", "DS", PATIENT.encode() + b"\\1\\2")
    elif kind == "malformed frames":
        _raw(ds, "NumberOfFrames", "IS", b"Quackenbush ")
    if kind in {"modality", "photometric", "burned-in", "no pixels", "malformed position"} | {
        "malformed frames"
    }:
        with pytest.raises(UnusableError) as info:
            read_frames(DicomFile(ds, SYNTAX))
        return str(info.value)
    frames = _frames(datasets)
    if kind == "missing":
        return _reason(frames[:2] + frames[3:])
    if kind == "duplicate":
        return _reason([*frames, frames[0]])
    if kind == "rotated":
        frames[0] = dataclasses.replace(frames[0], orientation=(0, 1, 0, 0, 0, -1))
        return _reason(frames)
    if kind == "phases":
        return _reason([*frames, *(dataclasses.replace(f, phase="tpi=2") for f in frames)])
    if kind == "tiny bound":
        return _reason(frames, max_voxels=10)
    return _reason(frames[:1])


@pytest.mark.parametrize(
    "kind",
    [
        "modality",
        "photometric",
        "burned-in",
        "no pixels",
        "malformed position",
        "malformed frames",
        "missing",
        "duplicate",
        "rotated",
        "phases",
        "tiny bound",
        "one slice",
    ],
)
def test_no_reason_quotes_the_patient_name(kind: str) -> None:
    reason = _refusal(kind)
    assert reason and "\n" not in reason
    for part in ("Quackenbush", "Theodora", "QUACKENBUSH"):
        assert part not in reason, reason
