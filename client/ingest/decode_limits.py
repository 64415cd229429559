"""What one DICOM file may cost, checked from its header before any pixel is decoded.

A file's header says how large its pixels are once decoded, and a crafted file can claim
gigapixels in a few hundred kilobytes (a deflated dataset, or an encapsulated frame) that a
decoder would then allocate. Each file is held to these bounds first; the worker's
address-space limit (`decode_pool.py`) is only the backstop for a decoder that misbehaves anyway.
The limits are stated in the site guide; what they cost is measured in docs/results/ingestion.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

MIB: Final[int] = 1 << 20


@dataclass(frozen=True)
class DecodeLimits:
    """Per-file bounds. The defaults admit every image in pydicom's and pydicom-data's corpora
    and the largest projection radiographs in use (a 4096 x 5625 mammogram is 44 MiB decoded);
    they refuse a 12000 x 12000 frame and a dataset inflating past its own decoded size."""

    max_file_bytes: int = 512 * MIB
    max_frame_pixels: int = 8192 * 8192
    max_decoded_bytes: int = 256 * MIB
    max_ratio: float = 500.0
    """Decoded bytes per byte on disk, above `ratio_floor_bytes`: lossless codecs reach 3:1 and
    lossy ones about 40:1 on radiographs; deflate of zeros reaches 1000:1."""
    ratio_floor_bytes: int = 16 * MIB
    """Below this decoded size a high ratio is harmless (a tiny synthetic JPEG 2000 reaches
    2000:1), so the ratio is not judged."""
    header_slack_bytes: int = 16 * MIB
    """What a dataset may hold besides its pixels (overlays, private tags, icons)."""

    @property
    def max_inflated_bytes(self) -> int:
        """The most a deflated dataset may inflate to: pixels plus header."""
        return self.max_decoded_bytes + self.header_slack_bytes


DEFAULT_LIMITS: Final[DecodeLimits] = DecodeLimits()


class CostError(Exception):
    """A file refused for what it would cost, with the one-line reason shown to the site."""


def mib(count: float) -> str:
    """A byte count as the site guide states limits."""
    return f"{count / MIB:.0f} MiB" if count >= MIB else f"{count / 1024:.0f} KiB"


def check_file_size(size: int, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Refuses a file larger than a site reads whole."""
    if size > limits.max_file_bytes:
        raise CostError(f"file of {mib(size)} is over the {mib(limits.max_file_bytes)} limit")


def _header_int(ds: Dataset, keyword: str, default: int | None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise CostError(f"malformed header ({keyword} missing)")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise CostError(f"malformed header ({keyword} is not a number)") from exc
    if number < 0:
        raise CostError(f"malformed header ({keyword} is negative)")
    return number


def decoded_bytes(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    """What the pixel data decodes to, from the header alone; CostError when a frame or the
    whole is over its limit, or the header cannot say."""
    rows = _header_int(ds, "Rows", None)
    columns = _header_int(ds, "Columns", None)
    frames = max(1, _header_int(ds, "NumberOfFrames", 1))
    samples = max(1, _header_int(ds, "SamplesPerPixel", 1))
    bits = _header_int(ds, "BitsAllocated", None)
    if rows * columns > limits.max_frame_pixels:
        raise CostError(
            f"image of {columns} x {rows} pixels is over the "
            f"{limits.max_frame_pixels / 1e6:.0f} megapixel limit"
        )
    size = rows * columns * frames * samples * max(1, -(-bits // 8))
    if size > limits.max_decoded_bytes:
        raise CostError(
            f"pixel data would decode to {mib(size)} ({frames} frame(s)), over the "
            f"{mib(limits.max_decoded_bytes)} limit"
        )
    return size


def check_decode_cost(ds: Dataset, file_bytes: int, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    """The decoded size of a header's pixel data once it passes every bound: its size and the
    ratio of decoded bytes to the bytes on disk."""
    size = decoded_bytes(ds, limits)
    ratio = size / max(file_bytes, 1)
    if size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
        raise CostError(
            f"pixel data would decode to {mib(size)} from a file of {mib(file_bytes)} "
            f"({ratio:.0f}:1, over the {limits.max_ratio:.0f}:1 limit)"
        )
    return size
