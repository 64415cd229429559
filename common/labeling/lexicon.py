"""What counts as a mention of each finding: the labeler's finding definitions, as patterns.

Each finding has the terms that count as a mention and the related terms that do not (a
calcified granuloma is not a nodule; airspace disease is not consolidation unless the report says
so). The default reference standard is the CheXpert labeler's (Irvin et al. 2019), whose classes
keep Lung Lesion, Consolidation, Pneumonia and Lung Opacity apart; each departure is written in
docs/labeler.md#finding-definitions beside examples, and tests/common/test_labeler.py pins them.
Patterns run on lower-cased text; a related term claims its span first, so no mention overlaps it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from fedrad.common.findings import ABSENT, FINDINGS, UNCERTAIN


@dataclass(frozen=True)
class Term:
    """One way a report names a finding, with what the phrase itself says about it."""

    pattern: str
    status: int | None = None
    """A fixed status the phrase carries on its own ("heart size is normal" -> 0), or None when
    the sentence's negation and uncertainty cues decide."""
    at_most: int | None = None
    """An asserted mention is capped here: blunting of a costophrenic angle may be effusion or
    pleural thickening, so at most uncertain; its negation still gives 0."""


_HEART = (
    r"(?:heart(?: size)?|cardiac (?:silhouette|size|shadow|contours?|diameter)"
    r"|size of the (?:heart|cardiac silhouette)|heart shadow)"
)
_HEART_OR_CM = rf"(?:{_HEART}|cardiomediastinal (?:silhouette|contours?|size))"
_NOT_FILLER = (
    r"(?!(?:not|no|normal|top|upper|high|borderline|with|without|and|but|of|in|on|from"
    r"|which|there)\b)"
)
_LABEL_SEP = r"(?: ?[:-])?"
"""A checklist's separator after the organ: "Heart: enlarged.", "Heart - normal."."""
_CP_ANGLE = r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i)|recess(?:es)?)"
_SIDE_WORDS = r"(?:(?:left|right|bilateral|both|lateral|posterior) )*"

MENTIONS: Final[dict[str, tuple[Term, ...]]] = {
    "nodule": (
        Term(r"\b(?:micro)?nodul(?:e|es|i)\b"),
        Term(r"\bnodular (?:[\w-]+ ){0,3}?(?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)\b"),
        Term(r"\bmass[- ]?like (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)\b"),
        Term(r"\bmicronodular\b"),
        Term(r"\bmass(?:es)?\b"),
        Term(r"\b(?:lung|pulmonary|parenchymal|cavitary|cavitating|spiculated|coin) lesions?\b"),
        Term(
            r"\b(?:lung|pulmonary|bronchogenic) (?:tumou?rs?|neoplasms?|carcinomas?|cancers?"
            r"|metastas[ie]s)\b"
        ),
    ),
    "pleural_effusion": (
        Term(rf"\b(?:sharp|clear|normal) {_SIDE_WORDS}{_CP_ANGLE}", ABSENT),
        Term(
            rf"\b{_CP_ANGLE} (?:(?:are|is|remain|remains|appear|appears|now|again) )*"
            r"(?:sharp(?:ly defined)?|clear|preserved|normal)\b",
            ABSENT,
        ),
        Term(r"\b(?:effusions?|effs)\b"),
        Term(r"\bpleural (?:fluid|collections?)\b"),
        Term(r"\bfluid (?:with)?in the (?:(?:left|right) )?pleural (?:space|cavity)\b"),
        Term(
            r"\b(?:hydrothora(?:x|ces)|ha?emothora(?:x|ces)|empyemas?|hydropneumothora(?:x|ces))\b"
        ),
        Term(
            rf"\bblunt(?:ing|ed)(?: of)?(?: the)? {_SIDE_WORDS}{_CP_ANGLE}",
            at_most=UNCERTAIN,
        ),
        Term(rf"\b{_CP_ANGLE} (?:\w+ ){{0,3}}?blunt(?:ing|ed)\b", at_most=UNCERTAIN),
        Term(r"\b(?:layering (?:pleural )?fluid|fluid layering)\b"),
    ),
    "cardiomegaly": (
        Term(
            rf"\b{_HEART} (?:\w+ )?(?:cannot|can not|could not|can't|is difficult to|is hard to"
            r"|not) (?:be )?(?:\w+ )?(?:assessed|evaluated|determined)\b",
            UNCERTAIN,
        ),
        Term(
            r"\b(?:borderline|top[- ]normal|upper[- ]normal|high[- ]normal)"
            r"(?: \w+){0,2}? (?:cardiomegaly|heart|cardiac)\b",
            UNCERTAIN,
        ),
        Term(
            rf"\b{_HEART}(?: \w+){{0,3}}? (?:(?:at |in |within |of )?(?:the )?"
            r"(?:top|upper|high)(?: limits?| range| end)?(?: of)?(?:[- ]normal)|borderline)\b",
            UNCERTAIN,
        ),
        Term(rf"\bnormal(?:[- ]sized?)? {_HEART_OR_CM}\b", ABSENT),
        Term(
            rf"\b{_HEART_OR_CM}{_LABEL_SEP}(?: {_NOT_FILLER}\w+){{0,4}}? (?:(?:is |are )?normal"
            r"|within normal limits|unremarkable|(?:is |are )?not enlarged)\b",
            ABSENT,
        ),
        Term(r"\bcardiomegaly\b"),
        Term(r"\b(?:cardiac|heart)(?: and mediastinal)?(?: silhouettes?)? enlargement\b"),
        Term(r"\benlargement of the (?:heart|cardiac (?:and mediastinal )?silhouettes?)\b"),
        Term(r"\benlarged (?:\w+ )?(?:heart|cardiac (?:silhouette|size|shadow))"),
        Term(
            r"\b(?:increased|large|globular|dilated) "
            r"(?:heart|cardiac silhouette|(?:heart|cardiac) size)\b"
        ),
        Term(
            rf"\b{_HEART}{_LABEL_SEP}(?: {_NOT_FILLER}\w+){{0,5}}? (?:enlarged|enlargement"
            r"|increased|large)\b"
        ),
    ),
    "pneumothorax": (
        Term(r"\b(?:hydro)?pneumothora(?:x|ces)\b"),
        Term(r"\bptx\b"),
        Term(r"\bpleural air\b|\bair in the (?:(?:left|right) )?pleural space\b"),
        Term(r"\bvisceral pleural (?:line|edge|margin)\b"),
    ),
    "consolidation": (
        Term(
            r"\b(?:the )?lungs (?:(?:are|is|remain|remains|appear|appears|now|again|otherwise"
            r"|essentially|grossly) )*clear\b(?! of)",
            ABSENT,
        ),
        Term(r"\bclear lungs\b", ABSENT),
        Term(r"\bconsolidat(?:ion|ions|ive|ed|ing)\b|\bconsol\b"),
    ),
    "fracture": (
        Term(r"\bfractur(?:e|es|ed|ing)\b"),
        Term(r"\bfxs?\b"),
    ),
}
"""Finding -> the terms that count as a mention. Within a finding, earlier terms win overlapping
spans, so fixed-status phrases come before the generic ones."""

RELATED: Final[dict[str, tuple[str, ...]]] = {
    "nodule": (
        r"\b(?:calcified )?granulom(?:a|as|ata|atous)\b(?: (?:disease|changes?|process))?",
        # as in the CheXpert labeler: a calcified nodule is a healed granuloma, no lesion
        r"\bcalcified(?<!non-calcified)(?<!non calcified) (?:[\w-]+ ){0,3}?"
        r"(?:nodul(?:e|es|i)|nodular (?:opacit(?:y|ies)|densit(?:y|ies)))\b",
        r"\bmass effect\b",
        r"\b(?:mediastinal|breast|soft[- ]tissue|thyroid|neck|abdominal|chest wall"
        r"|paratracheal|axillary|renal|adrenal|pelvic) mass(?:es)?\b",
        r"\bmass(?:es)? (?:in|of|within) the (?:\w+ )?(?:mediastinum|neck|abdomen|breast"
        r"|thyroid|chest wall|soft tissues?)\b",
        r"\bnipple shadows?\b|\bbone islands?\b",
    ),
    "pleural_effusion": (
        r"\b(?:pericardial|joint|knee|subdural) (?:\w+ )?effusions?\b",
        r"\bpleural (?:thickening|scarring|plaques?|calcifications?)\b|\bfibrothorax\b",
    ),
    "cardiomegaly": (
        r"\b(?:enlarged|widened|wide|prominent) (?:cardio)?mediastin(?:um|al (?:silhouette"
        r"|contours?))\b",
        r"\b(?:cardio)?mediastin(?:um|al (?:silhouette|contours?)) (?:is |are |appears? )?"
        r"(?:\w+ )?(?:enlarged|widened|wide|prominent)\b",
    ),
    "pneumothorax": (
        r"\bpneumo(?:mediastinum|peritoneum|pericardium|nia|nias|nitis)\b",
        r"\bsubcutaneous (?:emphysema|air|gas)\b|\bskin folds?\b",
    ),
    "consolidation": (
        r"\b(?:broncho)?pneumonias?\b",
        r"\binfiltrat(?:e|es|ion|ive)\b",
        r"\bair[- ]?space (?:opacit(?:y|ies|ification)|disease|process|densit(?:y|ies))\b",
        r"\batelecta(?:sis|tic)\b",
    ),
    "fracture": (
        r"\bfractur(?:e|es|ed) (?:of )?(?:the |a |one |two )?(?:(?!and\b|with\b|or\b)\w+ ){0,3}?"
        r"(?:wires?|leads?|sutures?)\b",
        r"\b(?:wires?|leads?) (?:\w+ ){0,2}?(?:is |are )?fractur(?:e|es|ed)\b",
        r"\bdeformit(?:y|ies)\b",
    ),
}
"""Finding -> terms that look like it but are not it. They claim their span first, so "calcified
granuloma", "pericardial effusion" or "fractured sternotomy wire" never give a mention; the
phrase is still a list item, so "no pneumonia, effusion or pneumothorax" negates all three."""

KEYWORDS: Final[dict[str, tuple[str, ...]]] = {
    "nodule": ("nodul", "mass", "lesion", "tumo", "neoplasm", "metasta", "carcinoma", "cancer"),
    "pleural_effusion": (
        "effusion",
        "effs",
        "pleural",
        "thora",
        "empyema",
        "costophrenic",
        "cp ",
        "fluid",
    ),
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac"),
    "pneumothorax": ("pneumothora", "ptx", "pleural"),
    "consolidation": ("lung", "consol"),
    "fracture": ("fractur", "fx"),
}
"""Every mention pattern contains one of its finding's keywords: a substring test is far cheaper
than the patterns, and most sentences mention nothing (tubes, lines, comparisons)."""

MENTION_RES: Final[dict[str, tuple[tuple[re.Pattern[str], Term], ...]]] = {
    finding: tuple((re.compile(t.pattern), t) for t in terms) for finding, terms in MENTIONS.items()
}
RELATED_RE: Final[re.Pattern[str]] = re.compile(
    "|".join(f"(?:{p})" for finding in FINDINGS for p in RELATED[finding])
)
"""All related terms as one pattern: which finding a look-alike resembles does not matter once
it has claimed its span."""
