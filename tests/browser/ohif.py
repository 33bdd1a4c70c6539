"""Helpers of the browser tests: a synthetic CT series, storing it in Orthanc, and opening a
study in OHIF until its viewport has drawn (the first-visit tour and notice dismissed)."""

from __future__ import annotations

import os
import shutil
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests import dicom_factory as factory

PHANTOM_DESCRIPTION = "CBIR BROWSER PHANTOM"
DRAW_TIMEOUT_S = 90


def phantom_series(slices: int = 8, size: int = 128, **tags) -> list[bytes]:
    """A CT series (Part 10 files) of a 16-pixel checkerboard (+400 / -400 HU) with a bright
    disc (+1000 HU) that grows slice by slice (radius ``disc_radius(z, size)``): geometry
    complete, so OHIF stacks it. ``tags`` (a patient's) are set on every file."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    files = []
    for z in range(slices):
        stored = np.where((yy // 16 + xx // 16) % 2 == 0, 1024 + 400, 1024 - 400).astype(np.uint16)
        stored[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < disc_radius(z, size) ** 2] = 1024 + 1000
        ds = factory.grey_image(
            stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=1000,
            StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame_of_reference,
            SeriesNumber=7, InstanceNumber=z + 1, ImagePositionPatient=[-size / 2, -size / 2, 5.0 * z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1], SliceThickness=5,
            SeriesDescription=PHANTOM_DESCRIPTION, **tags,
        )  # fmt: skip
        files.append(factory.to_bytes(ds))
    return files


def disc_radius(z: int, size: int = 128) -> float:
    """The radius (pixels) of the phantom's disc on slice ``z``."""
    return size / 8 + 3 * z


def store(orthanc, files: list[bytes]) -> str:
    """POST each file to Orthanc; returns the StudyInstanceUID."""
    for body in files:
        status, answer, _ = orthanc.request("POST", "/instances", body, content_type="application/dicom")
        assert status == 200, answer[:300]
    return dcmread(BytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID


def open_study(page, viewer, study_uid: str, series_description: str, screenshot_name: str) -> np.ndarray:
    """Open the study, dismiss the tour and the notice, wait until the viewport has drawn an
    image and the series list names ``series_description``; returns the viewport's pixels
    (grey) and saves a screenshot of the page."""
    page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}")
    canvas = page.locator('[data-cy="viewport-pane"] canvas.cornerstone-canvas').first
    canvas.wait_for(state="visible", timeout=60_000)
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    pixels = np.zeros((1, 1))
    while time.monotonic() < deadline:
        dismiss_overlays(page)
        pixels = np.asarray(Image.open(BytesIO(canvas.screenshot(animations="disabled"))).convert("L"), dtype=float)
        if pixels.std() > 40 and not overlays_shown(page):
            break
        time.sleep(0.5)
    save_screenshot(page, screenshot_name)
    assert pixels.std() > 40, f"the viewport shows no image after {DRAW_TIMEOUT_S} s (std {pixels.std():.1f})"
    series_list = page.locator('[data-cy="studyBrowser-panel"] [data-cy="series-description-label"]')
    series_list.filter(has_text=series_description).first.wait_for(state="visible", timeout=30_000)
    return pixels


def dismiss_overlays(page) -> None:
    """Skip the first-visit tour and hide the "investigational use" notice, where shown."""
    from playwright.sync_api import Error as PlaywrightError

    for button in (page.get_by_role("button", name="Skip all"), page.locator('[data-cy="confirm-and-hide-button"]')):
        try:
            if button.count() and button.first.is_visible():
                button.first.click(timeout=5_000)
        except PlaywrightError:  # it went away between the look and the click: the next round sees
            pass


def overlays_shown(page) -> bool:
    return page.get_by_role("button", name="Skip all").is_visible() or page.locator(
        '[data-cy="confirm-and-hide-button"]').is_visible()  # fmt: skip


def save_screenshot(page, name: str) -> None:
    """Into the test's folder (``page.screenshot_dir``, the conftest's ``page``) and, when set,
    ``$CBIR_SCREENSHOT_DIR``."""
    path = page.screenshot_dir / name
    page.screenshot(path=str(path))
    if os.environ.get("CBIR_SCREENSHOT_DIR"):
        target = Path(os.environ["CBIR_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)


def assert_clean(page) -> None:
    """Nothing left the machine and no script failed."""
    assert not page.outside_requests, f"the viewer asked for non-loopback URLs: {page.outside_requests[:5]}"
    assert not page.errors, f"uncaught JavaScript errors: {page.errors[:5]}"
