"""Opening a page in a real headless Chromium (the OS package, driven by Playwright) and
recording what it did: every request, whether each image decoded, the text a reader sees.

Why a real browser: a page can be valid HTML and still fetch something (a favicon, a font, an
image whose URL an attacker wrote into a report) or show a broken image; only a browser says
what it actually loads and draws. Chromium is launched with every host resolving to nothing
and every request sent to a closed local port, so a page that does try to reach the network
is recorded but reaches nothing (no PHI leaves the machine even when the test fails).

Chromium is skipped where it is missing, with the command that installs it, and fails the test
instead where CI says it must run (FEDRAD_REQUIRE_BROWSER=1).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL = "sudo apt-get install --no-install-recommends chromium"
# Debian's /usr/bin/chromium is a shell wrapper that adds flags (remote extensions, API keys)
# from /etc/chromium.d; the binary behind it is launched directly where it exists.
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "/usr/bin/chromium")
ARGS = (
    "--no-sandbox",  # CI runs as root, where Chromium refuses its sandbox
    "--host-resolver-rules=MAP * ~NOTFOUND",  # every name resolves to nothing
    "--proxy-server=127.0.0.1:9",  # and an address (no name to resolve) meets a closed port
    "--proxy-bypass-list=<-loopback>",  # loopback included
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--no-pings",
)
_DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@dataclass(frozen=True)
class BrowserResult:
    url: str  # the file:// URL the page was opened at
    requests: tuple[str, ...]  # every request URL Chromium reported, in order, data: included
    images_loaded: tuple[bool, ...]  # per <img> in document order: complete and naturalWidth > 0
    text: str  # what a reader sees: document.body.innerText
    html: str  # the document as the browser holds it after loading
    screenshot_png: bytes  # the full page
    console: tuple[str, ...]  # console warnings and errors, page errors (a CSP refusal is one)

    @property
    def network_requests(self) -> tuple[str, ...]:
        """Every request but the page's own file and `data:` URIs (which never leave the
        page; Chromium 156 with Playwright 1.65 reports none of them anyway)."""
        return tuple(u for u in self.requests if u != self.url and not u.startswith("data:"))


def candidates() -> tuple[str, ...]:
    """Where Chromium is looked for: $FEDRAD_CHROMIUM alone where it is set."""
    chosen = os.environ.get("FEDRAD_CHROMIUM")
    return (chosen,) if chosen else CANDIDATES


def find_chromium() -> str | None:
    """The Chromium to launch: $FEDRAD_CHROMIUM, else the OS package's."""
    for name in candidates():
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Chromium and Playwright, or a skip saying how to install them (a failure under
    FEDRAD_REQUIRE_BROWSER=1, so CI never passes for want of a browser)."""
    problem = None
    executable = find_chromium()
    if executable is None:
        problem = f"no Chromium found (tried {', '.join(candidates())}): {INSTALL}"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is not installed: .venv/bin/pip install -e '.[dev]'"
    if problem is None:
        assert executable is not None
        return executable
    if os.environ.get("FEDRAD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FEDRAD_REQUIRE_BROWSER=1 but {problem}")
    pytest.skip(problem)


def open_page(path: Path, *, timeout_s: float = 30.0) -> BrowserResult:
    """Opens `path` as a file:// URL in headless Chromium, waits for its load event (every
    image decoded or failed) and records what happened."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    url = Path(path).resolve().as_uri()
    requests: list[str] = []
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=list(ARGS))
        try:
            context = browser.new_context(
                java_script_enabled=True,  # for the checks below; the page itself has none
                service_workers="block",
            )
            context.set_default_timeout(timeout_s * 1000)
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            page.on(
                "console",
                lambda m: (
                    console.append(f"{m.type}: {m.text}")
                    if m.type in ("warning", "error")
                    else None
                ),
            )
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(url, wait_until="load")
            images = page.evaluate(
                "Array.from(document.images, i => i.complete && i.naturalWidth > 0)"
            )
            text = page.evaluate("document.body.innerText")
            html = page.content()
            screenshot = page.screenshot(full_page=True, type="png")
        finally:
            browser.close()
    return BrowserResult(
        url=url,
        requests=tuple(requests),
        images_loaded=tuple(bool(i) for i in images),
        text=text,
        html=html,
        screenshot_png=screenshot,
        console=tuple(console),
    )


def embedded_pngs(html: str) -> list[bytes]:
    """Every PNG embedded in `html` as a data: URI, decoded, so a search for a string (PHI)
    also sees what base64 hides."""
    return [base64.b64decode(m.group(1)) for m in _DATA_URI.finditer(html)]
