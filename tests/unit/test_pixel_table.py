"""The grey pipeline's value table: a frame mapped once per stored value, then indexed, gives the
pictures of the same frame mapped pixel by pixel, bit for bit, whatever its rules."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from orthanc_cbir.dicom import DecodedInstance, decode_dataset, pixels
from tests import dicom_factory as factory

RNG = np.random.default_rng(7)
# 64 x 64 pixels of at most 1,500 values: the table is taken (fewer values than half the pixels)
CT_STORED = RNG.integers(0, 1500, (64, 64)).astype(np.uint16)
SIGNED = RNG.integers(-1000, 500, (64, 64)).astype(np.int16)


def modality_lut_sequence() -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [1024, 10, 16]  # stored values under 10 and over 1033 clip to the ends
    item.ModalityLUTType = "HU"
    item.LUTData = list(RNG.integers(0, 4096, 1024))
    return Sequence([item])


CASES: dict[str, tuple[np.ndarray, dict[str, Any]]] = {
    "CT, file window": (CT_STORED, {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": -600,
                                    "WindowWidth": 1500}),
    "CT, LINEAR_EXACT window": (CT_STORED, {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40,
                                            "WindowWidth": 400, "VOILUTFunction": "LINEAR_EXACT"}),
    "CT, window of width 1": (CT_STORED, {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": -500,
                                          "WindowWidth": 1}),
    "CT, body part default": (CT_STORED, {"RescaleSlope": 1, "RescaleIntercept": -1024, "BodyPartExamined": "CHEST"}),
    "CT, signed with a fractional rescale": (SIGNED, {"RescaleSlope": 0.37, "RescaleIntercept": -3.25}),
    "CT, Presentation LUT INVERSE": (CT_STORED, {"RescaleSlope": 1, "RescaleIntercept": -1024,
                                                 "PresentationLUTShape": "INVERSE"}),
    "MR, SIGMOID window": (CT_STORED, {"modality": "MR", "sop_class": factory.MR_IMAGE, "WindowCenter": 700,
                                       "WindowWidth": 300, "VOILUTFunction": "SIGMOID"}),
    "MR, no window (percentiles)": (CT_STORED, {"modality": "MR", "sop_class": factory.MR_IMAGE}),
    "MR, 8-bit": (CT_STORED.astype(np.uint8), {"modality": "MR", "sop_class": factory.MR_IMAGE}),
    "CR, MONOCHROME1": (CT_STORED, {"modality": "CR", "sop_class": factory.CR_IMAGE, "photometric": "MONOCHROME1",
                                    "WindowCenter": 800, "WindowWidth": 900}),
    "CT, modality LUT sequence": (CT_STORED, {"ModalityLUTSequence": modality_lut_sequence(), "WindowCenter": 2000,
                                              "WindowWidth": 3000}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_the_value_table_gives_the_pictures_of_the_pixel_by_pixel_mapping(case, monkeypatch):
    stored, attributes = CASES[case]
    ds = factory.grey_image(stored, **attributes)
    real, tables = pixels._table_range, []

    def recorded(raw: np.ndarray, view: Dataset) -> tuple[int, int] | None:
        tables.append(real(raw, view))
        return tables[-1]

    monkeypatch.setattr(pixels, "_table_range", recorded)
    tabled = decode_dataset(ds)
    assert tables and tables[0] is not None, "the frame was not mapped as a table"
    monkeypatch.setattr(pixels, "_table_range", lambda raw, view: None)
    whole = decode_dataset(ds)

    assert isinstance(tabled, DecodedInstance) and isinstance(whole, DecodedInstance)
    for ours, theirs in zip(tabled.images, whole.images, strict=True):
        for name in ("pixels", "model_pixels"):
            mine, other = getattr(ours, name), getattr(theirs, name)
            assert mine.dtype == other.dtype == np.float32 and mine.shape == other.shape
            assert mine.tobytes() == other.tobytes(), f"{name} differ"
        assert (ours.decisions, ours.hounsfield) == (theirs.decisions, theirs.hounsfield)


def test_the_displayed_picture_is_made_when_first_read_not_for_indexing(monkeypatch):
    """Indexing reads only the model's picture: decoding a CT slice, holding it in the worker's
    embedding batch and embedding it makes no displayed picture (a lookup over every pixel);
    reading ``pixels`` makes it once, the same as at once."""
    made = []
    real = pixels.TablePicture.made
    monkeypatch.setattr(pixels.TablePicture, "made", lambda self: made.append(1) or real(self))
    from orthanc_cbir.ingest.pipeline import EmbeddingBatch
    from orthanc_cbir.model.embedder import Embedder

    stored, attributes = CASES["CT, file window"]
    decoded = decode_dataset(factory.grey_image(stored, **attributes))
    assert isinstance(decoded, DecodedInstance)
    batch: EmbeddingBatch[str] = EmbeddingBatch(Embedder(), max_instances=2)
    batch.add("slice", decoded)
    assert not batch.full and len(batch.embed()) == 1
    assert made == []
    image = decoded.images[0]
    first, again = image.pixels, image.pixels
    assert len(made) == 1 and first is again
    monkeypatch.setattr(pixels, "_table_range", lambda raw, view: None)
    whole = decode_dataset(factory.grey_image(stored, **attributes))
    assert isinstance(whole, DecodedInstance) and first.tobytes() == whole.images[0].pixels.tobytes()


def test_decoding_leaves_the_files_own_attributes_as_they_were():
    """The pixel step sets the rescale on its own view of a frame's attributes (an empty slope reads
    as 1): the dataset it was handed, which the worker reads Orthanc's ids from, keeps its own."""
    ds = factory.grey_image(CT_STORED, RescaleSlope="", RescaleIntercept="-1024")
    assert isinstance(decode_dataset(ds), DecodedInstance)
    assert ds["RescaleSlope"].value in ("", None) and ds["RescaleSlope"].VR == "DS"
