"""The request / reply protocol beside the ingest stream (ingest.queue.WorkerRequests) and the
Orthanc id map, on a real redis-server: what the routes and the workers rely on."""

from __future__ import annotations

import threading
import time

import pytest

from orthanc_cbir.ingest.queue import DICOMWEB, ORTHANC, QUERY, SIMILAR_SERIES, SPOOL, IngestQueue, WorkerRequests


@pytest.fixture
def queue(client):  # the integration tests' redis-server (tests/integration/conftest.py), emptied for each test
    client.flushdb()
    return IngestQueue(client)


def serve_one(queue: IngestQueue, answer) -> threading.Thread:
    """A worker's side in a thread: read one entry, take its body once, reply."""
    def work():
        requests = WorkerRequests(queue)
        for _ in range(50):
            events = queue.read("worker-1", count=1, block_ms=100)
            if events:
                body = requests.take(events[0].orthanc_id)
                assert requests.take(events[0].orthanc_id) is None  # a body is taken once
                requests.reply(events[0].orthanc_id, answer(body))
                queue.ack(events)
                return

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_an_asker_gets_the_reply_of_the_worker_that_took_its_body(queue):
    worker = serve_one(queue, lambda body: {"length": len(body)})
    assert WorkerRequests(queue).ask(QUERY, b"12345", wait_s=10) == {"length": 5}
    worker.join(5)


def test_a_request_nobody_answers_is_withdrawn(queue):
    requests = WorkerRequests(queue)
    started = time.monotonic()
    assert requests.ask(QUERY, b"body", wait_s=1) is None
    assert time.monotonic() - started < 5
    (event,) = queue.read("late-worker", count=1, block_ms=100)
    assert requests.take(event.orthanc_id) is None  # a worker that comes later finds nothing to do


def test_a_job_goes_from_queued_to_done_and_the_bound_counts_only_untaken_jobs(queue):
    requests = WorkerRequests(queue)
    first = requests.submit(SIMILAR_SERIES, b"{}", "instance-1", queue_s=60, keep_s=60, limit=1)
    assert first is not None and requests.job(first).queued
    assert requests.submit(SIMILAR_SERIES, b"{}", "instance-2", queue_s=60, keep_s=60, limit=1) is None  # bound
    (event,) = queue.read("worker-1", count=1, block_ms=100)
    assert requests.take(event.orthanc_id) == b"{}"
    running = requests.job(first)
    assert not running.queued and running.result is None and running.instance == "instance-1"
    assert requests.submit(SIMILAR_SERIES, b"{}", "instance-2", queue_s=60, keep_s=60, limit=1) is not None
    requests.reply(first, {"hits": 3})
    assert requests.job(first).result == {"hits": 3}
    queue.client.delete(queue.keys.query_reply(first))  # the worker's reply expires after a minute...
    assert requests.job(first).result == {"hits": 3}  # ...the job kept it
    assert requests.job("0" * 32) is None


def test_rejections_are_keyed_by_sop_instance_uid_with_their_source_and_a_deletion_finds_its_own(queue):
    queue.reject(ORTHANC, "orthanc-a", "not an image", "an SR", "1.2.3.4")
    queue.reject(SPOOL, "1.2.3.5.dcm", "truncated", "ends inside an element", "1.2.3.5")
    queue.reject(DICOMWEB, "1.2.3.6", "too large", "over the limit", "1.2.3.6")
    queue.reject(ORTHANC, "orthanc-b", "not DICOM", "no preamble")  # no SOPInstanceUID to key it by
    rejected = queue.rejected()
    assert set(rejected) == {"1.2.3.4", "1.2.3.5", "1.2.3.6", "orthanc:orthanc-b"}
    assert {key: entry["source"] for key, entry in rejected.items()} == {
        "1.2.3.4": ORTHANC, "1.2.3.5": SPOOL, "1.2.3.6": DICOMWEB, "orthanc:orthanc-b": ORTHANC}  # fmt: skip
    assert queue.rejected_from(ORTHANC) == {"orthanc-a", "orthanc-b"}
    queue.forget("orthanc-a")
    queue.forget("orthanc-b")
    assert set(queue.rejected()) == {"1.2.3.5", "1.2.3.6"}


def test_the_orthanc_id_map_remembers_what_was_indexed_and_forgets_a_deleted_instance(queue):
    queue.remember_indexed({"orthanc-a": "1.2.3", "orthanc-b": "1.2.4"})
    queue.reject(ORTHANC, "orthanc-a", "not an image", "detail")
    assert queue.indexed_uids(["orthanc-a", "orthanc-c", "orthanc-b"]) == ["1.2.3", None, "1.2.4"]
    assert dict(queue.indexed_map(page=1)) == {"orthanc-a": "1.2.3", "orthanc-b": "1.2.4"}
    assert queue.forget("orthanc-a") == "1.2.3"
    assert queue.forget("orthanc-a") is None and queue.rejected_from(ORTHANC) == set()
    assert queue.indexed_uids(["orthanc-a"]) == [None]
