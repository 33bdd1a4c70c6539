"""``orthanc-cbir backfill`` against a misbehaving DICOMweb server on loopback (issue 21): it finishes,
it can be stopped, and it says what went wrong. The server is a few lines of http.server that
answer QIDO-RS the wrong way; Redis and the model are the real ones."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from dicomweb_client.api import DICOMwebClient

from orthanc_cbir.ingest.backfill import BackfillError, backfill
from orthanc_cbir.ingest.queue import IngestQueue

pytestmark = pytest.mark.integration


def study(n: int) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.77.{n}"]},
            "00201208": {"vr": "IS", "Value": [1]}}  # fmt: skip


def qido_server(answer: Callable[[int], list[dict]], delay_s: float = 0.0) -> Iterator[str]:
    """A DICOMweb server whose study search answers ``answer(offset)`` (after ``delay_s``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            offset = int(parse_qs(urlsplit(self.path).query).get("offset", ["0"])[0])
            time.sleep(delay_s)
            body = json.dumps(answer(offset)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def repeating():
    """Every study search answers the same page: the server ignores ``offset``."""
    yield from qido_server(lambda offset: [study(n) for n in range(3)])


@pytest.fixture
def endless():
    """A new page for every offset, slowly: a listing that never ends by itself."""
    yield from qido_server(lambda offset: [study(offset + n) for n in range(3)], delay_s=0.05)


def test_a_server_that_repeats_a_page_stops_the_run_with_a_message(repeating, client, store, embedder):
    started = time.monotonic()
    with pytest.raises(BackfillError, match="ignores the offset parameter"):
        backfill(DICOMwebClient(repeating), store, IngestQueue(client), embedder, progress=False)
    assert time.monotonic() - started < 30  # it looped until killed before


def test_a_stop_while_listing_ends_the_run_as_interrupted(endless, client, store, embedder):
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()  # what SIGINT / SIGTERM set in the CLI (exit 130)
    started = time.monotonic()
    summary = backfill(DICOMwebClient(endless), store, IngestQueue(client), embedder, progress=False, stop=stop)
    assert summary.interrupted and time.monotonic() - started < 10
    assert summary.indexed == 0 and summary.instances == 0
