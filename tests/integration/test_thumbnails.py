"""Hits' thumbnails come from this project's pixel step, not Orthanc's ``/preview``: Orthanc
1.10 cannot decode JPEG 2000, so the results page showed broken images for such hits (issue 17,
item 15). ``GET /cbir/instances/{id}/thumbnail`` fetches the file from Orthanc, decodes it with
``decode_instance`` and answers a PNG of the display picture at most 256 px on a side, in
Orthanc's plugin and in ``orthanc-cbir serve``; every hit's ``thumbnail`` URL points to it.

Real Orthanc (with the plugin), Redis, a worker and ``serve``'s HTTP server on loopback."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from orthanc_cbir.api.http_server import HttpServerThread, create_app
from orthanc_cbir.config import load_settings
from orthanc_cbir.dicom import DecodedInstance, decode_instance
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import OrthancServer, free_port
from tests import dicom_factory as factory
from tests.integration.pushing import wait_until
from tests.integration.workers import start_worker

pytestmark = pytest.mark.integration

SIZE = 512


def j2k_slice(seed: int, **attributes):
    """A 512x512 CT slice (a disc that moves with ``seed``) stored as JPEG 2000 lossless."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - 256) ** 2 + (xx - 160 - 8 * seed) ** 2) < (90 + 4 * seed) ** 2
    stored = (disc * 1400 + (xx // 4 % 2) * 60).astype(np.uint16)
    ds = factory.grey_image(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
                            WindowWidth=400, BodyPartExamined="CHEST", **attributes)  # fmt: skip
    ds.compress(JPEG2000Lossless)
    return ds


@pytest.fixture(scope="module")
def stored(orthanc, redis_server, embedder):
    """Four JPEG 2000 slices of one series, stored in Orthanc and indexed by a worker."""
    running = start_worker(orthanc, redis_server.url, embedder)
    try:
        series, study = factory.generate_uid(), factory.generate_uid()
        datasets = [j2k_slice(seed, SeriesInstanceUID=series, StudyInstanceUID=study, InstanceNumber=seed + 1)
                    for seed in range(4)]  # fmt: skip
        ids = []
        for ds in datasets:
            status, body, _ = orthanc.request("POST", "/instances", factory.to_bytes(ds),
                                              content_type="application/dicom")  # fmt: skip
            assert status == 200, body
            ids.append(json.loads(body)["ID"])
        store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(embedder.card))
        wait_until(lambda: store.count() >= len(datasets), 120, "the JPEG 2000 slices indexed")
        yield {"datasets": datasets, "ids": ids}
    finally:
        running.stop()


def display_picture(orthanc, orthanc_id: str) -> np.ndarray:
    outcome = decode_instance(orthanc.client.instance_file(orthanc_id))
    assert isinstance(outcome, DecodedInstance), str(outcome)
    return outcome.images[0].pixels


def png_pixels(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image, dtype=np.float32) / 255


def assert_is_thumbnail_of(body: bytes, picture: np.ndarray) -> None:
    thumb = png_pixels(body)
    assert thumb.shape == (256, 256)
    expected = np.asarray(Image.fromarray(np.round(picture * 255).astype(np.uint8)).resize((256, 256)),
                          dtype=np.float32) / 255  # fmt: skip
    assert np.corrcoef(thumb.ravel(), expected.ravel())[0, 1] > 0.98
    assert np.abs(thumb - expected).mean() < 0.03


def test_orthancs_own_preview_cannot_draw_jpeg_2000(orthanc, stored):
    """Why the route exists: Orthanc 1.10 answers no image for these files. (When this fails, a newer
    Orthanc decodes JPEG 2000 and its preview would do, but the pixel step's picture stays the file's VOI.)"""
    status, body, content_type = orthanc.request("GET", f"/instances/{stored['ids'][0]}/preview")
    assert status != 200 or not content_type.startswith("image/"), (status, content_type)


def test_the_thumbnail_route_draws_a_jpeg_2000_instance(orthanc, stored):
    orthanc_id = stored["ids"][0]
    status, body, content_type = orthanc.request("GET", f"/cbir/instances/{orthanc_id}/thumbnail")
    assert status == 200 and content_type == "image/png", (status, body[:200])
    assert_is_thumbnail_of(body, display_picture(orthanc, orthanc_id))


def test_every_hit_points_to_its_thumbnail_and_each_one_draws(orthanc, stored):
    answer = orthanc.get_json(f"/cbir/instances/{stored['ids'][1]}/similar?k=3&strategy=exact")
    assert answer["hits"]
    for hit in answer["hits"]:
        assert hit["thumbnail"] == f"/cbir/instances/{hit['orthanc']['instance']}/thumbnail"
        status, body, content_type = orthanc.request("GET", hit["thumbnail"])
        assert status == 200 and content_type == "image/png"
        assert_is_thumbnail_of(body, display_picture(orthanc, hit["orthanc"]["instance"]))


def test_the_results_page_asks_the_thumbnail_route(orthanc, stored):
    status, body, _ = orthanc.request("GET", f"/cbir/ui/instances/{stored['ids'][0]}")
    assert status == 200
    page = body.decode()
    assert "/cbir/instances/${encodeURIComponent(hit.orthanc.instance)}/thumbnail" in page
    assert "/preview" not in page


@pytest.mark.parametrize("identifier, code", [("0123abcd-0123abcd-0123abcd-0123abcd-0123abcd", 404),
                                              ("0123abcd..system", 400), ("not-an-id%3Cscript%3E", 400)])  # fmt: skip
def test_thumbnail_mistakes_get_a_json_message(orthanc, identifier, code):
    status, body, content_type = orthanc.request("GET", f"/cbir/instances/{identifier}/thumbnail")
    assert status == code and content_type.startswith("application/json"), (status, body[:200])
    assert "<script" not in body.decode().lower()


def test_the_thumbnail_route_needs_credentials(orthanc, stored):
    answer = requests.get(f"{orthanc.url}/cbir/instances/{stored['ids'][0]}/thumbnail", timeout=10)
    assert answer.status_code == 401


def test_a_file_over_the_cap_is_refused_before_it_is_fetched(tmp_path, redis_server):
    ds = j2k_slice(0)
    with OrthancServer(tmp_path / "orthanc", redis_url=redis_server.url, cbir={"MaxQueryBytes": 4096}) as small:
        status, body, _ = small.request("POST", "/instances", factory.to_bytes(ds), content_type="application/dicom")
        assert status == 200, body
        assert small.get_json(f"/instances/{json.loads(body)['ID']}")["FileSize"] > 4096
        status, body, content_type = small.request("GET", f"/cbir/instances/{json.loads(body)['ID']}/thumbnail")
    assert status == 413 and content_type.startswith("application/json"), (status, body[:200])


def test_serve_draws_the_thumbnail_from_its_orthanc(orthanc, redis_server, stored, tmp_path):
    token = secrets.token_urlsafe(16)
    settings = load_settings(env={}, redis_url=redis_server.url, http_token=token, orthanc_url=orthanc.url,
                             orthanc_username=orthanc.auth[0], orthanc_password=orthanc.auth[1])  # fmt: skip
    app = create_app(settings, Spool(Path(tmp_path), IngestQueue(redis.Redis.from_url(redis_server.url))))
    with HttpServerThread(app, "127.0.0.1", free_port()) as running:
        headers = {"Authorization": f"Bearer {token}"}
        orthanc_id = stored["ids"][2]
        answer = requests.get(f"{running.url}/cbir/instances/{orthanc_id}/thumbnail", headers=headers, timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text[:200]
        assert_is_thumbnail_of(answer.content, display_picture(orthanc, orthanc_id))
        assert requests.get(f"{running.url}/cbir/instances/{orthanc_id}/thumbnail", timeout=10).status_code == 401
        missing = requests.get(f"{running.url}/cbir/instances/0123abcd-0123abcd-0123abcd-0123abcd-0123abcd/thumbnail",
                               headers=headers, timeout=10)  # fmt: skip
        assert missing.status_code == 404 and missing.json()["status"] == 404
    gone = load_settings(env={}, redis_url=redis_server.url, http_token=token,
                         orthanc_url=f"http://127.0.0.1:{free_port()}")  # fmt: skip
    app = create_app(gone, Spool(Path(tmp_path), IngestQueue(redis.Redis.from_url(redis_server.url))))
    with HttpServerThread(app, "127.0.0.1", free_port()) as running:
        answer = requests.get(f"{running.url}/cbir/instances/{orthanc_id}/thumbnail", headers=headers, timeout=30)
        assert answer.status_code == 502 and answer.json()["status"] == 502
