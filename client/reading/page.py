"""One self-contained HTML page for a reading, the page a clinician opens.

The page must be safe to open anywhere and must not leak anything when it is: it loads no
script, font, stylesheet or image from anywhere (every image is a `data:` URI, the style is
inline, a Content-Security-Policy forbids everything else, so even a value that slipped past
escaping could fetch nothing), and every text value is escaped, because every value (a report
the language model wrote, a question a user typed, a note) is treated as hostile. What the
page shows is checked on the way in: a probability outside [0, 1], a decision that does not
follow from the probability and the site's thresholds, or bytes that are not a PNG are refused
rather than drawn, since a page that looks authoritative must not show what the head did not
decide. An embedded PNG keeps only the chunks that draw it: a text chunk could carry a name
that base64 hides from anyone searching the page for it.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import zlib
from base64 import b64encode
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path

from fedrad.common.atomic_file import replace_file
from fedrad.common.tasks import STATUS_WORDS

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)
"""Nothing but inline style and `data:` images; `base-uri` and `form-action` are not governed by
`default-src`, so they are closed too."""

DISCLAIMER = "Research prototype — not for clinical use; decisions remain the radiologist's"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the chunks that decide how a PNG looks; every other (ancillary) chunk is dropped
_DRAWING_CHUNKS = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs"}
)
SIDES = frozenset({"left", "right", "bilateral"})
CHANGES = frozenset({"new", "larger", "smaller", "stable", "resolved"})
PAGE_MODE = 0o600  # a patient's reading, de-identified or not: the writer's alone to share

# C0/C1 controls (tab and newline kept) and the bidirectional overrides and isolates, with
# which a text could make the page show something other than what it says ("Trojan source")
_UNSAFE_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class PageFinding:
    """One finding's row, and its explanation map where the head suggests it."""

    name: str  # display name, e.g. "Pleural effusion"
    probability: float  # head probability, 0..1
    threshold: float  # the site's decision threshold for this finding ("present")
    suggested: bool  # the head's decision: probability >= threshold (or >= possible_threshold)
    side: str | None  # "left"/"right"/"bilateral" or None
    map_png: bytes | None  # explanation map overlay PNG (only for suggested findings)
    map_note: str | None = None  # e.g. "Grad-CAM at the encoder's last stage (8x8)"
    possible_threshold: float | None = None  # the site's "uncertain" threshold, if it has one

    def __post_init__(self) -> None:
        _check_text(self.name, "finding name")
        _check_probability(self.probability, f"{self.name}: probability")
        _check_probability(self.threshold, f"{self.name}: threshold")
        if self.possible_threshold is not None:
            _check_probability(self.possible_threshold, f"{self.name}: possible threshold")
            if self.possible_threshold > self.threshold:
                raise ValueError(f"{self.name}: possible threshold above the threshold")
        if not isinstance(self.suggested, bool):
            raise ValueError(f"{self.name}: suggested must be a bool")
        if self.suggested != (self.decision != STATUS_WORDS[0]):
            raise ValueError(
                f"{self.name}: suggested={self.suggested} does not follow from probability "
                f"{self.probability} and the site's thresholds"
            )
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"{self.name}: side must be one of {sorted(SIDES)} or None")
        if self.map_png is not None:
            if not self.suggested:
                raise ValueError(f"{self.name}: an explanation map for a finding not suggested")
            _clean_png(self.map_png, f"{self.name}: map")
        if self.map_note is not None:
            _check_text(self.map_note, f"{self.name}: map note")

    @property
    def decision(self) -> str:
        """The head's decision in the words the rest of fedrad uses (present/uncertain/absent)."""
        if self.probability >= self.threshold:
            return STATUS_WORDS[1]
        if self.possible_threshold is not None and self.probability >= self.possible_threshold:
            return STATUS_WORDS[-1]
        return STATUS_WORDS[0]


@dataclass(frozen=True)
class PriorComparison:
    """What changed since the patient's prior study, or why the comparison was left out."""

    compared: bool  # False: the comparison is left out, `reason` says why
    reason: str | None  # e.g. "the prior belongs to another patient (pseudonyms differ)"
    days_before: int | None  # how many days before the current study the prior was taken
    changes: tuple[tuple[str, str, float], ...]  # (finding display name, change, probability)
    statement: str  # the sentence(s) the report states
    prior_png: bytes | None = None  # the prior's de-identified image

    def __post_init__(self) -> None:
        if not isinstance(self.compared, bool):
            raise ValueError("prior: compared must be a bool")
        if not self.compared:
            if not isinstance(self.reason, str) or not self.reason.strip():
                raise ValueError("prior: a comparison left out needs its reason")
            # another patient's image or changes must never reach this patient's page
            if self.changes or self.prior_png is not None:
                raise ValueError("prior: a comparison left out shows no changes and no image")
        elif self.reason is not None:
            _check_text(self.reason, "prior: reason")
        if self.days_before is not None and (
            not isinstance(self.days_before, int)
            or isinstance(self.days_before, bool)
            or self.days_before < 0
        ):
            raise ValueError("prior: days_before must be a non-negative int or None")
        if not isinstance(self.changes, tuple):
            raise ValueError("prior: changes must be a tuple")
        for row in self.changes:
            if not isinstance(row, tuple) or len(row) != 3:
                raise ValueError("prior: each change is (finding, change, probability)")
            name, change, probability = row
            _check_text(name, "prior: finding name")
            if change not in CHANGES:
                raise ValueError(f"prior: change must be one of {sorted(CHANGES)}")
            _check_probability(probability, f"prior: {name}: probability")
        _check_text(self.statement, "prior: statement")
        if self.prior_png is not None:
            _clean_png(self.prior_png, "prior image")


@dataclass(frozen=True)
class PageContent:
    """Everything one page shows; refused at construction if any part is not what it claims."""

    scan_description: str  # e.g. "radiograph" or "CT volume of 133 slices"
    image_png: bytes
    findings: tuple[PageFinding, ...]
    report: str
    report_source: str
    prior: PriorComparison | None  # None: no prior was given
    question: str | None
    answer: str | None
    notes: tuple[str, ...]
    model_description: str  # e.g. "tiny preset, checkpoint format 5, trained 3 rounds"
    generated: str  # ISO timestamp of when the page was made

    def __post_init__(self) -> None:
        for value, what in (
            (self.scan_description, "scan description"),
            (self.report, "report"),
            (self.report_source, "report source"),
            (self.model_description, "model description"),
            (self.generated, "generated"),
        ):
            _check_text(value, what)
        _clean_png(self.image_png, "image")
        if not isinstance(self.findings, tuple) or not isinstance(self.notes, tuple):
            raise ValueError("findings and notes must be tuples")
        if not all(isinstance(f, PageFinding) for f in self.findings):
            raise ValueError("findings must be PageFinding values")
        if self.prior is not None and not isinstance(self.prior, PriorComparison):
            raise ValueError("prior must be a PriorComparison or None")
        if self.question is not None:
            _check_text(self.question, "question")
        if self.answer is not None:
            if self.question is None:
                raise ValueError("an answer without a question")
            _check_text(self.answer, "answer")
        for note in self.notes:
            _check_text(note, "note")
        try:
            datetime.fromisoformat(self.generated)
        except ValueError:
            raise ValueError(f"generated is not an ISO timestamp: {self.generated!r}") from None


def render_page(content: PageContent) -> str:
    """The whole page as one string: no part of it refers to anything outside itself."""
    images = _image_section(content)
    body = "\n".join(
        (
            f'<header class="disclaimer" role="note"><strong>{_t(DISCLAIMER)}</strong></header>',
            f"<h1>Reading: {_t(content.scan_description)}</h1>",
            f'<p class="meta">Model: {_t(content.model_description)}<br>'
            f"Page made: {_t(content.generated)}</p>",
            images,
            _findings_section(content.findings),
            '<section id="report"><h2>Generated report</h2>'
            f'<pre class="report">{_t(content.report)}</pre>'
            f'<p class="source">Source: {_t(content.report_source)}</p></section>',
            _prior_section(content.prior),
            _qa_section(content.question, content.answer),
            _notes_section(content.notes),
            f"<footer><p>{_t(DISCLAIMER)}.</p><p>Every image on this page is embedded in it; "
            "the page loads nothing from anywhere.</p></footer>",
        )
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_t(CSP)}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>fedrad reading — {_t(content.scan_description)}</title>\n"
        '<link rel="icon" href="data:,">\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_page(content: PageContent, path: Path) -> None:
    """Renders and writes the page atomically (a reader never sees half a page), UTF-8."""
    page = render_page(content).encode("utf-8")
    replace_file(Path(path), page, mode=PAGE_MODE)
    log.info("wrote the reading page %s (%d bytes)", path, len(page))


def _image_section(content: PageContent) -> str:
    _, width, height = _clean_png(content.image_png, "image")
    figures = [
        _figure(
            content.image_png,
            f"De-identified {content.scan_description}",
            f"The de-identified {content.scan_description}",
            main=True,
        )
    ]
    missing = []
    for f in content.findings:
        if not f.suggested:
            continue
        if f.map_png is None:
            missing.append(f.name)
            continue
        where = f" ({f.side})" if f.side else ""
        caption = f"{f.name}{where}: probability {f.probability:.3f}, {f.decision}"
        if f.map_note:
            caption += f". {f.map_note}"
        figures.append(_figure(f.map_png, f"Explanation map for {f.name}", caption))
    parts = [
        '<section id="images"><h2>Image and explanation maps</h2>',
        f'<div class="grid">{"".join(figures)}</div>',
    ]
    if not any(f.suggested for f in content.findings):
        parts.append("<p>No finding is suggested, so there are no explanation maps.</p>")
    elif missing:
        parts.append(f"<p>No explanation map for: {_t(', '.join(missing))}.</p>")
    parts.append(
        '<p class="hint">An explanation map shows where the finding head looked; it is not '
        f"a segmentation. Image size {width}×{height} pixels.</p></section>"
    )
    return "".join(parts)


def _figure(png: bytes, alt: str, caption: str, *, main: bool = False) -> str:
    clean, width, height = _clean_png(png, alt)
    css = ' class="main"' if main else ""
    return (
        f'<figure{css}><img src="{_data_uri(clean)}" alt="{_t(alt)}" width="{width}" '
        f'height="{height}"><figcaption>{_t(caption)}</figcaption></figure>'
    )


def _findings_section(findings: tuple[PageFinding, ...]) -> str:
    if not findings:
        return '<section id="findings"><h2>Finding probabilities</h2><p>None.</p></section>'
    rows = []
    for f in findings:
        threshold = f"{f.threshold:.2f}"
        if f.possible_threshold is not None:
            threshold = f"{f.possible_threshold:.2f} (uncertain) / {threshold} (present)"
        css = ' class="suggested"' if f.suggested else ""
        rows.append(
            f'<tr{css}><th scope="row">{_t(f.name)}</th><td class="num">'
            f'{f.probability:.3f}</td><td class="num">{_t(threshold)}</td>'
            f"<td>{_t(f.decision)}{' (suggested)' if f.suggested else ''}</td>"
            f"<td>{_t(f.side or '—')}</td></tr>"
        )
    return (
        '<section id="findings"><h2>Finding probabilities</h2><table>'
        '<thead><tr><th scope="col">Finding</th><th scope="col">Probability</th>'
        '<th scope="col">Site threshold</th><th scope="col">Decision</th>'
        '<th scope="col">Side</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _prior_section(prior: PriorComparison | None) -> str:
    head = '<section id="prior"><h2>Comparison with the prior study</h2>'
    if prior is None:
        return f"{head}<p>No prior study was given; nothing was compared.</p></section>"
    if not prior.compared:
        return (
            f'{head}<p class="left-out"><strong>The comparison with the prior study was left '
            f"out:</strong> {_t(prior.reason or '')}</p></section>"
        )
    parts = [head]
    if prior.days_before is not None:
        days = "day" if prior.days_before == 1 else "days"
        parts.append(
            f"<p>The prior study was taken {prior.days_before} {days} before this one.</p>"
        )
    parts.append(f'<p class="statement">{_t(prior.statement)}</p>')
    if prior.changes:
        rows = "".join(
            f'<tr><th scope="row">{_t(name)}</th><td>{_t(change)}</td>'
            f'<td class="num">{probability:.3f}</td></tr>'
            for name, change, probability in prior.changes
        )
        parts.append(
            '<table><thead><tr><th scope="col">Finding</th><th scope="col">Change</th>'
            '<th scope="col">Probability (interval head)</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
    else:
        parts.append("<p>No finding changed.</p>")
    if prior.prior_png is not None:
        parts.append(
            '<div class="grid">'
            + _figure(prior.prior_png, "The prior study", "The prior study, de-identified")
            + "</div>"
        )
    if prior.reason:
        parts.append(f"<p>{_t(prior.reason)}</p>")
    parts.append("</section>")
    return "".join(parts)


def _qa_section(question: str | None, answer: str | None) -> str:
    head = '<section id="qa"><h2>Question and answer</h2>'
    if question is None:
        return f"{head}<p>No question was asked.</p></section>"
    shown = _t(answer) if answer is not None else "<em>no answer was given</em>"
    return (
        f'{head}<dl><dt>Question</dt><dd class="pre">{_t(question)}</dd>'
        f'<dt>Answer</dt><dd class="pre">{shown}</dd></dl></section>'
    )


def _notes_section(notes: tuple[str, ...]) -> str:
    head = '<section id="notes"><h2>Consistency notes</h2>'
    if not notes:
        return (
            f"{head}<p>None: the report and the answer agree with the finding head.</p></section>"
        )
    items = "".join(f"<li>{_t(n)}</li>" for n in notes)
    return f"{head}<ul>{items}</ul></section>"


def _t(text: str) -> str:
    """Escapes `text` for HTML text and attribute values alike, and defuses the characters that
    could make it read as something else (controls, bidi overrides, lone surrogates)."""
    clean = _UNSAFE_CHARS.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))
    clean = clean.encode("utf-8", "replace").decode("utf-8")
    return escape(clean, quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + b64encode(png).decode("ascii")


def _clean_png(png: object, what: str) -> tuple[bytes, int, int]:
    """The PNG with only the chunks that draw it, and its (width, height); ValueError for
    anything that is not a whole PNG. Text, EXIF, time and ICC-profile chunks and anything after
    IEND are dropped: they can carry a name or a date, and base64 hides them from a search of
    the page."""
    if not isinstance(png, bytes) or not png.startswith(PNG_SIGNATURE):
        raise ValueError(f"{what}: not a PNG (its bytes do not start with the PNG signature)")
    kept = [PNG_SIGNATURE]
    pos, size = len(PNG_SIGNATURE), (0, 0)
    while True:
        if pos + 12 > len(png):
            raise ValueError(f"{what}: a truncated PNG")
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        end = pos + 12 + length
        if end > len(png):
            raise ValueError(f"{what}: a truncated PNG")
        if (pos == len(PNG_SIGNATURE)) != (kind == b"IHDR"):
            raise ValueError(f"{what}: not a PNG (IHDR is not its first chunk)")
        (crc,) = struct.unpack(">I", png[end - 4 : end])
        if zlib.crc32(png[pos + 4 : end - 4]) != crc:
            raise ValueError(f"{what}: a damaged PNG ({kind!r} fails its CRC)")
        if kind == b"IHDR":
            if length != 13:
                raise ValueError(f"{what}: not a PNG (bad IHDR)")
            size = struct.unpack(">II", png[pos + 8 : pos + 16])
            if 0 in size:
                raise ValueError(f"{what}: a PNG of zero size")
        if kind in _DRAWING_CHUNKS:
            kept.append(png[pos:end])
        elif not kind[0] & 0x20:  # a critical chunk this page does not know how to vet
            raise ValueError(f"{what}: a PNG with an unknown critical chunk {kind!r}")
        if kind == b"IEND":
            break
        pos = end
    return b"".join(kept), size[0], size[1]


def _check_probability(value: object, what: str) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(f"{what} must be a number in [0, 1], not {value!r}")


def _check_text(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, not {type(value).__name__}")


_STYLE = """
:root{color-scheme:light;--ink:#1a1a1a;--muted:#555;--line:#ccc;--warn:#8a1c00;--mark:#fff4d6}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:#fff;max-width:1100px;margin:0 auto;padding:1rem 1.5rem 2rem}
h1{font-size:1.5rem;margin:.8rem 0 .2rem}
h2{font-size:1.15rem;border-bottom:1px solid var(--line);padding-bottom:.2rem;margin-top:1.6rem}
.disclaimer{border:2px solid var(--warn);color:var(--warn);background:#fff0eb;padding:.6rem .9rem;
border-radius:4px;font-size:1.05rem}
.meta,.source,.hint,footer{color:var(--muted);font-size:.9rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1rem;
align-items:start}
figure{margin:0;border:1px solid var(--line);border-radius:4px;padding:.5rem;background:#fafafa}
figure.main{grid-column:span 2}
figure img{display:block;width:100%;height:auto;image-rendering:auto;background:#000}
figcaption{font-size:.88rem;margin-top:.4rem;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;margin:.4rem 0}
th,td{border:1px solid var(--line);padding:.3rem .5rem;text-align:left;vertical-align:top;
overflow-wrap:anywhere}
thead th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.suggested{background:var(--mark);font-weight:600}
pre.report,.pre{white-space:pre-wrap;overflow-wrap:anywhere}
pre.report{font:inherit;background:#f7f7f7;border-left:4px solid #888;padding:.7rem .9rem;
margin:.4rem 0}
.left-out{border-left:4px solid var(--warn);padding:.4rem .8rem;background:#fff0eb}
dt{font-weight:600}dd{margin:0 0 .6rem 1rem}
footer{margin-top:2rem;border-top:1px solid var(--line)}
@media print{
body{max-width:none;padding:0;font-size:11pt}
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}
.grid{grid-template-columns:repeat(3,1fr)}
figure,tr,.disclaimer,pre.report{break-inside:avoid}
h2{break-after:avoid}
}
"""
