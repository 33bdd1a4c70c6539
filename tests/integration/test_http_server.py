"""The standalone HTTP API (``orthanc-cbir serve`` without Orthanc): STOW-RS into the spool, a worker
indexes, the /cbir routes answer; authentication on every route; a client's mistakes are 4xx JSON;
schemathesis against the served OpenAPI document. Real redis-server, uvicorn on loopback, a worker
thread with the shipped model."""

from __future__ import annotations

import dataclasses
import io
import json
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread

from orthanc_cbir.api.http_server import HttpServerThread, create_app
from orthanc_cbir.config import load_settings
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import free_port
from tests import dicom_factory as factory
from tests.integration.pushing import synthetic_series, wait_until
from tests.integration.workers import start_spool_worker

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(16)
STOW_CAP = 4 * 2**20  # small caps, so that the 413 tests send little
QUERY_CAP = 2**20
SLICES = 8
CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0xC000, 0xA900


@pytest.fixture(scope="module")
def spool(tmp_path_factory, client):
    return Spool(tmp_path_factory.mktemp("spool"), IngestQueue(client))


@pytest.fixture(scope="module")
def settings(redis_server, spool):
    # no Orthanc behind this server: a free port, so that the thumbnail route's answer (502) is known
    return load_settings(env={}, redis_url=redis_server.url, http_token=TOKEN, spool_dir=str(spool.directory),
                         orthanc_url=f"http://127.0.0.1:{free_port()}")  # fmt: skip


@pytest.fixture(scope="module")
def worker(client, embedder, spool):
    """A standalone worker: ``store-file`` entries come from the spool; no Orthanc (port 9 is never asked)."""
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    running = start_spool_worker(client, store, embedder, spool, "http-worker")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(settings, spool, worker):
    app = create_app(settings, spool, max_stow_bytes=STOW_CAP, max_query_bytes=QUERY_CAP)
    with HttpServerThread(app, "127.0.0.1", free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield session
    session.close()


def indexed_count(http, server) -> int:
    status = http.get(server.url + "/cbir/status", timeout=10).json()
    return status.get("indexed", 0) if status["spooled"] == 0 else -1


@pytest.fixture(scope="module")
def stored(server, http, tmp_path_factory):
    """Two synthetic series (one study) sent with dicomweb-client's STOW-RS, then indexed."""
    folder = tmp_path_factory.mktemp("series")
    study = factory.generate_uid()
    datasets = [dcmread(p) for p in synthetic_series(folder / "a", slices=SLICES, StudyInstanceUID=study)
                + synthetic_series(folder / "b", slices=SLICES, texture=6, StudyInstanceUID=study)]  # fmt: skip
    before = indexed_count(http, server)
    web = DICOMwebClient(url=server.url + "/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
    answer = web.store_instances(datasets)
    wait_until(lambda: indexed_count(http, server) == before + len(datasets), 90, "the worker indexing them")
    return {"answer": answer, "datasets": datasets, "study": study,
            "series": [datasets[0].SeriesInstanceUID, datasets[-1].SeriesInstanceUID]}  # fmt: skip


def multipart(*parts: bytes, boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                    for part in parts) + b"--" + boundary.encode() + b"--\r\n"  # fmt: skip
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def new_instance(**attributes) -> bytes:
    return factory.to_bytes(factory.grey_image(np.full((64, 64), 900, np.uint16), **attributes))


def items(answer: dict, tag: str) -> list[dict]:
    return answer.get(tag, {}).get("Value", [])


def assert_error(response: requests.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str), body
    for word in words:
        assert word in body["error"], body


# -- STOW-RS and the similarity routes --------------------------------------------------------


def test_stow_rs_references_every_instance_and_the_worker_indexes_them(stored, server, http, spool):
    answer, datasets = stored["answer"], stored["datasets"]
    referenced = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert referenced == {d.SOPInstanceUID for d in datasets}
    assert {item.ReferencedSOPClassUID for item in answer.ReferencedSOPSequence} == {factory.CT_IMAGE}
    assert "FailedSOPSequence" not in answer
    assert spool.pending() == 0 and not list(spool.directory.glob(".part-*"))

    query = datasets[3]
    similar = http.get(f"{server.url}/cbir/instances/{query.SOPInstanceUID}/similar", params={"k": 5}, timeout=30)
    assert similar.status_code == 200, similar.text
    hits = similar.json()["hits"]
    assert len(hits) == 5 and query.SOPInstanceUID not in {h["SOPInstanceUID"] for h in hits}
    assert {h["SOPInstanceUID"] for h in hits} <= {d.SOPInstanceUID for d in datasets}
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)

    # QIDO-RS style: the series most like series a is series b (a series never answers itself)
    qido = http.get(f"{server.url}/cbir/series/{stored['series'][0]}/similar/series", timeout=30)
    assert qido.status_code == 200 and qido.headers["Content-Type"] == "application/dicom+json", qido.text
    assert qido.json()[0]["0020000E"]["Value"] == [stored["series"][1]]


def stow(http, url: str, *parts: bytes) -> requests.Response:
    body, content_type = multipart(*parts)
    return http.post(url, data=body, headers={"Content-Type": content_type}, timeout=120)


def test_stow_rs_fails_what_is_not_dicom_or_not_of_the_study(server, http, stored):
    good = new_instance()
    partial = stow(http, server.url + "/dicom-web/studies", good, b"this is not a DICOM file")
    assert partial.status_code == 202 and partial.headers["Content-Type"] == "application/dicom+json", partial.text
    answer = partial.json()
    assert [i["00081155"]["Value"] for i in items(answer, "00081199")] == [[dcmread(io.BytesIO(good)).SOPInstanceUID]]
    assert [i["00081197"]["Value"] for i in items(answer, "00081198")] == [[CANNOT_UNDERSTAND]]

    none = stow(http, server.url + "/dicom-web/studies", b"\x00" * 300, b"")
    assert none.status_code == 409 and "00081199" not in none.json(), none.text
    assert [i["00081197"]["Value"] for i in items(none.json(), "00081198")] == [[CANNOT_UNDERSTAND]] * 2

    # the study-specific form: an instance of another study fails, one of the study is stored
    mine, other = new_instance(StudyInstanceUID=stored["study"]), new_instance()
    mixed = stow(http, f"{server.url}/dicom-web/studies/{stored['study']}", mine, other)
    assert mixed.status_code == 202, mixed.text
    failed = items(mixed.json(), "00081198")
    assert [(i["00081155"]["Value"], i["00081197"]["Value"]) for i in failed] == [
        ([dcmread(io.BytesIO(other)).SOPInstanceUID], [DOES_NOT_MATCH])]


def test_query_file_takes_parameters_from_headers_and_query_string(server, http, stored):
    pixels = stored["datasets"][5].pixel_array.astype(np.float32)
    png = io.BytesIO()
    Image.fromarray((255 * pixels / pixels.max()).astype(np.uint8)).save(png, format="PNG")
    by_header = http.post(server.url + "/cbir/query", data=png.getvalue(),
                          headers={"Content-Type": "image/png", "X-Cbir-K": "3"}, timeout=60)  # fmt: skip
    assert by_header.status_code == 200 and len(by_header.json()["hits"]) == 3, by_header.text
    dicom = factory.to_bytes(stored["datasets"][2])
    by_query = http.post(server.url + "/cbir/query", params={"k": 4, "strategy": "exact"}, data=dicom,
                         headers={"Content-Type": "application/dicom"}, timeout=60)  # fmt: skip
    assert by_query.status_code == 200 and by_query.json()["strategy"] == "exact", by_query.text
    assert len(by_query.json()["hits"]) == 4


# -- authentication ---------------------------------------------------------------------------


def test_every_route_needs_the_token(server, http, stored):
    document = http.get(server.url + "/openapi.json", timeout=10).json()
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    uids = {"instances": stored["datasets"][0].SOPInstanceUID, "series": stored["series"][0],
            "studies": stored["study"]}  # fmt: skip
    requests_to_make = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no/such/route")]
    for path, operations in document["paths"].items():
        resource = path.split("/")[2]
        concrete = path.replace("{uid}", uids.get(resource, "1.2.3")).replace("{study}", stored["study"])
        concrete = concrete.replace("{orthanc_id}", "0123abcd-0123abcd-0123abcd-0123abcd-0123abcd")
        requests_to_make += [(method.upper(), concrete) for method in operations]
    assert len(requests_to_make) == 3 + 21
    bad_credentials = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
                       {"Authorization": TOKEN}, {"Authorization": "Basic " + "Y2JpcjpzZWNyZXQ="}]  # fmt: skip
    for method, path in requests_to_make:
        for headers in bad_credentials:
            refused = requests.request(method, server.url + path, headers=headers, timeout=10)
            assert_error(refused, 401, "Authorization: Bearer")
            assert refused.headers["WWW-Authenticate"].startswith('Bearer realm="orthanc-cbir"')
        allowed = http.request(method, server.url + path, timeout=30)
        if path.endswith("/thumbnail"):  # let in; no Orthanc answers here
            assert allowed.status_code == 502, allowed.text
            continue
        if path.endswith("/similar-regions"):  # let in; a region query needs its box
            assert allowed.status_code == 400 and "box" in allowed.json()["error"], allowed.text
            continue
        assert allowed.status_code != 401 and allowed.status_code < 500, (method, path, allowed.text)
        if method == "GET" and "no/such" not in path:
            assert allowed.status_code == 200, (path, allowed.text)


def test_basic_authentication_and_the_loopback_rule(settings, spool, tmp_path):
    basic_settings = dataclasses.replace(settings, http_token="", http_username="cbir", http_password="p@ss:word")
    basic = create_app(basic_settings, spool)
    with HttpServerThread(basic, "127.0.0.1", free_port()) as running:
        url = running.url + "/cbir/status"
        for auth in (None, ("cbir", "wrong"), ("other", "p@ss:word")):
            refused = requests.get(url, auth=auth, timeout=10)
            assert_error(refused, 401, "Basic")
            assert refused.headers["WWW-Authenticate"].startswith('Basic realm="orthanc-cbir"')
        assert requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 401
        assert requests.get(url, auth=("cbir", "p@ss:word"), timeout=10).status_code == 200

    open_settings = dataclasses.replace(settings, http_token="")
    with pytest.raises(ValueError, match="without authentication"):
        create_app(dataclasses.replace(open_settings, http_host="0.0.0.0"), spool)
    with pytest.raises(ValueError, match="without http_password"):
        create_app(dataclasses.replace(open_settings, http_username="cbir"), spool)
    open_app = create_app(open_settings, spool)  # loopback: allowed without authentication
    with pytest.raises(ValueError, match="without authentication"):
        HttpServerThread(open_app, "0.0.0.0", free_port())
    with HttpServerThread(open_app, "127.0.0.1", free_port()) as running:
        assert requests.get(running.url + "/cbir/status", timeout=10).status_code == 200


# -- a client's mistakes ----------------------------------------------------------------------


def test_client_mistakes_are_4xx_json(server, http, stored, spool):
    uid = stored["datasets"][0].SOPInstanceUID
    similar = f"{server.url}/cbir/instances/{uid}/similar"
    for params, words in [({"k": 0}, ["k"]), ({"k": 101}, ["k"]), ({"k": "ten"}, ["k"]), ({"offset": -1}, ["offset"]),
                          ({"k": 100, "offset": 950}, ["offset"]), ({"strategy": "nope"}, ["strategy"]),
                          ({"level": "patient"}, ["level"]), ({"format": "xml"}, ["format"]),
                          ({"weights": "colour=1"}, ["weights"]), ({"age": "old"}, ["age"]),
                          ({"modality": ""}, ["modality"]),
                          ({"colour": "red"}, ["unknown parameter", "strategy"])]:  # fmt: skip
        assert_error(http.get(similar, params=params, timeout=10), 400, *words)
    # a message names the accepted parameters, never repeats what the client sent
    assert "colour" not in http.get(similar, params={"colour": "red"}, timeout=10).text
    assert_error(http.get(f"{server.url}/cbir/instances/1.2.3.4/similar", timeout=10), 404, "not in the index")
    assert_error(http.get(f"{server.url}/cbir/series/{uid}/similar", timeout=10), 404, "not in the index")
    assert_error(http.get(f"{server.url}/cbir/instances/not-a-uid/similar", timeout=10), 400, "uid")
    assert_error(http.get(server.url + "/cbir/nothing", timeout=10), 404, "/cbir/nothing")
    not_allowed = http.delete(server.url + "/cbir/status", timeout=10)
    assert_error(not_allowed, 405, "DELETE")
    assert not_allowed.headers["Allow"] == "GET"

    url = server.url + "/dicom-web/studies"

    def post(body: bytes, content_type: str) -> requests.Response:
        return http.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)

    dicom = new_instance()
    assert_error(post(dicom, "application/dicom"), 415, "multipart/related")
    body, content_type = multipart(dicom)
    assert_error(post(body, content_type.replace("application/dicom", "application/dicom+json")), 415)
    assert_error(post(body, "multipart/related; type=application/dicom"), 400, "boundary")
    assert_error(post(body[:-40], content_type), 400, "closing boundary")
    assert_error(post(b"garbage" * 10, content_type), 400)
    assert_error(post(*multipart()), 400, "no part")

    big, big_type = multipart(*[b"\x00" * 2**20] * 5)  # 5 MiB > the 4 MiB cap
    assert_error(post(big, big_type), 413, "4 MiB")

    def chunks():  # no Content-Length: the server counts what arrives
        for start in range(0, len(big), 2**16):
            yield big[start:start + 2**16]

    assert_error(http.post(url, data=chunks(), headers={"Content-Type": big_type}, timeout=30), 413, "4 MiB")
    assert not list(spool.directory.glob(".part-*")), "a refused request left part files behind"

    query = server.url + "/cbir/query"
    assert_error(http.post(query, data=b"\x00" * (QUERY_CAP + 1), timeout=30), 413, "1 MiB")
    assert_error(http.post(query, data=b"", timeout=10), 400, "request body")
    assert_error(http.post(query, data=b"not an image", params={"k": 3}, timeout=60), 400, "cannot search")


# -- schemathesis -----------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, stored, tmp_path):
    """Every check but ``positive_data_acceptance`` (a body the worker cannot decode, a Feb 30 or
    an unknown UID are valid in the schema and rightly refused). STOW-RS is left out: schemathesis
    has no serializer for multipart/related (the tests above cover it). Real UIDs are offered as
    the path's ``uid`` most of the time, so that the searches run. One worker: Python 3.11's
    ``ast.parse`` in two threads at once (hypothesis describing its strategies) can raise a spurious
    ``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905)."""
    runner = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if runner is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    uids = {"instances": [d.SOPInstanceUID for d in stored["datasets"]], "series": stored["series"],
            "studies": [stored["study"]]}  # fmt: skip
    config = [f"[dictionaries.{name}]\nvalues = {json.dumps(values)}\n" for name, values in uids.items()]
    config += [f'[[operations]]\ninclude-path-regex = "^/cbir/{name}/"\n'
               f'parameters = {{ "path.uid" = {{ dictionary = "{name}", probability = 0.8 }} }}\n'
               for name in uids]  # fmt: skip
    (tmp_path / "schemathesis.toml").write_text("\n".join(config))
    done = subprocess.run(
        [runner, "--no-color", "--config-file", str(tmp_path / "schemathesis.toml"), "run",
         server.url + "/openapi.json", "--header", f"Authorization: Bearer {TOKEN}",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--exclude-path-regex", "^/dicom-web/|/thumbnail$",
         "--max-examples", "10", "--workers", "1", "--seed", "20260101", "--request-timeout", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert "Tested: 18" in done.stdout, done.stdout[-3000:]
