"""The reading page (`client/reading/page.py`): every text value shows as text, nothing can
load from outside the page, what it shows is checked on the way in, and it is written whole."""

from __future__ import annotations

import base64
import io
import os
import re
import stat
import struct
import zlib
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from fedrad.client.reading.page import (
    CSP,
    DISCLAIMER,
    PageContent,
    PageFinding,
    PriorComparison,
    render_page,
    write_page,
)

HOSTILE = "<script>alert(1)</script> and \"><img src=http://x> & 'quoted'"
# every attribute through which an element can load something
LOADING_ATTRIBUTES = {
    "src",
    "href",
    "srcset",
    "poster",
    "data",
    "action",
    "formaction",
    "background",
    "manifest",
    "xlink:href",
    "ping",
}
CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")\s]*)|@import\s+['\"]?([^'\";\s]*)", re.I)


def png(color: tuple[int, int, int] = (40, 40, 40), size: tuple[int, int] = (32, 24), **text: str):  # type: ignore[no-untyped-def]
    """A real PNG from Pillow, with text chunks where asked."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def finding(name: str = "Pleural effusion", probability: float = 0.83, **kw) -> PageFinding:  # type: ignore[no-untyped-def]
    suggested = isinstance(probability, float) and probability >= kw.get("threshold", 0.5)
    defaults = dict(
        name=name,
        probability=probability,
        threshold=0.5,
        suggested=suggested,
        side="left" if suggested else None,
        map_png=png((200, 30, 30)) if suggested else None,
        map_note="Grad-CAM at the encoder's last stage (8x8)" if suggested else None,
    )
    return PageFinding(**{**defaults, **kw})


def content(**kw) -> PageContent:  # type: ignore[no-untyped-def]
    defaults = dict(
        scan_description="radiograph",
        image_png=png((90, 90, 90), (64, 80)),
        findings=(finding(), finding("Cardiomegaly", 0.12)),
        report="Small left pleural effusion. Heart size normal.",
        report_source="grounded in the finding head (3 candidates re-ranked)",
        prior=PriorComparison(
            compared=True,
            reason=None,
            days_before=14,
            changes=(("Pleural effusion", "larger", 0.83),),
            statement="Pleural effusion is larger than on the prior study.",
            prior_png=png((60, 60, 60), (64, 80)),
        ),
        question="Is there a pleural effusion?",
        answer="yes (0.83)",
        notes=("the report reads cardiomegaly as absent",),
        model_description="tiny preset, checkpoint format 5, trained 3 rounds",
        generated="2026-12-06T22:40:00+00:00",
    )
    return PageContent(**{**defaults, **kw})


class Page(HTMLParser):
    """The parsed page: start tags with their attributes, text, and the inline style."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.style: list[str] = []
        self._in: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            del self._in[len(self._in) - 1 - self._in[::-1].index(tag) :]

    def handle_data(self, data: str) -> None:
        (self.style if self._in and self._in[-1] == "style" else self.text).append(data)

    @property
    def shape(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(tag, tuple(sorted(attrs))) for tag, attrs in self.tags]

    def loaded_urls(self) -> list[str]:
        """Every URL the page could load: resource attributes, and url()/@import in CSS."""
        urls = []
        for _, attrs in self.tags:
            for name, value in attrs.items():
                if name == "srcset":  # candidates "URL [descriptor]", split at ", "
                    urls.extend(c.split()[0] for c in re.split(r",\s+", value or "") if c.strip())
                elif name in LOADING_ATTRIBUTES:
                    urls.append((value or "").strip())
                if name == "style":
                    urls.extend(a or b for a, b in CSS_URL.findall(value or ""))
        urls.extend(a or b for a, b in CSS_URL.findall("".join(self.style)))
        return urls


def hostile_variants() -> dict[str, PageContent]:
    """The page with HOSTILE in each text field in turn."""
    base = content()
    f0 = base.findings[0]
    prior = base.prior
    assert prior is not None
    return {
        "report": replace(base, report=HOSTILE),
        "report_source": replace(base, report_source=HOSTILE),
        "scan_description": replace(base, scan_description=HOSTILE),
        "model_description": replace(base, model_description=HOSTILE),
        "question": replace(base, question=HOSTILE),
        "answer": replace(base, answer=HOSTILE),
        "note": replace(base, notes=(HOSTILE, HOSTILE)),
        "finding_name": replace(base, findings=(replace(f0, name=HOSTILE), *base.findings[1:])),
        "map_note": replace(base, findings=(replace(f0, map_note=HOSTILE), *base.findings[1:])),
        "statement": replace(base, prior=replace(prior, statement=HOSTILE)),
        "change_name": replace(
            base, prior=replace(prior, changes=((HOSTILE, "new", 0.9),), reason=HOSTILE)
        ),
        "left_out_reason": replace(
            base,
            prior=PriorComparison(False, HOSTILE, None, (), "", None),
        ),
    }


@pytest.mark.parametrize("field", sorted(hostile_variants()))
def test_hostile_text_shows_as_text_never_markup(field: str) -> None:
    hostile = hostile_variants()[field]
    html = render_page(hostile)
    parsed = Page(html)
    # the same elements and attributes as the page with harmless text in that field
    harmless = Page(render_page(_swap(hostile, HOSTILE, "harmless")))
    assert parsed.shape == harmless.shape
    assert not any(tag == "script" for tag, _ in parsed.tags)
    assert all(
        (attrs.get("src") or "").startswith("data:image/png;base64,")
        for tag, attrs in parsed.tags
        if tag == "img"
    )
    assert "<script>" not in html and "<img src=http" not in html
    assert HOSTILE in "".join(parsed.text) or HOSTILE in html_attr_values(parsed)


def html_attr_values(parsed: Page) -> str:
    return " ".join(v or "" for _, attrs in parsed.tags for v in attrs.values())


def _swap(value: object, old: str, new: str) -> object:
    """`value` with every string `old` replaced by `new`, through dataclasses and tuples."""
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, tuple):
        return tuple(_swap(v, old, new) for v in value)
    if isinstance(value, PageContent | PageFinding | PriorComparison):
        fields = {k: _swap(v, old, new) for k, v in vars(value).items()}
        return type(value)(**fields)
    return value


def test_csp_and_icon_in_head_and_no_script_or_external_link() -> None:
    parsed = Page(render_page(content()))
    csp = [
        a
        for t, a in parsed.tags
        if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert [a["content"] for a in csp] == [CSP]
    directives = {d.strip() for d in CSP.split(";")}
    assert {"default-src 'none'", "img-src data:", "style-src 'unsafe-inline'"} <= directives
    # the policy is the first thing that can load anything: before any link, style or img
    names = [t for t, _ in parsed.tags]
    assert names.index("meta", names.index("meta") + 1) < min(
        names.index(t) for t in ("link", "style", "img")
    )
    assert [a for t, a in parsed.tags if t == "link"] == [{"rel": "icon", "href": "data:,"}]
    assert not {"script", "iframe", "object", "embed", "base", "form", "video", "audio"} & set(
        names
    )
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)


def test_every_loadable_url_is_a_data_uri() -> None:
    parsed = Page(render_page(content()))
    urls = parsed.loaded_urls()
    # the image, one map, the prior, and the favicon
    assert len(urls) == 4
    assert all(u.startswith("data:") for u in urls), urls
    for tag, attrs in parsed.tags:
        if tag == "img":
            data = base64.b64decode(attrs["src"].removeprefix("data:image/png;base64,"))
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (int(attrs["width"]), int(attrs["height"]))


def test_url_check_catches_an_external_resource() -> None:
    """The check above can fail: a URL in any loading attribute or in CSS is found."""
    parsed = Page(
        '<img srcset="data:,a 1x, http://x/b.png 2x"><div style="background:url(\'http://y\')">'
        '<video poster="http://z"></video><style>@import "http://w.css";</style>'
    )
    assert sorted(u for u in parsed.loaded_urls() if not u.startswith("data:")) == [
        "http://w.css",
        "http://x/b.png",
        "http://y",
        "http://z",
    ]


def test_page_sections_disclaimer_and_numbers() -> None:
    html = render_page(content())
    text = " ".join("".join(Page(html).text).split())
    assert DISCLAIMER in text
    for expected in (
        "Small left pleural effusion. Heart size normal.",
        "0.830",
        "0.120",
        "present (suggested)",
        "absent",
        "14 days before this one",
        "Pleural effusion is larger than on the prior study.",
        "Is there a pleural effusion?",
        "yes (0.83)",
        "the report reads cardiomegaly as absent",
        "Grad-CAM at the encoder's last stage (8x8)",
        "tiny preset, checkpoint format 5, trained 3 rounds",
    ):
        assert expected in text, expected
    # no map for a finding not suggested, one for the suggested one
    assert "Explanation map for Pleural effusion" in html
    assert "Explanation map for Cardiomegaly" not in html


def test_left_out_prior_states_why_and_shows_nothing_of_it() -> None:
    reason = "the prior belongs to another patient (pseudonyms differ)"
    left_out = content(prior=PriorComparison(False, reason, None, (), "", None))
    parsed = Page(render_page(left_out))
    text = " ".join("".join(parsed.text).split())
    assert f"The comparison with the prior study was left out: {reason}" in text
    assert sum(t == "img" for t, _ in parsed.tags) == 2  # the image and one map; no prior
    assert "No prior study was given" in "".join(Page(render_page(content(prior=None))).text)
    # another patient's image or changes are refused, not drawn
    with pytest.raises(ValueError, match="left out"):
        PriorComparison(False, reason, None, (), "", png())
    with pytest.raises(ValueError, match="left out"):
        PriorComparison(False, reason, None, (("Nodule", "new", 0.7),), "", None)
    with pytest.raises(ValueError, match="reason"):
        PriorComparison(False, "  ", None, (), "", None)


def test_uncertain_decision_with_the_sites_possible_threshold() -> None:
    f = finding("Pneumothorax", 0.4, possible_threshold=0.3, suggested=True, side="right")
    assert f.decision == "uncertain"
    text = "".join(Page(render_page(content(findings=(f,)))).text)
    assert "0.30 (uncertain) / 0.50 (present)" in text
    assert "uncertain (suggested)" in text


@pytest.mark.parametrize(
    "bad",
    [
        dict(probability=1.2),
        dict(probability=-0.01),
        dict(probability=float("nan")),
        dict(probability=float("inf")),
        dict(probability=True),
        dict(probability="0.9"),
        dict(threshold=1.5),
        dict(possible_threshold=0.7),  # above the threshold
        dict(suggested=False),  # 0.83 >= 0.5: the head suggests it
        dict(side="up"),
    ],
)
def test_finding_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        finding(**bad)


def test_map_for_a_finding_not_suggested_refused() -> None:
    with pytest.raises(ValueError, match="not suggested"):
        finding("Cardiomegaly", 0.12, map_png=png())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bad_pngs() -> dict[str, object]:
    good = png()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    ihdr_end = 8 + 12 + 13
    return {
        "jpeg": jpeg.getvalue(),
        "empty": b"",
        "text": good.decode("latin-1"),
        "signature only": good[:8],
        "truncated": good[:-5],
        "crc": good[: ihdr_end - 1] + bytes([good[ihdr_end - 1] ^ 1]) + good[ihdr_end:],
        "zero size": good[:8]
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 8, 8, 2, 0, 0, 0))
        + good[ihdr_end:],
        "unknown critical chunk": good[:ihdr_end] + _chunk(b"ZZZZ", b"x") + good[ihdr_end:],
        "no IHDR first": good[:8] + _chunk(b"IDAT", b"") + good[8:],
    }


@pytest.mark.parametrize("kind", sorted(_bad_pngs()))
@pytest.mark.parametrize("where", ["image", "map", "prior"])
def test_bad_png_refused(kind: str, where: str) -> None:
    bad = _bad_pngs()[kind]
    with pytest.raises(ValueError, match="PNG"):
        if where == "image":
            content(image_png=bad)
        elif where == "map":
            finding(map_png=bad)
        else:
            PriorComparison(True, None, 3, (), "Stable.", bad)  # type: ignore[arg-type]


def test_png_text_chunks_and_trailing_bytes_never_reach_the_page() -> None:
    """A name in a PNG's text chunk would be hidden from a search of the page by base64."""
    leaky = png((10, 200, 10), Comment="Quackenbush^Theodora", Author="MRN7730912") + b"MRN7730912"
    html = render_page(content(image_png=leaky))
    embedded = [
        base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    ]
    assert embedded and not any(b"Quackenbush" in e or b"MRN7730912" in e for e in embedded)
    with Image.open(io.BytesIO(leaky)) as original, Image.open(io.BytesIO(embedded[0])) as shown:
        assert shown.tobytes() == original.tobytes()
        assert not shown.info.get("Comment")


def test_controls_and_bidi_overrides_defused() -> None:
    sneaky = "effusion \u202eelbats\u202c on the left\x00\x1b[31m\ud800 end"
    text = "".join(Page(render_page(content(report=sneaky))).text)
    assert "\u202e" not in text and "\x00" not in text and "\x1b" not in text
    assert "\ud800" not in text and "effusion" in text and "end" in text


@pytest.mark.parametrize(
    "bad",
    [
        dict(generated="yesterday"),
        dict(answer="yes", question=None),
        dict(notes=("fine", 3)),
        dict(notes="a string is not a tuple"),
        dict(report=None),
        dict(findings=("Pleural effusion",)),
    ],
)
def test_content_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        content(**bad)


def test_page_is_small_beside_its_images() -> None:
    html = render_page(content())
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert len(without_images.encode()) < 16_000


def test_write_page_atomic_utf8_private(tmp_path: Path) -> None:
    out = tmp_path / "reading.html"
    out.write_text("old page")
    page = content(report="Épanchement pleural — gauche ✓")
    write_page(page, out)
    assert os.listdir(tmp_path) == ["reading.html"]
    assert out.read_bytes() == render_page(page).encode("utf-8")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_write_page_failure_keeps_the_old_page_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "reading.html"
    out.write_text("old page")

    def fail_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        write_page(content(), out)
    assert os.listdir(tmp_path) == ["reading.html"]
    assert out.read_text() == "old page"
