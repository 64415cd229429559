"""De-identified CT/MR slices still make the same volume, and carry nothing identifying.

A series is de-identified file by file; what lets it be re-assembled afterwards (positions,
orientation, per-frame functional groups) must survive the keep-list, and what identifies the
patient (names, original UIDs, anything else in a functional group) must not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID

from fedrad.client.ingest.deid import PseudonymKey, deidentify_dataset
from fedrad.client.ingest.dicom_io import DicomFile, UnusableError, read_dicom
from fedrad.client.ingest.series import Frame, assemble_series, read_frames

SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001/CT5N"
KEY = PseudonymKey(b"s" * 32)
SYNTAX = "Explicit VR Little Endian"


def _elements(ds: Dataset) -> Iterator[DataElement]:
    """Every element, inside sequences too, and the file meta."""
    meta = getattr(ds, "file_meta", None)
    for source in (ds, meta) if meta is not None else (ds,):
        for elem in source:
            yield elem
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from _elements(item)


def _instance_uids(ds: Dataset) -> set[str]:
    """UIDs that name this patient's objects (not a registered SOP class or syntax)."""
    return {
        str(elem.value)
        for elem in _elements(ds)
        if elem.VR == "UI" and elem.value and UID(str(elem.value)).name == str(elem.value)
    }


def _texts(ds: Dataset) -> list[str]:
    return [str(elem.value) for elem in _elements(ds) if elem.VR not in ("OB", "OW", "SQ")]


def _frames(datasets: list[Dataset]) -> list[Frame]:
    return [
        f
        for i, ds in enumerate(datasets)
        for f in read_frames(DicomFile(ds, SYNTAX), rel_path=str(i))
    ]


def test_a_deidentified_series_reassembles_to_the_same_volume(tmp_path: Path) -> None:
    originals = [pydicom.dcmread(p) for p in sorted(SERIES.iterdir())]
    assert {str(ds.PatientName) for ds in originals} == {"Doe^Peter"}
    cleaned = [deidentify_dataset(ds, KEY) for ds in originals]
    for index, ds in enumerate(cleaned):  # and through the disk, as a site would keep them
        ds.save_as(tmp_path / f"{index}.dcm", enforce_file_format=False)
    reread = [read_dicom(tmp_path / f"{i}.dcm").dataset for i in range(len(cleaned))]

    before = assemble_series(_frames(originals))
    for datasets in (cleaned, reread):
        after = assemble_series(_frames(datasets))
        np.testing.assert_array_equal(after.voxels, before.voxels)
        assert (after.spacing, after.origin, after.orientation) == (
            before.spacing,
            before.origin,
            before.orientation,
        )
        assert after.series_uid != before.series_uid and after.study_uid != before.study_uid

    assert len({ds.StudyInstanceUID for ds in cleaned}) == 1
    assert len({ds.SeriesInstanceUID for ds in cleaned}) == 1
    assert len({ds.SOPInstanceUID for ds in cleaned}) == len(cleaned)
    [patient] = {ds.PatientID for ds in cleaned}
    assert patient and patient != originals[0].PatientID
    original_uids = set().union(*(_instance_uids(ds) for ds in originals))
    assert original_uids  # study, series, instance, frame of reference, ...
    for ds in cleaned:
        assert not _instance_uids(ds) & original_uids
        texts = _texts(ds)
        assert not any("Doe" in text or "Peter" in text for text in texts)
    for index in range(len(cleaned)):
        blob = (tmp_path / f"{index}.dcm").read_bytes()
        assert b"Peter" not in blob
        assert not any(uid.encode() in blob for uid in original_uids)


def test_enhanced_ct_keeps_its_per_frame_geometry_and_nothing_else() -> None:
    """eCT_Supplemental's groups also hold frame anatomy, VOI LUTs, a real-world value map and
    an irradiation event UID: only the geometry macros come through."""
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    event = ds.SharedFunctionalGroupsSequence[0].IrradiationEventIdentificationSequence[0]
    event_uid = str(event.IrradiationEventUID)
    out = deidentify_dataset(ds, KEY)
    [shared] = out.SharedFunctionalGroupsSequence
    assert [e.keyword for e in shared] == [
        "PlaneOrientationSequence",
        "PixelMeasuresSequence",
        "PixelValueTransformationSequence",
    ]
    assert len(out.PerFrameFunctionalGroupsSequence) == 2
    assert all(
        [e.keyword for e in item] == ["FrameContentSequence", "PlanePositionSequence"]
        for item in out.PerFrameFunctionalGroupsSequence
    )
    content = out.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    assert [e.keyword for e in content] == [
        "StackID",
        "InStackPositionNumber",
        "FrameAcquisitionNumber",
    ]  # DimensionIndexValues (pointing at a dropped index) is not kept
    assert event_uid not in _texts(out)
    before, after = read_frames(DicomFile(ds, SYNTAX)), read_frames(DicomFile(out, SYNTAX))
    for old, new in zip(before, after, strict=True):
        assert (new.position, new.orientation, new.pixel_spacing, new.thickness) == (
            old.position,
            old.orientation,
            old.pixel_spacing,
            old.thickness,
        )
        np.testing.assert_array_equal(new.pixels, old.pixels)  # HU: intercept -1024 kept


def _enhanced_mr_with_extras() -> Dataset:
    """emri_small (real pixels, no geometry of its own) given per-frame geometry, plus what a
    scanner also puts in functional groups: a private tag, a referenced image, a frame comment
    and an acquisition time."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    ds.PatientName = "Quackenbush^Theodora"
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.9, 0.9]
    shared.PixelMeasuresSequence[0].SpacingBetweenSlices = 1.2
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for index in range(10):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [1.2 * (9 - index), -40, 60]
        item.FrameContentSequence = Sequence([Dataset()])
        item.FrameContentSequence[0].InStackPositionNumber = index + 1
        item.FrameContentSequence[0].FrameComments = "Quackenbush, second attempt"
        item.FrameContentSequence[0].FrameAcquisitionDateTime = "20230311101500"
        referenced = Dataset()
        referenced.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
        referenced.ReferencedSOPInstanceUID = f"1.2.3.4.5.6.{index}"
        item.ReferencedImageSequence = Sequence([referenced])
        block = item.private_block(0x0029, "ACME MR", create=True)
        block.add_new(0x10, "LO", "Theodora Quackenbush")
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    return ds


def test_enhanced_mr_loses_what_else_its_functional_groups_hold() -> None:
    ds = _enhanced_mr_with_extras()
    out = deidentify_dataset(copy.deepcopy(ds), KEY)
    for item in out.PerFrameFunctionalGroupsSequence:
        assert [e.keyword for e in item] == ["FrameContentSequence", "PlanePositionSequence"]
        assert not any(e.tag.is_private for e in item)
        assert [e.keyword for e in item.FrameContentSequence[0]] == ["InStackPositionNumber"]
    assert not any(e.tag.is_private for e in _elements(out))
    assert not any("Quackenbush" in text or "Theodora" in text for text in _texts(out))
    assert not any(text.startswith("1.2.3.4.5.6.") for text in _texts(out))
    before = assemble_series(read_frames(DicomFile(ds, SYNTAX)))
    after = assemble_series(read_frames(DicomFile(out, SYNTAX)))
    assert after.spacing == pytest.approx((1.2, 0.9, 0.9))
    assert (after.spacing, after.origin, after.orientation) == (
        before.spacing,
        before.origin,
        before.orientation,
    )
    np.testing.assert_array_equal(after.voxels, before.voxels)


def test_a_cine_is_still_a_cine_after_deidentification() -> None:
    """FrameIncrementPointer survives: without it a de-identified cine with one position and a
    SpacingBetweenSlices would be stacked into a volume it is not."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.FrameIncrementPointer = Tag("FrameTime")
    out = deidentify_dataset(ds, KEY)
    with pytest.raises(UnusableError, match=r"^multi-phase / 4-D series \(10 phases"):
        assemble_series(read_frames(DicomFile(out, SYNTAX)))
