"""Radiologist-style CT chest reports and clinical indications for synthetic CT studies.

Why: a CT site's labels come from its reports, as a radiograph site's do, so every synthetic CT
needs a report worded the way chest CT reports are: TECHNIQUE / COMPARISON / FINDINGS by organ
system / numbered IMPRESSION, nodules with size, density, lobe and image reference, Lung-RADS
(screening) or Fleischner (incidental) follow-up, and explicit negatives in varied wording. Every
phrasing here is one the project's labeler reads correctly (tests/common/test_chest_ct.py checks
labels, sides and nodule sizes over hundreds of reports), so report labels equal the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from .chest_ct import CTFinding
from .report_text import Writer, cap

__all__ = ["lung_rads", "write_ct_indication", "write_ct_report"]

_ORDINALS: Final[dict[int, str]] = {
    1: "1st",
    2: "2nd",
    3: "3rd",
    **{n: f"{n}th" for n in range(4, 13)},
}
_WORD_ORDINALS: Final[dict[int, str]] = {
    1: "first",
    2: "second",
    3: "third",
    4: "fourth",
    5: "fifth",
    6: "sixth",
    7: "seventh",
    8: "eighth",
    9: "ninth",
    10: "tenth",
    11: "eleventh",
    12: "twelfth",
}
_IMAGES_PER_LOBE: Final[dict[str, tuple[int, int]]] = {
    "right upper lobe": (25, 70),
    "left upper lobe": (25, 80),
    "right middle lobe": (70, 105),
    "right lower lobe": (80, 140),
    "left lower lobe": (80, 140),
}
"""Plausible axial image numbers (series 3, 1.25 mm, apex first) for a nodule in each lobe."""


def _size(w: Writer, mm: float) -> str:
    """Whole millimetres, or centimetres to one decimal for 1 cm and over (both exact)."""
    mm = round(mm)
    if mm >= 10 and w.chance(0.4):
        return f"{mm / 10:.1f} cm"
    return f"{mm} mm"


def _rib(w: Writer, n: int) -> str:
    return _ORDINALS[n] if w.chance(0.75) else _WORD_ORDINALS[n]


# --------------------------------------------------------------------------------------------
# nodule management


def lung_rads(nodules: Sequence[CTFinding]) -> tuple[str, str]:
    """(category, management) under Lung-RADS v2022 for a baseline screening CT: the most
    suspicious nodule decides; no nodule is category 1."""
    best = ("1", "Negative. Continue annual screening with low-dose CT in 12 months.")
    rank = {"1": 0, "2": 1, "3": 2, "4A": 3, "4B": 4}
    text = {
        "2": "Benign appearance or behavior. Continue annual screening with low-dose CT in "
        "12 months.",
        "3": "Probably benign. Follow-up low-dose CT in 6 months.",
        "4A": "Suspicious. Follow-up low-dose CT in 3 months; PET/CT may be considered.",
        "4B": "Very suspicious. Diagnostic chest CT with or without contrast, PET/CT and/or "
        "tissue sampling is recommended.",
    }
    for f in nodules:
        size = round(f.size_mm or 0.0)
        solid = round(f.solid_mm or 0.0)
        if f.density == "ground-glass":
            cat = "2" if size < 30 else "3"
        elif f.density == "part-solid":
            if size < 6:
                cat = "2"
            elif solid < 6:
                cat = "3"
            else:
                cat = "4A" if solid < 8 else "4B"
        else:
            cat = "2" if size < 6 else "3" if size < 8 else "4A" if size < 15 else "4B"
        if rank[cat] > rank[best[0]]:
            best = (cat, text[cat])
    return best


def _fleischner(w: Writer, f: CTFinding) -> str:
    """Fleischner Society 2017 advice for one incidental nodule (no nodule words, so the
    sentence never adds a size or a status to the nodule)."""
    size = round(f.size_mm or 0.0)
    lead = w.pick(
        [
            "Per Fleischner Society guidelines, ",
            "Per the 2017 Fleischner Society guidelines, ",
            "Following Fleischner Society recommendations, ",
        ]
    )
    if f.density == "ground-glass":
        if size < 6:
            return lead + "no routine follow-up is recommended."
        return lead + (
            "CT at 6-12 months is recommended to confirm persistence, then CT every 2 years "
            "until 5 years."
        )
    if f.density == "part-solid":
        if size < 6:
            return lead + "no routine follow-up is recommended."
        return lead + (
            "CT at 3-6 months is recommended to confirm persistence; if unchanged, annual CT for "
            "5 years."
        )
    if size < 6:
        return lead + w.pick(
            [
                "no routine follow-up is needed in a low-risk patient; optional CT at 12 months "
                "if high risk.",
                "no routine follow-up is recommended for a low-risk patient; in a high-risk "
                "patient, optional CT at 12 months.",
            ]
        )
    if size <= 8:
        return lead + "CT at 6-12 months is recommended, then consider CT at 18-24 months."
    return lead + "consider CT at 3 months, PET/CT, or tissue sampling."


# --------------------------------------------------------------------------------------------
# positive statements: (FINDINGS sentence, IMPRESSION item)


def _nodule(w: Writer, f: CTFinding) -> tuple[str, str]:
    lobe = f.lobe or ("left upper lobe" if f.side == "left" else "right upper lobe")
    size = _size(w, f.size_mm or 8.0)
    density = f.density or "solid"
    lo, hi = _IMAGES_PER_LOBE[lobe]
    ref = f"(series 3, image {int(w.rng.integers(lo, hi))})"
    if density == "part-solid":
        solid = _size(w, f.solid_mm or max(2.0, (f.size_mm or 8.0) / 3))
        s = w.pick(
            [
                f"{cap(size)} part-solid nodule in the {lobe} with a {solid} solid component "
                f"{ref}.",
                f"There is a {size} part-solid nodule in the {lobe} {ref}, with a {solid} solid "
                "component.",
            ]
        )
    else:
        kind = density if density == "solid" or w.chance(0.6) else "pure ground-glass"
        s = w.pick(
            [
                f"{cap(size)} {kind} nodule in the {lobe} {ref}.",
                f"There is a {size} {kind} nodule in the {lobe} {ref}.",
                f"{cap(kind)} pulmonary nodule in the {lobe} measuring {size} {ref}.",
                f"A {kind} nodule in the {lobe} measures {size} {ref}.",
            ]
        )
    imp = w.pick(
        [
            f"{cap(size)} {density} nodule in the {lobe}.",
            f"{cap(size)} {density} {lobe} nodule.",
            f"{cap(density)} pulmonary nodule in the {lobe} measuring {size}.",
        ]
    )
    return s, imp


def _effusion(w: Writer, f: CTFinding) -> tuple[str, str]:
    size = f.severity or "small"
    if f.side == "bilateral":
        s = w.pick(
            [
                f"{cap(size)} bilateral pleural effusions.",
                f"There are {size} bilateral pleural effusions with adjacent compressive "
                "atelectasis.",
                f"{cap(size)} dependent bilateral pleural effusions.",
            ]
        )
        return s, w.pick(
            [f"{cap(size)} bilateral pleural effusions.", f"Bilateral {size} pleural effusions."]
        )
    side = f.side or "right"
    opts = [
        f"{cap(size)} {side} pleural effusion.",
        f"There is a {size} {side} pleural effusion.",
        f"{cap(size)} dependent {side} pleural effusion with adjacent compressive atelectasis.",
        f"{cap(size)} simple-appearing {side} pleural effusion.",
    ]
    if size != "small":
        opts.append(f"{cap(size)} {side} pleural effusion layering dependently.")
    return w.pick(opts), w.pick(
        [f"{cap(size)} {side} pleural effusion.", f"{cap(side)} pleural effusion, {size}."]
    )


def _pneumothorax(w: Writer, f: CTFinding) -> tuple[str, str]:
    size = f.severity or "small"
    side = f.side or "right"
    opts = [
        f"{cap(size)} {side} pneumothorax.",
        f"There is a {size} {side} pneumothorax, predominantly anterior.",
        f"{cap(size)} anterior {side} pneumothorax.",
    ]
    if size == "small":
        opts.append(f"Small {side} pneumothorax layering anteriorly.")
    else:
        cm = {"moderate": (1.5, 2.5), "large": (3.0, 4.5)}[size]
        opts.append(
            f"{cap(size)} {side} pneumothorax, up to {w.rng.uniform(*cm):.1f} cm in depth "
            "anteriorly."
        )
    return w.pick(opts), w.pick(
        [f"{cap(size)} {side} pneumothorax.", f"{cap(side)} pneumothorax, {size}."]
    )


def _consolidation(w: Writer, f: CTFinding) -> tuple[str, str]:
    lobe = f.lobe or ("left lower lobe" if f.side == "left" else "right lower lobe")
    s = w.pick(
        [
            f"{cap(lobe)} consolidation with air bronchograms.",
            f"Dense consolidation in the {lobe} with air bronchograms.",
            f"Consolidation involving much of the {lobe}.",
            f"There is airspace consolidation in the {lobe}, with air bronchograms.",
        ]
    )
    imp = w.pick(
        [
            f"{cap(lobe)} consolidation, compatible with pneumonia in the appropriate clinical "
            "setting.",
            f"{cap(lobe)} consolidation.",
            f"Consolidation in the {lobe}, likely pneumonia. Recommend follow-up CT after "
            "treatment to document resolution.",
        ]
    )
    return s, imp


def _fracture(w: Writer, f: CTFinding) -> tuple[str, str]:
    side = "left" if f.side == "left" else "right"
    rib = _rib(w, f.rib or 6)
    if f.chronic:
        s = w.pick(
            [
                f"Healed fracture of the {side} {rib} rib.",
                f"Old healed {side} {rib} rib fracture with callus formation.",
                f"Healed {side} {rib} rib fracture.",
            ]
        )
        return s, w.pick(
            [f"Healed {side} {rib} rib fracture.", f"Old healed fracture of the {side} {rib} rib."]
        )
    s = w.pick(
        [
            f"Acute fracture of the {side} {rib} rib.",
            f"Acute mildly displaced fracture of the lateral {side} {rib} rib.",
            f"Acute {side} {rib} rib fracture with a small cortical step-off.",
            f"Nondisplaced acute fracture of the {side} {rib} rib laterally.",
        ]
    )
    return s, w.pick(
        [f"Acute fracture of the {side} {rib} rib.", f"Acute {side} {rib} rib fracture."]
    )


def _cardiomegaly(w: Writer, f: CTFinding, *, sized: bool = False) -> tuple[str, str]:
    """``sized``: only wordings that grade it with the adjective the site reads a degree from."""
    sev = f.severity or "mild"
    opts = [
        "Cardiomegaly.",
        f"{cap(sev)} cardiomegaly.",
        "The heart is enlarged.",
        f"{cap(sev)} cardiomegaly. No pericardial effusion.",
        f"The heart is {sev}ly enlarged." if sev != "marked" else "The heart is markedly enlarged.",
    ]
    s = w.pick([opts[1], opts[3]] if sized else opts)
    return s, w.pick(["Cardiomegaly.", f"{cap(sev)} cardiomegaly."])


_POSITIVE = {
    "nodule": _nodule,
    "pleural_effusion": _effusion,
    "pneumothorax": _pneumothorax,
    "consolidation": _consolidation,
    "fracture": _fracture,
    "cardiomegaly": _cardiomegaly,
}

# --------------------------------------------------------------------------------------------
# negatives and filler

_NEG: Final[dict[str, tuple[str, ...]]] = {
    "nodule": (
        "No suspicious pulmonary nodules.",
        "No pulmonary nodules or masses.",
        "No suspicious pulmonary nodule or mass.",
        "There are no pulmonary nodules.",
    ),
    "consolidation": (
        "No consolidation.",
        "No focal consolidation.",
        "There is no airspace consolidation.",
        "No focal airspace consolidation.",
    ),
    "pleural_effusion": (
        "No pleural effusion.",
        "There is no pleural effusion.",
        "No pleural fluid.",
    ),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "cardiomegaly": (
        "Heart size is normal.",
        "The heart is normal in size.",
        "Normal heart size.",
        "Heart size is within normal limits.",
    ),
    "fracture": (
        "No acute fracture.",
        "No acute rib fracture.",
        "No displaced rib fractures.",
        "There is no acute fracture.",
    ),
}
_PLEURA_BOTH: Final[tuple[str, ...]] = (
    "No pleural effusion or pneumothorax.",
    "There is no pleural effusion or pneumothorax.",
    "No pneumothorax or pleural effusion.",
)
_OSSEOUS_QUIET: Final[tuple[str, ...]] = (
    "No acute osseous abnormality.",
    "The osseous structures are intact.",
    "No suspicious osseous lesion.",
)
"""Bone statements that name no fracture: an absent fracture said without the word."""
_FILLER: Final[dict[str, tuple[str, ...]]] = {
    "lungs": (
        "The central airways are patent.",
        "Mild centrilobular emphysema in the upper lobes.",
        "Minimal dependent subsegmental atelectasis.",
        "Mild bronchial wall thickening.",
    ),
    "heart": (
        "No pericardial effusion.",
        "No mediastinal or hilar lymphadenopathy.",
        "The thoracic aorta is normal in caliber.",
        "Mild coronary artery calcifications.",
        "The thyroid gland is unremarkable.",
    ),
    "bones": (
        "Mild degenerative changes of the thoracic spine.",
        "Multilevel degenerative disc disease in the thoracic spine.",
        "The chest wall soft tissues are unremarkable.",
    ),
    "abdomen": (
        "The visualized upper abdomen is unremarkable.",
        "Limited images of the upper abdomen are unremarkable.",
        "The imaged upper abdominal organs are unremarkable.",
    ),
}
_HEADINGS: Final[dict[str, tuple[str, ...]]] = {
    "lungs": ("LUNGS AND AIRWAYS", "LUNGS"),
    "pleura": ("PLEURA", "PLEURAL SPACES"),
    "heart": ("HEART AND MEDIASTINUM", "MEDIASTINUM AND HEART", "CARDIOVASCULAR"),
    "bones": ("BONES AND SOFT TISSUES", "MUSCULOSKELETAL", "CHEST WALL AND BONES"),
    "abdomen": ("UPPER ABDOMEN",),
}
_SYSTEM: Final[dict[str, str]] = {
    "nodule": "lungs",
    "consolidation": "lungs",
    "pleural_effusion": "pleura",
    "pneumothorax": "pleura",
    "cardiomegaly": "heart",
    "fracture": "bones",
}
_NORMAL_IMP: Final[tuple[str, ...]] = (
    "No acute intrathoracic abnormality.",
    "No acute cardiopulmonary process.",
    "Normal CT of the chest.",
)


def _technique(w: Writer, screening: bool, thickness: float | None) -> str:
    thick = f"{thickness:g}" if thickness else w.pick(["1.25", "2.5", "1"])
    if screening:
        first = w.pick(
            [
                "Low-dose CT of the chest was performed without intravenous contrast.",
                "Low-dose helical CT of the chest without contrast, as part of the screening "
                "program.",
            ]
        )
    else:
        first = w.pick(
            [
                "CT of the chest was performed with intravenous contrast.",
                "Contrast-enhanced helical CT of the chest.",
                "Axial CT images of the chest were obtained following the administration of "
                "intravenous contrast.",
            ]
        )
    return (
        f"TECHNIQUE: {first} Axial images were reconstructed at {thick} mm slice thickness with "
        "coronal and sagittal reformats."
    )


def write_ct_report(
    findings: Sequence[CTFinding],
    rng: np.random.Generator,
    *,
    screening: bool | None = None,
    slice_thickness_mm: float | None = None,
    followed: bool = False,
    has_prior: bool = False,
) -> str:
    """A CT chest report stating every finding in ``findings`` as present and, most of the
    time, the absent ones as absent.

    ``screening`` (default: drawn, 25 %) makes it a lung cancer screening report with a
    Lung-RADS category; otherwise nodules get Fleischner Society advice. ``followed``: the
    patient is followed over visits, so the degree of cardiomegaly is always stated (sizes of
    nodules, effusions and pneumothoraces always are). ``has_prior``: an earlier CT of this
    patient is on file, so the COMPARISON line names it rather than saying none.
    """
    w = Writer(rng)
    if screening is None:
        screening = w.chance(0.25)
    present = {f.name for f in findings}
    body: dict[str, list[str]] = {k: [] for k in _HEADINGS}
    impression: list[str] = []
    order = ("pneumothorax", "consolidation", "pleural_effusion", "fracture", "nodule")
    ranked = sorted(findings, key=lambda f: order.index(f.name) if f.name in order else 2.5)
    for f in ranked:
        if f.name == "cardiomegaly":
            sentence, item = _cardiomegaly(w, f, sized=followed)
        else:
            sentence, item = _POSITIVE[f.name](w, f)
        body[_SYSTEM[f.name]].append(sentence)
        impression.append(item)
        if f.name == "nodule" and not screening:
            impression[-1] = f"{item} {_fleischner(w, f)}"
    nodules = [f for f in findings if f.name == "nodule"]
    if screening:
        cat, advice = lung_rads(nodules)
        impression.append(f"Lung-RADS {cat}: {advice}")

    # negatives, most of the time for each absent finding
    absent = [n for n in _SYSTEM if n not in present]
    if {"pleural_effusion", "pneumothorax"} <= set(absent) and w.chance(0.6):
        body["pleura"].append(w.pick(_PLEURA_BOTH))
        absent = [n for n in absent if n not in ("pleural_effusion", "pneumothorax")]
    for name in absent:
        if name == "fracture" and w.chance(0.35):
            body["bones"].append(w.pick(_OSSEOUS_QUIET))
        elif name == "cardiomegaly" or w.chance(0.9):
            body[_SYSTEM[name]].insert(
                0 if name == "cardiomegaly" else len(body[_SYSTEM[name]]), w.pick(_NEG[name])
            )
    for system, options in _FILLER.items():
        if w.chance(0.5 if system != "abdomen" else 0.8):
            body[system].append(w.pick(options))
    if not body["bones"]:
        body["bones"].append(w.pick(_OSSEOUS_QUIET))

    if not impression:
        impression.append(w.pick(_NORMAL_IMP))
    elif "pneumothorax" not in present and "fracture" in present and w.chance(0.5):
        impression.append("No pneumothorax.")

    comparison = w.pick(
        ["Prior chest CT.", "CT of the chest from a prior visit."]
        if has_prior
        else ["None.", "None available.", "No prior chest CT is available."]
    )
    lines = [_technique(w, screening, slice_thickness_mm), f"COMPARISON: {comparison}", ""]
    if w.chance(0.65):
        lines.append("FINDINGS:")
        for system, sentences in body.items():
            if sentences:
                lines.append(f"{w.pick(_HEADINGS[system])}: {' '.join(sentences)}")
    else:
        prose = [s for sentences in body.values() for s in sentences]
        lines.append("FINDINGS: " + " ".join(prose))
    lines.append("")
    if len(impression) > 1 or w.chance(0.5):
        lines.append("IMPRESSION:")
        lines += [f"{i}. {item}" for i, item in enumerate(impression, 1)]
    else:
        lines.append(f"IMPRESSION: {impression[0]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# indications

_INDICATIONS: Final[dict[str, tuple[str, ...]]] = {
    "nodule": (
        "Follow-up of a pulmonary nodule seen on an outside chest radiograph.",
        "Hemoptysis.",
        "Unintended weight loss and chronic cough.",
        "Abnormal chest radiograph.",
    ),
    "pleural_effusion": (
        "Shortness of breath.",
        "Dyspnea and decreased breath sounds at the base.",
        "Known malignancy, increasing dyspnea.",
    ),
    "cardiomegaly": (
        "Dyspnea on exertion and leg swelling.",
        "Known heart failure, worsening dyspnea.",
        "Chest pain.",
    ),
    "pneumothorax": (
        "Sudden onset pleuritic chest pain.",
        "Acute shortness of breath.",
        "Chest pain after central line placement.",
    ),
    "consolidation": (
        "Fever and productive cough.",
        "Hypoxia, evaluate for pneumonia.",
        "Persistent fever despite antibiotics.",
    ),
    "fracture": (
        "Fall with chest wall pain.",
        "Motor vehicle collision, chest wall tenderness.",
        "Trauma, evaluate for injury.",
    ),
}
_GENERIC: Final[tuple[str, ...]] = (
    "Chest pain.",
    "Shortness of breath.",
    "Chronic cough.",
    "Staging of known malignancy.",
    "Evaluate for pulmonary embolism.",
)


def write_ct_indication(
    findings: Sequence[CTFinding],
    rng: np.random.Generator,
    age: int,
    sex: str,
    *,
    screening: bool = False,
) -> str:
    """The clinical question on the request: correlated with the findings, never a copy of them
    (as in practice, about half the time it is generic)."""
    w = Writer(rng)
    who = {"M": "man", "F": "woman", "male": "man", "female": "woman"}.get(sex, "patient")
    if screening:
        years = int(w.rng.integers(20, 61))
        quit_years = int(w.rng.integers(1, 15))
        status = w.pick(
            [
                "current smoker",
                f"former smoker, quit {quit_years} year{'s' if quit_years > 1 else ''} ago",
            ]
        )
        return w.pick(
            [
                f"Lung cancer screening. {age}-year-old {who}, {status}, {years} pack-years.",
                f"Annual low-dose CT for lung cancer screening; {status}, {years} pack-year "
                "history.",
            ]
        )
    names = [f.name for f in findings]
    text = w.pick(_INDICATIONS[w.pick(names)]) if names and w.chance(0.6) else w.pick(_GENERIC)
    if w.chance(0.4):
        text = f"{age}-year-old {who}. {text}"
    return text
