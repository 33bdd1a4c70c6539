"""Lung apex and base (training.landmarks): on a chest the test builds, and on the shared real chest CT
against the positions annotated by eye for the cross-patient level measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orthanc_cbir.dicom.pixels import CT_MODEL_MAPPING
from orthanc_cbir.evaluation.model_report import LANDMARKS
from orthanc_cbir.model.lung_extent import LUNG_SPAN_MM, LungLandmarks
from orthanc_cbir.training.anatomy import load_volume
from orthanc_cbir.training.landmarks import lung_landmarks

SLICE_MM, PIXEL_MM = 2.5, 3.0
SHARED_CHEST = (
    Path(__file__).parents[2] / ".." / "shared/data/dicom/series/lung_pet_ct_dx/Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"
)


def grey(hu: float) -> float:
    return float(np.interp(hu, *zip(*CT_MODEL_MAPPING, strict=True)))


def chest(slices: int = 100, lung_centre: int = 50, lung_half_height: int = 30) -> np.ndarray:
    """A body (soft tissue) in air holding two air-filled lungs, a windpipe on the midline that joins
    them through a bronchus and runs up through the top slice, and a gas bubble below the lungs."""
    z, y, x = np.mgrid[:slices, :128, :128].astype(float)
    volume = np.full(z.shape, grey(-1000.0), dtype=np.float32)
    volume[(y - 64) ** 2 + (x - 64) ** 2 <= 50**2] = grey(40.0)
    for side in (-25, 25):
        lung = ((x - 64 - side) / 15) ** 2 + ((y - 64) / 15) ** 2 + ((z - lung_centre) / lung_half_height) ** 2 <= 1
        volume[lung] = grey(-850.0)
    volume[((x - 64) ** 2 + (y - 64) ** 2 <= 4**2) & (z >= lung_centre + 20)] = grey(-1000.0)
    volume[(np.abs(z - lung_centre - 20) <= 1) & (np.abs(y - 64) <= 2) & (np.abs(x - 64) <= 25)] = grey(-1000.0)
    volume[(x - 70) ** 2 + (y - 80) ** 2 + (z - 10) ** 2 <= 6**2] = grey(-1000.0)
    return volume


def z_axis(slices: int) -> np.ndarray:
    return -300.0 + SLICE_MM * np.arange(slices)


def test_the_apex_and_base_are_the_lungs_not_the_windpipe_or_bowel_gas():
    found = lung_landmarks(chest(), z_axis(100), PIXEL_MM, PIXEL_MM)
    # the lungs' tips lie at slices 80 and 20; the windpipe reaches the top slice, the gas bubble slice 4
    assert found.apex_mm == pytest.approx(z_axis(100)[80], abs=2 * SLICE_MM)
    assert found.base_mm == pytest.approx(z_axis(100)[20], abs=2 * SLICE_MM)


def test_lungs_cut_by_the_volume_give_no_landmark_on_that_side():
    cut_at_the_top = chest(slices=70, lung_centre=50)
    found = lung_landmarks(cut_at_the_top, z_axis(70), PIXEL_MM, PIXEL_MM)
    assert found.apex_mm is None and found.base_mm == pytest.approx(z_axis(70)[20], abs=2 * SLICE_MM)


def test_a_volume_without_lungs_has_no_landmarks():
    abdomen = np.full((40, 64, 64), grey(-1000.0), dtype=np.float32)
    abdomen[:, 8:56, 8:56] = grey(40.0)
    abdomen[10:14, 30:34, 20:24] = grey(-1000.0)  # bowel gas
    assert lung_landmarks(abdomen, z_axis(40), PIXEL_MM, PIXEL_MM) == LungLandmarks(None, None)


def test_the_lung_frame_puts_the_apex_at_zero_and_the_base_one_span_below():
    z = np.array([-400.0, -300.0, -200.0, -100.0])
    np.testing.assert_allclose(LungLandmarks(-100.0, -300.0).frame(z),
                               [-1.5 * LUNG_SPAN_MM, -LUNG_SPAN_MM, -0.5 * LUNG_SPAN_MM, 0.0])  # fmt: skip
    np.testing.assert_allclose(LungLandmarks(-100.0, None).frame(z), z + 100.0)
    np.testing.assert_allclose(LungLandmarks(None, -300.0).frame(z), z + 300.0 - LUNG_SPAN_MM)
    assert LungLandmarks(None, None).frame(z) is None
    assert LungLandmarks(-100.0, -150.0).frame(z) is None  # 50 mm: no adult lung


@pytest.mark.skipif(not SHARED_CHEST.is_dir(), reason="../shared data not present")
def test_the_landmarks_of_a_real_chest_ct_agree_with_those_annotated_by_eye():
    volume = load_volume(SHARED_CHEST)
    found = lung_landmarks(volume.grey, volume.z_mm, volume.row_mm, volume.column_mm)
    by_eye = next(entry for entry in json.loads(LANDMARKS.read_text())["series"].values() if "A0001" in entry["name"])
    # two 5 mm slices: the eye looked at a lung window, the detector counts voxels
    assert found.apex_mm == pytest.approx(by_eye["lung_apex_mm"], abs=10.0)
    assert found.base_mm == pytest.approx(by_eye["lung_base_mm"], abs=10.0)


def test_an_axial_slice_is_judged_by_its_anatomy_and_a_reformat_by_its_volume():
    from orthanc_cbir.evaluation.model_report import anatomical_regions

    volume = np.array(["abdomen", "abdomen", "chest", "chest", "abdomen", "chest", "abdomen"])
    z = np.array([-430.0, -500.0, -660.0, -650.0, np.nan, -900.0, -700.0])
    bases = [-460.0, -460.0, -659.0, -659.0, -460.0, "below", "above"]
    # an "abdomen" CT's top slice shows the heart; a chest CT's last slice is liver; reformats keep theirs
    assert anatomical_regions(volume, z, bases).tolist() == ["chest", "abdomen", "abdomen", "chest", "abdomen",
                                                             "chest", "abdomen"]  # fmt: skip


def test_every_volume_of_the_plane_and_region_measure_has_its_lung_base_annotated():
    from orthanc_cbir.training.anatomy import anatomy_volumes

    annotated = json.loads(LANDMARKS.read_text())["lung_base"]["volumes"]
    # the volumes README says to bring (one of extra/SOURCES.json without a base keeps its volume's region)
    measured = {source.path.name for source in anatomy_volumes(Path("anatomy"), Path("series"))
                if source.region in ("chest", "abdomen")}  # fmt: skip
    assert {"lidc0314", "example_ct.nii.gz", "example_ct_dicom"} <= measured <= set(annotated)
    assert all(isinstance(v, float) or v in ("below", "above") for v in annotated.values())
