"""Imaging modalities the model reads, and how a training example names its own.

A radiograph is one 2-D projection; CT and MR studies are volumes. Each kind has its own
encoder and projector in the model (its *part*), and the rest (language model adapters,
finding heads) is shared; a site trains the parts its data reach (`common/model/parts.py`).
"""

from __future__ import annotations

from typing import Final

RADIOGRAPH: Final[str] = "radiograph"
CT: Final[str] = "CT"
MR: Final[str] = "MR"

MODALITIES: Final[tuple[str, ...]] = (RADIOGRAPH, CT, MR)
"""Index order is the integer code a training example carries (0 radiograph, 1 CT, 2 MR)."""

VOLUME_MODALITIES: Final[frozenset[str]] = frozenset({CT, MR})


def modality_code(modality: str) -> int:
    """The integer a batch carries for `modality`; ValueError for an unknown one."""
    try:
        return MODALITIES.index(modality)
    except ValueError:
        raise ValueError(
            f"unknown modality {modality!r} (known: {', '.join(MODALITIES)})"
        ) from None
