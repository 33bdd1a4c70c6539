"""A region query inside OHIF: on the shared Lung-PET-CT-Dx chest CT (indexed with the
``regions`` setting), the reader draws a rectangle with OHIF's own rectangle tool around each
annotated tumour and asks for similar regions; the first hit is a region of a neighbouring
slice that overlaps the tumour. Opening that hit shows it beside the query with its matching
region drawn over it. Real Orthanc, Redis, worker, OHIF and headless Chromium."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from orthanc_cbir.model.embedder import Embedder
from tests.browser.ohif import DRAW_TIMEOUT_S, assert_clean, dismiss_overlays, overlays_shown, save_screenshot, store
from tests.index.test_regions import SERIES, overlaps, tumour_boxes
from tests.integration.pushing import wait_until
from tests.integration.workers import start_worker

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not SERIES.is_dir(), reason=f"the shared Lung-PET-CT-Dx series is not at {SERIES}")]
PANEL = '[data-cy="cbir-similar-panel"]'
CANVAS = '[data-cy="viewport-pane"] canvas.cornerstone-canvas'
IMAGE_SIDE = 512  # the series' Rows and Columns


@pytest.fixture(scope="module")
def lung(orthanc, redis_server):
    """The series stored in Orthanc and indexed with its region entries; slices in axial order."""
    from pydicom import dcmread

    running = start_worker(orthanc, redis_server.url, Embedder(batch_size=64), regions=True)
    paths = sorted(SERIES.glob("*.dcm"))
    study_uid = store(orthanc, [path.read_bytes() for path in paths])
    wait_until(lambda: orthanc.get_json("/cbir/status").get("indexed", 0) >= len(paths), 180, "the series indexed")
    headers = sorted((dcmread(path, stop_before_pixels=True) for path in paths),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))  # fmt: skip
    order = [ds.SOPInstanceUID for ds in headers]
    yield {"study_uid": study_uid, "order": order, "boxes": tumour_boxes(set(order))}
    running.stop()


def shown(page) -> str:
    """The SOPInstanceUID of the image the panel answers for."""
    return page.locator(PANEL).get_attribute("data-query") or ""


def go_to(page, target: str, order: list[str]) -> None:
    """Scroll the stack (OHIF's arrow keys) until the panel answers for ``target``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page.wait_for_function("selector => document.querySelector(selector)?.dataset.kind === 'images'", arg=PANEL)
        current = shown(page)
        if current == target:
            return
        before = current
        page.locator(CANVAS).first.hover()
        # ArrowDown / ArrowUp move one slice; which way is the target depends on OHIF's sort
        page.keyboard.press("ArrowDown" if order.index(target) < order.index(current) else "ArrowUp")
        page.wait_for_function("([selector, before]) => document.querySelector(selector)?.dataset.query !== before",
                               arg=[PANEL, before], timeout=10_000)  # fmt: skip
    raise AssertionError("the stack did not reach the annotated slice")


def draw(page, box: tuple[int, int, int, int]) -> None:
    """Drag OHIF's rectangle tool over ``box`` (image pixels): the image fills the viewport's
    shorter side, centred (OHIF's initial camera)."""
    bounds = page.locator(CANVAS).first.bounding_box()
    side = min(bounds["width"], bounds["height"])
    left, top = bounds["x"] + (bounds["width"] - side) / 2, bounds["y"] + (bounds["height"] - side) / 2
    x0, y0, x1, y1 = (left + box[0] * side / IMAGE_SIDE, top + box[1] * side / IMAGE_SIDE,
                      left + box[2] * side / IMAGE_SIDE, top + box[3] * side / IMAGE_SIDE)  # fmt: skip
    page.locator('[data-cy="cbir-draw-region"]').click()
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    page.mouse.up()


def test_a_rectangle_around_each_tumour_finds_it_on_a_neighbouring_slice(viewer, lung, page):
    order, boxes = lung["order"], lung["boxes"]
    annotated = sorted(boxes, key=order.index)
    page.goto(f"{viewer.url}/similar?StudyInstanceUIDs={lung['study_uid']}&initialSOPInstanceUID={annotated[0]}")
    page.locator(CANVAS).first.wait_for(state="visible", timeout=60_000)
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    while (overlays_shown(page) or not shown(page)) and time.monotonic() < deadline:
        dismiss_overlays(page)
        time.sleep(0.5)
    found, first_hit = [], None
    for uid in annotated:
        go_to(page, uid, order)
        draw(page, boxes[uid])
        page.locator('[data-cy="cbir-search-region"]').click()
        page.wait_for_function("([selector, uid]) => { const panel = document.querySelector(selector); return "
                               "panel?.dataset.kind === 'regions' && panel.dataset.query === uid && "
                               "panel.querySelector('[data-cy=\"cbir-hit\"]') }", arg=[PANEL, uid])  # fmt: skip
        drawn = [int(v) for v in re.findall(r"\d+", page.locator('[data-cy="cbir-region"]').inner_text())[:4]]
        assert np.abs(np.subtract(drawn, boxes[uid])).max() <= 3, f"drew {drawn} for the box {boxes[uid]}"
        card = page.locator('[data-cy="cbir-hit"]').first
        hit, region = card.get_attribute("data-sop-instance-uid"), tuple(int(v) for v in card.get_attribute(
            "data-region").split(","))  # fmt: skip
        target = boxes.get(hit, boxes[uid])  # a neighbour without an annotation: the query's box
        found.append(abs(order.index(hit) - order.index(uid)) == 1 and overlaps(region, target))
        if first_hit is None:
            first_hit = (hit, region)
            save_screenshot(page, "ohif-region-query.png")
        page.get_by_role("button", name="Whole image").click()
    share = float(np.mean(found))
    print(f"tumour rectangles drawn in OHIF answered at rank 1 by a neighbouring slice's region: {share:.3f} "
          f"({sum(found)}/{len(found)})")
    assert len(found) >= 10 and share >= 0.9
    assert_clean(page)


def test_an_opened_region_hit_is_drawn_over_the_hit_beside_the_query(viewer, lung, page):
    order, boxes = lung["order"], lung["boxes"]
    uid = sorted(boxes, key=order.index)[len(boxes) // 2]
    page.goto(f"{viewer.url}/similar?StudyInstanceUIDs={lung['study_uid']}&initialSOPInstanceUID={uid}")
    page.locator(CANVAS).first.wait_for(state="visible", timeout=60_000)
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    while (overlays_shown(page) or shown(page) != uid) and time.monotonic() < deadline:
        dismiss_overlays(page)
        time.sleep(0.5)
    draw(page, boxes[uid])
    page.locator('[data-cy="cbir-search-region"]').click()
    page.wait_for_function("selector => document.querySelector(selector)?.dataset.kind === 'regions'", arg=PANEL)
    card = page.locator('[data-cy="cbir-hit"]').first
    region = [int(v) for v in card.get_attribute("data-region").split(",")]
    card.click()
    page.locator('[data-cy="cbir-comparing"]').wait_for(state="visible", timeout=30_000)
    overlay = page.locator("[data-cbir-region]")
    overlay.wait_for(state="visible", timeout=30_000)
    wait_until(lambda: page.locator(CANVAS).count() == 2, 30, "the 1x2 layout")
    right = page.locator(CANVAS).nth(1).bounding_box()
    drawn = overlay.bounding_box()
    side = min(right["width"], right["height"])
    left, top = right["x"] + (right["width"] - side) / 2, right["y"] + (right["height"] - side) / 2
    expected = (left + region[0] * side / IMAGE_SIDE, top + region[1] * side / IMAGE_SIDE)
    save_screenshot(page, "ohif-region-side-by-side.png")
    assert abs(drawn["x"] - expected[0]) < 6 and abs(drawn["y"] - expected[1]) < 6, (drawn, expected)
    assert abs(drawn["width"] - (region[2] - region[0]) * side / IMAGE_SIDE) < 6
    assert_clean(page)
