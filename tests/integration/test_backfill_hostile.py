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

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.backfill import BackfillError, backfill, dicomweb_session
from orthanc_cbir.ingest.queue import IngestQueue
from tests import dicom_factory as factory

pytestmark = pytest.mark.integration


def study(n: int) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.77.{n}"]},
            "00201208": {"vr": "IS", "Value": [1]}}  # fmt: skip


def qido_server(answer: Callable[[int], list[dict]], delay_s: float = 0.0,
                routes: Callable[[str, int], tuple[str, bytes] | None] | None = None) -> Iterator[str]:  # fmt: skip
    """A DICOMweb server whose study search answers ``answer(offset)`` (after ``delay_s``); ``routes(path,
    offset)`` may answer any request first, as (content type, body)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = urlsplit(self.path).path
            offset = int(parse_qs(urlsplit(self.path).query).get("offset", ["0"])[0])
            time.sleep(delay_s)
            routed = routes(path, offset) if routes is not None else None
            content_type, body = routed or ("application/dicom+json", json.dumps(answer(offset)).encode())
            self.send_response(200)
            self.send_header("Content-Type", content_type)
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


@pytest.fixture
def not_json():
    """The study search answers a body that is not JSON."""
    yield from qido_server(lambda offset: [], routes=lambda path, offset: ("application/dicom+json", b"<html>oops"))


def test_a_search_answered_with_something_else_than_json_says_so(not_json, client, store, embedder):
    with pytest.raises(BackfillError, match="not JSON") as raised:
        backfill(DICOMwebClient(not_json), store, IngestQueue(client), embedder, progress=False)
    assert "cannot reach" not in str(raised.value)  # it was reported as a network failure


@pytest.fixture
def mislabelled(tmp_path):
    """One study, one instance listed as LISTED, whose WADO-RS file holds another SOPInstanceUID."""
    ds = factory.grey_image(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    listed, study_uid, series_uid = "1.2.826.0.1.3680043.8.498.78.1", ds.StudyInstanceUID, ds.SeriesInstanceUID
    boundary = "hostileboundary"
    part = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + factory.to_bytes(ds) + \
        f"\r\n--{boundary}--\r\n".encode()  # fmt: skip

    def routes(path: str, offset: int) -> tuple[str, bytes] | None:
        if path == "/studies":
            return "application/dicom+json", json.dumps([] if offset else [{
                "0020000D": {"vr": "UI", "Value": [study_uid]}, "00201208": {"vr": "IS", "Value": [1]}}]).encode()
        if path == f"/studies/{study_uid}/instances":
            return "application/dicom+json", json.dumps([] if offset else [{
                "0020000E": {"vr": "UI", "Value": [series_uid]}, "00080018": {"vr": "UI", "Value": [listed]},
                "00080060": {"vr": "CS", "Value": ["CT"]}}]).encode()
        return f'multipart/related; type="application/dicom"; boundary={boundary}', part

    yield from qido_server(lambda offset: [], routes=routes)


def test_a_file_holding_another_sop_instance_uid_than_listed_is_named_and_its_study_not_done(
        mislabelled, client, embedder):  # fmt: skip
    client.flushdb()
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    summary = backfill(DICOMwebClient(mislabelled), store, IngestQueue(client), embedder, progress=False)
    # it was counted "already indexed" (or indexed under the other UID) and the study checkpointed as done
    assert (summary.mismatched, summary.indexed, summary.already_indexed) == (1, 0, 0)
    assert not summary.complete and "another SOPInstanceUID" in summary.line()
    again = backfill(DICOMwebClient(mislabelled), store, IngestQueue(client), embedder, progress=False)
    assert again.studies_done_earlier == 0 and again.mismatched == 1  # walked again, not skipped


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dripping():
    """The study search answers one byte every 0.2 s: the connection's timeout never fires."""

    class Drip(_Quiet):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps([study(0)]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up
                pass

    yield from serve(Drip)


def test_an_answer_dripping_past_the_deadline_stops_the_run_with_a_message(dripping, client, store, embedder):
    session = dicomweb_session(deadline_s=2.0)
    started = time.monotonic()
    with pytest.raises(BackfillError, match="did not answer the study search in time"):
        backfill(DICOMwebClient(dripping, session=session), store, IngestQueue(client), embedder, progress=False)
    # dicomweb-client tries a failed request 5 times with backoff (1, 2, 4, 8 s): about 25 s. Before, each
    # try waited for the whole body, since the 20 s between two bytes never passed
    assert time.monotonic() - started < 60


@pytest.fixture
def endless_file():
    """One study, one instance, whose WADO-RS answer is an endless multipart stream (no length)."""
    study_uid, series_uid, sop_uid = (f"1.2.826.0.1.3680043.8.498.79.{n}" for n in range(3))

    class Endless(_Quiet):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path, offset = urlsplit(self.path).path, int(parse_qs(urlsplit(self.path).query).get("offset", ["0"])[0])
            if path in ("/studies", f"/studies/{study_uid}/instances"):
                listed = [] if offset else [{"0020000D": {"vr": "UI", "Value": [study_uid]},
                                             "0020000E": {"vr": "UI", "Value": [series_uid]},
                                             "00080018": {"vr": "UI", "Value": [sop_uid]}}]  # fmt: skip
                body = json.dumps(listed).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            head, chunk = b"--b\r\nContent-Type: application/dicom\r\n\r\n", b"\0" * (1 << 20)
            try:
                self.wfile.write(b"%x\r\n" % len(head) + head + b"\r\n")
                for _ in range(4096):  # 4 GiB if nobody stops reading
                    self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except OSError:  # the client gave up
                pass

    yield from serve(Endless)


def test_an_endless_wado_answer_is_a_too_large_rejection_and_the_walk_goes_on(endless_file, client, embedder):
    client.flushdb()
    store, queue = IndexStore(client, IndexInfo.from_card(embedder.card)), IngestQueue(client)
    session = dicomweb_session(deadline_s=60.0, max_bytes=8 * 2**20)
    summary = backfill(DICOMwebClient(endless_file, session=session), store, queue, embedder, progress=False)
    assert summary.rejected == 1 and summary.indexed == 0
    (entry,) = queue.rejected().values()
    assert entry["reason"] == "too large" and "passed 8388608 bytes" in entry["detail"]


@pytest.fixture
def huge_search():
    """The study search answers one JSON array of 64 MiB (no length), of entries without a
    StudyInstanceUID: under a looser bound it is parsed whole (about ten times its size in memory)."""

    class Huge(_Quiet):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            entry = b'{"00080020": {"vr": "DA", "Value": ["20240131"]}},'
            block = entry * ((1 << 20) // len(entry))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in [b"["] + [block] * 64 + [b"{}]"]:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client stopped reading
                pass

    yield from serve(Huge)


def test_a_search_page_past_its_bound_stops_the_run_unparsed(huge_search, client, store, embedder):
    """A QIDO-RS page is read up to MAX_SEARCH_BYTES (16 MiB: a page of PAGE entries is a few hundred kB),
    never parsed past it (issue 21, item 3: at 256 MiB a parsed page took 2.6 GiB)."""
    with pytest.raises(BackfillError, match="answered the study search with more than a run reads"):
        backfill(DICOMwebClient(huge_search, session=dicomweb_session(deadline_s=60.0)), store, IngestQueue(client),
                 embedder, progress=False)  # fmt: skip
