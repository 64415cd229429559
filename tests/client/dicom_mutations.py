"""A deterministic corpus of hostile DICOM files, built at test time in a few seconds.

Seeds are pydicom's own test files (one per transfer syntax family), one real CR radiograph from
pydicom-data and a small synthetic CR image. Every mutant is written as `<seed>__<mutation>.dcm`,
so a failure names the operator that made it:

- ``trunc-*``: the file cut in the preamble, the meta group, an element header, the pixel data;
- ``len-*``: an element's length field set to 0xFFFFFFF0 (0xFFFF for 2-byte lengths), doubled,
  undefined, zero or odd;
- ``vr-*``: an explicit VR rewritten (``US`` -> ``SQ``, ``OW`` -> ``US``, an invalid VR, ...);
- ``hdr-*``: header values re-saved with pydicom: Rows/Columns 12000 or 65535 over the same small
  pixel data, NumberOfFrames huge or zero, BitsAllocated 0/3/7/13/48/65535, SamplesPerPixel, ...;
- ``ts-*``: the meta group rewritten to another transfer syntax over the same dataset bytes (an
  unknown UID, big endian over little-endian data, an encapsulated syntax over native pixels, ...);
- ``flip-*``: seeded random byte flips;
- ``bomb__*``: a deflate bomb (:func:`deflate_bomb`); ``nested__*``: sequences 5000 deep;
  ``noise__*``: files that are not DICOM at all.

Nothing here holds an inflated bomb or a large array in memory.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    PYDICOM_ROOT_UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

TEST_FILES: Final[Path] = Path(pydicom.__file__).parent / "data" / "test_files"
"""pydicom's bundled test files."""

SEED_FILES: Final[tuple[str, ...]] = (
    "CT_small.dcm",  # explicit VR little endian, 128x128 16-bit
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_RLE.dcm",  # RLE lossless (encapsulated)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEG-lossy.dcm",  # JPEG extended, one frame
    "image_dfl.dcm",  # deflated explicit VR little endian
)
"""Seeds from ``TEST_FILES``."""

DATA_STORE_SEEDS: Final[tuple[str, ...]] = ("RG3_J2KI.dcm",)
"""Seeds from pydicom-data (via ``pydicom.data.get_testdata_file``): a real 1760x1760 CR."""

SYNTHETIC_SEED: Final[str] = "synthetic_cr"
"""A 64x64 CR image built here: the one seed whose unmutated form passes every header check."""

LONG_VRS: Final[frozenset[str]] = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
)
UNDEFINED: Final[int] = 0xFFFFFFFF
HUGE_LENGTH: Final[int] = 0xFFFFFFF0
NESTING_DEPTH: Final[int] = 5000
CONTENT_SEQUENCE: Final[tuple[int, int]] = (0x0040, 0xA730)
PIXEL_DATA: Final[int] = 0x7FE00010

Mutant = tuple[str, bytes]


def _uid(n: int) -> str:
    """Fixed UIDs under pydicom's root, so the corpus is byte-identical across runs."""
    return f"{PYDICOM_ROOT_UID}77.{n}"


# ----------------------------------------------------------------------------- encoding helpers


def _file_meta(syntax: str, *, sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = _uid(0)
    return meta


def _preamble_and_meta(meta: FileMetaDataset, preamble: bytes = b"\0" * 128) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return preamble + b"DICM" + fp.getvalue()


def _encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    """A dataset's elements alone (no preamble or meta), in the given encoding."""
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _element_header(tag: tuple[int, int], vr: str, length: int, *, implicit: bool) -> bytes:
    group, elem = tag
    if implicit:
        return struct.pack("<HHI", group, elem, length)
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xI", group, elem, vr.encode(), length)
    return struct.pack("<HH2sH", group, elem, vr.encode(), length)


def _image_header(accession: str, rows: int, cols: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = _uid(rows * 100_000 + cols)
    ds.AccessionNumber = accession
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


@cache
def synthetic_radiograph() -> bytes:
    """A valid 64x64 CR file (explicit VR little endian) with fixed UIDs and pixels."""
    ds = _image_header("MUTANT-CR", 64, 64)
    ds.ViewPosition = "PA"
    ds.PatientName = "Mutant^Seed"
    ds.PatientID = "MUT0001"
    ds.StudyInstanceUID = _uid(2)
    ds.SeriesInstanceUID = _uid(3)
    ds.PixelData = np.random.default_rng(0).integers(0, 4000, (64, 64), dtype=np.uint16).tobytes()
    ds.file_meta = _file_meta(
        ExplicitVRLittleEndian, sop_class=ds.SOPClassUID, sop_instance=ds.SOPInstanceUID
    )
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# ----------------------------------------------------------------------------- the deflate bomb


@cache
def _deflate_bomb_bytes(rows: int, cols: int) -> bytes:
    pixel_bytes = rows * cols * 2
    if pixel_bytes >= UNDEFINED:
        raise ValueError(f"{rows}x{cols} 16-bit pixels do not fit a 32-bit element length")
    header = _image_header("BOMB-1", rows, cols)
    meta = _file_meta(
        DeflatedExplicitVRLittleEndian,
        sop_class=header.SOPClassUID,
        sop_instance=header.SOPInstanceUID,
    )
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as DICOM stores it
    parts = [
        _preamble_and_meta(meta),
        deflater.compress(_encode(header)),
        deflater.compress(_element_header((0x7FE0, 0x0010), "OW", pixel_bytes, implicit=False)),
    ]
    chunk = memoryview(bytes(1 << 20))
    remaining = pixel_bytes
    while remaining:  # streamed: the inflated dataset is never held here
        step = min(len(chunk), remaining)
        parts.append(deflater.compress(chunk[:step]))
        remaining -= step
    parts.append(deflater.flush())
    return b"".join(parts)


def deflate_bomb(path: Path, rows: int = 12000, cols: int = 12000) -> Path:
    """Writes a Deflated Explicit VR Little Endian CR file whose header claims `rows` x `cols`
    16-bit pixels, and whose deflated dataset inflates to all of them (288 MB for the default,
    from a file of about 280 KB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_deflate_bomb_bytes(rows, cols))
    return path


# ----------------------------------------------------------------------------- nested sequences


def nested_sequences(
    depth: int = NESTING_DEPTH,
    *,
    implicit: bool = False,
    defined: bool = False,
    terminated: bool = True,
) -> bytes:
    """A CR file whose ContentSequence nests `depth` sequences, each in the previous one's only
    item, written byte by byte (pydicom would recurse to write it); small pixel data follows."""
    header = _image_header("NESTED-1", 32, 32)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta = _file_meta(syntax, sop_class=header.SOPClassUID, sop_instance=header.SOPInstanceUID)
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
    if defined:
        inner = b""
        for _ in range(depth):
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = _element_header(CONTENT_SEQUENCE, "SQ", len(item), implicit=implicit) + item
        nested = inner
    else:
        opening = _element_header(CONTENT_SEQUENCE, "SQ", UNDEFINED, implicit=implicit)
        nested = (opening + item_start) * depth
        if terminated:
            item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            nested += (item_end + sequence_end) * depth
    parts = [_preamble_and_meta(meta), _encode(header, implicit=implicit), nested]
    if terminated:
        pixels = bytes(32 * 32 * 2)
        parts.append(_element_header((0x7FE0, 0x0010), "OW", len(pixels), implicit=implicit))
        parts.append(pixels)
    return b"".join(parts)


# ----------------------------------------------------------------------------- a seed's layout


@dataclass(frozen=True)
class Element:
    """Where one top-level element of a seed sits in its bytes."""

    keyword: str
    vr: str | None  # None in implicit VR files
    header_at: int
    length_at: int
    length_size: int  # 2 or 4 bytes
    value_at: int
    length: int
    little: bool


@dataclass(frozen=True)
class Layout:
    meta_end: int  # offset of the first dataset element
    syntax: str
    file_meta: FileMetaDataset
    elements: dict[str, Element]  # by keyword; empty for deflated seeds

    @property
    def pixels(self) -> Element | None:
        return self.elements.get("PixelData")


def _meta_end(data: bytes) -> int:
    """The end of the group 0002 elements (always explicit VR little endian)."""
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6].decode("latin-1")
        if vr in LONG_VRS:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def _read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


def layout(data: bytes) -> Layout:
    ds = _read(data)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    elements: dict[str, Element] = {}
    if syntax != DeflatedExplicitVRLittleEndian:
        for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts raw elements)
            raw = ds.get_item(tag)
            if not isinstance(raw, RawDataElement) or raw.value_tell is None:
                continue
            tell, little = raw.value_tell, raw.is_little_endian
            if raw.is_implicit_VR:
                header_at, length_at, size, vr = tell - 8, tell - 4, 4, None
            elif raw.VR in LONG_VRS:
                header_at, length_at, size, vr = tell - 12, tell - 4, 4, str(raw.VR)
            else:
                header_at, length_at, size, vr = tell - 8, tell - 2, 2, str(raw.VR)
            found = struct.unpack_from("<HH" if little else ">HH", data, header_at)
            if found != (raw.tag.group, raw.tag.element):
                continue  # not where we expected: leave it alone
            keyword = pydicom.datadict.keyword_for_tag(raw.tag) or f"{int(raw.tag):08X}"
            elements[keyword] = Element(
                keyword, vr, header_at, length_at, size, tell, raw.length, little
            )
    return Layout(_meta_end(data), syntax, ds.file_meta, elements)


# ----------------------------------------------------------------------------- mutation operators


def _set_length(data: bytes, el: Element, value: int) -> bytes:
    fmt = ("<" if el.little else ">") + ("I" if el.length_size == 4 else "H")
    out = bytearray(data)
    struct.pack_into(fmt, out, el.length_at, value)
    return bytes(out)


def truncations(data: bytes, lay: Layout) -> Iterator[Mutant]:
    cuts: dict[str, int] = {
        f"trunc-{pct}pct": len(data) * pct // 100 for pct in (2, 25, 50, 75, 95)
    }
    cuts["trunc-last-byte"] = len(data) - 1
    cuts["trunc-preamble"] = 100
    cuts["trunc-dicm"] = 130
    cuts["trunc-meta"] = max(lay.meta_end - 5, 133)
    cuts["trunc-first-element"] = lay.meta_end + 5
    if lay.pixels is not None:
        cuts["trunc-pixel-header"] = lay.pixels.header_at + 6
        cuts["trunc-pixel-value"] = lay.pixels.value_at + 1
    for name, at in cuts.items():
        if 0 < at < len(data):
            yield name, data[:at]


LENGTH_TARGETS: Final[tuple[str, ...]] = ("PixelData", "Rows", "StudyInstanceUID")


def length_edits(data: bytes, lay: Layout) -> Iterator[Mutant]:
    for keyword in LENGTH_TARGETS:
        el = lay.elements.get(keyword)
        if el is None:
            continue
        top = HUGE_LENGTH if el.length_size == 4 else 0xFFFF
        length = el.length if el.length != UNDEFINED else 0
        yield f"len-huge-{keyword}", _set_length(data, el, top)
        yield f"len-double-{keyword}", _set_length(data, el, min(2 * length + 2, top))
        yield f"len-plus1-{keyword}", _set_length(data, el, min(length + 1, top))
        yield f"len-zero-{keyword}", _set_length(data, el, 0)
        if el.length_size == 4:
            yield f"len-undefined-{keyword}", _set_length(data, el, UNDEFINED)


VR_EDITS: Final[dict[str, tuple[str, ...]]] = {
    "Rows": ("SQ", "OB", "UL", "FD", "XX", "\0\0"),
    "PixelData": ("SQ", "UN", "US", "UT", "XX"),
    "StudyInstanceUID": ("SQ", "FD", "OW", "AT"),
}


def vr_edits(data: bytes, lay: Layout) -> Iterator[Mutant]:
    for keyword, vrs in VR_EDITS.items():
        el = lay.elements.get(keyword)
        if el is None or el.vr is None:  # implicit VR files carry no VR to rewrite
            continue
        for vr in vrs:
            if vr == el.vr:
                continue
            out = bytearray(data)
            out[el.header_at + 4 : el.header_at + 6] = vr.encode("latin-1")
            shown = "nul" if vr == "\0\0" else vr
            yield f"vr-{keyword}-{shown}", bytes(out)


HEADER_EDITS: Final[dict[str, dict[str, object]]] = {
    "hdr-rows-cols-12000": {"Rows": 12000, "Columns": 12000},
    "hdr-rows-cols-65535": {"Rows": 65535, "Columns": 65535},
    "hdr-cols-65535": {"Columns": 65535},
    "hdr-rows-0": {"Rows": 0},
    "hdr-frames-2147483647": {"NumberOfFrames": "2147483647"},
    "hdr-frames-65535-dims-65535": {"NumberOfFrames": "65535", "Rows": 65535, "Columns": 65535},
    "hdr-frames-0": {"NumberOfFrames": "0"},
    "hdr-frames-negative": {"NumberOfFrames": "-7"},
    "hdr-bits-allocated-0": {"BitsAllocated": 0},
    "hdr-bits-allocated-3": {"BitsAllocated": 3},
    "hdr-bits-allocated-7": {"BitsAllocated": 7},
    "hdr-bits-allocated-13": {"BitsAllocated": 13},
    "hdr-bits-allocated-48": {"BitsAllocated": 48},
    "hdr-bits-allocated-65535": {"BitsAllocated": 65535},
    "hdr-bits-stored-40": {"BitsStored": 40, "HighBit": 39},
    "hdr-high-bit-65535": {"HighBit": 65535},
    "hdr-samples-0": {"SamplesPerPixel": 0},
    "hdr-samples-65535": {"SamplesPerPixel": 65535},
    "hdr-samples-3-planar-9": {"SamplesPerPixel": 3, "PlanarConfiguration": 9},
    "hdr-pixel-representation-2": {"PixelRepresentation": 2},
    "hdr-photometric-palette": {"PhotometricInterpretation": "PALETTE COLOR"},
}


def header_edits(data: bytes, lay: Layout) -> Iterator[Mutant]:
    for name, changes in HEADER_EDITS.items():
        ds = _read(data)
        out = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for keyword, value in changes.items():
                    setattr(ds, keyword, value)
                ds.save_as(out)
        except Exception:  # a seed pydicom cannot re-save this way (big endian, say)
            continue
        yield name, out.getvalue()


SYNTAX_SWAPS: Final[dict[str, str]] = {
    "ts-unknown-uid": "1.3.6.1.4.1.99999.77.1.2",
    "ts-explicit-big-endian": ExplicitVRBigEndian,
    "ts-explicit-little-endian": ExplicitVRLittleEndian,
    "ts-implicit": ImplicitVRLittleEndian,
    "ts-deflated": DeflatedExplicitVRLittleEndian,
    "ts-jpeg-baseline": JPEGBaseline8Bit,
    "ts-jpeg2000": JPEG2000,
    "ts-rle": RLELossless,
    "ts-mpeg2": MPEG2MPML,
    "ts-empty": "",
}


def syntax_swaps(data: bytes, lay: Layout) -> Iterator[Mutant]:
    if data[128:132] != b"DICM":
        return
    for name, syntax in SYNTAX_SWAPS.items():
        if syntax == lay.syntax:
            continue
        meta = FileMetaDataset()
        meta.update(lay.file_meta)
        meta.TransferSyntaxUID = syntax
        try:
            head = _preamble_and_meta(meta, data[:128])
        except Exception:
            continue
        yield name, head + data[lay.meta_end :]


FLIP_COUNTS: Final[tuple[int, ...]] = (1, 4, 16, 64, 512)


def byte_flips(data: bytes, lay: Layout, rng: random.Random) -> Iterator[Mutant]:
    pixel_start = lay.pixels.value_at if lay.pixels is not None else len(data)
    regions = {
        "header": (lay.meta_end, max(pixel_start, lay.meta_end + 1)),
        "meta": (128, max(lay.meta_end, 129)),
        "any": (0, len(data)),
    }
    for where, (lo, hi) in regions.items():
        for count in FLIP_COUNTS:
            if where == "meta" and count > 16:
                continue
            out = bytearray(data)
            for _ in range(count):
                out[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
            yield f"flip-{where}-{count}", bytes(out)


# ----------------------------------------------------------------------------- the corpus


def _seed_bytes() -> dict[str, bytes]:
    seeds = {Path(name).stem: (TEST_FILES / name).read_bytes() for name in SEED_FILES}
    for name in DATA_STORE_SEEDS:
        seeds[Path(name).stem] = Path(pydicom.data.get_testdata_file(name)).read_bytes()
    seeds[SYNTHETIC_SEED] = synthetic_radiograph()
    return seeds


SEED_OPERATORS: Final[tuple[Callable[[bytes, Layout], Iterator[Mutant]], ...]] = (
    truncations,
    length_edits,
    vr_edits,
    header_edits,
    syntax_swaps,
)


def standalone_mutants(rng: random.Random) -> Iterator[Mutant]:
    yield "bomb__deflate-12000x12000", _deflate_bomb_bytes(12000, 12000)
    yield f"nested__sq-{NESTING_DEPTH}-undefined", nested_sequences()
    yield f"nested__sq-{NESTING_DEPTH}-defined", nested_sequences(defined=True)
    yield f"nested__sq-{NESTING_DEPTH}-implicit", nested_sequences(implicit=True)
    yield f"nested__sq-{NESTING_DEPTH}-unterminated", nested_sequences(terminated=False)
    noise = rng.randbytes(4096)
    yield "noise__random-4k", noise
    yield "noise__dicm-then-random", b"\0" * 128 + b"DICM" + noise
    yield "noise__preamble-only", b"\0" * 128 + b"DICM"
    yield "noise__empty", b""


def mutants(seed: int) -> Iterator[Mutant]:
    """Every mutant, in a fixed order; `seed` drives the random flips and noise."""
    for stem, data in _seed_bytes().items():
        lay = layout(data)
        for operator in SEED_OPERATORS:
            for name, mutated in operator(data, lay):
                yield f"{stem}__{name}", mutated
        rng = random.Random(f"{seed}:{stem}")
        for name, mutated in byte_flips(data, lay, rng):
            yield f"{stem}__{name}", mutated
    yield from standalone_mutants(random.Random(f"{seed}:standalone"))


def build_corpus(dest: Path, *, seed: int, count: int | None = None) -> list[Path]:
    """Writes the mutants into `dest` as `<name>.dcm` and returns their paths, sorted. With
    `count`, a seeded sample of that many (the same for the same seed)."""
    chosen = list(mutants(seed))
    names = [name for name, _ in chosen]
    assert len(set(names)) == len(names), "mutant names must be unique"
    if count is not None and count < len(chosen):
        chosen = random.Random(seed).sample(chosen, count)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in chosen:
        path = dest / f"{name}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return sorted(paths)
