"""Writes the report prose and clinical indication for one synthetic study.

Why: site labels come from reports (as MIMIC-CXR's come from the CheXpert labeler), so the
labeler needs prose that varies the way real reports do: synonyms, shuffled sentence order,
explicit and implicit negation, hedging, laterality and sizes, and a few misses. The label the
prose asserts is returned next to the text so evaluation can score the labeler against it:
1 stated present, -1 hedged, 0 negated or not mentioned.

About ``phi_rate`` of reports also echo header PHI (referring physician, patient name, MRN,
dates) the way real reports do, so the site's report scrubber has something to remove.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from fedrad.common.findings import ABSENT, FINDINGS, PRESENT, UNCERTAIN

from .cxr_image import Finding, cardiac_degree

STATED_SIZES: Final[frozenset[str]] = frozenset(
    {"nodule", "pleural_effusion", "pneumothorax", "cardiomegaly"}
)
"""Findings whose size (or degree) a followed patient's report always states, never hedged or
missed, in words the site reads a size from: comparing two such reports gives the change."""


@dataclass(frozen=True)
class ReportStyle:
    """A radiology group's habits; differs per site (text is non-IID too)."""

    hedge_rate: float = 0.10  # present findings stated with uncertainty (label -1)
    miss_rate: float = 0.03  # present findings the report misses (label 0)
    negate_rate: float = 0.6  # absent findings negated explicitly (else not mentioned)
    numbered_impression: bool = False  # "IMPRESSION:\n1. ...\n2. ..."
    sentence_per_line: bool = False  # FINDINGS sentences on their own lines
    comparison_rate: float = 0.3  # reports opening with a COMPARISON line
    phi_rate: float = 0.15  # reports echoing header PHI in the prose


@dataclass(frozen=True)
class HeaderPHI:
    """Identifiers from the DICOM header that a report may repeat."""

    given_name: str
    family_name: str
    mrn: str
    referring_family: str
    study_date: dt.date
    study_time: str  # HHMM
    prior_date: dt.date


@dataclass(frozen=True)
class Report:
    """The prose, and what it asserts per finding (1 / 0 / -1)."""

    text: str
    labels: dict[str, int] = field(default_factory=dict)
    phi_echoed: bool = False


_LOBES = {
    ("right", "upper"): "right upper lobe",
    ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula",
    ("left", "lower"): "left lower lobe",
}
_ZONES = {
    "upper": ("upper zone", "apex", "upper lung"),
    "middle": ("mid zone", "mid lung"),
    "lower": ("lower zone", "base", "lung base"),
}
_ORD = {
    1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 5: "5th", 6: "6th",
    7: "7th", 8: "8th", 9: "9th", 10: "10th", 11: "11th", 12: "12th",
}  # fmt: skip
"""Drawn fractures use ribs 4-9; DRR studies carry CT fractures (ribs 3-10)."""


class Writer:
    """Small helper holding the rng so template picks read naturally (CT reports too)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def cap(s: str) -> str:
    """The sentence with its first letter in upper case."""
    return s[:1].upper() + s[1:]


def _where(w: Writer, f: Finding, side: str) -> str:
    """A lobe or a zone, as radiologists alternate between them."""
    zone = f.zone or "lower"
    if w.chance(0.55):
        return _LOBES[(side, zone)]
    return f"{side} {w.pick(_ZONES[zone])}"


def _size_text(w: Writer, mm: float) -> str:
    if mm >= 10 and w.chance(0.5):
        return f"{mm / 10:.1f} cm"
    return f"{round(mm)} mm"


def _side(f: Finding) -> str:
    return f.side or "right"


def _positive(w: Writer, f: Finding, view: str, *, sized: bool = False) -> tuple[str, str]:
    """(FINDINGS sentence, IMPRESSION item) stating ``f`` as present; ``sized``: only
    FINDINGS wordings that grade it (an effusion's size, the degree of cardiomegaly)."""
    side = _side(f)
    if f.name == "nodule":
        size, where = (
            _size_text(w, f.size_mm or 10.0),
            _where(w, f, "left" if side == "left" else "right"),
        )
        s = w.pick(
            [
                f"There is a {size} nodule in the {where}.",
                f"A {size} rounded opacity in the {where} is compatible with a pulmonary nodule.",
                f"{cap(size)} pulmonary nodule projecting over the {where}.",
                f"Well-circumscribed {size} nodule in the {where}.",
            ]
        )
        imp = w.pick(
            [
                f"{cap(size)} {where} pulmonary nodule. Recommend CT chest for further evaluation.",
                f"Pulmonary nodule in the {where}, {size}.",
                f"{cap(size)} nodule, {where}; CT recommended.",
            ]
        )
        return s, imp
    if f.name == "pleural_effusion":
        size = f.size or "small"
        if side == "bilateral":
            s = w.pick(
                [
                    f"Bilateral {size} pleural effusions.",
                    f"{cap(size)} bilateral pleural effusions.",
                    f"There are {size} pleural effusions bilaterally.",
                    f"Bilateral pleural fluid, {size} in volume.",
                ]
            )
            return s, w.pick([f"{cap(size)} bilateral pleural effusions.", "Bilateral effusions."])
        opts = [
            f"{cap(size)} {side} pleural effusion.",
            f"There is a {size} {side}-sided pleural effusion.",
            f"{cap(size)} amount of {side} pleural fluid.",
        ]
        if size == "small":
            opts.append(
                f"Blunting of the {side} costophrenic angle, consistent with a small effusion."
            )
        if size == "large":
            opts.append(f"Large {side} pleural effusion with adjacent compressive atelectasis.")
        return w.pick(opts), w.pick(
            [f"{cap(size)} {side} pleural effusion.", f"{cap(side)} effusion."]
        )
    if f.name == "cardiomegaly":
        sev = cardiac_degree(f.ctr or 0.6)
        opts = [
            "The cardiac silhouette is enlarged.",
            "Cardiomegaly.",
            f"{cap(sev)} cardiomegaly.",
            "The heart is enlarged.",
            f"Heart size is {sev}ly enlarged.",
        ]
        s = w.pick([f"{cap(sev)} cardiomegaly."] if sized else opts)
        return s, w.pick(
            ["Cardiomegaly.", f"{cap(sev)} cardiomegaly.", "Enlarged cardiac silhouette."]
        )
    if f.name == "pneumothorax":
        size = f.size or "small"
        cm = {"small": 1.0, "moderate": 2.5, "large": 4.5}[size] + round(
            float(w.rng.uniform(-0.3, 0.6)), 1
        )
        opts = [
            f"There is a {size} {side} pneumothorax.",
            f"A {side} pneumothorax is present, measuring approximately {cm:.1f} cm at the apex.",
            f"{cap(side)} pneumothorax with a visible visceral pleural line.",
        ]
        if sized:
            opts = opts[:1]
        if size == "small":
            opts.append(f"Small {side} apical pneumothorax.")
        if size == "large":
            opts.append(f"Large {side} pneumothorax without mediastinal shift.")
        return w.pick(opts), w.pick(
            [f"{cap(size)} {side} pneumothorax.", f"{cap(side)} pneumothorax."]
        )
    if f.name == "consolidation":
        if side == "bilateral":
            zone = {"upper": "upper", "middle": "mid", "lower": "lower"}[f.zone or "lower"]
            s = w.pick(
                [
                    f"Patchy consolidation in both {zone} zones.",
                    f"Bilateral {zone} zone airspace consolidation.",
                    f"Multifocal consolidation involving both lungs, predominantly in the {zone} "
                    "zones.",
                ]
            )
            return s, w.pick(
                ["Multifocal consolidation, compatible with pneumonia.", "Bilateral consolidation."]
            )
        where = _where(w, f, side)
        s = w.pick(
            [
                f"Patchy airspace consolidation in the {where}.",
                f"Focal consolidation in the {where}, consistent with pneumonia.",
                f"Airspace opacity in the {where} with air bronchograms, compatible with "
                "consolidation.",
                f"There is {where} consolidation.",
            ]
        )
        imp = w.pick(
            [
                f"{cap(where)} consolidation, compatible with pneumonia in the appropriate "
                "clinical setting.",
                f"{cap(where)} consolidation.",
                f"Consolidation in the {where}.",
            ]
        )
        return s, imp
    # fracture
    rib = _ORD.get(f.rib or 6, "6th")
    if f.chronic:
        s = w.pick(
            [
                f"Old healed fracture of the {side} {rib} rib.",
                f"Healed {side} {rib} rib fracture.",
                f"Chronic deformity of the {side} {rib} rib from a prior fracture.",
            ]
        )
        return s, w.pick([f"Old healed {side} {rib} rib fracture.", f"Healed {side} rib fracture."])
    disp = w.pick(["displaced", "minimally displaced", "mildly displaced"])
    s = w.pick(
        [
            f"Acute {disp} fracture of the {side} {rib} rib.",
            f"There is a fracture of the {side} lateral {rib} rib.",
            f"{cap(side)} {rib} rib fracture with cortical step-off.",
        ]
    )
    return s, w.pick([f"Acute {side} {rib} rib fracture.", f"{cap(side)} {rib} rib fracture."])


def _hedged(w: Writer, f: Finding, view: str) -> tuple[str, str]:
    """(FINDINGS sentence, IMPRESSION item) stating ``f`` with uncertainty."""
    side = _side(f)
    one = "right" if side == "bilateral" else side
    if f.name == "nodule":
        where = _where(w, f, one)
        s = w.pick(
            [
                f"Questionable nodular opacity in the {where}, possibly a nipple shadow.",
                f"Possible small nodule in the {where}.",
                f"Ill-defined opacity in the {where} may represent a nodule.",
            ]
        )
        return s, f"Possible {where} nodule; consider CT for further evaluation."
    if f.name == "pleural_effusion":
        s = w.pick(
            [
                f"Possible small {one} pleural effusion.",
                f"Blunting of the {one} costophrenic angle may reflect a trace effusion or "
                "pleural thickening.",
                f"A small {one} pleural effusion is not excluded.",
            ]
        )
        return s, f"Possible small {one} effusion."
    if f.name == "cardiomegaly":
        opts = [
            "The cardiac silhouette is borderline enlarged.",
            "Heart size may be mildly enlarged.",
        ]
        if view == "AP":
            opts.append("Possible mild cardiomegaly, accentuated by the AP technique.")
        return w.pick(opts), "Borderline cardiac enlargement."
    if f.name == "pneumothorax":
        s = w.pick(
            [
                f"Cannot exclude a tiny {one} apical pneumothorax.",
                f"Possible small {one} apical pneumothorax.",
                f"Questionable {one} apical pleural line, which may represent a small "
                "pneumothorax.",
            ]
        )
        return s, f"Possible small {one} pneumothorax; a follow-up radiograph may help."
    if f.name == "consolidation":
        where = _where(w, f, one)
        opts = [
            f"Hazy opacity in the {where}, atelectasis versus early consolidation.",
            f"Possible developing consolidation in the {where}.",
        ]
        if f.zone == "lower":
            opts.append(f"Subtle opacity at the {one} base, may represent early consolidation.")
        return w.pick(opts), f"Possible early consolidation on the {one}."
    rib = _ORD.get(f.rib or 6, "6th")
    s = w.pick(
        [
            f"Possible nondisplaced fracture of the {side} {rib} rib.",
            f"Questionable cortical irregularity of the {side} {rib} rib, which may represent a "
            "fracture.",
            f"Subtle lucency through the {side} lateral {rib} rib; a nondisplaced fracture cannot "
            "be excluded.",
        ]
    )
    return s, f"Possible {side} {rib} rib fracture."


_NEG = {
    "nodule": ("No suspicious pulmonary nodules.", "No focal pulmonary nodule or mass."),
    "pleural_effusion": (
        "No pleural effusion.",
        "No pleural fluid.",
        "The costophrenic angles are sharp.",
        "There is no pleural effusion.",
    ),
    "cardiomegaly": (
        "Heart size is normal.",
        "The cardiac silhouette is within normal limits.",
        "Normal heart size.",
        "The cardiomediastinal silhouette is within normal limits.",
    ),
    "pneumothorax": (
        "No pneumothorax.",
        "There is no pneumothorax.",
        "No evidence of pneumothorax.",
    ),
    "consolidation": ("No focal consolidation.", "There is no focal airspace consolidation."),
    "fracture": (
        "No displaced rib fracture.",
        "No acute osseous abnormality.",
        "The osseous structures are intact.",
        "No fracture is identified.",
    ),
}
_RESOLVED = {
    "pleural_effusion": "The previously seen pleural effusion has resolved.",
    "pneumothorax": "No residual pneumothorax.",
    "consolidation": "Previously described airspace consolidation has resolved.",
    "nodule": "The previously questioned nodule is not seen on this study, likely a nipple shadow.",
}
_FILLER = (
    "The mediastinal contours are unremarkable.",
    "Hilar contours are normal.",
    "Mild degenerative changes of the thoracic spine.",
    "The visualized upper abdomen is unremarkable.",
    "Pulmonary vascularity is within normal limits.",
)
_DEVICE_TEXT = {
    "ecg_leads": (
        "Cardiac monitoring leads overlie the chest.",
        "External monitoring leads project over the thorax.",
    ),
    "central_line": (
        "Central venous catheter terminates in the SVC.",
        "A central line is seen with its tip in the SVC.",
    ),
    "endotracheal_tube": (
        "Endotracheal tube tip is {n} cm above the carina.",
        "ET tube in standard position.",
    ),
    "nasogastric_tube": (
        "Enteric tube courses below the diaphragm.",
        "Nasogastric tube tip in the stomach.",
    ),
}
_NORMAL_IMP = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No radiographic evidence of acute cardiopulmonary disease.",
)


def _fmt_date(w: Writer, d: dt.date) -> str:
    return w.pick(
        [d.strftime("%m/%d/%Y"), d.isoformat(), d.strftime("%B %d, %Y").replace(" 0", " ")]
    )


def _negations(
    w: Writer, names: list[str], *, lungs_clear_ok: bool, interval: bool = True
) -> list[str]:
    """Negative sentences for ``names``, combining some the way radiologists do; ``interval``
    allows a few "has resolved" ones (wrong for a followed patient whose prior lacked it)."""
    out: list[str] = []
    todo = list(names)
    trio = {"consolidation", "pleural_effusion", "pneumothorax"}
    if trio <= set(todo) and w.chance(0.35):
        out.append(
            w.pick(
                [
                    "No focal consolidation, pleural effusion, or pneumothorax.",
                    "There is no consolidation, effusion, or pneumothorax.",
                ]
            )
        )
        todo = [n for n in todo if n not in trio]
    if {"pleural_effusion", "pneumothorax"} <= set(todo) and w.chance(0.6):
        out.append(
            w.pick(
                [
                    "No pleural effusion or pneumothorax.",
                    "There is no pleural effusion or pneumothorax.",
                    "No pneumothorax or pleural effusion.",
                ]
            )
        )
        todo = [n for n in todo if n not in ("pleural_effusion", "pneumothorax")]
    if "consolidation" in todo and lungs_clear_ok and w.chance(0.5):
        out.append(w.pick(["The lungs are clear.", "Lungs are clear without focal consolidation."]))
        todo.remove("consolidation")
    for n in todo:
        if interval and n in _RESOLVED and w.chance(0.05):
            out.append(_RESOLVED[n])
        else:
            out.append(w.pick(_NEG[n]))
    return out


def write_report(
    findings: Sequence[Finding],
    *,
    view: str,
    devices: Sequence[str],
    style: ReportStyle,
    phi: HeaderPHI,
    rng: np.random.Generator,
    followed: bool = False,
    has_prior: bool = False,
) -> Report:
    """Write FINDINGS/IMPRESSION prose for the image's findings and return the asserted labels.

    ``followed``: the patient is followed over visits, so the report states the size of every
    present `STATED_SIZES` finding (never hedged or missed) and says nothing of interval change
    ("has resolved"): the site compares two such reports itself. ``has_prior``: an earlier study
    of this patient is on file (dated ``phi.prior_date``), so a COMPARISON line never says none.
    """
    w = Writer(rng)
    present = {f.name: f for f in findings}
    labels = dict.fromkeys(FINDINGS, ABSENT)
    sentences: list[str] = []
    impression: list[tuple[int, str]] = []
    to_negate: list[str] = []
    heart_sentence = ""
    priority = (
        "pneumothorax",
        "pleural_effusion",
        "consolidation",
        "cardiomegaly",
        "fracture",
        "nodule",
    )
    for name in FINDINGS:
        f = present.get(name)
        if f is None:
            if name == "cardiomegaly" or w.chance(style.negate_rate):
                to_negate.append(name)
            continue
        r = w.rng.random()
        if followed and name in STATED_SIZES:
            r = 1.0  # stated, with its size
        if r < style.miss_rate:  # missed: not mentioned, or wrongly negated
            if name == "cardiomegaly" or w.chance(0.5):
                to_negate.append(name)
            continue
        if r < style.miss_rate + style.hedge_rate:
            s, imp = _hedged(w, f, view)
            labels[name] = UNCERTAIN
            if w.chance(0.7):
                impression.append((priority.index(name), imp))
        else:
            s, imp = _positive(w, f, view, sized=followed)
            labels[name] = PRESENT
            impression.append((priority.index(name), imp))
        if name == "cardiomegaly":
            heart_sentence = s
        else:
            sentences.append(s)
    mentioned_lung = any(labels[n] != ABSENT for n in ("nodule", "consolidation", "pneumothorax"))
    negs = _negations(
        w,
        [n for n in to_negate if n != "cardiomegaly"],
        lungs_clear_ok=not mentioned_lung,
        interval=not followed,
    )
    if "cardiomegaly" in to_negate:
        opts = list(_NEG["cardiomegaly"])
        if view == "AP":
            opts.append("Heart size is within normal limits for this AP projection.")
        heart_sentence = w.pick(opts)
    sentences += negs
    if w.chance(0.35):
        sentences.append(w.pick(_FILLER))
    for d in devices:
        sentences.append(w.pick(_DEVICE_TEXT[d]).format(n=int(w.rng.integers(3, 7))))
    w.rng.shuffle(sentences)  # type: ignore[arg-type]
    if heart_sentence:
        sentences.insert(
            0 if w.chance(0.6) else int(w.rng.integers(len(sentences) + 1)), heart_sentence
        )

    impression.sort()
    items = [imp for _, imp in impression]
    if not items:
        items = [w.pick(_NORMAL_IMP)] if devices or w.chance(0.8) else ["Normal chest radiograph."]
    if devices and w.chance(0.5):
        items.append("Support devices as described.")

    header = ""
    phi_echoed = False
    if w.chance(style.phi_rate):
        phi_echoed = True
        prior = _fmt_date(w, phi.prior_date)
        kind = int(w.rng.integers(3)) if any(labels.values()) else int(w.rng.integers(1, 3))
        if kind == 0:
            t = f"{phi.study_time[:2]}:{phi.study_time[2:]}"
            items.append(
                f"Findings discussed with Dr. {phi.referring_family} by telephone on "
                f"{_fmt_date(w, phi.study_date)} at {t}."
            )
        elif kind == 1:
            header = (
                f"COMPARISON: Prior study of {phi.given_name} {phi.family_name} from {prior}.\n"
            )
        else:
            header = w.pick(
                [
                    f"COMPARISON: Chest radiograph ({phi.mrn}) dated {prior}.\n",
                    f"COMPARISON: Outside images for {phi.family_name}, {phi.given_name} "
                    f"(MRN {phi.mrn[3:]}) from {prior}.\n",
                ]
            )
    elif w.chance(style.comparison_rate):
        options = ["None.", "None available.", "Chest radiograph from a prior admission."]
        if has_prior:
            options = ["Prior chest radiograph.", "Chest radiograph from a prior admission."]
        header = "COMPARISON: " + w.pick(options) + "\n"

    joiner = "\n" if style.sentence_per_line else " "
    body = "FINDINGS:" + ("\n" if style.sentence_per_line else " ") + joiner.join(sentences)
    if style.numbered_impression and len(items) > 1:
        imp_text = "IMPRESSION:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(items, 1))
    else:
        imp_text = "IMPRESSION: " + " ".join(items)
    return Report(text=f"{header}{body}\n{imp_text}", labels=labels, phi_echoed=phi_echoed)


# --------------------------------------------------------------------------------------------
# indications

_SITE_INDICATIONS = {
    "outpatient": (
        "pre-operative evaluation",
        "chronic cough",
        "routine follow-up",
        "annual physical",
        "smoker, screening",
        "hypertension, dyspnea on exertion",
    ),
    "icu": (
        "intubated patient, assess tube position",
        "hypoxia",
        "status post central line placement",
        "sepsis",
        "post-operative day 1",
        "increasing oxygen requirement",
    ),
    "trauma": (
        "motor vehicle collision",
        "fall from height",
        "assault, chest wall pain",
        "trauma evaluation",
        "fall, chest wall pain",
    ),
    "community": (
        "fever and cough",
        "shortness of breath",
        "chest pain",
        "weakness",
        "cough for two weeks",
    ),
}
_FINDING_INDICATIONS = {
    "nodule": (
        "follow-up pulmonary nodule",
        "incidental nodule on outside CT, follow-up",
        "weight loss, smoker",
        "hemoptysis",
    ),
    "pleural_effusion": (
        "shortness of breath",
        "dyspnea and leg swelling",
        "decreased breath sounds at the base",
        "follow-up effusion",
    ),
    "cardiomegaly": (
        "congestive heart failure",
        "dyspnea on exertion",
        "bilateral leg edema",
        "known cardiomyopathy",
    ),
    "pneumothorax": (
        "sudden onset chest pain",
        "rule out pneumothorax after line placement",
        "status post chest tube removal",
        "acute shortness of breath",
    ),
    "consolidation": (
        "fever and cough",
        "productive cough, rule out pneumonia",
        "hypoxia, crackles at the base",
        "fever, elevated white count",
    ),
    "fracture": (
        "fall, chest wall pain",
        "rib pain after fall",
        "motor vehicle collision, chest wall tenderness",
        "point tenderness over the ribs",
    ),
}


def write_indication(
    findings: Sequence[Finding], *, kind: str, age: int, sex: str, rng: np.random.Generator
) -> str:
    """A clinical question correlated with the findings, with noise (never a copy of the label)."""
    w = Writer(rng)
    names = [f.name for f in findings]
    if names and w.chance(0.55):
        text = w.pick(_FINDING_INDICATIONS[w.pick(names)])
    elif w.chance(0.15):
        text = w.pick(_FINDING_INDICATIONS[w.pick(FINDINGS)])
    else:
        text = w.pick(_SITE_INDICATIONS.get(kind, _SITE_INDICATIONS["community"]))
    if w.chance(0.25):
        text = f"{age} y/o {sex}, {text}"
    return cap(text)
