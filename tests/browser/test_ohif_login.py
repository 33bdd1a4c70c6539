"""OHIF through ``orthanc-cbir viewer`` outside the demo mode: the browser logs in with an Orthanc
user (HTTP Basic, checked by Orthanc) and OHIF then draws a study; without a login it gets
nothing. Real Orthanc, viewer and headless Chromium; the viewport's pixels are checked."""

from __future__ import annotations

import pytest

from orthanc_cbir.local_services import ViewerServer
from tests.browser.conftest import VIEWPORT
from tests.browser.ohif import PHANTOM_DESCRIPTION, assert_clean, open_study, phantom_series, store

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def login_viewer(tmp_path_factory, orthanc):
    with ViewerServer(tmp_path_factory.mktemp("login-viewer"), orthanc=orthanc, demo=False) as server:
        yield server


def _page(browser, tmp_path, **context_options):
    context = browser.new_context(viewport=VIEWPORT, **context_options)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.screenshot_dir, page.outside_requests, page.errors = tmp_path, [], []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    return context, page


def test_ohif_draws_a_study_for_a_logged_in_orthanc_user(orthanc, login_viewer, browser, tmp_path):
    study_uid = store(orthanc, phantom_series())
    context, page = _page(browser, tmp_path, http_credentials={"username": orthanc.username,
                                                                "password": orthanc.password})  # fmt: skip
    try:
        pixels = open_study(page, login_viewer, study_uid, PHANTOM_DESCRIPTION, "ohif-logged-in.png")
        assert pixels.std() > 40
        assert_clean(page)
    finally:
        context.close()


def test_without_a_login_the_browser_gets_nothing(orthanc, login_viewer, browser, tmp_path):
    from playwright.sync_api import Error as PlaywrightError

    context, page = _page(browser, tmp_path)
    statuses: list[int] = []
    page.on("response", lambda response: statuses.append(response.status))
    try:
        for path in ("/viewer", "/dicom-web/studies"):
            # Headless Chromium shows no login dialog: it ends the navigation on the 401 challenge.
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                page.goto(login_viewer.url + path)
        assert statuses == [401, 401]  # the viewer's own page too: nothing but the challenge
    finally:
        context.close()
