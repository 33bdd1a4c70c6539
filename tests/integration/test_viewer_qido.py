"""OHIF's study list through ``orthanc-cbir viewer``: the QIDO-RS answer carries each study's
description. OHIF 3 asks ``includefield=00081030%2C00080060%2C00080090%2C00100030`` (commas
percent-encoded by dicomweb-client); Orthanc's DICOMweb plugin 1.7 splits on literal commas only
and returns no StudyDescription by default, so every study read "No Description" (issue 17, item 15).

Real Orthanc (with its DICOMweb plugin) and a real ``orthanc-cbir viewer`` process."""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests

from orthanc_cbir.local_services import ViewerServer
from orthanc_cbir.viewer import ohif_dist, ohif_present, orthanc_request_target
from tests import dicom_factory as factory

pytestmark = pytest.mark.integration

OHIF_STUDY_LIST_QUERY = "limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060%2C00080090%2C00100030"
"""The query OHIF 3's study list sends (``mapParams`` in its DICOMweb data source, encoded by dicomweb-client)."""


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, orthanc):
    dist = tmp_path_factory.mktemp("dist")
    (dist / "index.html").write_bytes(b"<!doctype html><title>stand-in OHIF</title>")
    with ViewerServer(tmp_path_factory.mktemp("viewer"), orthanc=orthanc, dist=dist, demo=True) as server:
        yield server


@pytest.fixture(scope="module")
def study(orthanc):
    ds = factory.grey_image(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16), StudyDescription="CHEST CT QIDO",
                            ReferringPhysicianName="Referring^Rita")  # fmt: skip
    status, body, _ = orthanc.request("POST", "/instances", factory.to_bytes(ds), content_type="application/dicom")
    assert status == 200, body
    return ds


def studies_answer(base: str, **kwargs) -> dict[str, dict]:
    answer = requests.get(f"{base}/dicom-web/studies?{OHIF_STUDY_LIST_QUERY}", timeout=30,
                          headers={"Accept": "application/dicom+json"}, **kwargs)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return {item["0020000D"]["Value"][0]: item for item in answer.json()}


def test_the_study_list_query_through_the_viewer_returns_the_study_description(viewer, study):
    item = studies_answer(viewer.url)[str(study.StudyInstanceUID)]
    assert item["00081030"]["Value"] == ["CHEST CT QIDO"]
    assert item["00080060"]["Value"] == ["CT"] or item["00080061"]["Value"] == ["CT"]
    assert item["00080090"]["Value"][0]["Alphabetic"] == "Referring^Rita"


def test_orthanc_alone_answers_that_query_without_the_description(orthanc, study):
    """Why the viewer restores the commas: Orthanc 1.10's DICOMweb plugin ignores the encoded
    list. When this fails, a newer plugin reads it and the rewrite is no longer needed."""
    item = studies_answer(orthanc.url, auth=orthanc.auth)[str(study.StudyInstanceUID)]
    assert "00081030" not in item


def test_only_includefield_commas_of_dicomweb_requests_are_restored():
    assert orthanc_request_target("/dicom-web/studies?PatientName=Doe%2CJohn&includefield=00081030%2c0008103E") \
        == "/dicom-web/studies?PatientName=Doe%2CJohn&includefield=00081030,0008103E"  # fmt: skip
    assert orthanc_request_target("/cbir/similar?includefield=00081030%2C00080060") \
        == "/cbir/similar?includefield=00081030%2C00080060"  # fmt: skip
    assert orthanc_request_target("/dicom-web/studies") == "/dicom-web/studies"


@pytest.mark.skipif(not ohif_present(), reason="the OHIF dist is not fetched (make ohif)")
def test_the_shipped_ohif_still_asks_the_description_with_includefield():
    """The fix rests on what this OHIF build sends: its study list asks 00081030 through includefield."""
    bundles = "".join(path.read_text(errors="replace")
                      for path in ohif_dist().glob("*.js"))  # fmt: skip
    assert re.search(r"commaSeparatedFields = \['00081030'", bundles)
    assert "includefield: commaSeparatedFields" in bundles
