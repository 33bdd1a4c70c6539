"""The worker's client of Orthanc's REST API against a real Orthanc: an instance's series, study and
patient ids are worked out as Orthanc makes them (no request), and requests share one connection."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.orthanc_client import OrthancClient, dicom_identifiers, orthanc_ids
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.worker import Worker
from orthanc_cbir.local_services import free_port
from tests.integration.pushing import sop_instance_uids, storescu, synthetic_series, wait_until
from tests.integration.workers import WorkerThread

pytestmark = pytest.mark.integration

SHARED_DICOM = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"


class CountingClient(OrthancClient):
    """The real client, noting the path of every request it sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths: list[str] = []

    def request(self, method, path, *args, **kwargs):
        self.paths.append(path)
        return super().request(method, path, *args, **kwargs)


def orthancs_own(answer: dict) -> dict[str, str]:
    return {"patient": answer["ParentPatient"], "study": answer["ParentStudy"], "series": answer["ParentSeries"],
            "instance": answer["ID"]}  # fmt: skip


def test_the_ids_worked_out_from_a_file_are_those_orthanc_gives_it(orthanc):
    files = sorted(p for p in (SHARED_DICOM / "single").rglob("*") if p.is_file())
    files += [p for series in sorted((SHARED_DICOM / "series").glob("*/*")) for p in sorted(series.glob("*.dcm"))[:3]]
    client = orthanc.client
    worked_out, stored = 0, 0
    for path in files:
        data = path.read_bytes()
        status, body, _ = client.request("POST", "/instances", data, content_type="application/dicom")
        if status != 200:  # not DICOM Orthanc keeps: nothing to compare
            continue
        own = orthancs_own(json.loads(body))
        stored += 1
        identifiers = dicom_identifiers(data)
        worked_out += identifiers is not None and orthanc_ids(identifiers) == own
        # where they are not Orthanc's (a PatientID read otherwise), the client asks Orthanc instead
        assert client.parents(own["instance"], identifiers) == own, path.name
    assert stored >= 200
    assert worked_out >= 0.95 * stored, f"{worked_out} of {stored}"


def indexed_through_a_worker(orthanc, client, embedder, orthanc_client: OrthancClient, paths: list[Path],
                             uids: set[str], consumer: str) -> list:  # fmt: skip
    """Push ``paths`` (SOPInstanceUIDs ``uids``) to Orthanc with a worker (``orthanc_client`` its client
    of Orthanc) running until every one is in the index; their entries, in UID order."""
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    worker = WorkerThread(Worker(IngestQueue(client, claim_idle_ms=1500), orthanc_client, store, embedder,
                                 batch_size=16, consumer=consumer)).start()  # fmt: skip
    try:
        storescu(orthanc, paths)
        wait_until(lambda: all(store.contains(uid) for uid in uids), 60, "the series indexed")
    finally:
        worker.stop()
    return store.describe(sorted(uids))


def test_a_worker_asks_orthanc_only_for_the_file_of_each_instance_it_indexes(orthanc, client, embedder, tmp_path):
    paths = synthetic_series(tmp_path / "series", slices=4, texture=5)
    counting = CountingClient(orthanc.url, orthanc.username, orthanc.password)
    entries = indexed_through_a_worker(orthanc, client, embedder, counting, paths, sop_instance_uids(paths),
                                       "counted-worker")
    for entry in entries:
        assert entry is not None
        instance = entry.orthanc["instance"]
        own = orthanc.client.get_json(f"/instances/{instance}")
        series = orthanc.client.get_json(f"/series/{own['ParentSeries']}")
        study = orthanc.client.get_json(f"/studies/{series['ParentStudy']}")
        assert entry.orthanc == {"patient": study["ParentPatient"], "study": series["ParentStudy"],
                                 "series": own["ParentSeries"], "instance": instance}  # fmt: skip
    # the worker also takes what other tests stored: only the requests about this series count here
    ours = {entry.orthanc[level] for entry in entries if entry for level in ("instance", "series", "study")}
    about_ours = [path for path in counting.paths if any(resource in path for resource in ours)]
    assert sorted(about_ours) == sorted(f"/instances/{e.orthanc['instance']}/file" for e in entries if e)


def test_a_worker_parses_each_file_it_indexes_once(orthanc, client, embedder, tmp_path, monkeypatch):
    parsed: list[str] = []  # the SOPInstanceUID of every dataset pydicom parses, in any thread
    dcmread = pydicom.dcmread

    def counting_dcmread(*args, **kwargs):
        dataset = dcmread(*args, **kwargs)
        parsed.append(str(dataset.get("SOPInstanceUID", "")))
        return dataset

    paths = synthetic_series(tmp_path / "series", slices=4, texture=6)
    uids = sop_instance_uids(paths)
    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)  # from here on, the worker's parsing only
    entries = indexed_through_a_worker(orthanc, client, embedder, orthanc.client, paths, uids, "parsing-worker")
    assert all(entry is not None and entry.orthanc["series"] for entry in entries)  # its ids worked out
    assert {uid: parsed.count(uid) for uid in uids} == dict.fromkeys(uids, 1)


def test_requests_to_one_orthanc_share_a_kept_alive_connection(orthanc):
    client = OrthancClient(orthanc.url, orthanc.username, orthanc.password)
    for _ in range(20):
        assert client.request("GET", "/system")[0] == 200
    assert client._pool.connection_from_url(orthanc.url).num_connections == 1


def test_an_orthanc_that_is_not_there_raises_an_os_error():
    with pytest.raises(OSError):
        OrthancClient(f"http://127.0.0.1:{free_port()}", timeout_s=2).request("GET", "/system")
