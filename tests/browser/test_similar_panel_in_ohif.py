"""The orthanc-cbir extension and mode inside OHIF: the "Similar" panel beside a CT slice, a
click that opens a hit beside the query (1x2), Escape back, and votes from the panel. Real
Orthanc, Redis, worker, OHIF (the extension loaded at run time from the viewer) and headless
Chromium; the viewports' pixels are checked."""

from __future__ import annotations

import json
import time
from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from orthanc_cbir.model.embedder import Embedder
from tests.browser.ohif import (
    DRAW_TIMEOUT_S,
    assert_clean,
    disc_radius,
    dismiss_overlays,
    overlays_shown,
    phantom_series,
    save_screenshot,
    store,
)
from tests.integration.pushing import wait_until
from tests.integration.workers import start_worker

pytestmark = pytest.mark.browser

SLICES = 8
OTHER_PATIENT = {"PatientName": "Other^Bertha", "PatientID": "PID-B-77", "StudyDescription": "OTHER CASE"}
VIEWPORT_CANVAS = '[data-cy="viewport-pane"] canvas.cornerstone-canvas'
HIT_CARDS = '[data-cy="cbir-hit"]'


@pytest.fixture(scope="module")
def indexed(orthanc, redis_server):
    """Two patients' phantom CT series (the same anatomy, each slice's disc a known size),
    indexed by a worker."""
    running = start_worker(orthanc, redis_server.url, Embedder(batch_size=64))
    own = phantom_series(slices=SLICES)
    other = phantom_series(slices=SLICES, **OTHER_PATIENT)
    study_uid = store(orthanc, own)
    store(orthanc, other)
    wait_until(lambda: orthanc.get_json("/cbir/status").get("indexed", 0) >= 2 * SLICES, 120, "16 indexed instances")
    slice_of = {}
    for files in (own, other):
        for z, body in enumerate(files):
            slice_of[dcmread(BytesIO(body), stop_before_pixels=True).SOPInstanceUID] = z
    yield {"study_uid": study_uid, "slice_of": slice_of}
    running.stop()


def open_in_similar_mode(page, viewer, study_uid: str) -> None:
    """The study in the orthanc-cbir mode, its first slice drawn, the tour and notice dismissed."""
    page.goto(f"{viewer.url}/similar?StudyInstanceUIDs={study_uid}")
    canvas = page.locator(VIEWPORT_CANVAS).first
    canvas.wait_for(state="visible", timeout=60_000)
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    while time.monotonic() < deadline:
        dismiss_overlays(page)
        if canvas_pixels(page, 0).std() > 40 and not overlays_shown(page):
            return
        time.sleep(0.5)
    raise AssertionError(f"the viewport drew nothing in {DRAW_TIMEOUT_S} s")


def canvas_pixels(page, index: int) -> np.ndarray:
    shot = page.locator(VIEWPORT_CANVAS).nth(index).screenshot(animations="disabled")
    return np.asarray(Image.open(BytesIO(shot)).convert("L"), dtype=float)


def drawn_disc_radius(pixels: np.ndarray) -> float:
    """The radius of the phantom's white disc in a viewport, in the image's pixels: its widest
    row of white over the drawn image's width (the 128-pixel image fills the viewport's width;
    the viewport's text overlays, in the screenshot too, are short white runs)."""
    columns = np.flatnonzero((pixels > 5).any(axis=0))
    width = columns[-1] - columns[0] + 1
    widest = (pixels >= 245).sum(axis=1).max()
    return float(widest / width * 128 / 2)


def panel_hits(page) -> list[dict]:
    cards = page.locator(HIT_CARDS)
    return [{"rank": int(cards.nth(i).get_attribute("data-rank")),
             "uid": cards.nth(i).get_attribute("data-sop-instance-uid"), "text": cards.nth(i).inner_text()}
            for i in range(cards.count())]  # fmt: skip


def answered(orthanc, query_uid: str, **parameters: str) -> list[str]:
    """The SOPInstanceUIDs Orthanc's similarity route answers for ``query_uid``, in rank order."""
    from urllib.parse import urlencode

    answer = orthanc.get_json(f"/cbir/instances/{query_uid}/similar?{urlencode({'k': 10, **parameters})}")
    return [hit["SOPInstanceUID"] for hit in answer["hits"]]


def wait_for_hits(page, uids: list[str]) -> None:
    """Until the panel lists exactly these SOPInstanceUIDs, in this order."""
    page.wait_for_function("uids => [...document.querySelectorAll('[data-cy=\"cbir-hit\"]')]"
                           ".map(card => card.dataset.sopInstanceUid).join() === uids.join()", arg=uids)  # fmt: skip


def shown_query(page) -> str:
    page.wait_for_function("document.querySelector('[data-cy=\"cbir-similar-panel\"]')?.dataset.query")
    return page.locator('[data-cy="cbir-similar-panel"]').get_attribute("data-query")


def test_the_similar_panel_lists_hits_for_the_shown_slice_within_a_second(orthanc, viewer, indexed, page):
    open_in_similar_mode(page, viewer, indexed["study_uid"])
    hits = page.locator(HIT_CARDS)
    hits.first.wait_for(state="visible", timeout=30_000)  # the first search after the mode's start
    query = shown_query(page)
    expected = answered(orthanc, query)
    wait_for_hits(page, expected)
    listed = panel_hits(page)
    assert indexed["slice_of"][query] is not None and len(expected) >= 5
    assert [h["uid"] for h in listed] == expected and [h["rank"] for h in listed] == list(range(1, len(expected) + 1))
    assert any("another patient" in h["text"] for h in listed) and any("this patient" in h["text"] for h in listed)
    assert all("Bertha" not in h["text"] and "PID-B-77" not in h["text"] for h in listed)
    page.wait_for_function("[...document.querySelectorAll('[data-cy=\"cbir-hit\"] img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")  # fmt: skip
    save_screenshot(page, "ohif-similar-panel.png")
    # another tab, then the panel's own again (a new panel, a new search): hits within a second
    page.locator('[data-cy="panelMeasurement-btn"]').click()
    page.locator('[data-cy="cbir-similar-panel"]').wait_for(state="detached", timeout=10_000)
    started = time.monotonic()
    page.locator('[data-cy="similar-btn"]').click()
    hits.first.wait_for(state="visible", timeout=1_000)
    assert time.monotonic() - started < 1.0
    # another patient's images only
    page.select_option("#cbir-exclude", "same-patient")
    others = answered(orthanc, query, exclude="same-patient")
    assert len(others) == SLICES
    wait_for_hits(page, others)
    assert all("another patient" in h["text"] for h in panel_hits(page))
    # the results page's filters: nothing indexed is MR, and the panel says so instead of old hits
    page.fill("#cbir-modality", "MR")
    page.press("#cbir-modality", "Enter")
    wait_for_hits(page, [])
    assert "No similar image" in page.locator('[data-cy="cbir-status"]').inner_text()
    assert_clean(page)


def test_a_click_on_a_hit_shows_it_beside_the_query_and_escape_returns(orthanc, viewer, indexed, page):
    open_in_similar_mode(page, viewer, indexed["study_uid"])
    page.select_option("#cbir-exclude", "same-patient")
    wait_for_hits(page, answered(orthanc, shown_query(page), exclude="same-patient"))
    hits = panel_hits(page)
    query_radius = drawn_disc_radius(canvas_pixels(page, 0))
    # the hit whose disc differs most from the query's, so the pixels tell them apart
    chosen = max(hits, key=lambda h: abs(disc_radius(indexed["slice_of"][h["uid"]]) - query_radius))
    z = indexed["slice_of"][chosen["uid"]]
    page.locator(f'[data-cy="cbir-hit"][data-sop-instance-uid="{chosen["uid"]}"]').click()
    page.locator('[data-cy="cbir-comparing"]').wait_for(state="visible", timeout=30_000)
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    right = np.zeros((1, 1))
    while time.monotonic() < deadline:
        if page.locator(VIEWPORT_CANVAS).count() == 2:
            right = canvas_pixels(page, 1)
            if right.std() > 40 and abs(drawn_disc_radius(right) - disc_radius(z)) < 2.5:
                break
        time.sleep(0.5)
    save_screenshot(page, "ohif-side-by-side.png")
    assert page.locator(VIEWPORT_CANVAS).count() == 2, "no 1x2 layout"
    assert abs(drawn_disc_radius(right) - disc_radius(z)) < 2.5, (
        f"the right viewport's disc is {drawn_disc_radius(right):.1f} px, hit slice {z}'s is {disc_radius(z):.1f}")
    left = canvas_pixels(page, 0)
    assert abs(drawn_disc_radius(left) - query_radius) < 2.5, "the query's slice left the left viewport"
    page.keyboard.press("Escape")
    page.wait_for_function(f"document.querySelectorAll('{VIEWPORT_CANVAS}').length === 1", timeout=30_000)
    page.locator('[data-cy="cbir-comparing"]').wait_for(state="detached", timeout=10_000)
    wait_until(lambda: abs(drawn_disc_radius(canvas_pixels(page, 0)) - query_radius) < 2.5, 30,
               "the query's slice back in the one viewport")  # fmt: skip
    assert_clean(page)


def test_votes_from_the_panel_land_in_the_audit_trail_and_in_evaluate_votes(
        orthanc, viewer, indexed, redis_server, page, capsys):  # fmt: skip
    from orthanc_cbir.cli import main

    before = [e for e in orthanc.get_json("/cbir/audit?count=100")["entries"] if e["route"] == "vote"]
    open_in_similar_mode(page, viewer, indexed["study_uid"])
    page.locator(HIT_CARDS).first.wait_for(state="visible", timeout=30_000)
    query_uid = shown_query(page)
    wait_for_hits(page, answered(orthanc, query_uid))
    hits = panel_hits(page)
    cards = page.locator(HIT_CARDS)
    cards.nth(0).locator("button[data-vote='up']").click()
    cards.nth(0).locator("button[data-vote='up'][aria-pressed='true']").wait_for()
    cards.nth(2).locator("button[data-vote='down']").click()
    cards.nth(2).locator("button[data-vote='down'][aria-pressed='true']").wait_for()
    assert page.locator('[data-cy="cbir-comparing"]').count() == 0, "a vote opened the hit"
    entries = orthanc.get_json("/cbir/audit?count=100")["entries"]
    votes = [e for e in entries if e["route"] == "vote"][: 2][::-1]
    assert len([e for e in entries if e["route"] == "vote"]) == len(before) + 2
    assert [(e["user"], e["query"], e["hit"], e["vote"], e["rank"]) for e in votes] == [
        (orthanc.username, query_uid, hits[0]["uid"], "up", 1),
        (orthanc.username, query_uid, hits[2]["uid"], "down", 3)]  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", "--votes", "--redis-url", redis_server.url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["votes"] >= 2 and report["precision_at"]["1"] == 1.0
    assert_clean(page)
