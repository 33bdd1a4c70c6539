"""A small authenticated client of Orthanc's REST API (what the workers and tests need)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from base64 import b64encode
from typing import Any


class OrthancClient:
    """HTTP Basic authenticated requests to one Orthanc."""

    def __init__(self, url: str, username: str = "", password: str = "", timeout_s: float = 30):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._authorization = "Basic " + b64encode(f"{username}:{password}".encode()).decode() if username else None

    def request(self, method: str, path: str, body: bytes | None = None, *, content_type: str | None = None,
                headers: dict[str, str] | None = None,
                timeout_s: float | None = None) -> tuple[int, bytes, str]:  # fmt: skip
        """One request: (status, body, content type). 4xx/5xx do not raise; an unreachable server does (OSError)."""
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        if self._authorization:
            request.add_header("Authorization", self._authorization)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers.get("Content-Type", "")

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

    def parents(self, orthanc_id: str) -> dict[str, str]:
        """Orthanc ids of the instance and its series, study and patient."""
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
