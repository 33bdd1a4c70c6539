"""Fuzzing ``POST /cbir/query`` of the standalone HTTP API with hypothesis: mutated DICOM, mutated
pictures and random bytes as the body. Real redis-server, uvicorn on loopback, a worker thread
with the shipped model that embeds each body. Every answer is 2xx or a 4xx JSON error, never a
5xx, and the worker is still running at the end.

Budget: 60 examples (``deadline=None``, derandomized), a few seconds on two cores;
``CBIR_FUZZ_EXAMPLES=2000`` runs that many with fresh random seeds."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orthanc_cbir.api.http_server import HttpServerThread, create_app
from orthanc_cbir.config import load_settings
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import free_port
from tests import dicom_factory as factory
from tests.integration.pushing import wait_until
from tests.integration.workers import start_spool_worker
from tests.unit.test_bad_input import PICTURES, SEEDS, mutated

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(16)
QUERY_CAP = 2**20
EXAMPLES = int(os.environ.get("CBIR_FUZZ_EXAMPLES", 0))


@pytest.fixture(scope="module")
def spool(tmp_path_factory, client):
    return Spool(tmp_path_factory.mktemp("spool"), IngestQueue(client))


@pytest.fixture(scope="module")
def cbir_settings(redis_server, spool):
    return load_settings(env={}, redis_url=redis_server.url, http_token=TOKEN, spool_dir=str(spool.directory),
                         max_pixels_per_frame=2**20)  # fmt: skip


@pytest.fixture(scope="module")
def worker(client, embedder, spool, cbir_settings):
    """A standalone worker with the settings' limits; no Orthanc (port 9 is never asked)."""
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    running = start_spool_worker(client, store, embedder, spool, "fuzz-worker",
                                 max_file_bytes=cbir_settings.max_file_bytes,
                                 max_pixels_per_frame=cbir_settings.max_pixels_per_frame)  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(cbir_settings, spool, worker):
    app = create_app(cbir_settings, spool, max_query_bytes=QUERY_CAP)
    with HttpServerThread(app, "127.0.0.1", free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield session
    session.close()


@pytest.fixture(scope="module")
def indexed(server, http, spool):
    """Two CT instances stored through the spool and indexed by the worker."""
    for value in (300, 1200):
        ds = factory.grey_image(np.full((32, 32), value, np.uint16))
        spool.accept(factory.to_bytes(ds), ds.SOPInstanceUID)
    wait_until(lambda: http.get(server.url + "/cbir/status", timeout=10).json().get("indexed", 0) >= 2, 60,
               "the worker indexing two instances")  # fmt: skip


def mutated_picture() -> st.SearchStrategy[bytes]:
    def mutate(args: tuple[bytes, list[tuple[int, int]], int]) -> bytes:
        seed, flips, end = args
        data = bytearray(seed)
        for at, value in flips:
            if 8 <= at < len(data):
                data[at] = value
        return bytes(data[:end])

    flips = st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=3)
    return st.tuples(st.sampled_from(PICTURES), flips, st.integers(8, 2000)).map(mutate)


BODIES = st.one_of(
    mutated(),
    mutated_picture(),
    st.binary(min_size=1, max_size=1024),
    st.sampled_from(SEEDS),  # valid files: a 200 with hits
)


def test_a_query_on_an_empty_index_is_not_a_server_error(server, http):
    answer = http.post(server.url + "/cbir/query", data=SEEDS[0], timeout=60)
    assert answer.status_code == 200 and answer.json()["hits"] == [], answer.text


def test_fuzz_query_bodies_never_get_a_server_error(server, http, worker, indexed):
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES or 60, deadline=None, derandomize=not EXAMPLES, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(body=BODIES, k=st.sampled_from(["1", "3"]))
    def post(body: bytes, k: str) -> None:
        answer = http.post(server.url + "/cbir/query", data=body, params={"k": k},
                           headers={"Content-Type": "application/octet-stream"}, timeout=60)  # fmt: skip
        seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (answer.status_code, answer.text, body[:64])
        assert 200 <= answer.status_code, (answer.status_code, answer.text)
        assert answer.headers["Content-Type"] == "application/json", answer.headers
        payload = answer.json()
        if answer.status_code >= 400:
            assert payload["status"] == answer.status_code and isinstance(payload["error"], str), payload
        else:
            assert len(payload["hits"]) <= int(k)

    post()
    assert worker.is_alive(), "the worker thread died"
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both outcomes were exercised
    print(f"query fuzz: answers by status {dict(sorted(seen.items()))}")
