"""Real-anatomy readers for training and validation (training.anatomy), on a CT volume the test builds."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_cbir.dicom.pixels import CT_MODEL_MAPPING
from orthanc_cbir.training.anatomy import MIN_REFORMAT_MM, REFORMAT_FRACTIONS, VolumeSource, read_volume
from orthanc_cbir.training.data import AUX_LABELS
from tests import dicom_factory as factory


def write_volume(folder, slices: int, spacing_mm: float, feet_first: bool = False) -> None:
    """Axial slices whose HU grows towards the head (bone up top), written in a shuffled order;
    ``feet_first`` flips the slice normal, as some scanners write it."""
    order = np.random.default_rng(0).permutation(slices)
    for k in order:
        z = -500.0 + k * spacing_mm
        hu = int(-1000 + 2000 * k / (slices - 1))
        orientation = [1, 0, 0, 0, -1, 0] if feet_first else [1, 0, 0, 0, 1, 0]
        ds = factory.grey_image(np.full((32, 32), hu + 2048, dtype=np.uint16), RescaleSlope=1, RescaleIntercept=-2048,
                                WindowCenter=40, WindowWidth=400, ImageOrientationPatient=orientation,
                                ImagePositionPatient=[0, 0, z], PixelSpacing=[2.0, 2.0])  # fmt: skip
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


@pytest.mark.parametrize("feet_first", [False, True])
def test_axial_slices_come_ordered_towards_the_head_with_their_level_in_mm(tmp_path, feet_first):
    write_volume(tmp_path, slices=30, spacing_mm=5.0, feet_first=feet_first)
    volume = read_volume(VolumeSource(tmp_path, "CT", "chest", "p1"), group=7)
    axial = np.flatnonzero(volume.aux["plane"] == AUX_LABELS["plane"].index("axial"))
    levels = volume.aux["level"][axial]
    np.testing.assert_allclose(levels, -500.0 + 5.0 * np.arange(30))
    # the model's picture, not the file's 40/400 window: the fixed HU mapping
    brightness = volume.images[axial].mean(axis=(1, 2)) / 255.0
    expected = np.interp(-1000 + 2000 * np.arange(30) / 29, *zip(*CT_MODEL_MAPPING, strict=True))
    np.testing.assert_allclose(brightness, expected, atol=0.01)
    assert (volume.group == 7).all() and (volume.labels["region"] >= 0).all()


def test_reformats_run_from_the_head_down_and_carry_no_level(tmp_path):
    write_volume(tmp_path, slices=30, spacing_mm=5.0)  # 145 mm: enough for reformats
    volume = read_volume(VolumeSource(tmp_path, "CT", "chest", "p1"), group=0)
    for plane in ("coronal", "sagittal"):
        rows = np.flatnonzero(volume.aux["plane"] == AUX_LABELS["plane"].index(plane))
        assert len(rows) == len(REFORMAT_FRACTIONS) and np.isnan(volume.aux["level"][rows]).all()
        picture = volume.images[rows[0]].astype(float)
        filled = picture[picture.sum(axis=1) > 0]
        assert filled[0].mean() > filled[-1].mean()  # the head (bright here) at the top, as a viewer shows it


def test_a_thin_volume_gives_no_reformat(tmp_path):
    write_volume(tmp_path, slices=10, spacing_mm=MIN_REFORMAT_MM / 20)
    volume = read_volume(VolumeSource(tmp_path, "CT", "abdomen", "p1"), group=0)
    assert (volume.aux["plane"] == AUX_LABELS["plane"].index("axial")).all()
