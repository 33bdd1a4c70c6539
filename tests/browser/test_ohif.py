"""The OHIF viewer, served by ``orthanc-cbir viewer`` on one origin with Orthanc behind it,
draws a CT series that Orthanc stores: a synthetic one always, the shared 64-slice CT
where ../shared/data has it. Asserts on the viewport's pixels and on the series list."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.browser.ohif import PHANTOM_DESCRIPTION, assert_clean, open_study, phantom_series, store

pytestmark = pytest.mark.browser

SHARED_SERIES = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / (
    "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl")  # fmt: skip


def test_ohif_draws_a_synthetic_ct_series(orthanc, viewer, page):
    study_uid = store(orthanc, phantom_series())
    pixels = open_study(page, viewer, study_uid, PHANTOM_DESCRIPTION, "ohif-phantom.png")
    # The file's window (L 40, W 1000) applied: -400 HU squares near black (~15), +400 HU squares
    # light grey (~220), the +1000 HU disc white; each over a good part of the viewport.
    dark, light, white = (pixels < 60).mean(), ((pixels > 190) & (pixels < 240)).mean(), (pixels >= 245).mean()
    assert min(dark, light, white) > 0.1, f"dark {dark:.2f}, light grey {light:.2f}, white {white:.2f} of the viewport"
    assert_clean(page)


@pytest.mark.skipif(not SHARED_SERIES.is_dir(), reason=f"the shared CT series is not at {SHARED_SERIES}")
def test_ohif_draws_the_shared_ct_series(orthanc, viewer, page):
    paths = sorted(SHARED_SERIES.glob("*.dcm"))
    description = dcmread(paths[0], stop_before_pixels=True).get("SeriesDescription", "")
    study_uid = store(orthanc, [path.read_bytes() for path in paths])
    pixels = open_study(page, viewer, study_uid, description, "ohif-shared-ct.png")
    # A chest CT in the file's lung window (L -600, W 1600): black outside the body, grey and white inside.
    assert (pixels < 30).mean() > 0.1 and (pixels > 100).mean() > 0.05
    assert_clean(page)
