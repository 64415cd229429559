"""Reports and answers that agree with the diagnosis head: tidy, re-rank, repair, template.

A small language model, trained for a few noisy DP steps, can write a report that contradicts
the findings it was prompted with. The model writes several candidates; each is tidied (only
FINDINGS and IMPRESSION, no repeated sentence, no run of de-identification placeholders, a length
bound) and read by the site's own labeler, and the one that agrees with the head's decisions on
the most findings wins. A finding the winner still contradicts has its sentences replaced by a
fixed sentence for the decision; if even that does not read back right, the whole report is the
template. Questions about a finding are answered from the same decisions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from fedrad.common.findings import (
    ABSENT,
    DISPLAY_NAMES,
    FINDINGS,
    LATERAL_FINDINGS,
    UNCERTAIN,
)
from fedrad.common.labeling.labeler import ReportLabels, label_report, mentioned_findings
from fedrad.common.labeling.sections import sentences
from fedrad.common.tasks import SHORT_NAMES, presence_answer, question_kind

CANDIDATES: Final[int] = 4
"""Report candidates (beams) the model writes per scan; more agree more often and cost time."""
MAX_SENTENCES: Final[int] = 16
"""A report keeps at most this many sentences (the longest of the shipped reports has 14)."""
MAX_REPORT_CHARS: Final[int] = 1_200
PLACEHOLDER_RE: Final[re.Pattern[str]] = re.compile(r"_{2,}")
"""De-identification placeholders ("___"), as MIMIC-style reports carry them."""
_PLACEHOLDER_RUN_RE: Final[re.Pattern[str]] = re.compile(r"_{2,}(?:[\s,.;:/-]*_{2,})+")
_WORD_RE: Final[re.Pattern[str]] = re.compile(r"[A-Za-z]{2,}")
_BANNER_RE: Final[re.Pattern[str]] = re.compile(
    r"(?:(?:final|preliminary|prelim|amended|corrected|addended)\s+)?report\b[\s:.-]*",
    re.IGNORECASE,
)
"""A report's banner ("FINAL REPORT"), which MIMIC-style exports put before any header,
usually run together with the examination's title ("FINAL REPORT CHEST ON ___")."""
_INLINE_HEADER_RE: Final[re.Pattern[str]] = re.compile(
    r"(?<=\S)[ \t]+(?=(?:CLINICAL )?(?:INDICATIONS?|HISTORY|COMPARISONS?|TECHNIQUE|EXAMINATION"
    r"|EXAM|FINDINGS|IMPRESSIONS?|CONCLUSIONS?|REASON FOR EXAM(?:INATION)?)[ \t]*:)"
)
"""An upper-case section header in the middle of a line ("... (PORTABLE AP) INDICATION: ___"),
as generated text runs them together: put on a line of its own, it starts its section."""
_LOWER_RE: Final[re.Pattern[str]] = re.compile(r"[a-z]")
NO_FINDING_SENTENCE: Final[str] = "No acute cardiopulmonary abnormality."

Source = Literal["generated", "repaired", "template"]


# -- tidying ------------------------------------------------------------------------------------


def report_parts(text: str) -> tuple[list[str], list[str]]:
    """(findings sentences, impression sentences) of a report: the sections a report states
    its findings in, each sentence once, placeholder runs collapsed to one, at most
    MAX_SENTENCES in all. INDICATION, HISTORY, COMPARISON and TECHNIQUE are left out: they are
    the referrer's question and context, which the model reads and does not write; so are the
    banner and a leading title (upper case in a mixed-case report, naming no finding)."""
    findings: list[str] = []
    impression: list[str] = []
    seen: set[str] = set()
    mixed_case = _LOWER_RE.search(text) is not None
    for kind, sentence in sentences(_INLINE_HEADER_RE.sub("\n", text)):
        clean = _PLACEHOLDER_RUN_RE.sub("___", sentence).strip()
        banner = _BANNER_RE.match(clean)
        if banner is not None:
            rest = clean[banner.end() :]
            if not _LOWER_RE.search(rest):
                continue  # the banner and the examination's title: no finding is stated
            if banner.group(0).strip().lower() != "report":
                clean = rest
        if not _WORD_RE.search(PLACEHOLDER_RE.sub(" ", clean)):
            continue  # nothing but placeholders and punctuation
        if (
            mixed_case
            and not (findings or impression)
            and not _LOWER_RE.search(clean)
            and not mentioned_findings(clean)
        ):
            continue  # a leading title ("CHEST (PORTABLE AP)") in a mixed-case report
        if clean[-1] not in ".!?":
            clean += "."
        key = clean.lower()
        if key in seen:
            continue
        seen.add(key)
        (impression if kind == "impression" else findings).append(clean)
        if len(findings) + len(impression) >= MAX_SENTENCES:
            break
    return findings, impression


def assemble(findings: Sequence[str], impression: Sequence[str]) -> str:
    """One line, "FINDINGS: ... IMPRESSION: ...", cut at a sentence within MAX_REPORT_CHARS."""
    parts = []
    if findings:
        parts.append("FINDINGS: " + " ".join(findings))
    if impression:
        parts.append("IMPRESSION: " + " ".join(impression))
    text = " ".join(parts)
    if len(text) > MAX_REPORT_CHARS:
        cut = text.rfind(". ", 0, MAX_REPORT_CHARS)
        text = text[: cut + 1] if cut > 0 else text[:MAX_REPORT_CHARS]
    return text


def tidy_report(text: str) -> str:
    """The findings and impression of a report in the one shape the model writes: the training
    target, the reference for text overlap, and every generated candidate."""
    findings, impression = report_parts(text)
    if not findings and not impression:
        return ""
    return assemble(findings, impression)


def report_target(report: str) -> str:
    """What the model learns to write: the report's findings and impression, tidied as every
    generated report is (the whole text, whitespace collapsed, if it has neither)."""
    return tidy_report(report) or " ".join(report.split())


# -- decisions in words -------------------------------------------------------------------------


def template_sentence(
    finding: str, decision: int, side: str | None = None, size_mm: float | None = None
) -> str:
    """One sentence the labeler reads back as `decision` (pinned for every combination)."""
    name = DISPLAY_NAMES[finding]
    if decision == ABSENT:
        return f"No {name}."
    where = f"{side} " if side and finding in LATERAL_FINDINGS else ""
    size = f" measuring {size_mm:g} mm" if finding == "nodule" and size_mm else ""
    if decision == UNCERTAIN:
        return f"Possible {where}{name}{size}."
    text = f"{where}{name}{size}."
    return text[0].upper() + text[1:]


def template_report(
    decisions: dict[str, int],
    sides: dict[str, str | None] | None = None,
    nodule_size_mm: float | None = None,
) -> str:
    """A report written from the decisions alone: what the reader gets when every candidate
    contradicts them. Findings state each finding; the impression, the positive ones."""
    sides = sides or {}
    body = [
        template_sentence(f, decisions[f], sides.get(f), nodule_size_mm if f == "nodule" else None)
        for f in FINDINGS
    ]
    positive = [
        template_sentence(f, decisions[f], sides.get(f), nodule_size_mm if f == "nodule" else None)
        for f in FINDINGS
        if decisions[f] != ABSENT
    ]
    return assemble(body, positive or [NO_FINDING_SENTENCE])


# -- choosing and repairing ---------------------------------------------------------------------


Sides = dict[str, str | None]


def disagreements(
    labels: ReportLabels, decisions: dict[str, int], sides: Sides | None = None
) -> list[str]:
    """Findings whose label in the text is not the head's decision (present, uncertain and
    absent are three different things), or whose stated side is not the side head's."""
    sides = sides or {}

    def side_differs(f: str) -> bool:
        said, head = labels.sides[f], sides.get(f)
        return decisions[f] != ABSENT and None not in (said, head) and said != head

    return [f for f in FINDINGS if labels.labels[f] != decisions[f] or side_differs(f)]


def agreement(text: str, decisions: dict[str, int], sides: Sides | None = None) -> float:
    """Share of findings on which the labeler's reading of `text` is the head's decision."""
    return 1.0 - len(disagreements(label_report(text), decisions, sides)) / len(FINDINGS)


@dataclass(frozen=True)
class GroundedReport:
    text: str
    source: Source  # the chosen candidate as written, repaired, or the template
    candidate: int | None  # index of the chosen candidate (None: the template)
    raw_agreement: float  # the chosen candidate's agreement before any repair
    replaced: tuple[str, ...] = ()  # findings whose sentences were replaced

    def describe(self, candidates: int) -> str:
        """One line for the reader: where the report's text came from."""
        if self.source == "template" or self.candidate is None:
            return (
                f"written from the findings: none of the {candidates} candidates from the "
                "language model agreed with them"
            )
        origin = f"language model, candidate {self.candidate + 1} of {candidates}"
        if self.source == "repaired":
            names = ", ".join(DISPLAY_NAMES[f] for f in self.replaced)
            return f"{origin}; sentences on {names} rewritten from the findings"
        return origin


def ground_report(
    candidates: Sequence[str], decisions: dict[str, int], sides: Sides | None = None
) -> GroundedReport:
    """The candidate (in order of the model's preference) that agrees with `decisions` (and
    the side head's `sides`) on the most findings, with what it still contradicts rewritten;
    the template if that fails."""
    best: tuple[int, str, ReportLabels] | None = None
    best_key: tuple[int, float] | None = None
    for index, candidate in enumerate(candidates):
        text = tidy_report(candidate)
        if not text:
            continue
        labels = label_report(text)
        key = (len(disagreements(labels, decisions, sides)), repeated_ngram_rate(text))
        if best_key is None or key < best_key:
            best, best_key = (index, text, labels), key
    if best is None:
        return GroundedReport(template_report(decisions, sides), "template", None, 0.0)
    index, text, labels = best
    raw = 1.0 - len(disagreements(labels, decisions, sides)) / len(FINDINGS)
    if raw == 1.0:
        return GroundedReport(text, "generated", index, raw)
    written = labels  # the sides and size the model wrote, kept through the rewrite
    replaced: list[str] = []
    for _ in range(2):  # a dropped sentence can take an agreeing finding's statement with it
        wrong = disagreements(labels, decisions, sides)
        if not wrong:
            return GroundedReport(text, "repaired", index, raw, tuple(replaced))
        text = _rewrite(text, wrong, decisions, {**written.sides, **(sides or {})}, written)
        replaced += [f for f in wrong if f not in replaced]
        labels = label_report(text)
    if not disagreements(labels, decisions, sides):
        return GroundedReport(text, "repaired", index, raw, tuple(replaced))
    return GroundedReport(template_report(decisions, sides), "template", None, raw)


def _rewrite(
    text: str,
    wrong: Sequence[str],
    decisions: dict[str, int],
    sides: Sides,
    labels: ReportLabels,
) -> str:
    """Drops every sentence naming a finding in `wrong` and states the decision instead, with
    the side head's side (else the one the model wrote) and the size the model wrote, in the
    impression when there is one (it overrides the findings section)."""
    findings, impression = report_parts(text)
    keep = set(wrong)
    findings = [s for s in findings if not mentioned_findings(s) & keep]
    impression = [s for s in impression if not mentioned_findings(s) & keep]
    fixed = [
        template_sentence(
            f, decisions[f], sides.get(f), labels.nodule_size_mm if f == "nodule" else None
        )
        for f in FINDINGS
        if f in keep
    ]
    if impression or not findings:
        impression += fixed
    else:
        findings += fixed
    return assemble(findings, impression)


# -- degeneration -------------------------------------------------------------------------------


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0: no loop at all)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def placeholder_rate(text: str) -> float:
    """Share of a text's words that are de-identification placeholders ("___")."""
    words = text.split()
    return sum(1 for w in words if PLACEHOLDER_RE.search(w)) / len(words) if words else 0.0


# -- answers ------------------------------------------------------------------------------------

CANNOT_ANSWER: Final[str] = "cannot answer"
AnswerSource = Literal["finding head", "report", "language model", "none"]


@dataclass(frozen=True)
class GroundedAnswer:
    kind: str | None  # "presence" | "side" | "size"; None: a question of no known kind
    finding: str | None
    value: str  # the short answer, scored against the reference answers
    text: str  # what the reader is shown: the value in words, with the probability
    source: AnswerSource


def needs_language_model(
    question: str,
    decisions: dict[str, int],
    report: ReportLabels,
    side_probabilities: dict[str, dict[str, float]] | None = None,
) -> bool:
    """Whether `ground_answer` will want the model's own answer: a side (without the side
    head's) or a size the head calls present or possible and the report does not state."""
    parsed = question_kind(question)
    if parsed is None:
        return False
    kind, finding = parsed
    if kind == "presence" or decisions[finding] == ABSENT:
        return False
    if kind == "side":
        return not (side_probabilities or {}).get(finding) and report.sides.get(finding) is None
    return report.nodule_size_mm is None


def ground_answer(
    question: str,
    decisions: dict[str, int],
    probabilities: dict[str, float],
    report: ReportLabels,
    model_answer: str | None = None,
    side_probabilities: dict[str, dict[str, float]] | None = None,
) -> GroundedAnswer:
    """A question answered from the heads' decisions (presence, side; and "there is no ..."
    for the side or size of an absent finding), else from the report (side, size), else from
    the model's own answer when it is a side or a size; anything else is "cannot answer"."""
    parsed = question_kind(question)
    if parsed is None:
        return GroundedAnswer(
            None,
            None,
            CANNOT_ANSWER,
            f"{CANNOT_ANSWER}: ask whether a finding is present, which side it is on, or how "
            "large a nodule is (" + ", ".join(DISPLAY_NAMES[f] for f in FINDINGS) + ")",
            "none",
        )
    kind, finding = parsed
    name, p, decision = DISPLAY_NAMES[finding], probabilities[finding], decisions[finding]
    said = f"{name}, probability {p:.3f} from the finding head"
    if kind == "presence":
        value = presence_answer(decision)
        return GroundedAnswer(kind, finding, value, f"{value} ({said})", "finding head")
    if decision == ABSENT:
        value = f"there is no {SHORT_NAMES[finding]}"
        return GroundedAnswer(kind, finding, value, f"{value} ({said})", "finding head")
    value: str | None
    source: AnswerSource
    by_side = (side_probabilities or {}).get(finding)
    if kind == "side" and by_side:
        side = max(by_side, key=lambda k: by_side[k])
        value = f"{side} (side probability {by_side[side]:.3f}; {said})"
        return GroundedAnswer(kind, finding, side, value, "finding head")
    if kind == "side":
        stated = report.sides.get(finding)
        value, source = (stated, "report") if stated else (_side_in(model_answer), "language model")
    else:
        size = report.nodule_size_mm
        value, source = (
            (f"{size:g} mm", "report")
            if size is not None
            else (_size_in(model_answer), "language model")
        )
    if value is None:
        return GroundedAnswer(kind, finding, "not stated", f"not stated ({said})", "none")
    origin = "from the report" if source == "report" else "the language model's answer"
    return GroundedAnswer(kind, finding, value, f"{value} ({origin}; {said})", source)


_SIDE_ANSWER_RE: Final[re.Pattern[str]] = re.compile(r"\b(left|right|bilateral)\b", re.IGNORECASE)
_SIZE_ANSWER_RE: Final[re.Pattern[str]] = re.compile(
    r"\b(\d{1,3}(?:\.\d)?)\s*(mm|cm)\b", re.IGNORECASE
)


def _side_in(text: str | None) -> str | None:
    found = {m.group(1).lower() for m in _SIDE_ANSWER_RE.finditer(text or "")}
    if not found:
        return None
    return "bilateral" if "bilateral" in found or len(found) > 1 else found.pop()


def _size_in(text: str | None) -> str | None:
    m = _SIZE_ANSWER_RE.search(text or "")
    if m is None:
        return None
    mm = float(m.group(1)) * (10.0 if m.group(2).lower() == "cm" else 1.0)
    return f"{mm:g} mm" if 0 < mm <= 300 else None
