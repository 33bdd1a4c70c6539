"""A stream entry a worker fails on is a dead letter, not the end of the worker (issue 17, item 2).
Real redis-server, Orthanc with this project's plugin, an ``orthanc-cbir worker`` process and
storescu on loopback."""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread

from orthanc_cbir.api.similar import status_of
from orthanc_cbir.ingest.queue import SIMILAR_SERIES, STORE_FILE, IngestQueue, WorkerRequests
from orthanc_cbir.local_services import WorkerProcess
from tests.integration.pushing import sop_instance_uids, storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

PATIENT = {"PatientName": "Letter^Dora^Secret", "PatientID": "PID-DEAD-LETTER-42"}


@pytest.fixture(scope="module")
def worker(orthanc, redis_server, tmp_path_factory):
    process = WorkerProcess(tmp_path_factory.mktemp("worker"), redis_url=redis_server.url, orthanc=orthanc,
                            batch_size=8).start()  # fmt: skip
    yield process
    process.stop()


def push_and_wait(orthanc, store, paths) -> None:
    storescu(orthanc, paths)
    wait_until(lambda: all(store.row(uid) is not None for uid in sop_instance_uids(paths)), 90,
               "the pushed slices indexed")  # fmt: skip


def ask(queue: IngestQueue, action: str, body: bytes, wait_s: int = 60) -> dict:
    """Enqueue an interactive request as the routes do and wait for the worker's reply."""
    reply = WorkerRequests(queue).ask(action, body, wait_s)
    assert reply is not None, "no reply: the worker is gone"
    return reply


def test_a_format_on_similar_series_is_a_400_and_the_worker_goes_on(orthanc, worker, store, client, tmp_path):
    paths = synthetic_series(tmp_path / "series", slices=6, **PATIENT)
    push_and_wait(orthanc, store, paths + synthetic_series(tmp_path / "other", slices=6, **PATIENT))  # 2 studies
    query = orthanc.client.lookup(str(dcmread(paths[2]).SOPInstanceUID))
    route = f"/cbir/instances/{query}/similar/series"
    status, body, _ = orthanc.request("POST", route, b"", headers={"X-Cbir-Format": "dicom+json"}, timeout_s=60)
    assert status == 400 and "format" in json.loads(body)["error"], body
    # the same request reaching a worker some other way (an older route, a script) is a 400 too
    asked = json.dumps({"instance": query, "parameters": {"format": "dicom+json", "k": "3"}}).encode()
    reply = ask(IngestQueue(client), SIMILAR_SERIES, asked)
    assert reply["kind"] == "BadParameters" and status_of(reply) == 400 and "format" in reply["error"]
    assert worker.process.poll() is None, worker.log_tail()
    status, body, _ = orthanc.request("POST", route, b"", headers={"X-Cbir-K": "3"}, timeout_s=120)
    assert status == 200 and json.loads(body)["series"]["instances"] == 3, body


def test_an_entry_the_worker_fails_on_is_a_dead_letter_and_the_worker_goes_on(orthanc, worker, store, client,
                                                                               tmp_path):  # fmt: skip
    queue = IngestQueue(client)
    reply = ask(queue, SIMILAR_SERIES, b"{not json")  # a body no route writes
    assert reply["kind"] == "WorkerFailed" and status_of(reply) == 500 and "dead-letter" in reply["error"]
    queue.enqueue("1.2.3.4.dcm", STORE_FILE)  # a standalone server's entry: this worker has no spool
    paths = synthetic_series(tmp_path / "after", slices=4, texture=5, **PATIENT)
    push_and_wait(orthanc, store, paths)
    assert worker.process.poll() is None, worker.log_tail()
    status = orthanc.get_json("/cbir/status")
    assert status["dead_letters"] == 2, status
    letters = {entry["orthanc_id"]: entry for entry in orthanc.get_json("/cbir/rejected")["rejected"]
               if entry["reason"] == "worker error"}  # fmt: skip
    assert letters["1.2.3.4.dcm"]["action"] == STORE_FILE
    assert letters["1.2.3.4.dcm"]["detail"].startswith("RuntimeError in worker.py:")
    assert any(e["action"] == SIMILAR_SERIES and e["detail"].startswith("JSONDecodeError") for e in letters.values())
    log = worker.log_tail(500)
    assert "is a dead letter" in log
    assert not any(secret in log for secret in [*PATIENT.values(), "Letter", "Dora", "DEAD-LETTER"])
