"""radlabels, read as files: 1,000 real chest radiograph reports with labels over our findings.

radlabels (MIT) ships the reports with RadGraph-derived present / uncertain / absent labels for
48 findings and the evidence behind each (alias, status, RadGraph token). The package is never
imported: importing it downloads a model. The foundation builder pretrains on the text; the
labeler benchmark scores against the labels. A finding of ours is the CheXpert-style collapse
(present > uncertain > absent) of the evidence mapped onto it; none means 0, since radlabels'
"missing key" means "no evidence found", our "not mentioned".

The mapping follows fedrad's written finding definitions
(``docs/labeler.md``, "Finding definitions"), decided per alias radlabels ships, not
per score (alias counts in the comments are mentions over the 1,000 reports):

- nodule: ``lung_nodule_or_mass`` without the aliases naming a granuloma ("granuloma" 2,
  "calcified granuloma" 2) or a calcified nodule (the alias "calcified nodule" 1, or
  "calcified" among the three tokens before the mention): both are healed granulomas,
  look-alikes of a nodule (the CheXpert labeler's unmention list).
  ``lung_lesion`` is left out: its lung / pulmonary lesion aliases are the same mentions
  ``lung_nodule_or_mass`` already carries, and its others, "cavitation" (4) and "lytic lesion"
  (1, bone), are not nodules.
- pleural_effusion: ``pleural_effusion``; its blunting aliases ("costophrenic blunting" 14,
  "blunting costophrenic angle" 5) count as uncertain (-1) whatever their status, absent
  ("no blunting") excepted: blunting alone may be a small effusion or pleural thickening. The
  ``pneumothorax`` alias "hydropneumothorax" (4) is an effusion too. ``pleural_thickening`` and
  ``pleural_other`` are look-alikes, left out.
- cardiomegaly: ``cardiomegaly``, every alias. ``enlarged_cardiomediastinum`` (a widened
  mediastinum) is CheXpert's separate class, left out.
- pneumothorax: ``pneumothorax``, every alias; ``pneumomediastinum`` is a look-alike.
- consolidation: ``consolidation``, plus the ``air_space_opacity`` aliases containing
  "consolidat" (the same mentions, as RadGraph files them under both). Pneumonia (323),
  infiltration (17), airspace opacity / process, patchy / confluent opacity and
  ``lung_opacity`` no longer map: the definitions count them only where consolidation is said.
- fracture: ``fracture_generic``, ``acute_rib_fracture``, ``non_acute_rib_fracture``; only
  aliases containing "fracture" (every shipped alias does: none is a bare "deformity"), and not
  a wire's or lead's fracture ("no evidence of lead fracture", 1).

With ``drop_ignored_sections`` (the default), evidence whose tokens lie in a section our labeler
ignores (the INDICATION's "? pneumonia") is dropped, so the figures measure the labeler against
its own contract; ``False`` scores against the labels as shipped.

The corpus is split once and for all into a development half and a held-out half, so that
figures can be reported on reports the labeler was not developed against. A report's half
depends on its file stem alone: the first byte of sha256(stem, UTF-8) even -> "dev", odd ->
"heldout" (516 / 484 of radlabels 0.2.0's reports). Never on position or a seed, so adding,
removing or reordering reports moves no other report between halves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Final, Literal, get_args

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN
from fedrad.common.labeling.sections import section_spans

logger = logging.getLogger(__name__)

Split = Literal["all", "dev", "heldout"]
SPLITS: Final[tuple[str, ...]] = get_args(Split)

_STATUS: Final[dict[str, int]] = {
    "definitely present": PRESENT,
    "uncertain": UNCERTAIN,
    "definitely absent": ABSENT,
}

RADLABELS_MAPPING: Final[dict[str, tuple[str, ...]]] = {
    "lung_nodule_or_mass": ("nodule",),
    "pleural_effusion": ("pleural_effusion",),
    "cardiomegaly": ("cardiomegaly",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "air_space_opacity": ("consolidation",),
    "fracture_generic": ("fracture",),
    "acute_rib_fracture": ("fracture",),
    "non_acute_rib_fracture": ("fracture",),
}
"""radlabels finding -> our findings, before the alias rules of ``mapped_evidence``."""

_CALCIFIED_RE: Final[re.Pattern[str]] = re.compile(
    r"\bcalcified\b(?<!non-calcified)(?<!non calcified)"
)
"""A calcified nodule is a healed granuloma, as in the CheXpert labeler's unmention list."""
_FRACTURE_DISEASES: Final[frozenset[str]] = frozenset(
    {"fracture_generic", "acute_rib_fracture", "non_acute_rib_fracture"}
)
_DEVICE_WORDS: Final[frozenset[str]] = frozenset({"wire", "wires", "lead", "leads"})
"""A fracture next to these is a device's ("lead fracture", "fractured sternotomy wires")."""
_CLAUSE_END: Final[frozenset[str]] = frozenset({".", ",", ";", ":"})


def mapped_evidence(disease: str, alias: str, status: int) -> list[tuple[str, int]]:
    """(our finding, status) pairs one radlabels mention gives, under the written definitions.

    Why each rule: the module docstring. Device fractures need the report's tokens and are
    dropped by the caller.
    """
    ours = RADLABELS_MAPPING.get(disease, ())
    alias = alias.lower()
    if disease == "air_space_opacity" and "consolidat" not in alias:
        return []  # pneumonia, infiltrate, airspace / patchy opacity: not consolidation
    if disease == "lung_nodule_or_mass" and (
        "granuloma" in alias or _CALCIFIED_RE.search(alias) is not None
    ):
        return []  # granuloma, calcified nodule: look-alikes of a nodule
    if disease in _FRACTURE_DISEASES and "fracture" not in alias:
        return []  # a bare "deformity" is not a fracture
    if disease == "pleural_effusion" and "blunting" in alias and status != ABSENT:
        return [("pleural_effusion", UNCERTAIN)]  # effusion or pleural thickening
    if disease == "pneumothorax" and "hydropneumothorax" in alias:
        return [("pneumothorax", status), ("pleural_effusion", status)]
    return [(finding, status) for finding in ours]


def radlabels_half(stem: str) -> Literal["dev", "heldout"]:
    """A report's half, from its file stem alone: sha256's first byte even -> dev, odd ->
    heldout (the module docstring says why)."""
    return "dev" if hashlib.sha256(stem.encode("utf-8")).digest()[0] % 2 == 0 else "heldout"


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


def _token_offsets(original: str, tokens: Sequence[str]) -> list[int | None]:
    """Character offset in the original report of each RadGraph token (None if not found)."""
    offsets: list[int | None] = []
    cursor = 0
    for token in tokens:
        at = original.find(token, cursor) if token else -1
        if at < 0:
            offsets.append(None)
            continue
        offsets.append(at)
        cursor = at + len(token)
    return offsets


def _names_a_device(tokens: Sequence[str], indices: Sequence[int]) -> bool:
    """Whether a fracture mention is a wire's or a lead's: the word before it, or one of the
    three after it within its clause, names one."""
    first, last = min(indices), max(indices)
    near = [tokens[first - 1]] if first > 0 else []
    for token in tokens[last + 1 : last + 4]:
        if token in _CLAUSE_END:
            break
        near.append(token)
    return any(word.lower() in _DEVICE_WORDS for word in near)


def _calcified(tokens: Sequence[str], indices: Sequence[int]) -> bool:
    """Whether a nodule mention is a calcified one ("several calcified nodular opacities"): a
    healed granuloma under the definitions, whatever alias RadGraph gave it."""
    first = min(indices)
    before = " ".join(tokens[max(0, first - 3) : first]).lower()
    return _CALCIFIED_RE.search(before) is not None


def _collapse(statuses: Sequence[int]) -> int:
    if PRESENT in statuses:
        return PRESENT
    if UNCERTAIN in statuses:
        return UNCERTAIN
    return ABSENT


def _labels_from_matches(
    report: str, entry: dict[str, object], *, drop_ignored_sections: bool
) -> dict[str, int]:
    """Our six labels from one report's radlabels evidence, following ``mapped_evidence``."""
    tokens = str(entry.get("text", "")).split(" ")
    ignored: list[tuple[int, int]] = []
    offsets: list[int | None] = []
    if drop_ignored_sections:
        ignored = [(a, b) for kind, a, b in section_spans(report) if kind == "ignore"]
        offsets = _token_offsets(report, tokens)
    statuses: dict[str, list[int]] = {f: [] for f in FINDINGS}
    matches = entry.get("matches", [])
    for match in matches if isinstance(matches, list) else []:
        disease, label = match.get("disease", ""), match.get("label")
        if disease not in RADLABELS_MAPPING or label not in _STATUS:
            continue
        indices = [
            i for i in match.get("start_ix", []) if isinstance(i, int) and 0 <= i < len(tokens)
        ]
        if disease in _FRACTURE_DISEASES and indices and _names_a_device(tokens, indices):
            continue
        if disease == "lung_nodule_or_mass" and indices and _calcified(tokens, indices):
            continue
        if ignored:
            positions = [offsets[i] for i in indices if offsets[i] is not None]
            if positions and any(a <= min(positions) < b for a, b in ignored):
                continue
        for finding, status in mapped_evidence(
            disease, str(match.get("alias", "")), _STATUS[label]
        ):
            statuses[finding].append(status)
    return {f: _collapse(statuses[f]) for f in FINDINGS}


def load_radlabels(
    samples_dir: Path, *, drop_ignored_sections: bool = True, split: Split = "all"
) -> list[tuple[str, dict[str, int]]]:
    """(report text, labels over our six findings) for the bundled reports of ``split`` (both
    halves, or the one ``radlabels_half`` assigns), sorted by id."""
    if split not in SPLITS:
        raise ValueError(f"unknown radlabels split {split!r} (choose from {', '.join(SPLITS)})")
    reports_dir = samples_dir / "synthetic_reports"
    evidence = json.loads((samples_dir / "synthetic_matches.json").read_text(encoding="utf-8"))
    out: list[tuple[str, dict[str, int]]] = []
    for path in sorted(reports_dir.glob("*.txt")):
        if split != "all" and radlabels_half(path.stem) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entry = evidence.get(path.stem, {})
        out.append(
            (text, _labels_from_matches(text, entry, drop_ignored_sections=drop_ignored_sections))
        )
    logger.info("loaded %d radlabels reports (%s)", len(out), split)
    return out
