"""The class labels a search uses: the file's own word first, the model's heads after.

The ``modality`` and ``region`` label heads were trained on MedNIST pictures and misname
real DICOM (a CT slice called MR). Where the file says what it is, its DICOM Modality and
BodyPartExamined decide the label of the ``class`` strategy and of the ``modality`` /
``region`` sub-codes of ``multilateral``; the model's predicted class only fills what the
file does not say (no such attribute, or a value this module cannot map to one of the
model's label names, e.g. Modality ``US`` or BodyPartExamined ``EXTREMITY``).

The maps name labels, not class numbers: a model whose card has no such label name
(or no such head) simply gets the model's word. Indexed rows need no new stored field:
the ``modality`` and ``body_part`` attribute columns already hold
:func:`~orthanc_cbir.index.schema.category_hash` of the file's values, and the maps are
looked up by those hashes.

>>> file_label("modality", "DX"), file_label("region", "THORAX"), file_label("region", "EXTREMITY")
('XR', 'chest', None)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from ..index.schema import NO_CLASS, category_hash

MODALITY_LABELS: dict[str, str] = {
    "CT": "CT",
    "MR": "MR",
    # projection X-ray: computed / digital radiography, the retired RG and DR, mammography,
    # panoramic and intra-oral dental X-ray, angiography and fluoroscopy
    **dict.fromkeys(("CR", "DX", "DR", "XR", "RG", "MG", "PX", "IO", "XA", "RF"), "XR"),
}
"""DICOM Modality -> the model's ``modality`` label name (model card: CT, MR, XR)."""

REGION_LABELS: dict[str, str] = {
    **dict.fromkeys(("CHEST", "LUNG", "LUNGS", "THORAX", "HEART", "RIB", "RIBS", "STERNUM", "MEDIASTINUM",
                     "CHEST_LUNG", "THORAXCHEST"), "chest"),  # fmt: skip
    **dict.fromkeys(("ABDOMEN", "PELVIS", "ABDOMENPELVIS", "ABDOMEN_PELVIS", "ABDOMEN PELVIS", "ABDOMEN-PELVIS",
                     "LIVER", "KIDNEY", "KIDNEYS", "PANCREAS", "SPLEEN", "STOMACH", "GALLBLADDER", "COLON", "BOWEL",
                     "BLADDER", "PROSTATE", "ADRENAL", "UTERUS", "OVARY", "RECTUM"), "abdomen"),  # fmt: skip
    **dict.fromkeys(("HEAD", "BRAIN", "SKULL", "BRAIN_HEAD", "HEAD_BRAIN", "FACE", "ORBIT", "SELLA", "IAC",
                     "TEMPORALBONE", "SINUS", "SINUSES"), "head"),  # fmt: skip
    "BREAST": "breast",
    **dict.fromkeys(("HAND", "FINGER", "FINGERS", "THUMB"), "hand"),
}
"""BodyPartExamined (upper case) -> the model's ``region`` label name (model card: abdomen,
breast, chest, hand, head). Values spanning two regions (CHESTABDOMEN, HEADNECK, WHOLEBODY)
and regions the model has no label for (EXTREMITY, SPINE, KNEE) are left to the model."""

FILE_MAPS: dict[str, dict[str, str]] = {"modality": MODALITY_LABELS, "region": REGION_LABELS}
"""Label head -> map of the file's values to label names."""
FILE_COLUMNS: dict[str, str] = {"modality": "modality", "region": "body_part"}
"""Label head -> the attribute column (:data:`~orthanc_cbir.index.schema.ATTRIBUTES`) holding the file's value."""

FILE, MODEL = "file", "model"


def file_label(head: str, value: str | None) -> str | None:
    """The label name the file's value gives ``head`` (``None``: the file does not say)."""
    if not value or head not in FILE_MAPS:
        return None
    return FILE_MAPS[head].get(value.strip().upper())  # as category_hash normalises: rows and queries agree


class LabelMap:
    """The label names of one model (its card's ``labels``) and the file values that map to them."""

    def __init__(self, labels: Mapping[str, Sequence[str]]):
        self.labels = {head: tuple(names) for head, names in labels.items()}
        self._hashes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for head, names in self.labels.items():
            table = {category_hash(value): names.index(label) for value, label in FILE_MAPS.get(head, {}).items()
                     if label in names}  # fmt: skip
            keys = np.array(sorted(table), dtype=np.uint32)
            self._hashes[head] = (keys, np.array([table[k] for k in keys], dtype=np.uint8))

    def file_class(self, head: str, value: str | None) -> int | None:
        """The class number the file's value gives ``head`` in this model, or ``None``."""
        name = file_label(head, value)
        names = self.labels.get(head, ())
        return names.index(name) if name in names else None

    def query_class(
        self, head: str, value: str | None, probabilities: Mapping[str, np.ndarray]
    ) -> tuple[int | None, str]:
        """A query's class for ``head`` and its source: the file's value, else the argmax of the
        model's probabilities, else ``(None, "model")`` (no such head)."""
        number = self.file_class(head, value)
        if number is not None:
            return number, FILE
        p = probabilities.get(head)
        return (None if p is None or len(p) == 0 else int(np.argmax(p))), MODEL

    def row_classes(self, head: str, attributes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """For every row: its class for ``head`` (uint8, :data:`NO_CLASS` when neither the file nor
        the model says) and whether the file gave it (bool)."""
        predicted = attributes[f"predicted_{head}"]
        keys, classes = self._hashes.get(head, (np.zeros(0, np.uint32), np.zeros(0, np.uint8)))
        column = FILE_COLUMNS.get(head)
        if column is None or not len(keys):
            return predicted, np.zeros(len(predicted), bool)
        values = attributes[column]
        where = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
        from_file = (np.take(keys, where) == values) & (values != 0)
        return np.where(from_file, np.take(classes, where), predicted).astype(np.uint8), from_file

    def describe(self, metadata: Mapping, probabilities: Mapping[str, Sequence[float] | np.ndarray]) -> dict[str, dict]:
        """A stored instance's labels as a hit shows them: ``{head: {"value": name, "source":
        "file" | "model"}}`` for every head of the model (``value`` ``None`` when neither says)."""
        values = {"modality": metadata.get("modality"), "region": metadata.get("body_part_examined")}
        arrays = {h: np.asarray(p) for h, p in probabilities.items()}
        out = {}
        for head, names in self.labels.items():
            number, source = self.query_class(head, values.get(head), arrays)
            out[head] = {"value": names[number] if number is not None and number < len(names) else None,
                         "source": source}  # fmt: skip
        return out


def upload_header(body: bytes) -> tuple[str | None, str | None]:
    """Modality and BodyPartExamined of an uploaded query when it is DICOM (``(None, None)``
    for a PNG, a JPEG or anything unreadable); reads the header only, never the pixels."""
    if body[:8] == b"\x89PNG\r\n\x1a\n" or body[:3] == b"\xff\xd8\xff":
        return None, None
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True, force=True,
                             specific_tags=["Modality", "BodyPartExamined"])  # fmt: skip
        modality, body_part = (str(ds.get(k) or "").strip() or None for k in ("Modality", "BodyPartExamined"))
    except Exception:  # noqa: BLE001 - a header pydicom cannot read says nothing
        return None, None
    return modality, (body_part.upper() if body_part else None)


__all__ = ["FILE", "MODEL", "MODALITY_LABELS", "NO_CLASS", "REGION_LABELS", "LabelMap", "file_label", "upload_header"]
