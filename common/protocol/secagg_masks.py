"""SecAgg+ mask expansion at the strength of its seeds, for the sites and the coordinator alike.

Flower 1.41 expands every SecAgg+ mask with `secaggplus_utils.pseudo_rand_gen`, which XOR-folds
the seed (a site's 32-byte private seed, or a 44-byte pairwise key) into a 32-bit seed for
numpy's RandomState: 2^32 candidates recover a mask, whatever the seed. `expand_masks` keys
AES-256 in counter mode with HKDF-SHA256 of the whole seed instead, so a mask is as hard to
guess as its seed. `install_full_strength_masks` puts it in place of `pseudo_rand_gen` in
Flower's `secaggplus_mod` (the site) and `secaggplus_workflow` (the coordinator), which both
bind the name at import; both sides must run it, or the sum does not unmask.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Final

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

MIN_SEED_BYTES: Final[int] = 32  # a site's private seed is 32 bytes, a pairwise key 44
MAX_RANGE: Final[int] = 2**63  # values must fit int64
# HKDF's info: keys derived here are for this stream and nothing else
STREAM_LABEL: Final[bytes] = b"fedrad secagg+ mask stream v1"
# Flower's modules that bind `pseudo_rand_gen` by name: the site's mod, the coordinator's workflow
FLOWER_MODULES: Final[tuple[str, ...]] = (
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
_CHUNK: Final[int] = 1 << 18  # keystream bytes per cipher call (stays in cache)
_ZEROS: Final[bytes] = bytes(_CHUNK)
_logged = False


class MaskSeedError(ValueError):
    """A seed too short to key a full-strength mask."""


class MaskRangeError(ValueError):
    """A mask range outside [2, 2**63]."""


def expand_masks(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Masks for `seed`: one int64 array per shape in `dimensions_list` (a `()` shape gives a
    0-d array), uniform in [0, num_range); a drop-in for Flower's `pseudo_rand_gen`.

    The key is HKDF-SHA256 (info `STREAM_LABEL`) of the whole seed, so every seed byte changes
    every mask; the keystream is AES-256-CTR from a zero counter block, read as little-endian
    64-bit words, one stream over the arrays in order (each array its own part of it). A power
    of two `num_range` keeps the low bits: exactly uniform if the keystream is. Any other is reduced
    modulo `num_range`: each value is then within num_range / 2**64 of uniform in statistical
    distance (under 2**-32 for ranges up to 2**32). Deterministic in `seed`, so a site and the
    coordinator derive the same masks.

    Refused with one line: a seed shorter than `MIN_SEED_BYTES` (`MaskSeedError`), a range
    below 2 or above 2**63 (`MaskRangeError`).
    """
    if not isinstance(seed, bytes | bytearray | memoryview):
        raise TypeError(f"a SecAgg+ mask seed is bytes, not {type(seed).__name__}")
    seed = bytes(seed)
    if len(seed) < MIN_SEED_BYTES:
        raise MaskSeedError(
            f"SecAgg+ mask seed of {len(seed)} bytes refused: full-strength masks need at least "
            f"{MIN_SEED_BYTES}"
        )
    if isinstance(num_range, bool) or not isinstance(num_range, int | np.integer):
        raise MaskRangeError(f"SecAgg+ mask range must be an integer, not {num_range!r}")
    num_range = int(num_range)
    if not 2 <= num_range <= MAX_RANGE:
        raise MaskRangeError(f"SecAgg+ mask range {num_range} refused: it must be in [2, 2**63]")
    shapes = [tuple(int(d) for d in shape) for shape in dimensions_list]
    if any(d < 0 for shape in shapes for d in shape):
        raise ValueError(f"SecAgg+ mask shapes must not be negative: {shapes}")
    sizes = [math.prod(shape) for shape in shapes]
    words = _keystream_words(_stream_key(seed), sum(sizes))
    if num_range & (num_range - 1) == 0:
        np.bitwise_and(words, np.uint64(num_range - 1), out=words)
    else:
        np.remainder(words, np.uint64(num_range), out=words)
    values = words.view(np.int64)  # every value is below 2**63: the same number
    ends = np.cumsum(sizes)
    return [
        values[end - size : end].reshape(shape)
        for shape, size, end in zip(shapes, sizes, ends, strict=True)
    ]


def _stream_key(seed: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=STREAM_LABEL).derive(seed)


def _keystream_words(key: bytes, count: int) -> np.ndarray:
    """The first `count` 64-bit words of AES-256-CTR under `key`, as a writable uint64 array."""
    total = 8 * count
    # A numpy buffer (large ones get huge pages: a bytearray's page faults cost twice the AES),
    # with room for the block beyond what update_into writes; CTR writes exactly what it reads.
    words = np.empty(count + 2, dtype="<u8")
    view = memoryview(words.view(np.uint8))
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    for start in range(0, total, _CHUNK):
        length = min(_CHUNK, total - start)
        zeros = _ZEROS if length == _CHUNK else _ZEROS[:length]
        encryptor.update_into(zeros, view[start : start + length + 15])
    return words[:count].astype(np.uint64, copy=False)


def install_full_strength_masks() -> None:
    """`expand_masks` in place of `pseudo_rand_gen` in Flower's SecAgg+ mod and workflow.
    Idempotent; says so once at INFO."""
    global _logged
    for name in FLOWER_MODULES:
        module = importlib.import_module(name)
        module.pseudo_rand_gen = expand_masks  # type: ignore[attr-defined]
    if not _logged:
        _logged = True
        logger.info(
            "SecAgg+ masks: AES-256-CTR keyed by HKDF-SHA256 of the whole seed, in place of "
            "Flower's 32-bit-seeded pseudo_rand_gen"
        )


def full_strength_masks_installed() -> bool:
    """Whether both Flower modules expand masks with `expand_masks` now."""
    return all(
        getattr(importlib.import_module(name), "pseudo_rand_gen", None) is expand_masks
        for name in FLOWER_MODULES
    )
