"""Similarity answers as QIDO-RS does them (PS3.18 Annex F): ``application/dicom+json``.

One object per hit at the answer's level with the usual study / series / instance
attributes, built with pydicom. The rank, the distance and the strategy travel in
a private block, creator ``ORTHANC-CBIR`` in group 0x0011:

- (0011,xx01) IS: rank (1 = most similar)
- (0011,xx02) DS: distance (feature distance, or weighted Hamming distance for ``multilateral``)
- (0011,xx03) LO: strategy

No patient identifier is ever included: the index does not store one.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "ORTHANC-CBIR"

_ALWAYS = {
    "study": ("StudyInstanceUID", "StudyDate"),
    "series": ("StudyInstanceUID", "SeriesInstanceUID", "Modality"),
    "instance": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"),
}
OPTIONAL = ("StudyDate", "StudyDescription", "SeriesDescription", "BodyPartExamined", "Manufacturer", "PatientSex")
"""What ``includefield`` may add (``all`` adds every one)."""

_FROM_RECORD = {
    "StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
    "SOPInstanceUID": "sop_instance_uid", "SOPClassUID": "sop_class_uid", "Modality": "modality",
    "StudyDescription": "study_description", "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part_examined", "Manufacturer": "manufacturer", "PatientSex": "patient_sex",
}  # fmt: skip


def included_fields(includefield: str | None) -> tuple[str, ...]:
    """The optional attributes an ``includefield`` value asks for, each by keyword or by tag
    number (PS3.18 8.3.4.3: ``StudyDescription`` or ``00081030``); unknown ones are ignored, as
    QIDO-RS ignores attributes it does not hold.

    >>> included_fields("00081030,Manufacturer,nonsense")
    ('StudyDescription', 'Manufacturer')
    """
    if not includefield:
        return ()
    asked = {_keyword(part.strip()) for part in includefield.split(",")}
    return OPTIONAL if "all" in asked else tuple(name for name in OPTIONAL if name in asked)


def _keyword(field: str) -> str:
    """The keyword of a tag number (``00081030``), or ``field`` itself."""
    if len(field) == 8 and all(c in "0123456789abcdefABCDEF" for c in field):
        return keyword_for_tag(int(field, 16)) or field
    return field


def hit_dataset(level: str, rank: int, distance: float, strategy: str, metadata: dict[str, Any],
                extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """One hit as a DICOM JSON object."""
    ds = Dataset()
    for keyword in dict.fromkeys(_ALWAYS[level] + extra):
        if keyword == "StudyDate":
            value = (metadata.get("study_date") or "").replace("-", "")
        else:
            value = metadata.get(_FROM_RECORD[keyword])
        if value:
            setattr(ds, keyword, value)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "IS", rank)
    block.add_new(0x02, "DS", f"{distance:.6g}")
    block.add_new(0x03, "LO", strategy)
    return ds.to_json_dict()
