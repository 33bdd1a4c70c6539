"""``orthanc-cbir viewer`` as an HTTP server, without a browser: it serves the files of an
OHIF dist folder (a stand-in here), answers app routes with index.html, and forwards
Orthanc's paths with Orthanc's credentials, statuses and content types kept."""

from __future__ import annotations

import http.client
import json
import re
import uuid

import numpy as np
import pytest
import requests

from orthanc_cbir.local_services import ViewerServer
from tests import dicom_factory as factory

pytestmark = pytest.mark.integration

INDEX = b"<!doctype html><title>stand-in OHIF</title>"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, orthanc):
    dist = tmp_path_factory.mktemp("dist")
    (dist / "index.html").write_bytes(INDEX)
    (dist / "app.bundle.js").write_text("console.log('ohif');\n")
    (dist / "codec.wasm").write_bytes(b"\0asm\1\0\0\0")
    with ViewerServer(tmp_path_factory.mktemp("viewer"), orthanc=orthanc, dist=dist) as server:
        yield server


@pytest.fixture(scope="module")
def instance(orthanc):
    """One CT instance stored in Orthanc (directly, not through the viewer)."""
    ds = factory.grey_image(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32), SeriesDescription="PROXY TEST")
    status, body, _ = orthanc.request("POST", "/instances", factory.to_bytes(ds), content_type="application/dicom")
    assert status == 200, body
    return ds


def test_serves_the_dist_the_generated_config_and_app_routes(viewer):
    assert requests.get(viewer.url + "/").content == INDEX
    spa = requests.get(viewer.url + "/viewer?StudyInstanceUIDs=1.2.3")
    assert spa.status_code == 200 and spa.content == INDEX
    assert spa.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    wasm = requests.get(viewer.url + "/codec.wasm")
    assert wasm.headers["Content-Type"] == "application/wasm" and wasm.content == b"\0asm\1\0\0\0"
    assert requests.get(viewer.url + "/missing.bundle.js").status_code == 404
    for escape in ("/../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd"):  # never a file outside dist
        connection = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
        connection.request("GET", escape)
        assert connection.getresponse().read() == INDEX
        connection.close()
    head = requests.head(viewer.url + "/app.bundle.js")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len("console.log('ohif');\n"))
    config = requests.get(viewer.url + "/app-config.js").text
    source = json.loads(re.search(r"window\.config = (\{.*\});", config, re.DOTALL).group(1))["dataSources"][0]
    assert source["sourceName"] == "dicomweb" and source["namespace"].endswith("dataSourcesModule.dicomweb")
    assert {source["configuration"][key] for key in ("qidoRoot", "wadoRoot", "wadoUriRoot")} == {"/dicom-web"}
    assert requests.post(viewer.url + "/viewer", data=b"x").status_code == 405


def test_forwards_dicomweb_with_orthancs_credentials(viewer, orthanc, instance):
    studies = requests.get(viewer.url + "/dicom-web/studies", params={"StudyInstanceUID": instance.StudyInstanceUID})
    assert studies.status_code == 200 and studies.headers["Content-Type"] == "application/dicom+json"
    assert studies.json()[0]["0020000D"]["Value"] == [instance.StudyInstanceUID]
    assert requests.get(viewer.url + "/dicom-web/studies/1.2.3/metadata").status_code == 404  # statuses kept
    frame_path = (f"/dicom-web/studies/{instance.StudyInstanceUID}/series/{instance.SeriesInstanceUID}"
                  f"/instances/{instance.SOPInstanceUID}/frames/1")  # fmt: skip
    accept = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    proxied = requests.get(viewer.url + frame_path, headers=accept)
    direct = requests.get(orthanc.url + frame_path, headers=accept, auth=orthanc.auth)
    assert proxied.status_code == direct.status_code == 200
    # The boundary differs per answer; everything else of the multipart/related type is Orthanc's own.
    boundary = re.compile(r"boundary=[^;]+")
    assert boundary.sub("", proxied.headers["Content-Type"]) == boundary.sub("", direct.headers["Content-Type"])
    assert proxied.headers["Content-Type"].startswith("multipart/related")
    assert instance.PixelData in proxied.content
    assert requests.get(viewer.url + "/cbir/status").status_code == 200
    assert requests.get(viewer.url + "/app/explorer.html").status_code == 200


def test_bulk_data_uris_point_at_the_viewer(viewer, instance):
    metadata = requests.get(f"{viewer.url}/dicom-web/studies/{instance.StudyInstanceUID}/series/"
                            f"{instance.SeriesInstanceUID}/metadata").text  # fmt: skip
    uris = re.findall(r'"BulkDataURI"\s*:\s*"([^"]+)"', metadata)
    assert uris and all(uri.startswith(viewer.url + "/dicom-web/") for uri in uris), uris[:3]


def test_forwards_post_and_delete(viewer, orthanc):
    ds = factory.grey_image(np.full((16, 16), 7, dtype=np.uint16))
    stored = requests.post(viewer.url + "/instances", data=factory.to_bytes(ds),
                           headers={"Content-Type": "application/dicom"})  # fmt: skip
    assert stored.status_code == 200, stored.text
    orthanc_id = stored.json()["ID"]
    # STOW-RS through the proxy: a multipart/related body streamed to Orthanc.
    stow = factory.grey_image(np.full((16, 16), 9, dtype=np.uint16))
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + factory.to_bytes(stow)
            + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
    answer = requests.post(viewer.url + "/dicom-web/studies", data=body,
                           headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                    "Accept": "application/dicom+json"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    found = orthanc.request("POST", "/tools/lookup", stow.SOPInstanceUID.encode())
    assert found[0] == 200 and json.loads(found[1])
    assert requests.delete(viewer.url + f"/instances/{orthanc_id}").status_code == 200
    assert orthanc.request("GET", f"/instances/{orthanc_id}")[0] == 404
