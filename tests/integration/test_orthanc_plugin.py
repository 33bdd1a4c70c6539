"""Orthanc with this project's plugin, fed the way a PACS and a DICOMweb client feed it.

DICOM goes in with DCMTK's storescu (uncompressed) and dcmsend (compressed) over a
real association, and with STOW-RS from dicomweb-client; it comes back out of
Orthanc's REST API and must decode to exactly what the file decodes to.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import JPEG2000Lossless

from orthanc_cbir import __version__
from orthanc_cbir.dicom import DecodedInstance, decode_instance
from orthanc_cbir.local_services import OrthancServer, dcmtk_environment, free_port
from tests import dicom_factory as factory

pytestmark = pytest.mark.integration


def ct_slice(seed: int, **attributes):
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2000, size=(64, 64), dtype=np.uint16)
    return factory.grey_image(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024,
                              BodyPartExamined="CHEST", **attributes)  # fmt: skip


def orthanc_id(orthanc: OrthancServer, sop_instance_uid: str) -> str:
    status, body, _ = orthanc.request("POST", "/tools/lookup", sop_instance_uid.encode())
    matches = [m for m in json.loads(body) if m["Type"] == "Instance"] if status == 200 else []
    assert len(matches) == 1, f"{sop_instance_uid} not stored in Orthanc (HTTP {status})"
    return matches[0]["ID"]


def pixels_back_from_orthanc(orthanc: OrthancServer, sop_instance_uid: str) -> np.ndarray:
    status, body, _ = orthanc.request("GET", f"/instances/{orthanc_id(orthanc, sop_instance_uid)}/file")
    assert status == 200
    outcome = decode_instance(body)
    assert isinstance(outcome, DecodedInstance), str(outcome)
    return outcome.images[0].pixels


def local_pixels(ds) -> np.ndarray:
    outcome = decode_instance(factory.to_bytes(ds))
    assert isinstance(outcome, DecodedInstance), str(outcome)
    return outcome.images[0].pixels


def test_plugin_answers_status_with_version_and_redis_health(orthanc, redis_server):
    status = orthanc.get_json("/cbir/status")
    assert status["version"] == __version__
    assert status["redis"]["ok"] is True and status["redis"]["version"].startswith("7.")


def test_plugin_routes_sit_behind_orthanc_authentication(orthanc):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(orthanc.url + "/cbir/status", timeout=10)
    assert refused.value.code == 401


def test_status_refuses_other_methods(orthanc):
    status, _, _ = orthanc.request("POST", "/cbir/status", b"{}")
    assert status == 405


def test_storescu_push_is_stored_and_reads_back_to_the_same_pixels(orthanc, tmp_path):
    datasets = [ct_slice(seed) for seed in range(3)]
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(tmp_path / f"ct{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    done = subprocess.run(
        ["storescu", "-aet", "TEST_PACS", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
        capture_output=True, text=True, timeout=60, env=dcmtk_environment(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for ds in datasets:
        np.testing.assert_array_equal(pixels_back_from_orthanc(orthanc, ds.SOPInstanceUID), local_pixels(ds))


def test_dcmsend_push_keeps_a_compressed_syntax_and_decodes(orthanc, tmp_path):
    ds = ct_slice(10)
    ds.compress(JPEG2000Lossless)
    path = tmp_path / "ct_j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run(
        ["dcmsend", "-aet", "TEST_PACS", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), str(path)],
        capture_output=True, text=True, timeout=60, env=dcmtk_environment(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    instance = orthanc_id(orthanc, ds.SOPInstanceUID)
    _, syntax, _ = orthanc.request("GET", f"/instances/{instance}/metadata/TransferSyntax")
    assert syntax.decode() == JPEG2000Lossless
    np.testing.assert_array_equal(pixels_back_from_orthanc(orthanc, ds.SOPInstanceUID), local_pixels(ds))


def test_stow_rs_push_is_stored_and_served_back_over_dicomweb(orthanc):
    ds = ct_slice(20)
    session = requests.Session()
    session.auth = orthanc.auth
    client = DICOMwebClient(url=orthanc.url + "/dicom-web", session=session)
    client.store_instances([ds])
    metadata = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert metadata["00080018"]["Value"] == [ds.SOPInstanceUID]
    assert metadata["00280010"]["Value"] == [64]
    np.testing.assert_array_equal(pixels_back_from_orthanc(orthanc, ds.SOPInstanceUID), local_pixels(ds))


def test_status_says_what_is_wrong_when_redis_is_unreachable(tmp_path):
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    with OrthancServer(tmp_path / "orthanc", redis_url=unreachable) as lonely:
        status = lonely.get_json("/cbir/status")
        audit_code, audit_body, audit_type = lonely.request("GET", "/cbir/audit")
    assert status["redis"]["ok"] is False
    assert audit_code == 503 and audit_type.startswith("application/json"), (audit_code, audit_body[:300])
    assert "audit trail cannot be read" in json.loads(audit_body)["error"]
    assert "ConnectionError" in status["redis"]["error"]
