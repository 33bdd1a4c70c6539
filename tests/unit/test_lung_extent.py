"""The aerated lung of one CT slice and the lung apex and base of a series from those areas
(orthanc_cbir.model.lung_extent): on slices the test draws, on area profiles of the series the
index meets (whole chests, chests still arriving, abdomens that begin at the lung bases), and on
the shared real chest CT decoded as the index decodes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from orthanc_cbir.dicom.pixels import hounsfield_to_grey
from orthanc_cbir.evaluation.model_report import LANDMARKS
from orthanc_cbir.index.records import decode_file
from orthanc_cbir.model.lung_extent import (
    AIR_GREY,
    BASE_BELOW_SHRUNK_MM,
    LungLandmarks,
    aerated_lung_mm2,
    filled_holes,
    series_landmarks,
)
from tests.records_factory import lung_profile

PIXEL_MM = 0.7
SHARED_CHEST = (
    Path(__file__).parents[2] / ".." / "shared/data/dicom/series/lung_pet_ct_dx/Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"
)


def grey_of(hounsfield: float) -> float:
    return float(hounsfield_to_grey(hounsfield))


def axial_slice(lung_radius_mm: float = 60.0, gas_radius_mm: float = 0.0) -> np.ndarray:
    """512 x 512 at 0.7 mm: a soft-tissue body in air above a hollow table, two lungs (-850 HU) either
    side of a windpipe (-1000 HU) on the midline, and a gas bubble (-1000 HU) beside them."""
    y, x = (np.mgrid[:512, :512] - 256.0) * PIXEL_MM
    picture = np.full((512, 512), grey_of(-1000.0), dtype=np.float32)
    picture[(x / 160) ** 2 + (y / 110) ** 2 <= 1] = grey_of(40.0)
    picture[(np.abs(y - 150) <= 8) & (np.abs(x) <= 170)] = grey_of(200.0)  # the table's shell ...
    picture[(np.abs(y - 150) <= 4) & (np.abs(x) <= 165)] = grey_of(-1000.0)  # ... and the air inside it
    for side in (-75.0, 75.0):
        picture[(x - side) ** 2 + y**2 <= lung_radius_mm**2] = grey_of(-850.0)
    picture[x**2 + (y + 40) ** 2 <= 9**2] = grey_of(-1000.0)
    picture[(x - 60) ** 2 + (y - 60) ** 2 <= gas_radius_mm**2] = grey_of(-1000.0)
    return picture


def test_a_slice_counts_its_two_lungs_and_neither_the_windpipe_the_gas_nor_the_air_around_it():
    expected = 2 * np.pi * 60.0**2
    assert aerated_lung_mm2(axial_slice(), PIXEL_MM, PIXEL_MM) == pytest.approx(expected, rel=0.05)
    with_gas = aerated_lung_mm2(axial_slice(gas_radius_mm=20.0), PIXEL_MM, PIXEL_MM)
    assert with_gas == pytest.approx(expected, rel=0.05)  # a -1000 HU bubble of 1,250 mm² adds its rim only


def test_a_slice_of_soft_tissue_only_has_no_lung_and_an_empty_picture_no_body():
    assert aerated_lung_mm2(axial_slice(lung_radius_mm=0.0), PIXEL_MM, PIXEL_MM) == 0.0
    assert aerated_lung_mm2(np.zeros((64, 64), np.float32), 5.0, 5.0) == 0.0


def test_a_whole_chest_gives_its_apex_and_base_in_any_order_and_unmeasured_slices_are_left_out():
    positions = np.arange(-500.0, -100.0, 5.0)
    areas = lung_profile(positions, apex=-150.0, base=-370.0)
    assert series_landmarks(areas, positions) == LungLandmarks(-150.0, -370.0)
    shuffled = np.random.default_rng(0).permutation(len(positions))
    with_unmeasured = np.r_[areas[shuffled], np.nan]
    assert series_landmarks(with_unmeasured, np.r_[positions[shuffled], -300.0]) == LungLandmarks(-150.0, -370.0)


def test_a_landmark_the_series_does_not_yet_go_beyond_is_not_given():
    positions = np.arange(-500.0, -100.0, 5.0)
    areas = lung_profile(positions, apex=-150.0, base=-370.0)
    arrived = positions >= -370.0  # sent from the head down, the slices below the base still to come
    assert series_landmarks(areas[arrived], positions[arrived]) == LungLandmarks(-150.0, None)
    gap = (positions >= -370.0) | (positions <= -400.0)  # 30 mm missing below the last slice with lung
    assert series_landmarks(areas[gap], positions[gap]) == LungLandmarks(-150.0, None)


def test_an_abdomen_that_begins_at_the_lung_bases_gives_the_base_where_the_lung_shrinks_not_where_gas_ends():
    positions = np.arange(-700.0, -395.0, 5.0)
    areas = lung_profile(positions, apex=-150.0, base=-450.0, widest_mm2=30_000.0)
    areas[(positions < -450.0) & (positions >= -600.0)] = 600.0  # stomach and bowel gas below the lungs
    found = series_landmarks(areas, positions)
    # the lungs shrink to a tenth of the top slice's at about -440 mm; the base lies 12 mm below that
    assert found.apex_mm is None and found.base_mm == pytest.approx(-450.0, abs=BASE_BELOW_SHRUNK_MM)


def test_a_series_without_lungs_gives_no_landmark_even_with_bowel_gas():
    positions = np.arange(-900.0, -600.0, 5.0)
    gas = np.where((positions > -800.0) & (positions < -700.0), 2_500.0, 0.0)
    assert series_landmarks(gas, positions) == LungLandmarks(None, None)
    colon = np.where(positions < -830.0, 12_000.0, 0.0)  # wide, running off the bottom: 70 mm is no lung
    assert series_landmarks(colon, positions) == LungLandmarks(None, None)
    loop = np.where((positions > -800.0) & (positions < -700.0), 12_000.0, 0.0)
    assert series_landmarks(loop, positions).frame(positions) is None  # two ends 90 mm apart are no lung
    top = np.where(positions > -700.0, 8_000.0, 0.0)
    top[-3] = 9_000.0  # gas at the top of a series but widest below its top slice: no lung bases
    assert series_landmarks(top, positions) == LungLandmarks(None, None)
    assert series_landmarks(np.array([]), np.array([])) == LungLandmarks(None, None)


@pytest.mark.skipif(not SHARED_CHEST.is_dir(), reason="../shared data not present")
def test_the_real_chest_ct_decoded_as_the_index_decodes_it_shows_the_landmarks_annotated_by_eye():
    from orthanc_cbir.index.records import embed_instances
    from orthanc_cbir.model.embedder import Embedder

    decoded = [decode_file(path) for path in sorted(SHARED_CHEST.glob("*.dcm"))]
    records = embed_instances(Embedder(), decoded)
    positions = np.array([record.metadata.axial_position_mm for record in records])
    found = series_landmarks(np.array([record.lung_mm2 for record in records]), positions)
    by_eye = next(entry for entry in json.loads(LANDMARKS.read_text())["series"].values() if "A0001" in entry["name"])
    assert found.apex_mm == pytest.approx(by_eye["lung_apex_mm"], abs=10.0)
    assert found.base_mm == pytest.approx(by_eye["lung_base_mm"], abs=10.0)


def test_the_body_is_filled_as_scipy_fills_holes_nested_edge_touching_and_diagonal_ones_alike():
    """filled_holes labels the background once where scipy dilates until nothing changes: the same
    mask on random pieces (holes inside holes, background touching an edge, gaps only diagonal) and
    on every slice of the real chest CT as the lung measure samples it."""
    rng = np.random.default_rng(7)
    masks = [ndimage.binary_opening(rng.random((40 + i % 37, 30 + i % 53)) < rng.uniform(0.3, 0.8)) for i in range(200)]
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8], ring[2:7, 2:7], ring[3:6, 3:6], ring[4, 4] = True, False, True, False  # a hole in a piece in a hole
    diagonal = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], bool)  # holes meeting at a corner
    masks += [ring, diagonal, np.zeros((5, 5), bool), np.ones((5, 5), bool)]
    if SHARED_CHEST.is_dir():
        for path in sorted(SHARED_CHEST.glob("*.dcm")):
            tissue = decode_file(path).images[0].model_pixels[::4, ::4] >= AIR_GREY
            labels, _ = ndimage.label(tissue)
            masks += [tissue, labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1]  # all of it; the body
    for mask in masks:
        assert np.array_equal(filled_holes(mask), ndimage.binary_fill_holes(mask))
