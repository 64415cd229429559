"""Reading radiographs: every kind of bad file becomes a one-line reason, good ones decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fedrad.client.ingest.dicom_io import UnusableError, load_radiograph
from tests.conftest import write_radiograph


def test_monochrome1_is_inverted_so_dense_is_bright(tmp_path: Path) -> None:
    pixels = np.zeros((64, 64), dtype=np.uint16)
    pixels[:, :32] = 3000  # left half: high stored value
    m2 = load_radiograph(write_radiograph(tmp_path / "m2.dcm", accession="A", pixels=pixels))
    m1 = load_radiograph(
        write_radiograph(
            tmp_path / "m1.dcm", accession="B", pixels=pixels, photometric="MONOCHROME1"
        )
    )
    assert m2.pixels[:, :32].mean() > m2.pixels[:, 32:].mean()
    assert m1.pixels[:, :32].mean() < m1.pixels[:, 32:].mean()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a DICOM file"),
        (b"hello, this is a text file\n" * 10, "not a DICOM file"),
        (bytes(range(256)) * 4, "not a DICOM file"),
    ],
)
def test_non_dicom_files_are_rejected(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(UnusableError, match=reason):
        load_radiograph(path)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    good = write_radiograph(tmp_path / "g.dcm", accession="A")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-3000])
    with pytest.raises(UnusableError):
        load_radiograph(cut)


def test_missing_pixel_data_is_rejected(tmp_path: Path) -> None:
    import pydicom

    path = write_radiograph(tmp_path / "g.dcm", accession="A")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(UnusableError, match="no pixel data"):
        load_radiograph(path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("OT-PAL-8-face.dcm", "photometric interpretation PALETTE COLOR"),
        ("CT_small.dcm", "modality CT is not a projection radiograph"),
        ("rtdose.dcm", "multi-frame"),
        ("MR_truncated.dcm", "modality MR"),
        ("test-SR.dcm", "no pixel data"),
    ],
)
def test_pydicom_edge_cases_get_reasons(name: str, reason: str) -> None:
    with pytest.raises(UnusableError, match=reason):
        load_radiograph(Path(get_testdata_file(name)))


def test_header_checks_come_before_the_decoder() -> None:
    """A truncated MR is refused for its modality without being decoded; accepted as MR, the
    decoder then finds its pixel data short."""
    path = Path(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(UnusableError, match="could not be decoded"):
        load_radiograph(path, modalities=frozenset({"MR"}))


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KI.dcm"])
def test_real_chest_radiograph_decodes(name: str) -> None:
    image = load_radiograph(Path(get_testdata_file(name)))
    assert image.pixels.ndim == 2 and image.pixels.shape[0] > 1000
    assert np.isfinite(image.pixels).all()


def test_a_colour_picture_is_refused_even_where_its_modality_is_accepted() -> None:
    with pytest.raises(UnusableError, match=r"colour image \(channels differ by 100%"):
        load_radiograph(Path(get_testdata_file("SC_rgb.dcm")), modalities=frozenset({"OT"}))
    with pytest.raises(UnusableError, match="colour image"):
        load_radiograph(Path(get_testdata_file("US1_J2KR.dcm")), modalities=frozenset({"US"}))


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_a_radiograph_exported_as_colour_reads_as_its_grey_picture(
    tmp_path: Path, photometric: str
) -> None:
    """A chest radiograph saved as an 8-bit colour secondary capture (teaching files do this)."""
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian

    grey = load_radiograph(Path(get_testdata_file("RG1_UNCR.dcm"))).pixels
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    low, high = np.percentile(grey, [0.5, 99.5])
    eight = np.clip((grey - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(eight[..., None], 3, axis=-1)
    pixels = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if tag in ds:
            delattr(ds, tag)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path = tmp_path / "colour.dcm"
    ds.save_as(path, enforce_file_format=True)

    image = load_radiograph(path).pixels
    assert image.shape == grey.shape and image.dtype == np.float32
    assert np.corrcoef(image.ravel(), eight.ravel().astype(np.float32))[0, 1] > 0.999
