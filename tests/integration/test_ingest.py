"""Indexing as a PACS feeds Orthanc: storescu pushes, the plugin enqueues, a worker
indexes; deletions follow; a killed worker loses nothing. Real Orthanc, Redis, storescu."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.worker import Worker
from orthanc_cbir.local_services import WorkerProcess, cbir_environment, dcmtk_environment
from orthanc_cbir.search import Filters, Query, Searcher, SearchOptions
from tests import dicom_factory as factory
from tests.integration.pushing import storescu, synthetic_series, wait_until
from tests.integration.workers import WorkerThread

pytestmark = pytest.mark.integration

SHARED_SERIES = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / (
    "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl")  # fmt: skip


@pytest.fixture(scope="module")
def store(client, embedder):
    return IndexStore(client, IndexInfo.from_card(embedder.card))


@pytest.fixture(scope="module")
def worker(orthanc, client, store, embedder):
    running = WorkerThread(Worker(IngestQueue(client, claim_idle_ms=1500), orthanc.client, store, embedder,
                                  batch_size=16, consumer="test-worker")).start()  # fmt: skip
    yield running
    running.stop()


def status(orthanc) -> dict:
    return orthanc.get_json("/cbir/status")


def test_a_pushed_series_is_indexed_and_its_slices_find_their_neighbours(orthanc, worker, store, tmp_path):
    paths = sorted(SHARED_SERIES.glob("*.dcm")) if SHARED_SERIES.is_dir() else synthetic_series(tmp_path / "series")
    before = status(orthanc)["indexed"]
    storescu(orthanc, paths)
    wait_until(lambda: status(orthanc)["indexed"] >= before + len(paths), 120, f"{len(paths)} slices indexed")
    stored = status(orthanc)
    assert stored["model"] == store.info.version and stored["queued"] == 0 and stored["pending"] == 0

    records = [r for r in store.describe([dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths])]
    assert all(r is not None and r.orthanc["instance"] for r in records)
    order = np.argsort([r.metadata.image_position_patient[2] for r in records])
    position = {records[i].metadata.sop_instance_uid: rank for rank, i in enumerate(order)}
    searcher = Searcher(store)
    searcher.snapshot.refresh()
    near = 0
    for uid, rank in position.items():
        row = store.describe([uid])[0].row
        query = Query(searcher.snapshot.vectors([row])[0], searcher.snapshot.codes[row])
        hit = searcher.search(query, SearchOptions("exact", k=2, filters=Filters(exclude_self=False))).hits
        neighbour = hit[1] if hit[0].sop_instance_uid == uid else hit[0]
        near += abs(position.get(neighbour.sop_instance_uid, -99) - rank) <= 2
    assert near / len(position) >= 0.9


def test_stow_rs_uploads_are_indexed_too(orthanc, worker, store, tmp_path):
    paths = synthetic_series(tmp_path / "stow", slices=3, texture=9)
    session = requests.Session()
    session.auth = orthanc.auth
    DICOMwebClient(url=orthanc.url + "/dicom-web", session=session).store_instances([dcmread(p) for p in paths])
    uids = series_uids(paths)
    wait_until(lambda: all(store.contains(uid) for uid in uids), 60, "the STOW-RS upload to be indexed")


def test_an_instance_that_is_not_an_image_is_listed_as_rejected(orthanc, worker, tmp_path):
    report = tmp_path / "report.dcm"
    factory.structured_report().save_as(report, enforce_file_format=True)
    before = status(orthanc)["rejected"]
    storescu(orthanc, [report])
    wait_until(lambda: status(orthanc)["rejected"] == before + 1, 60, "the SR to be rejected")
    reasons = [entry["reason"] for entry in worker.queue.rejected().values()]
    assert "not an image" in reasons


def test_deleting_an_instance_in_orthanc_removes_it_from_the_index(orthanc, worker, store, tmp_path):
    paths = synthetic_series(tmp_path / "to-delete", slices=3)
    storescu(orthanc, paths)
    uid = dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID
    wait_until(lambda: store.contains(uid), 60, "the slice to be indexed")
    orthanc_id = store.describe([uid])[0].orthanc["instance"]
    assert orthanc.request("DELETE", f"/instances/{orthanc_id}")[0] == 200
    wait_until(lambda: not store.contains(uid), 60, "the slice to leave the index")


def test_killing_a_worker_mid_push_loses_nothing(orthanc, worker, store, client, redis_server, tmp_path):
    """A real `orthanc-cbir worker` process takes the entries and is killed with SIGKILL while
    it holds some; the test's worker claims what it left, so stored == indexed + rejected."""
    worker.stop()
    victim = WorkerProcess(tmp_path / "victim", redis_url=redis_server.url, orthanc=orthanc, batch_size=4).start()
    queue = IngestQueue(client)
    try:
        paths = synthetic_series(tmp_path / "kill", slices=60, size=256)
        push = subprocess.Popen(["storescu", "-aet", "TEST_PACS", "-aec", orthanc.aet, "127.0.0.1",
                                 str(orthanc.dicom_port), *map(str, paths)], env=dcmtk_environment())  # fmt: skip
        wait_until(lambda: queue.counts()["pending"] > 0 or victim.process.poll() is not None, 60,
                   "the worker process to take entries", every_s=0.002)  # fmt: skip
        assert victim.process.poll() is None, victim.log_tail()
    finally:
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
    assert push.wait(timeout=120) == 0
    uids = series_uids(paths)
    assert not all(store.contains(uid) for uid in uids), "the worker process finished before it was killed"
    worker.start()
    wait_until(lambda: all(store.contains(uid) for uid in uids), 90, "every slice to be indexed after the kill")
    counts = status(orthanc)
    assert len(orthanc.get_json("/instances")) == counts["indexed"] + counts["rejected"]


def series_uids(paths) -> list[str]:
    return [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]


def test_similar_route_gives_the_core_answer_with_ids_and_thumbnails(orthanc, worker, store, tmp_path):
    paths = synthetic_series(tmp_path / "route", slices=9, texture=5)
    storescu(orthanc, paths)
    uids = series_uids(paths)
    wait_until(lambda: all(store.contains(uid) for uid in uids), 60, "the series to be indexed")
    stored = store.describe([uids[4]])[0]
    searcher = Searcher(store)
    searcher.snapshot.refresh()
    query = searcher.stored_query(np.array([stored.row]))
    assert query.probabilities, "a stored instance asks with its class probabilities (the class strategy needs them)"
    for strategy in ("exact", "class"):
        expected = searcher.search(query, SearchOptions(strategy, k=5)).sop_instance_uids
        for identifier in (stored.orthanc["instance"], uids[4]):  # an Orthanc id or the SOPInstanceUID
            answer = orthanc.get_json(f"/cbir/instances/{identifier}/similar?k=5&strategy={strategy}")
            assert [hit["SOPInstanceUID"] for hit in answer["hits"]] == expected and uids[4] not in expected
            assert [hit["rank"] for hit in answer["hits"]] == [1, 2, 3, 4, 5]
            first = answer["hits"][0]
            assert first["thumbnail"] == f"/cbir/instances/{first['orthanc']['instance']}/thumbnail"
            assert first["orthanc"]["series"] and first["StudyInstanceUID"] and answer["model"] == store.info.version
    expected = searcher.search(query, SearchOptions("exact", k=5)).sop_instance_uids
    second_page = orthanc.get_json(f"/cbir/instances/{uids[4]}/similar?k=2&offset=3&strategy=exact")
    assert [hit["SOPInstanceUID"] for hit in second_page["hits"]] == expected[3:5]
    assert [hit["rank"] for hit in second_page["hits"]] == [4, 5]


def test_similar_series_never_answers_with_itself(orthanc, worker, store):
    some = store.describe(store.sop_uids([0]))[0]
    for level in ("series", "instance"):  # asked per series or per instance, never its own series
        answer = orthanc.get_json(f"/cbir/series/{some.orthanc['series']}/similar?k=3&strategy=exact&level={level}")
        assert answer["level"] == level and len(answer["hits"]) == 3
        assert all(hit["SeriesInstanceUID"] != some.metadata.series_instance_uid for hit in answer["hits"])


def test_query_route_embeds_an_unstored_file_through_a_worker(orthanc, worker, tmp_path):
    probe = synthetic_series(tmp_path / "probe", slices=1, texture=3)[0]
    status_code, body, _ = orthanc.request("POST", "/cbir/query", probe.read_bytes(), content_type="application/dicom",
                                           headers={"X-Cbir-K": "4", "X-Cbir-Strategy": "exact"})  # fmt: skip
    assert status_code == 200, body
    assert [hit["rank"] for hit in json.loads(body)["hits"]] == [1, 2, 3, 4]
    status_code, body, _ = orthanc.request("POST", "/cbir/query", factory.to_bytes(factory.structured_report()))
    assert status_code == 400 and "not an image" in json.loads(body)["error"]


def test_similar_answers_as_qido_rs_to_a_dicomweb_client(orthanc, worker, store):
    stored = store.describe(store.sop_uids([5]))[0]
    base = f"/cbir/instances/{stored.orthanc['instance']}/similar"
    session = requests.Session()
    session.auth = orthanc.auth
    found = DICOMwebClient(url=orthanc.url + base, session=session).search_for_instances(
        limit=3, fields=["SeriesDescription"])  # fmt: skip
    datasets = [Dataset.from_json(item) for item in found]
    ranks = [int(ds.get_private_item(0x0011, 0x01, "ORTHANC-CBIR").value) for ds in datasets]
    assert ranks == [1, 2, 3]
    as_json = orthanc.get_json(base + "?k=3")
    assert [ds.SOPInstanceUID for ds in datasets] == [hit["SOPInstanceUID"] for hit in as_json["hits"]]
    assert all(ds.SeriesDescription for ds in datasets)
    assert not any(tag in item for item in found for tag in ("00100010", "00100020", "00100030"))  # no name, ID, birth


@pytest.mark.parametrize(("path", "code", "message"), [
    ("/cbir/instances/1.2.3.4/similar", 404, "not in the index"),
    ("/cbir/instances/1.2.3.4/similar?k=0", 400, "k must be"),
    ("/cbir/instances/1.2.3.4/similar?strategy=nearest", 400, "strategy is one of"),
    ("/cbir/instances/1.2.3.4/similar?age=old", 400, "age is MIN-MAX"),
    ("/cbir/instances/1.2.3.4/similar?colour=red", 400, "unknown parameter"),
    # the messages are fixed texts that never repeat what was sent (issue 17 item 14)
    ("/cbir/instances/1.2.3.4/similar?strategy=multilateral&weights=colour=1", 400, "SUB one of modality"),
    ("/cbir/instances/1.2.3.4/similar?strategy=multilateral&weights=modality=nan", 400, "WEIGHT a number >= 0"),
])  # fmt: skip
def test_similar_route_answers_mistakes_with_a_message(orthanc, worker, path, code, message):
    status_code, body, _ = orthanc.request("GET", path)
    assert status_code == code and message in json.loads(body)["error"]


def test_rejected_route_lists_the_reason(orthanc, worker):
    rejected = orthanc.get_json("/cbir/rejected")["rejected"]
    assert any(entry["reason"] == "not an image" for entry in rejected)


def test_reconcile_recovers_lost_entries_and_drops_what_orthanc_no_longer_has(orthanc, worker, store, client,
                                                                                redis_server, tmp_path, capsys):
    """Entries lost while no worker ran (the stream emptied by hand, as if Redis had been down):
    reconcile finds the stored-but-unindexed instances and the indexed-but-deleted one."""
    from orthanc_cbir.cli import main

    worker.stop()
    queue = IngestQueue(client)
    paths = synthetic_series(tmp_path / "lost", slices=4, texture=7)
    storescu(orthanc, paths)
    indexed = store.describe(store.sop_uids([0]))[0]
    assert orthanc.request("DELETE", f"/instances/{indexed.orthanc['instance']}")[0] == 200
    wait_until(lambda: queue.counts()["queued"] >= 5, 30, "the plugin to enqueue")
    client.delete(queue.keys.stream)  # every entry lost
    with pytest.MonkeyPatch.context() as patch:
        for name, value in cbir_environment(redis_server.url, orthanc).items():
            patch.setenv(name, value)
        assert main(["reconcile"]) == 0
    assert "4 sent to the workers; 1 gone from Orthanc" in capsys.readouterr().out
    worker.start()
    uids = series_uids(paths)
    wait_until(lambda: all(store.contains(uid) for uid in uids), 60, "the lost instances to be indexed")
    wait_until(lambda: not store.contains(indexed.metadata.sop_instance_uid), 60, "the deleted one to go")
