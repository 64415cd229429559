"""Peer report labeler: medspaCy (TargetMatcher + ConText + Sectionizer) over fedrad's six findings.

Runs in its own venv (.venv-medspacy: medspacy pins spacy<3.8, whose thinc needs numpy<2, which
clashes with fedrad's numpy 2.x), so it imports only the standard library and medspacy, never
fedrad. It reads JSON lines ``{"id": ..., "text": ...}`` on stdin and writes JSON lines
``{"id": ..., "labels": {finding: 1 | 0 | -1}}`` on stdout, in input order, then one JSON line of
timings on stderr (``{"peer_timing": {"load_s": ..., "label_s": ..., "n": ...}}``).

How the pipeline is built and how a mention becomes a label, with the reasons: docs/labeler.md,
"The peer labeler (medspaCy)".

What counts as each finding follows fedrad's written finding definitions
(docs/labeler.md, "Finding definitions"), the same ones radlabels' labels are mapped
under and the phrase suite is written to: granuloma is no nodule; consolidation is the
consolidation words only (pneumonia, infiltrate, airspace disease / opacity and infection are
look-alikes); a blunted costophrenic angle, or a borderline heart size, is uncertain at most; a
hydropneumothorax is an effusion and a pneumothorax; pneumomediastinum, pericardial effusion,
device "fractures" and the like are look-alikes. ``TARGETS``, ``UNCERTAIN_AT_MOST`` and
``DISTRACTORS`` were changed to follow those definitions, word for word where they list words;
nothing in them was tuned to a benchmark score.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Final

FINDINGS: Final[tuple[str, ...]] = (
    "nodule",
    "pleural_effusion",
    "cardiomegaly",
    "pneumothorax",
    "consolidation",
    "fracture",
)
"""fedrad's findings, in fedrad's order (copied: this script must not import fedrad)."""

PRESENT: Final[int] = 1
ABSENT: Final[int] = 0
UNCERTAIN: Final[int] = -1

_HEART: Final[list[str]] = ["heart", "cardiac"]
_HEART_PART: Final[list[str]] = ["size", "silhouette", "shadow", "contour", "contours"]
_VERB: Final[list[str]] = ["is", "are", "remains", "remain", "appears", "appear", "again", "now"]
_DEGREE: Final[list[str]] = [
    "mildly",
    "moderately",
    "markedly",
    "severely",
    "massively",
    "slightly",
    "minimally",
    "significantly",
    "substantially",
    "still",
    "again",
    "also",
]
_GRADE: Final[list[str]] = [
    "mild",
    "moderate",
    "marked",
    "severe",
    "massive",
    "slight",
    "minimal",
    "significant",
    "substantial",
]

_BORDERLINE: Final[list[str]] = ["borderline", "top"]

TARGETS: Final[dict[str, list[str | list[dict[str, Any]]]]] = {
    "nodule": [
        "nodule",
        "nodules",
        "nodular opacity",
        "nodular opacities",
        "nodular density",
        "nodular densities",
        "micronodule",
        "micronodules",
        "mass",
        "masses",
        "lung mass",
        "pulmonary mass",
        "lung lesion",
        "lung lesions",
        "pulmonary lesion",
        "pulmonary lesions",
        "cavitary lesion",
        "spiculated lesion",
        "lung tumor",
        "lung tumour",
        "lung neoplasm",
        "pulmonary neoplasm",
        "lung carcinoma",
        "pulmonary metastases",
    ],
    "pleural_effusion": [
        "effusion",
        "effusions",
        "pleural fluid",
        "hydrothorax",
        "hemothorax",
        "empyema",
        "layering fluid",
        "fluid in the pleural space",
    ],
    "cardiomegaly": [
        "cardiomegaly",
        "enlarged heart",
        "enlarged cardiac silhouette",
        "cardiac enlargement",
        "enlargement of the cardiac silhouette",
        "enlarged heart size",
        # "heart is (mildly) enlarged", "cardiac silhouette remains moderately enlarged"
        [
            {"LOWER": {"IN": _HEART}},
            {"LOWER": {"IN": _HEART_PART}, "OP": "?"},
            {"LOWER": {"IN": _VERB}, "OP": "*"},
            {"LOWER": {"IN": _DEGREE}, "OP": "*"},
            {"LOWER": {"IN": ["enlarged", "large"]}},
        ],
        # "moderately enlarged heart", "mild cardiac enlargement", "mildly enlarged cardiac
        # silhouette"
        [
            {"LOWER": {"IN": _DEGREE + _GRADE}},
            {"LOWER": {"IN": ["enlarged", "enlargement"]}, "OP": "?"},
            {"LOWER": {"IN": _HEART}},
            {"LOWER": {"IN": [*_HEART_PART, "enlargement"]}, "OP": "?"},
        ],
        # "heart size is increased"
        [
            {"LOWER": {"IN": _HEART}},
            {"LOWER": {"IN": _HEART_PART}},
            {"LOWER": {"IN": _VERB}, "OP": "*"},
            {"LOWER": {"IN": _DEGREE}, "OP": "*"},
            {"LOWER": "increased"},
        ],
    ],
    "pneumothorax": [
        "pneumothorax",
        "pneumothoraces",
        "ptx",
    ],
    "consolidation": [
        "consolidation",
        "consolidations",
        "consolidative",
        "consolidative opacity",
        "consolidative opacities",
        "consolidated",
        "airspace consolidation",
        "air space consolidation",
    ],
    "fracture": [
        "fracture",
        "fractures",
        "fractured",
        "fx",
    ],
}
"""Synonyms per finding: strings are phrase rules (matched lower-cased), lists spaCy patterns."""

UNCERTAIN_AT_MOST: Final[dict[str, list[str | list[dict[str, Any]]]]] = {
    # may be a small effusion or pleural thickening
    "pleural_effusion": [
        "blunting of the costophrenic angle",
        "blunting of the costophrenic angles",
        "blunting of the left costophrenic angle",
        "blunting of the right costophrenic angle",
        "blunted costophrenic angle",
        "blunted costophrenic angles",
        "costophrenic angle blunting",
        "costophrenic blunting",
    ],
    "cardiomegaly": [
        "borderline cardiomegaly",
        "upper limits of normal heart size",
        # "borderline heart size", "top-normal cardiac size", "top normal heart"
        [
            {"LOWER": {"IN": _BORDERLINE}},
            {"ORTH": "-", "OP": "?"},
            {"LOWER": "normal", "OP": "?"},
            {"LOWER": {"IN": _HEART}},
            {"LOWER": {"IN": _HEART_PART}, "OP": "?"},
        ],
        # "heart size is borderline", "heart size is top-normal"
        [
            {"LOWER": {"IN": _HEART}},
            {"LOWER": {"IN": _HEART_PART}, "OP": "?"},
            {"LOWER": {"IN": _VERB}, "OP": "*"},
            {"LOWER": {"IN": _BORDERLINE}},
            {"ORTH": "-", "OP": "?"},
            {"LOWER": "normal", "OP": "?"},
        ],
        # "heart size is at the upper limits of normal"
        [
            {"LOWER": {"IN": _HEART}},
            {"LOWER": {"IN": _HEART_PART}, "OP": "?"},
            {"LOWER": {"IN": _VERB}, "OP": "*"},
            {"LOWER": "at", "OP": "?"},
            {"LOWER": "the", "OP": "?"},
            {"LOWER": "upper"},
            {"LOWER": {"IN": ["limit", "limits"]}},
            {"LOWER": "of"},
            {"LOWER": "normal"},
        ],
    ],
}
"""Mentions the definitions call uncertain (-1) even when asserted; negated they are 0. Matched
as category ``<finding>_uncertain`` so that the longest match ("borderline cardiomegaly") wins
over the finding's own rule ("cardiomegaly")."""

BOTH: Final[dict[str, tuple[str, ...]]] = {
    "hydropneumothorax": ("pleural_effusion", "pneumothorax"),
}
"""Words that are two findings at once, matched as their own category."""

DISTRACTORS: Final[list[str]] = [
    # not a nodule
    "granuloma",
    "granulomas",
    "calcified granuloma",
    "calcified granulomas",
    "granulomatous disease",
    "granulomatous change",
    "granulomatous changes",
    # a calcified nodule is a healed granuloma (the CheXpert labeler's unmention list)
    "calcified nodule",
    "calcified nodules",
    "calcified nodular opacity",
    "calcified nodular opacities",
    "calcified nodular density",
    "calcified nodular densities",
    "mediastinal mass",
    "breast mass",
    "neck mass",
    "soft tissue mass",
    "soft-tissue mass",
    "thyroid mass",
    "mass effect",
    "nipple shadow",
    "nipple shadows",
    "bone island",
    # not a pleural effusion
    "pericardial effusion",
    "pericardial effusions",
    "joint effusion",
    # not a pneumothorax
    "pneumomediastinum",
    "pneumoperitoneum",
    "pneumopericardium",
    "subcutaneous emphysema",
    "skin fold",
    "skin folds",
    # not consolidation unless consolidation is said too
    "pneumonia",
    "pneumonias",
    "bronchopneumonia",
    "infiltrate",
    "infiltrates",
    "infiltration",
    "airspace disease",
    "air space disease",
    "airspace opacity",
    "airspace opacities",
    "air space opacity",
    "air space opacities",
    "infection",
    "infectious process",
    # not a fracture: a device's
    "fractured sternotomy wire",
    "fractured sternotomy wires",
    "fractured sternal wire",
    "fractured sternal wires",
    "sternotomy wire fracture",
    "wire fracture",
    "fractured wire",
    "fractured wires",
    "lead fracture",
    "fractured lead",
    "fractured leads",
    "fractured pacer lead",
    "fractured pacemaker lead",
]
"""Look-alikes matched as category ``OTHER`` so that TargetMatcher's longest match drops them
and no finding reads them."""

IGNORED_HEADER_WORDS: Final[list[str]] = [
    "indication",
    "indications",
    "history",
    "hx",
    "comparison",
    "comparisons",
    "technique",
    "examination",
    "exam",
    "study",
    "procedure",
    "reason",
    "notification",
    "reference",
    "clinical",
    "views",
    "priors",
]
"""Words that make a section header ignored (INDICATION:, CLINICAL HISTORY:, REASON FOR EXAM:)."""

_BLANK_LINE_RE: Final[re.Pattern[str]] = re.compile(r"\n[ \t]*\n")

COLON_RULES: Final[frozenset[str]] = frozenset({": no", ": none"})
"""Default ConText rules left out unless ``--keep-colon-rules``: written for checklists
("Pneumothorax: no", a backward negation), they swallow the "No" of every "FINDINGS: No
pneumothorax", whose forward "no" then never fires (127 of radlabels' 1,000 reports have a
header followed by "No"). Every other default rule is kept as shipped."""


def _section_rules() -> list[Any]:
    """Radiology report sections: ignored headers and any other all-caps header at line start."""
    from medspacy.section_detection import SectionRule

    ignored = SectionRule(
        literal="ignored header",
        category="ignored",
        pattern=[
            {"IS_UPPER": True, "OP": "*"},
            {"LOWER": {"IN": IGNORED_HEADER_WORDS}, "IS_UPPER": True},
            {"IS_UPPER": True, "OP": "*"},
            {"ORTH": ":"},
        ],
    )
    other = SectionRule(
        literal="other header",
        category="read",
        pattern=[
            {"IS_UPPER": True, "LOWER": {"NOT_IN": IGNORED_HEADER_WORDS}, "OP": "+"},
            {"ORTH": ":"},
        ],
    )
    return [ignored, other]


def _quiet_pyrush() -> None:
    """PyRuSH logs every sentence boundary at DEBUG through loguru: keep warnings only."""
    try:
        from loguru import logger
    except ImportError:  # an older PyRuSH that does not use loguru
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def build_pipeline(*, keep_colon_rules: bool = False) -> Any:
    """medspaCy's default pipes plus our target rules and radiology sections; offline."""
    _quiet_pyrush()
    import medspacy
    from medspacy.context import ConTextRule
    from medspacy.ner import TargetRule

    # tokenizer, PyRuSH, TargetMatcher, ConText; ConText's default rules are added below
    nlp = medspacy.load(load_rules=False)
    context = nlp.get_pipe("medspacy_context")
    context.add(
        [
            rule
            for rule in ConTextRule.from_json(context.DEFAULT_RULES_FILEPATH)
            if keep_colon_rules or rule.literal not in COLON_RULES
        ]
    )
    nlp.add_pipe(
        "medspacy_sectionizer",
        config={"rules": None, "require_start_line": True},
        after="medspacy_pyrush",
    )
    nlp.get_pipe("medspacy_sectionizer").add(_section_rules())
    rules: list[Any] = []
    for finding, synonyms in TARGETS.items():
        for synonym in synonyms:
            if isinstance(synonym, str):
                rules.append(TargetRule(literal=synonym, category=finding))
            else:
                rules.append(
                    TargetRule(literal=f"{finding} pattern", category=finding, pattern=synonym)
                )
    for finding, synonyms in UNCERTAIN_AT_MOST.items():
        for synonym in synonyms:
            category = f"{finding}_uncertain"
            if isinstance(synonym, str):
                rules.append(TargetRule(literal=synonym, category=category))
            else:
                rules.append(
                    TargetRule(literal=f"{category} pattern", category=category, pattern=synonym)
                )
    rules.extend(TargetRule(literal=word, category=word) for word in BOTH)
    rules.extend(TargetRule(literal=d, category="OTHER") for d in DISTRACTORS)
    nlp.get_pipe("medspacy_target_matcher").add(rules)
    return nlp


def mention_label(ent: Any, *, hypothetical: int) -> int:
    """One matched finding mention -> 1 / 0 / -1 from its ConText attributes."""
    if ent._.is_uncertain:
        return UNCERTAIN
    if ent._.is_negated:
        return ABSENT
    if ent._.is_hypothetical:
        return hypothetical
    if ent._.is_family:
        return ABSENT
    return PRESENT  # asserted, historical included


def in_ignored_section(ent: Any, *, blank_line_ends: bool = True) -> bool:
    """Whether a mention lies in an ignored section (INDICATION: ... up to the next header).

    With ``blank_line_ends`` an ignored section also ends at a blank line after its content, as
    fedrad's does: reports often put unheaded findings after "COMPARISON: ..." and a blank line.
    """
    section = ent._.section
    if section is None or section.category != "ignored":
        return False
    if not blank_line_ends:
        return True
    doc = ent.doc
    start = doc[section.body_start].idx if section.body_start < len(doc) else ent.start_char
    body = doc.text[start : ent.start_char]
    lead = len(body) - len(body.lstrip())
    return _BLANK_LINE_RE.search(body, lead) is None


CATEGORY_FINDINGS: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    **{f: ((f, False),) for f in FINDINGS},
    **{f"{f}_uncertain": ((f, True),) for f in UNCERTAIN_AT_MOST},
    **{word: tuple((f, False) for f in findings) for word, findings in BOTH.items()},
}
"""Target category -> (finding, whether an asserted mention is uncertain at most)."""


def doc_labels(doc: Any, *, hypothetical: int, blank_line_ends: bool = True) -> dict[str, int]:
    """CheXpert aggregation over the mentions outside ignored sections."""
    seen: dict[str, list[int]] = {f: [] for f in FINDINGS}
    for ent in doc.ents:
        targets = CATEGORY_FINDINGS.get(ent.label_, ())
        if not targets or in_ignored_section(ent, blank_line_ends=blank_line_ends):
            continue
        label = mention_label(ent, hypothetical=hypothetical)
        for finding, at_most_uncertain in targets:
            seen[finding].append(UNCERTAIN if at_most_uncertain and label == PRESENT else label)
    out: dict[str, int] = {}
    for finding, statuses in seen.items():
        if PRESENT in statuses:
            out[finding] = PRESENT
        elif UNCERTAIN in statuses:
            out[finding] = UNCERTAIN
        else:
            out[finding] = ABSENT
    return out


def _read(lines: Iterable[str]) -> Iterator[tuple[Any, str]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            yield record["id"], str(record["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(
                f"stdin line {number}: expected {{'id', 'text'}} JSON ({exc})"
            ) from exc


def main(argv: list[str] | None = None) -> int:
    """Label every report on stdin; JSON lines out, timings on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hypothetical",
        choices=("uncertain", "absent"),
        default="uncertain",
        help="label of a hypothetical mention (default: uncertain, -1)",
    )
    parser.add_argument(
        "--keep-colon-rules",
        action="store_true",
        help="keep ConText's default ': no' / ': none' rules (see COLON_RULES)",
    )
    parser.add_argument(
        "--sections-to-next-header",
        action="store_true",
        help="an ignored section runs to the next header only (medspaCy's own section extent)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    hypothetical = UNCERTAIN if args.hypothetical == "uncertain" else ABSENT

    records = list(_read(sys.stdin))
    started = time.perf_counter()
    nlp = build_pipeline(keep_colon_rules=args.keep_colon_rules)
    loaded = time.perf_counter()
    texts = (text for _, text in records)
    for (rid, _), doc in zip(records, nlp.pipe(texts, batch_size=args.batch_size), strict=True):
        labels = doc_labels(
            doc, hypothetical=hypothetical, blank_line_ends=not args.sections_to_next_header
        )
        sys.stdout.write(json.dumps({"id": rid, "labels": labels}) + "\n")
    sys.stdout.flush()
    done = time.perf_counter()
    timing = {"load_s": loaded - started, "label_s": done - loaded, "n": len(records)}
    sys.stderr.write(json.dumps({"peer_timing": timing}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
