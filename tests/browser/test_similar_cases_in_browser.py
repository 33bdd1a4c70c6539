"""What a radiologist sees: the results page (thumbnails, strategy selector) and, in OHIF,
the "Similar cases" series beside the query's series, its first image drawn. Real Orthanc,
Redis, worker, OHIF and headless Chromium; the pixels of the viewport are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orthanc_cbir.dicom.own_output import SERIES_DESCRIPTION
from orthanc_cbir.model.embedder import Embedder
from tests.browser.ohif import PHANTOM_DESCRIPTION, assert_clean, open_study, phantom_series, save_screenshot, store
from tests.integration.pushing import synthetic_series, wait_until
from tests.integration.workers import start_worker

pytestmark = pytest.mark.browser

OTHER_PATIENT = {"PatientName": "Other^Bertha", "PatientID": "PID-B-77", "StudyDescription": "OTHER CASE"}


@pytest.fixture(scope="module")
def indexed(orthanc, redis_server, tmp_path_factory):
    """The phantom CT study and another patient's study, indexed by a worker; the query is the
    phantom's middle slice."""
    running = start_worker(orthanc, redis_server.url, Embedder(batch_size=64))
    study_uid = store(orthanc, phantom_series(slices=8))
    other = synthetic_series(tmp_path_factory.mktemp("other"), slices=12, size=128, **OTHER_PATIENT)
    store(orthanc, [path.read_bytes() for path in other])
    wait_until(lambda: orthanc.get_json("/cbir/status").get("indexed", 0) >= 20, 120, "20 indexed instances")
    study = orthanc.client.lookup(study_uid, "Study")
    series = orthanc.get_json(f"/studies/{study}/series")[0]
    instances = sorted(orthanc.get_json(f"/series/{series['ID']}/instances"),
                       key=lambda i: int(i["MainDicomTags"]["InstanceNumber"]))  # fmt: skip
    yield {"study_uid": study_uid, "query": instances[len(instances) // 2]["ID"]}
    running.stop()


def hits_shown(page) -> list[tuple[str, str]]:
    """(SOPInstanceUID, rank and distance line) of every hit card on the results page."""
    cards = page.locator("#hits li")
    return [(cards.nth(i).get_attribute("data-sop-instance-uid"), cards.nth(i).locator(".rank").inner_text())
            for i in range(cards.count())]  # fmt: skip


def test_the_results_page_shows_hits_and_follows_the_strategy(viewer, indexed, page):
    page.goto(f"{viewer.url}/cbir/ui/instances/{indexed['query']}")
    page.wait_for_selector("body[data-strategy='graph']")
    assert page.locator("#hits li").count() == 12
    first = hits_shown(page)
    page.wait_for_function("[...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth > 0)")
    page.select_option("#strategy", "multilateral")
    page.wait_for_selector("body[data-strategy='multilateral']")
    second = hits_shown(page)
    save_screenshot(page, "results-page.png")
    assert len(second) == 12 and second != first, "the multilateral answer is the graph one"
    ohif_link = page.locator("#hits li a", has_text="OHIF").first.get_attribute("href")
    assert ohif_link.startswith("/viewer?StudyInstanceUIDs=")
    page.fill("#modality", "MR")  # nothing indexed is MR: the page says so instead of old hits
    page.locator("#modality").dispatch_event("change")
    page.wait_for_function("document.querySelectorAll('#hits li').length === 0")
    assert "0 hits" in page.locator("#status").inner_text()
    assert_clean(page)


def test_a_readers_votes_on_the_results_page_land_in_the_audit_trail_and_in_evaluate_votes(
        orthanc, viewer, indexed, redis_server, page, capsys):  # fmt: skip
    from orthanc_cbir.cli import main

    page.goto(f"{viewer.url}/cbir/ui/instances/{indexed['query']}")
    page.wait_for_selector("body[data-strategy='graph']")
    shown = hits_shown(page)
    cards = page.locator("#hits li")
    cards.nth(0).locator("button.up").click()
    cards.nth(0).locator("button.up[aria-pressed='true']").wait_for()
    cards.nth(1).locator("button.down").click()
    cards.nth(1).locator("button.down[aria-pressed='true']").wait_for()
    assert cards.nth(1).locator("button.up").get_attribute("aria-pressed") == "false"
    assert "Voted not similar: hit #2" in page.locator("#status").inner_text()
    save_screenshot(page, "results-page-votes.png")
    votes = [e for e in orthanc.get_json("/cbir/audit?count=10")["entries"] if e["route"] == "vote"][::-1]
    query_uid = orthanc.get_json(f"/instances/{indexed['query']}/simplified-tags")["SOPInstanceUID"]
    assert [(e["user"], e["query"], e["hit"], e["vote"], e["rank"], e["strategy"]) for e in votes] == [
        (orthanc.username, query_uid, shown[0][0], "up", 1, "graph"),
        (orthanc.username, query_uid, shown[1][0], "down", 2, "graph")]  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", "--votes", "--redis-url", redis_server.url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["votes"] == 2 and report["precision"] == 0.5 and report["precision_at"]["1"] == 1.0
    assert_clean(page)


def test_ohif_lists_the_similar_cases_series_beside_the_query_and_draws_it(orthanc, viewer, indexed, page):
    status, body, _ = orthanc.request("POST", f"/cbir/instances/{indexed['query']}/similar/series", b"",
                                      headers={"X-Cbir-K": "4", "X-Cbir-Exclude": "same-series"},
                                      timeout_s=150)  # fmt: skip
    assert status == 200, body
    made = json.loads(body)
    open_study(page, viewer, indexed["study_uid"], PHANTOM_DESCRIPTION, "ohif-query-study.png")
    series_list = page.locator('[data-cy="studyBrowser-panel"] [data-cy="series-description-label"]')
    series_list.filter(has_text=SERIES_DESCRIPTION).first.wait_for(state="visible", timeout=30_000)
    # the same study, opened on the "Similar cases" series: its first image is drawn
    pixels = open_study(page, viewer, f"{indexed['study_uid']}&initialSeriesInstanceUID="
                        f"{made['series']['SeriesInstanceUID']}",
                        SERIES_DESCRIPTION, "ohif-similar-cases.png")  # fmt: skip
    assert caption_band_rows(pixels) >= 10, "the viewport shows no Similar cases image (no caption band)"
    assert caption_band_rows(open_study(page, viewer, indexed["study_uid"], PHANTOM_DESCRIPTION,
                                        "ohif-query-again.png")) == 0  # fmt: skip
    assert_clean(page)


def caption_band_rows(pixels: np.ndarray) -> int:
    """Rows of the viewport that are white across most of the drawn image's width: the caption
    band of a "Similar cases" image (a CT slice has no such row)."""
    drawn = np.flatnonzero((pixels > 10).any(axis=0))
    if drawn.size == 0:
        return 0
    image = pixels[:, drawn[0]:drawn[-1] + 1]
    return int(((image > 240).mean(axis=1) > 0.6).sum())
