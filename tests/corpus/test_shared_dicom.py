"""Every file of ../shared/data/dicom ends as an image of the right shape or a named rejection.

MANIFEST.tsv records, per file, its geometry and whether pydicom + pylibjpeg
decoded it when the folder was assembled. The pixel step must do at least as well:
files marked ``NO:...`` there have a maintained decoder here (DCMTK for 12-bit
JPEG, an inferred transfer syntax for files without meta) and must decode too.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from orthanc_cbir.dicom import DecodedInstance, Rejection, RejectionReason, decode_instance

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
MANIFEST = SHARED_DICOM / "MANIFEST.tsv"
# Objects whose pixel data is not an image to retrieve by: a rejection is the right outcome.
NOT_IMAGES_WITH_PIXELS = {"Segmentation Storage", "RT Dose Storage"}

pytestmark = pytest.mark.skipif(
    not MANIFEST.exists(),
    reason=f"the shared DICOM corpus is absent ({MANIFEST} not found): a fresh clone without ../shared",
)


def manifest_rows() -> list[dict[str, str]]:
    if not MANIFEST.exists():
        return []
    with MANIFEST.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.parametrize("row", manifest_rows(), ids=lambda row: row["path"])
def test_file_ends_as_the_outcome_its_manifest_row_implies(row):
    outcome = decode_instance(SHARED_DICOM / row["path"])
    expected_image = row["decodes_pydicom_pylibjpeg"] != "n/a" and row["sop_class"] not in NOT_IMAGES_WITH_PIXELS
    if not expected_image:
        assert isinstance(outcome, Rejection), f"expected a rejection, got {outcome}"
        assert outcome.reason is RejectionReason.NOT_AN_IMAGE
        assert outcome.detail
        return
    assert isinstance(outcome, DecodedInstance), f"expected an image, got: {outcome}"
    image = outcome.images[0]
    assert image.pixels.shape == (int(row["rows"]), int(row["cols"]))
    assert image.pixels.dtype == np.float32
    assert 0.0 <= float(image.pixels.min()) <= float(image.pixels.max()) <= 1.0
    assert outcome.number_of_frames == int(row["frames"] or 1)
    assert outcome.metadata.sop_instance_uid


WG04 = SHARED_DICOM / "single" / "nema_wg04"
LOSSLESS = ("J2KR", "JLSL", "JPLL", "RLE")


def lossless_pairs() -> list[tuple[Path, Path]]:
    """(original, lossless encoding of it) for every NEMA WG-04 image that has both."""
    if not WG04.exists():
        return []
    pairs = []
    for reference in sorted((WG04 / "REF").glob("*_UNC")):
        stem = reference.name.removesuffix("_UNC")
        pairs += [
            (reference, WG04 / kind / f"{stem}_{kind}")
            for kind in LOSSLESS
            if (WG04 / kind / f"{stem}_{kind}").exists()
        ]
    return pairs


@pytest.mark.parametrize(("reference", "encoded"), lossless_pairs(), ids=lambda p: p.name)
def test_lossless_encoding_decodes_to_the_pixels_of_its_original(reference, encoded):
    original, copy = decode_instance(reference), decode_instance(encoded)
    assert isinstance(original, DecodedInstance) and isinstance(copy, DecodedInstance), f"{original} / {copy}"
    np.testing.assert_allclose(copy.images[0].pixels, original.images[0].pixels, atol=1 / 255)
