"""fedrad decodes exactly the files pydicom decodes, over pydicom's and pydicom-data's corpora:
bounding the decoder (limits, worker processes) must not lose a file pydicom can read, and the
reader must not claim pixels pydicom itself cannot produce.

One documented difference: a file with no transfer syntax in its meta (no meta header at all,
e.g. pydicom-data's OT-PAL-8-face.dcm) is refused by `pydicom.dcmread(f).pixel_array`, while
fedrad reads it and infers the syntax from the encoding it was read in. Such files may be decoded
by fedrad alone; every other file must agree."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from fedrad.client.ingest.dicom_io import UnusableError, decode_pixels, read_dicom

CORPORA: dict[str, Path] = {
    "test_files": Path(pydicom.__file__).parent / "data" / "test_files",
    "data_store": Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm")).parent,
}


def corpus_files(root: Path) -> list[Path]:
    """Every regular file under `root`, hidden files (and folders) left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def pydicom_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(path).pixel_array  # noqa: B018 (decoding is the point)
        except Exception:
            return False
    return True


def lacks_transfer_syntax(path: Path) -> bool:
    """pydicom, forced, finds no transfer syntax in the file's meta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            return False
    return "TransferSyntaxUID" not in getattr(ds, "file_meta", {})


def fedrad_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decode_pixels(read_dicom(path))
        except UnusableError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_fedrad_decodes_what_pydicom_decodes(corpus: str) -> None:
    root = CORPORA[corpus]
    files = corpus_files(root)
    assert files, f"no files under {root}"
    by_pydicom = {p.relative_to(root).as_posix() for p in files if pydicom_decodes(p)}
    by_fedrad = {p.relative_to(root).as_posix() for p in files if fedrad_decodes(p)}
    print(
        f"\n[decode-corpora] {corpus}: {len(files)} files, pydicom decodes {len(by_pydicom)}, "
        f"fedrad decodes {len(by_fedrad)}"
    )
    assert by_pydicom, "pydicom decoded nothing: the corpus is not what this test expects"
    only_pydicom = sorted(by_pydicom - by_fedrad)
    only_fedrad = sorted(p for p in by_fedrad - by_pydicom if not lacks_transfer_syntax(root / p))
    assert not only_pydicom and not only_fedrad, (
        f"decoded by pydicom only: {only_pydicom}; by fedrad only: {only_fedrad}"
    )
