"""The browser tests: headless Debian Chromium, driven by Playwright, over the OHIF viewer
(``orthanc-cbir viewer``) in front of a real Orthanc and Redis on loopback ports.

Skipped, with the reason, where Chromium, the Python Playwright package, the OHIF viewer
(``make ohif``), Orthanc or redis-server is missing. Playwright never downloads a browser
here: it launches ``/usr/bin/chromium``, which may only resolve loopback names, so a
request for anything outside the machine fails in the browser instead of leaving it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from orthanc_cbir.local_services import ORTHANC_BINARY, OrthancServer, RedisServer, ViewerServer
from orthanc_cbir.viewer import extension_dir, extension_present, ohif_dist, ohif_present

CHROMIUM = Path(os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Every name but loopback's fails to resolve: nothing leaves the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 900}

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")


def _missing() -> list[str]:
    missing = [tool for tool in ("redis-server", ORTHANC_BINARY) if not shutil.which(tool)]
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not ohif_present():
        missing.append(f"the OHIF viewer in {ohif_dist().parent} (make ohif)")
    if not extension_present():
        missing.append(f"the orthanc-cbir OHIF extension built in {extension_dir()} (make ohif)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[test]')")
    return missing


MISSING = _missing()


@pytest.fixture(autouse=True, scope="session")
def _browser_tools() -> None:
    """Skip (before any service starts) where something is missing: `make test` installs all of it."""
    if MISSING:
        pytest.skip(f"browser tests need {', '.join(MISSING)}")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, redis_server) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), redis_url=redis_server.url) as server:
        yield server


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, orthanc) -> Iterator[ViewerServer]:
    """``orthanc-cbir viewer`` in front of ``orthanc``; ``viewer.url`` is its origin."""
    with ViewerServer(tmp_path_factory.mktemp("viewer"), orthanc=orthanc) as server:
        yield server


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium (never a browser Playwright downloads)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh context (new profile: the first-visit tour shows) and page, 1280x900.

    ``page.outside_requests`` lists every request the page made to a host other than
    loopback's (they fail: the browser cannot resolve them); ``page.errors`` the uncaught
    JavaScript errors; ``page.screenshot_dir`` is the test's tmp_path."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.screenshot_dir = tmp_path
    page.outside_requests = []
    page.errors = []
    page.on("request", lambda request: _record_outside(page, request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()


def _record_outside(page, url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        page.outside_requests.append(url)
