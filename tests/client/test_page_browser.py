"""The reading page in a real headless Chromium: it renders, every image decodes, it requests
nothing but its own file, and hostile text stays text. Runs by default; skipped without
Chromium, failed instead under FEDRAD_REQUIRE_BROWSER=1 (CI)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedrad.client.reading.page import (
    DISCLAIMER,
    PageContent,
    PageFinding,
    PriorComparison,
    render_page,
    write_page,
)
from tests import browser
from tests.browser import BrowserResult, open_page, require_chromium

MARK = (255, 0, 255)  # a colour no radiograph or heat map here has: found in the screenshot
REPORT = (
    "FINDINGS: Small left pleural effusion.\n"
    "Heart size within normal limits.\n"
    'Quoted by a hostile model: <script>alert(1)</script> "><img src=http://x>'
)
REASON = "the prior belongs to another patient (pseudonyms differ)"


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def radiograph(size: int = 256) -> bytes:
    """A chest-like grey image: bright mediastinum, darker lungs, some noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = (
        (0.3 + 0.1 * y) + 0.25 * np.exp(-((x - 0.5) ** 2) / 0.01) + 0.1 * rng.random((size, size))
    )
    return _png((np.clip(lungs, 0, 1) * 255).astype(np.uint8))


def overlay(cx: float, cy: float, size: int = 256, *, mark: bool = False) -> bytes:
    """A Grad-CAM-like heat map over the grey image, as the explanation maps are drawn."""
    grey = np.asarray(Image.open(io.BytesIO(radiograph(size))).convert("RGB"), dtype=float)
    y, x = np.mgrid[0:size, 0:size] / size
    heat = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)[..., None]
    rgb = (1 - 0.5 * heat) * grey + 0.5 * heat * np.array([255.0, 60.0, 0.0])
    if mark:
        rgb[16:80, 16:80] = MARK
    return _png(rgb.astype(np.uint8))


def page_content(prior: PriorComparison | None) -> PageContent:
    findings = (
        PageFinding("Pleural effusion", 0.831, 0.5, True, "left", overlay(0.75, 0.7, mark=True)),
        PageFinding("Consolidation", 0.547, 0.5, True, "right", overlay(0.3, 0.5), "Grad-CAM"),
        PageFinding("Pneumothorax", 0.402, 0.5, True, "right", overlay(0.3, 0.2), None, 0.3),
        PageFinding("Cardiomegaly", 0.118, 0.5, False, None, None),
    )
    return PageContent(
        scan_description="radiograph",
        image_png=radiograph(),
        findings=findings,
        report=REPORT,
        report_source="grounded in the finding head",
        prior=prior,
        question="Is there a pleural effusion?",
        answer="yes (0.831)",
        notes=("the report reads consolidation as absent; the finding head decides present",),
        model_description="tiny preset, checkpoint format 5, trained 3 rounds",
        generated="2026-12-06T22:40:00+00:00",
    )


def check_offline(result: BrowserResult) -> None:
    """The only request is the page's own file. `data:` URIs are not network requests:
    Chromium 156 with Playwright 1.65 reports none for them, and should a later one report
    them, they are left out here by name, never by accident."""
    assert result.requests[0] == result.url
    assert result.network_requests == (), result.network_requests
    assert not [c for c in result.console if "Content Security Policy" in c], result.console


def test_page_renders_offline_in_chromium(tmp_path: Path) -> None:
    prior = PriorComparison(
        compared=True,
        reason=None,
        days_before=21,
        changes=(("Pleural effusion", "larger", 0.831), ("Consolidation", "new", 0.547)),
        statement="Pleural effusion is larger since the prior study. Consolidation is new.",
        prior_png=radiograph(),
    )
    path = tmp_path / "reading.html"
    write_page(page_content(prior), path)
    result = open_page(path)

    check_offline(result)
    assert result.console == ()
    # the image, three maps and the prior, every one decoded
    assert result.images_loaded == (True,) * 5
    text = result.text
    assert DISCLAIMER in text
    for line in REPORT.splitlines():  # the report, hostile line included, as text
        assert line in text
    for shown in ("0.831", "0.547", "0.402", "0.118", "0.50", "0.30 (uncertain) / 0.50 (present)"):
        assert shown in text, shown
    assert "21 days before this one" in text and "Consolidation is new." in text
    assert "yes (0.831)" in text and "Is there a pleural effusion?" in text
    assert "<script" not in result.html.lower()  # the DOM holds it as text, "&lt;script&gt;"

    shot = Image.open(io.BytesIO(result.screenshot_png))
    assert shot.format == "PNG" and shot.width >= 800 and shot.height > 1000
    rgb = np.asarray(shot.convert("RGB"))
    colours = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8)
    assert len(np.unique(colours | rgb[..., 2])) > 1000  # drawn, not blank
    assert (rgb == MARK).all(axis=-1).sum() > 500  # the first map is on screen
    (tmp_path / "reading.png").write_bytes(result.screenshot_png)


def test_left_out_prior_in_chromium(tmp_path: Path) -> None:
    path = tmp_path / "reading.html"
    write_page(page_content(PriorComparison(False, REASON, None, (), "", None)), path)
    result = open_page(path)
    check_offline(result)
    assert result.images_loaded == (True,) * 4  # no prior image
    assert f"The comparison with the prior study was left out: {REASON}" in result.text


def test_policy_holds_in_chromium_where_escaping_would_fail(tmp_path: Path) -> None:
    """The second line of defence works in a real browser: with markup spliced into the page
    as if escaping had failed, the script does not run and the image is refused by the policy
    (a malformed policy would be ignored by the browser without a word)."""
    html = render_page(page_content(None))
    spliced = (
        "<script>document.body.insertAdjacentText('beforeend', 'SCRIPT RAN')</script>"
        '<img src="http://fedrad-leak.invalid/x.png">'
        '<div style="background:url(http://fedrad-leak.invalid/y.png)">styled</div>'
    )
    path = tmp_path / "spliced.html"
    path.write_text(html.replace("<body>", "<body>" + spliced, 1), encoding="utf-8")
    result = open_page(path)
    assert "SCRIPT RAN" not in result.text
    refused = [c for c in result.console if "Content Security Policy" in c]
    assert any("script" in c for c in refused), result.console
    assert any("fedrad-leak.invalid/x.png" in c for c in refused), result.console
    assert result.images_loaded[0] is False  # the spliced image, refused


def test_harness_sees_what_a_leaky_page_loads(tmp_path: Path) -> None:
    """The checks above can fail: a page without the policy that reaches for the network has
    each attempt recorded (and answered by nothing), its broken image reported, while a data:
    image loads and is not counted as a request."""
    data = "data:image/png;base64," + base64.b64encode(radiograph(8)).decode()
    leaky = tmp_path / "leaky.html"
    leaky.write_text(
        "<!DOCTYPE html><html><head>"
        '<link rel="stylesheet" href="http://fedrad-leak.invalid/a.css"></head><body>'
        f'<img src="{data}"><img src="http://fedrad-leak.invalid/b.png">'
        '<div style="background:url(https://fedrad-leak.invalid/c.png)">x</div>'
        '<img src="http://127.0.0.1:8/d.png"></body></html>'
    )
    result = open_page(leaky)
    assert result.requests[0] == result.url
    assert set(result.network_requests) >= {
        "http://fedrad-leak.invalid/a.css",
        "http://fedrad-leak.invalid/b.png",
        "http://127.0.0.1:8/d.png",
    }
    assert result.images_loaded == (True, False, False)
    with pytest.raises(AssertionError):
        check_offline(result)


def test_missing_browser_skips_or_fails_as_ci_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRAD_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("FEDRAD_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install --no-install-recommends"):
        require_chromium()
    monkeypatch.setenv("FEDRAD_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="FEDRAD_REQUIRE_BROWSER=1"):
        require_chromium()
    assert browser.find_chromium() is None
