"""The fixed findings vocabulary shared by the cohort, the labeler, the model and evaluation."""

from __future__ import annotations

from typing import Final, Literal

FINDINGS: Final[tuple[str, ...]] = (
    "nodule",
    "pleural_effusion",
    "cardiomegaly",
    "pneumothorax",
    "consolidation",
    "fracture",
)
"""Order matters: it is the column order of label vectors and of the model's diagnosis head."""

NO_FINDING: Final[str] = "no_finding"

PRESENT: Final[int] = 1
ABSENT: Final[int] = 0
UNCERTAIN: Final[int] = -1

Label = Literal[1, 0, -1]

LATERAL_FINDINGS: Final[frozenset[str]] = frozenset(
    {"nodule", "pleural_effusion", "pneumothorax", "consolidation", "fracture"}
)
"""Findings that have a side; cardiomegaly does not."""

SIDES: Final[tuple[str, ...]] = ("left", "right", "bilateral")

LATERAL_ORDER: Final[tuple[str, ...]] = tuple(f for f in FINDINGS if f in LATERAL_FINDINGS)
"""Row order of the side head: one (left, right, bilateral) distribution per lateral finding."""

DISPLAY_NAMES: Final[dict[str, str]] = {
    "nodule": "pulmonary nodule",
    "pleural_effusion": "pleural effusion",
    "cardiomegaly": "cardiomegaly",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "fracture": "rib fracture",
}
