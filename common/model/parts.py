"""The model's parts by modality: what a site trains, and what the coordinator averages.

A site with radiographs only has nothing to teach the CT projector, and one with CT only
nothing for the radiograph projector: if each still sent its unchanged copy, the average would
pull every part towards the old value by the share of sites that never saw its modality. So
each trainable tensor belongs to a part: the projector of one modality, or the shared rest
(language-model adapters and finding heads). A site trains the shared part and the parts of the
modalities its data hold, and says which in its reply (declared public, as its example count
is); the coordinator averages each part over the sites that trained it
(`server/part_average.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from fedrad.common.modality import CT, MR, RADIOGRAPH

SHARED: Final[str] = "shared"
PART_PREFIXES: Final[dict[str, str]] = {
    "encoder.": RADIOGRAPH,  # trains only when not pretrained (freeze_encoder False)
    "projector.": RADIOGRAPH,
    "volume_projector.": CT,
}
"""Parameter-name prefix -> the modality part it belongs to; anything else is shared."""
MODALITY_PARTS: Final[tuple[str, ...]] = (RADIOGRAPH, CT)
PART_METRIC_PREFIX: Final[str] = "trained-"
"""A training reply's `trained-<part>` metric: 1.0 when the site trained that part, else 0.0."""
PART_METRIC_KEYS: Final[tuple[str, ...]] = tuple(f"{PART_METRIC_PREFIX}{p}" for p in MODALITY_PARTS)


def part_of(name: str) -> str:
    """The part a trainable tensor belongs to, by its name in the model's state."""
    for prefix, part in PART_PREFIXES.items():
        if name.startswith(prefix):
            return part
    return SHARED


def part_for_modality(modality: str) -> str:
    """MR volumes would share the volume projector's part if the model read them; it does
    not yet (ValueError), and a modality outside the model's parts is refused the same way."""
    if modality == RADIOGRAPH:
        return RADIOGRAPH
    if modality == CT:
        return CT
    if modality == MR:
        raise ValueError("this model has no MR part (it reads radiographs and chest CT)")
    raise ValueError(f"unknown modality {modality!r}")


def parts_reached(modalities: Iterable[str]) -> frozenset[str]:
    """The modality parts a site's training data reach."""
    return frozenset(part_for_modality(m) for m in set(modalities))


def part_metrics(reached: frozenset[str]) -> dict[str, float]:
    """The reply's declaration of what it trained: one 0/1 value per modality part."""
    return {f"{PART_METRIC_PREFIX}{part}": float(part in reached) for part in MODALITY_PARTS}


def declared_parts(metrics: Mapping[str, object]) -> frozenset[str] | None:
    """The modality parts a reply says it trained; None when it declares none (a reply from
    before parts existed trains everything it sends)."""
    keys = PART_METRIC_KEYS
    if not any(k in metrics for k in keys):
        return None
    out = set()
    for part, key in zip(MODALITY_PARTS, keys, strict=True):
        value = metrics.get(key, 0.0)
        if value not in (0.0, 1.0, 0, 1) or isinstance(value, bool):
            raise ValueError(f"{key} must be 0 or 1")
        if value == 1:
            out.add(part)
    return frozenset(out)


@contextmanager
def training_only(model: Any, reached: frozenset[str]) -> Iterator[None]:
    """Inside the block, the parts of modalities the site does not hold are frozen: no DP
    noise lands on them and they go back unchanged (the average leaves them out)."""
    frozen = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and part_of(name) not in (SHARED, *reached)
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
