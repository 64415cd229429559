"""radlabels, read as files: 1,000 real chest radiograph reports with labels over our findings.

radlabels (MIT) ships the reports with RadGraph-derived present / uncertain / absent labels for
48 findings and the evidence behind each (alias, status, RadGraph token). The package is never
imported: importing it downloads a model. The foundation builder pretrains on the text; the
labeler benchmark scores against the labels. A finding of ours is the CheXpert-style collapse
(present > uncertain > absent) of the evidence `RADLABELS_MAPPING` maps onto it; none means 0,
since radlabels' "missing key" means "no evidence found", our "not mentioned".

With ``drop_ignored_sections`` (the default), evidence whose tokens lie in a section our labeler
ignores (the INDICATION's "? pneumonia") is dropped, so the figures measure the labeler against
its own contract; ``False`` scores against the labels as shipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Final

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.labeler import section_spans

logger = logging.getLogger(__name__)

_STATUS: Final[dict[str, int]] = {
    "definitely present": PRESENT,
    "uncertain": UNCERTAIN,
    "definitely absent": ABSENT,
}

# Aliases of ``air_space_opacity`` that name no consolidation: CheXpert's separate "lung opacity"
# class (an opacity may be atelectasis). Its aliases naming consolidation, pneumonia, infiltrate
# or airspace / alveolar disease count.
_AIRSPACE_SKIPPED_ALIASES: Final[frozenset[str]] = frozenset(
    {
        "groundglass opacity",
        "ground-glass opacity",
        "ground glass opacity",
        "ground glass opacities",
        "ground-glass opacities",
        "patchy opacity",
        "patchy opacities",
        "confluent opacity",
        "confluent opacities",
        "parenchymal opacity",
    }
)

# Left out on purpose: ``lung_lesion`` (its extra aliases, "cavitation" and "lytic lesion" (bone),
# are not nodules), ``enlarged_cardiomediastinum`` (a widened mediastinum is not an enlarged
# heart; CheXpert keeps them apart too), ``lung_opacity`` and ``atelectasis``.
RADLABELS_MAPPING: Final[dict[str, tuple[str, ...]]] = {
    # every alias: nodule, mass, nodular opacity, granuloma, lung lesion, tumour
    "lung_nodule_or_mass": ("nodule",),
    # hemothorax and empyema included, as ours; radlabels itself excludes pericardial effusion
    "pleural_effusion": ("pleural_effusion",),
    "cardiomegaly": ("cardiomegaly",),
    "pneumothorax": ("pneumothorax",),
    # ours covers pneumonia (as the cohort's display name says), "infection" included
    "consolidation": ("consolidation",),
    "pneumonia": ("consolidation",),
    "infiltration": ("consolidation",),
    "air_space_opacity": ("consolidation",),
    # old and healed fractures are present for us too
    "fracture_generic": ("fracture",),
    "acute_rib_fracture": ("fracture",),
    "non_acute_rib_fracture": ("fracture",),
}
"""radlabels finding -> our findings; aliases in ``_AIRSPACE_SKIPPED_ALIASES`` do not count."""


def radlabels_samples_dir() -> Path:
    """The bundled corpus directory, located through package metadata without importing it."""
    try:
        dist = metadata.distribution("radlabels")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "radlabels is not installed; install it with "
            "`.venv/bin/pip install --no-deps radlabels==0.2.0` (make install does)"
        ) from exc
    samples = Path(str(dist.locate_file("radlabels/samples")))
    if (
        not (samples / "synthetic_reports").is_dir()
        or not (samples / "synthetic_matches.json").is_file()
    ):
        raise FileNotFoundError(
            f"radlabels is installed but its bundled corpus is missing under {samples}; "
            "reinstall with `.venv/bin/pip install --no-deps --force-reinstall radlabels==0.2.0`"
        )
    return samples


def _token_offsets(original: str, tokenized: str) -> list[int | None]:
    """Character offset in the original report of each RadGraph token (None if not found)."""
    offsets: list[int | None] = []
    cursor = 0
    for token in tokenized.split(" "):
        at = original.find(token, cursor) if token else -1
        if at < 0:
            offsets.append(None)
            continue
        offsets.append(at)
        cursor = at + len(token)
    return offsets


def _collapse(statuses: Sequence[int]) -> int:
    if PRESENT in statuses:
        return PRESENT
    if UNCERTAIN in statuses:
        return UNCERTAIN
    return ABSENT


def _labels_from_matches(
    report: str, entry: dict[str, object], *, drop_ignored_sections: bool
) -> dict[str, int]:
    """Our six labels from one report's radlabels evidence, following RADLABELS_MAPPING."""
    ignored: list[tuple[int, int]] = []
    offsets: list[int | None] = []
    if drop_ignored_sections:
        ignored = [(a, b) for kind, a, b in section_spans(report) if kind == "ignore"]
        offsets = _token_offsets(report, str(entry.get("text", "")))
    statuses: dict[str, list[int]] = {f: [] for f in FINDINGS}
    matches = entry.get("matches", [])
    for match in matches if isinstance(matches, list) else []:
        ours = RADLABELS_MAPPING.get(match.get("disease", ""), ())
        if not ours or match.get("label") not in _STATUS:
            continue
        if match.get("disease") == "air_space_opacity" and (
            match.get("alias") in _AIRSPACE_SKIPPED_ALIASES
        ):
            continue
        if ignored:
            positions = [
                offsets[i]
                for i in match.get("start_ix", [])
                if isinstance(i, int) and 0 <= i < len(offsets) and offsets[i] is not None
            ]
            if positions and any(a <= min(positions) < b for a, b in ignored):
                continue
        for finding in ours:
            statuses[finding].append(_STATUS[match["label"]])
    return {f: _collapse(statuses[f]) for f in FINDINGS}


def load_radlabels(
    samples_dir: Path, *, drop_ignored_sections: bool = True
) -> list[tuple[str, dict[str, int]]]:
    """(report text, labels over our six findings) for every bundled report, sorted by id."""
    reports_dir = samples_dir / "synthetic_reports"
    evidence = json.loads((samples_dir / "synthetic_matches.json").read_text(encoding="utf-8"))
    out: list[tuple[str, dict[str, int]]] = []
    for path in sorted(reports_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        entry = evidence.get(path.stem, {})
        out.append(
            (text, _labels_from_matches(text, entry, drop_ignored_sections=drop_ignored_sections))
        )
    logger.info("loaded %d radlabels reports", len(out))
    return out
