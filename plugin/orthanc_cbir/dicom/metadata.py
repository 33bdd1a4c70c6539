"""The metadata of one DICOM instance as one typed record.

The record holds what retrieval filters and answers need (UIDs, modality, body
part, sex, age, dates, geometry). It never holds the patient's name or ID: the
one patient field is :attr:`InstanceMetadata.patient_key`, a keyed one-way hash
(:func:`patient_key`) that lets a query exclude the same patient without storing
who the patient is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, overload

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

AXIAL_TILT_DEGREES = 30.0
"""A slice whose normal lies within this of the body axis is axial (gantry tilts are well under it)."""

_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


@dataclass(frozen=True)
class InstanceMetadata:
    """What the index keeps about an instance besides its pixels."""

    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    body_part_examined: str | None
    study_description: str | None
    series_description: str | None
    patient_sex: str | None
    """``M``, ``F`` or ``O``; ``None`` when absent or not one of those."""
    patient_age_years: float | None
    """From PatientAge (``045Y``, ``006M``...), else BirthDate to StudyDate."""
    study_date: dt.date | None
    manufacturer: str | None
    rows: int | None
    columns: int | None
    number_of_frames: int
    pixel_spacing_mm: tuple[float, float] | None
    """Row and column spacing: PixelSpacing, else ImagerPixelSpacing."""
    slice_location: float | None
    image_position_patient: tuple[float, float, float] | None
    patient_key: str | None
    """SHA-256 (16 hex digits) of issuer and PatientID: equal for the same patient,
    useless for finding out who the patient is."""
    image_orientation_patient: tuple[float, float, float, float, float, float] | None = None
    """Direction cosines of the rows and columns (last: entries written before it read ``None``)."""

    @property
    def axial_position_mm(self) -> float | None:
        """Where an axial slice lies along the body axis (mm, growing towards the head: the patient
        z of ImagePositionPatient); ``None`` unless both position and orientation say the slice is
        within :data:`AXIAL_TILT_DEGREES` of axial (a coronal or sagittal image has no one level)."""
        if self.image_position_patient is None or self.image_orientation_patient is None:
            return None
        row, column = np.array(self.image_orientation_patient[:3]), np.array(self.image_orientation_patient[3:])
        normal = np.cross(row, column)
        length = float(np.linalg.norm(normal))
        if not np.isfinite(length) or length < 1e-6:
            return None
        if abs(normal[2]) / length < math.cos(math.radians(AXIAL_TILT_DEGREES)):
            return None
        position = float(self.image_position_patient[2])
        return position if math.isfinite(position) else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the date as ``YYYY-MM-DD``, tuples as lists)."""
        record = asdict(self)
        record["study_date"] = self.study_date.isoformat() if self.study_date else None
        for name in ("pixel_spacing_mm", "image_position_patient", "image_orientation_patient"):
            if record[name] is not None:
                record[name] = list(record[name])
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> InstanceMetadata:
        """:meth:`to_json` back; a field the record lacks (written before it existed) is ``None``."""
        return cls.from_values([record.get(name) for name in cls.__dataclass_fields__])

    @classmethod
    def from_values(cls, values: list[Any]) -> InstanceMetadata:
        """:meth:`to_json`'s values back, in the order of the fields (``values`` is changed); fields
        past its end (written before they existed) are ``None``. Positional: an index entry's
        metadata is read with each hit of an answer."""
        values += [None] * (len(_FIELDS) - len(values))
        values[_STUDY_DATE] = dt.date.fromisoformat(values[_STUDY_DATE]) if values[_STUDY_DATE] else None
        values[_FRAMES] = values[_FRAMES] or 1
        for at in _TUPLES:
            if values[at] is not None:
                values[at] = tuple(values[at])
        return cls(*values)


_FIELDS = tuple(InstanceMetadata.__dataclass_fields__)
_STUDY_DATE, _FRAMES = _FIELDS.index("study_date"), _FIELDS.index("number_of_frames")
_TUPLES = tuple(_FIELDS.index(name) for name in ("pixel_spacing_mm", "image_position_patient",
                                                  "image_orientation_patient"))  # fmt: skip


def extract_metadata(ds: Dataset) -> InstanceMetadata:
    """Read the :class:`InstanceMetadata` of a dataset; absent or malformed values become ``None``."""
    study_date = parse_da(element_text(ds, "StudyDate"))
    return InstanceMetadata(
        sop_instance_uid=element_text(ds, "SOPInstanceUID"),
        series_instance_uid=element_text(ds, "SeriesInstanceUID"),
        study_instance_uid=element_text(ds, "StudyInstanceUID"),
        sop_class_uid=element_text(ds, "SOPClassUID") or _meta_text(ds, "MediaStorageSOPClassUID"),
        modality=element_text(ds, "Modality"),
        body_part_examined=_upper(element_text(ds, "BodyPartExamined")),
        study_description=element_text(ds, "StudyDescription"),
        series_description=element_text(ds, "SeriesDescription"),
        patient_sex=_sex(element_text(ds, "PatientSex")),
        patient_age_years=_age_years(ds, study_date),
        study_date=study_date,
        manufacturer=element_text(ds, "Manufacturer"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=max(_int(ds, "NumberOfFrames") or 1, 1),
        pixel_spacing_mm=_floats(ds, "PixelSpacing", 2) or _floats(ds, "ImagerPixelSpacing", 2),
        slice_location=_float(ds, "SliceLocation"),
        image_position_patient=_floats(ds, "ImagePositionPatient", 3),
        patient_key=_patient_key(ds),
        image_orientation_patient=_floats(ds, "ImageOrientationPatient", 6),
    )


def looks_like_uid(identifier: str) -> bool:
    """Whether an identifier is a DICOM UID (digits and dots) rather than an Orthanc id (hex and dashes).

    >>> looks_like_uid("1.2.840.113619.2.55"), looks_like_uid("0a9b0c2d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8a9b")
    (True, False)
    """
    return "." in identifier and all(part.isdigit() for part in identifier.split("."))


def parse_age(value: str | None) -> float | None:
    """Years from a DICOM AS value (``045Y``, ``006M``, ``003W``, ``010D``); ``None`` if malformed."""
    if not value:
        return None
    value = value.strip().upper()
    number, unit = value[:-1], value[-1:]
    if unit not in _AGE_UNIT_YEARS or not number.isdigit():
        return None
    return round(int(number) * _AGE_UNIT_YEARS[unit], 3)


def parse_da(value: str | None) -> dt.date | None:
    """A date from a DICOM DA value (``YYYYMMDD``, or the old ``YYYY.MM.DD``); ``None`` if malformed."""
    if not value:
        return None
    digits = value.strip().replace(".", "")
    try:
        return dt.datetime.strptime(digits[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _age_years(ds: Dataset, study_date: dt.date | None) -> float | None:
    age = parse_age(element_text(ds, "PatientAge"))
    if age is not None:
        return age
    birth = parse_da(element_text(ds, "PatientBirthDate"))
    if birth is None or study_date is None or study_date < birth:
        return None
    return round((study_date - birth).days / 365.25, 3)


PATIENT_KEY_VARIABLE = "CBIR_PATIENT_KEY_SECRET"
_BUILT_IN_KEY = b"orthanc-cbir patient key: set patient_key_secret"
_secret: list[bytes] = []
"""The key of this process, once known (:func:`use_patient_key_secret`, else the environment)."""


def use_patient_key_secret(secret: str | None) -> None:
    """Make ``secret`` (``Settings.patient_key_secret``) the key of every patient key this process
    computes; ``None`` goes back to the ``CBIR_PATIENT_KEY_SECRET`` variable, read on next use."""
    _secret.clear()
    if secret is not None:
        _secret.append(secret.encode() or _BUILT_IN_KEY)


def patient_key(patient_id: str | None, issuer: str | None = None) -> str | None:
    """The index's key of a patient: an HMAC-SHA-256 of issuer and PatientID, 64 bits in hex.

    Keyed, so that the index alone does not give the ID back: an unkeyed hash of a 7-digit MRN
    is reversed by trying all ten million. The key is the ``patient_key_secret`` setting, kept
    out of Redis; every process of a deployment (workers, ``serve``, the CLI) must have the same
    one, or ``exclude=same-patient`` stops matching. Workers and the CLI read it from the
    ``CBIR_PATIENT_KEY_SECRET`` variable (the setting's) unless :func:`use_patient_key_secret`
    was called; empty means a built-in key, which does not protect the IDs.
    """
    if not patient_id:
        return None
    if not _secret:
        from ..config import load_settings  # the setting as every process reads it (config imports nothing of ours)

        secret = os.environ.get(PATIENT_KEY_VARIABLE)
        variable = {PATIENT_KEY_VARIABLE: secret} if secret is not None else {}
        use_patient_key_secret(load_settings(env=variable).patient_key_secret)
    message = f"{issuer or ''}\x00{patient_id}".encode()
    return hmac.new(_secret[0], message, hashlib.sha256).hexdigest()[:16]


def _patient_key(ds: Dataset) -> str | None:
    return patient_key(element_text(ds, "PatientID"), element_text(ds, "IssuerOfPatientID"))


def _sex(value: str | None) -> str | None:
    value = (value or "").strip().upper()
    return value if value in {"M", "F", "O"} else None


def _upper(value: str | None) -> str | None:
    return value.upper() if value else None


def _raw(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element must not cost the whole record
        return None


def element_text(ds: Dataset, keyword: str) -> str | None:
    """An element's value as text without its padding (the first of several), ``None`` where it is
    absent, empty or malformed."""
    value = _raw(ds, keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else ""
    text = str(value).strip().strip("\x00")
    return text or None


def _meta_text(ds: Dataset, keyword: str) -> str | None:
    meta = getattr(ds, "file_meta", None)
    return element_text(meta, keyword) if meta is not None else None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _raw(ds, keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = _raw(ds, keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@overload
def _floats(ds: Dataset, keyword: str, count: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(ds: Dataset, keyword: str, count: Literal[3]) -> tuple[float, float, float] | None: ...
@overload
def _floats(ds: Dataset, keyword: str, count: Literal[6]) -> tuple[float, float, float, float, float, float] | None: ...
def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = _raw(ds, keyword)
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None
