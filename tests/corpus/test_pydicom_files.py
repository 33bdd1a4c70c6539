"""The files that the pydicom and pydicom-data packages install: each ends as an image or a
named rejection, and nothing pydicom itself can decode is rejected for its pixels."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from orthanc_cbir.dicom import DecodedInstance, Rejection, RejectionReason, decode_instance

PIXEL_REASONS = {RejectionReason.NO_DECODER, RejectionReason.CORRUPT_PIXEL_DATA, RejectionReason.UNSUPPORTED_IMAGE}


def installed_test_files() -> list[Path]:
    paths = (Path(p) for p in get_testdata_files())
    return sorted(p for p in paths if p.is_file() and p.suffix not in {".txt", ".json", ".py", ".md", ".gz", ".zip"})


def pydicom_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, force=True).pixel_array.size > 0
        except Exception:  # noqa: BLE001 - pydicom raises many kinds on a file it cannot decode
            return False


def test_the_packages_install_enough_files_to_mean_something():
    assert len(installed_test_files()) > 200


@pytest.mark.parametrize("path", installed_test_files(), ids=lambda p: p.name)
def test_installed_file_ends_as_image_or_named_rejection(path):
    outcome = decode_instance(path)
    assert isinstance(outcome, (DecodedInstance, Rejection))
    if isinstance(outcome, Rejection):
        assert outcome.detail
        if outcome.reason in PIXEL_REASONS:
            assert not pydicom_decodes(path), f"pydicom decodes what we rejected: {outcome}"
    else:
        assert all(0.0 <= image.pixels.min() <= image.pixels.max() <= 1.0 for image in outcome.images)
