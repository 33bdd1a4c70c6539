"""A small authenticated client of Orthanc's REST API (what the workers and tests need).

Requests go over kept-alive connections (urllib3's pool, safe to share between threads): a
worker asks Orthanc for the file of every instance it indexes, and opening and closing a TCP
connection for each request was a fifth of a worker's time spent on requests (a profile of
``benchmarks/ingest.py``). An instance's series, study and patient are worked out from its DICOM
identifiers as Orthanc works out their ids (:func:`orthanc_ids`) instead of being asked for:
three requests an instance fewer.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from base64 import b64encode
from typing import Any

import urllib3
from pydicom import Dataset

from ..dicom import element_text
from ..dicom.pixels import Source, read_header
from ..index.schema import ORTHANC_LEVELS, dashed_orthanc_id

DicomIdentifiers = tuple[str, str, str, str]
"""An instance's PatientID, StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID."""


def orthanc_ids(identifiers: DicomIdentifiers) -> dict[str, str]:
    """Orthanc's id of an instance and of its series, study and patient, as Orthanc makes them
    (Orthanc Book, "Orthanc identifiers"): the SHA-1 of the PatientID and, joined to it by ``|``,
    the StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID down to the level, in five groups
    of eight hex digits."""
    ids = {}
    for depth, level in enumerate(reversed(ORTHANC_LEVELS), start=1):  # the patient's first
        ids[level] = dashed_orthanc_id(hashlib.sha1("|".join(identifiers[:depth]).encode()).hexdigest())
    return ids


def dicom_identifiers(source: Source | Dataset) -> DicomIdentifiers | None:
    """The identifiers :func:`orthanc_ids` needs, read from a file's header, or from the dataset
    parsed from it already (``None``: unreadable). They stay here: the PatientID is hashed, never
    kept nor logged (pydicom's warnings quote values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            header = source if isinstance(source, Dataset) else read_header(source)
            patient, study, series, instance = (element_text(header, keyword) or "" for keyword in _IDENTIFIERS)
        except Exception:  # noqa: BLE001 - any unreadable header: Orthanc is asked instead
            return None
    return patient, study, series, instance


_IDENTIFIERS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class OrthancClient:
    """HTTP Basic authenticated requests to one Orthanc."""

    def __init__(self, url: str, username: str = "", password: str = "", timeout_s: float = 30):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._authorization = "Basic " + b64encode(f"{username}:{password}".encode()).decode() if username else None
        # one retry of a connection that fails to open (or a kept one Orthanc closed), none of a request it read
        self._pool = urllib3.PoolManager(maxsize=8, retries=urllib3.Retry(total=1, read=0, redirect=0, status=0))

    def request(self, method: str, path: str, body: bytes | None = None, *, content_type: str | None = None,
                headers: dict[str, str] | None = None,
                timeout_s: float | None = None) -> tuple[int, bytes, str]:  # fmt: skip
        """One request: (status, body, content type). 4xx/5xx do not raise; an unreachable server does (OSError)."""
        headers = dict(headers or {})
        if self._authorization:
            headers["Authorization"] = self._authorization
        if content_type:
            headers["Content-Type"] = content_type
        try:
            response = self._pool.request(method, self.url + path, body=body, headers=headers,
                                          timeout=timeout_s or self.timeout_s)  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out: Orthanc is away
            raise ConnectionError(f"{method} {path}: {type(exc).__name__}") from exc
        return response.status, response.data, response.headers.get("Content-Type", "")

    def get_json(self, path: str, *, timeout_s: float | None = None) -> Any:
        """GET a JSON resource; raises ``ValueError`` on a status other than 200."""
        status, body, _ = self.request("GET", path, timeout_s=timeout_s)
        if status != 200:
            raise ValueError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def instance_file(self, orthanc_id: str) -> bytes | None:
        """The stored DICOM file, or ``None`` when Orthanc no longer has the instance."""
        status, body, _ = self.request("GET", f"/instances/{orthanc_id}/file")
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"GET /instances/{orthanc_id}/file: HTTP {status}")
        return body

    def parents(self, orthanc_id: str, identifiers: DicomIdentifiers | None = None) -> dict[str, str]:
        """Orthanc ids of the instance and its series, study and patient: from the instance's
        ``identifiers`` when they make its id (:func:`orthanc_ids`), else asked of Orthanc (three
        requests: a PatientID Orthanc reads otherwise than pydicom, say)."""
        if identifiers is not None:
            ids = orthanc_ids(identifiers)
            if ids["instance"] == orthanc_id:
                return ids
        instance = self.get_json(f"/instances/{orthanc_id}")
        series = self.get_json(f"/series/{instance['ParentSeries']}")
        study = self.get_json(f"/studies/{series['ParentStudy']}")
        return {"instance": orthanc_id, "series": instance["ParentSeries"], "study": series["ParentStudy"],
                "patient": study["ParentPatient"]}  # fmt: skip

    def store(self, data: bytes) -> dict[str, Any]:
        """Store a DICOM file (``POST /instances``): Orthanc's answer, with the new ``ID``,
        ``ParentSeries`` and ``ParentStudy``. Raises ``ValueError`` when Orthanc refuses it."""
        status, body, _ = self.request("POST", "/instances", data, content_type="application/dicom")
        if status != 200:
            raise ValueError(f"POST /instances: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def lookup(self, uid: str, level: str = "Instance") -> str | None:
        """The Orthanc id of the resource with this DICOM UID at ``level`` (``None`` if there is none)."""
        status, body, _ = self.request("POST", "/tools/lookup", uid.encode(), content_type="text/plain")
        if status != 200:
            return None
        return next((match["ID"] for match in json.loads(body) if match.get("Type") == level), None)
