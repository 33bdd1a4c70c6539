"""A hit as the JSON answers show it (the HTTP routes, ``orthanc-cbir query --json``)."""

from __future__ import annotations

from typing import Any

from ..index.schema import StoredEntry
from ..search.strategies import Hit


def patient_relation(query_patient_key: str | None, hit_patient_key: str | None) -> str | None:
    """``"this patient"`` or ``"another patient"`` (the query's), from the one-way patient keys;
    ``None`` when either is unknown. A reader sees whose image a hit is, never who."""
    if not query_patient_key or not hit_patient_key:
        return None
    return "this patient" if query_patient_key == hit_patient_key else "another patient"


def hit_json(hit: Hit, strategy: str, query_patient_key: str | None = None) -> dict[str, Any]:
    """One hit as the HTTP answer shows it (DESIGN: UIDs, Orthanc ids, distance, key metadata, thumbnail,
    and whether it is the query's patient)."""
    entry = hit.entry
    meta = entry.metadata if entry is not None else None
    orthanc = entry.orthanc if entry is not None else {}
    return {
        "rank": hit.rank, "distance": hit.distance, "strategy": strategy, "instances": hit.instances,
        "StudyInstanceUID": meta and meta.study_instance_uid, "SeriesInstanceUID": meta and meta.series_instance_uid,
        "SOPInstanceUID": meta.sop_instance_uid if meta else hit.sop_instance_uid, "orthanc": orthanc,
        "Modality": meta and meta.modality, "BodyPartExamined": meta and meta.body_part_examined,
        "StudyDate": meta.study_date.isoformat() if meta and meta.study_date else None,
        "StudyDescription": meta and meta.study_description,
        "SeriesDescription": meta and meta.series_description, "PatientSex": meta and meta.patient_sex,
        "PatientAgeYears": meta and meta.patient_age_years,
        "patient": patient_relation(query_patient_key, meta.patient_key if meta else None),
        "labels": hit.labels if entry is not None else None,
        "copies": [copy_json(copy.entry, copy.distance) for copy in hit.copies],
        **({"region": {"box": list(hit.region)}} if hit.region is not None else {}),
        "thumbnail": f"/cbir/instances/{orthanc['instance']}/thumbnail" if orthanc.get("instance") else None,
    }  # fmt: skip


def copy_json(entry: StoredEntry, distance: float) -> dict[str, Any]:
    """A copy as a hit lists it: its UIDs, Orthanc ids and distance to the query."""
    meta = entry.metadata
    return {"SOPInstanceUID": meta.sop_instance_uid, "SeriesInstanceUID": meta.series_instance_uid,
            "StudyInstanceUID": meta.study_instance_uid, "orthanc": entry.orthanc, "distance": distance}  # fmt: skip
