"""``orthanc-cbir serve`` as a PACS meets it: a real process receiving with its SCP, killed with
SIGKILL mid-push and started again, loses nothing it acknowledged. Real redis-server, pynetdicom
SCU and storescu, the shipped model in the server's worker thread."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
import redis
from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import RedisServer, StandaloneServer
from orthanc_cbir.model.embedder import Embedder
from tests.integration.pushing import push, sop_instance_uids, storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration


def status(server: StandaloneServer) -> dict:
    request = urllib.request.Request(server.url + "/cbir/status", headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_killed_server_loses_nothing_it_acknowledged(redis_server, tmp_path):
    store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(Embedder().card))
    paths = synthetic_series(tmp_path / "push", slices=40, size=256)
    acknowledged: list[str] = []
    server = StandaloneServer(tmp_path / "serve", redis_url=redis_server.url).start()
    try:
        started = threading.Event()
        sender = threading.Thread(target=push, args=(server, paths, acknowledged, started))
        sender.start()
        assert started.wait(60), "the SCP acknowledged nothing"
        server.kill()  # mid-push: the association breaks, the rest is not acknowledged
        sender.join(timeout=60)
        assert 5 <= len(acknowledged) < len(paths)
        server.start()  # the same spool and Redis: what was acknowledged and not indexed is enqueued again
        wait_until(lambda: all(store.row(uid) is not None for uid in acknowledged), 120,
                   f"the {len(acknowledged)} acknowledged instances indexed after the restart")  # fmt: skip
        # the PACS sends the rest again; everything ends indexed exactly once
        rest = [p for p in paths if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) not in acknowledged]
        storescu(server, rest)
        wait_until(lambda: status(server).get("indexed") == len(paths), 120, "all 40 indexed")
        assert store.count() == len(paths)
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log_tail()


# -- poison and faults (issue 17, items 3 and 13) --------------------------------------------------

SECRET_PATIENT = {"PatientName": "Poison^Petra^Secret", "PatientID": "PID-POISON-4711"}


def c_store_file(port: int, aet: str, path) -> int:
    """C-STORE one file as it is on disk (its file meta names the instance; the dataset is not
    read, so it may lack what pynetdicom would insist on): the status, -1 without an answer."""
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    ae = AE(ae_title="TEST_PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", port, ae_title=aet)
    try:
        assert association.is_established
        answer = association.send_c_store(path)
        return int(answer.Status) if "Status" in answer else -1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if association.is_established:
            association.release()


def poison_files(folder) -> dict[str, object]:
    """A CT slice without SOPInstanceUID (its file meta still names one), and one whose
    SOPInstanceUID starts with '.'."""
    folder.mkdir(parents=True, exist_ok=True)
    no_uid = dcmread(synthetic_series(folder / "a", slices=1, **SECRET_PATIENT)[0])
    no_uid.SOPClassUID = no_uid.file_meta.MediaStorageSOPClassUID = CTImageStorage
    del no_uid.SOPInstanceUID
    no_uid.save_as(folder / "no-uid.dcm", enforce_file_format=False)
    dotted = dcmread(synthetic_series(folder / "b", slices=1, **SECRET_PATIENT)[0])
    dotted.SOPClassUID = dotted.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dotted.SOPInstanceUID = dotted.file_meta.MediaStorageSOPInstanceUID = "." + str(dotted.SOPInstanceUID)[:60]
    dotted.save_as(folder / "dotted.dcm", enforce_file_format=False)
    return {"no-uid": folder / "no-uid.dcm", "dotted": folder / "dotted.dcm"}


def test_poison_c_stores_are_refused_with_a_reason_and_later_files_are_indexed(redis_server, tmp_path):
    store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(Embedder().card))
    poison = poison_files(tmp_path / "poison")
    with StandaloneServer(tmp_path / "serve", redis_url=redis_server.url) as server:
        assert c_store_file(server.dicom_port, server.aet, poison["no-uid"]) == 0xC000
        assert c_store_file(server.dicom_port, server.aet, poison["dotted"]) == 0xC000
        assert not list(server.spool_dir.glob("*.dcm")) and not list(server.spool_dir.glob(".*"))
        paths = synthetic_series(tmp_path / "after", slices=4, texture=3)
        storescu(server, paths)
        wait_until(lambda: all(store.row(uid) is not None for uid in sop_instance_uids(paths)), 60,
                   "the files sent after indexed")  # fmt: skip
        log = server.log_tail(400)
    assert "refused (0xC000): the dataset has no valid SOPInstanceUID" in log
    assert "refused (0xC000): the request's AffectedSOPInstanceUID is not a valid UID" in log
    assert not any(secret in log for secret in [*SECRET_PATIENT.values(), "Poison", "Petra", "4711"])


def test_poison_files_left_in_the_spool_do_not_stall_the_server(redis_server, tmp_path):
    """What an older version acknowledged and spooled (a hidden '.1.2...dcm' name, a file without
    SOPInstanceUID): the start sets them aside instead of stopping its worker, at every start."""
    store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(Embedder().card))
    poison = poison_files(tmp_path / "poison")
    server = StandaloneServer(tmp_path / "serve", redis_url=redis_server.url)
    server.spool_dir.mkdir(parents=True)
    (server.spool_dir / ".1.2.840.99.1.dcm").write_bytes(poison["dotted"].read_bytes())
    (server.spool_dir / "1.2.840.99.2.dcm").write_bytes(poison["no-uid"].read_bytes())
    try:
        for round_ in range(2):  # and again after a restart: nothing poisonous is enqueued again
            server.start()
            paths = synthetic_series(tmp_path / f"round{round_}", slices=3, texture=4 + round_)
            storescu(server, paths)
            wait_until(lambda paths=paths: all(store.row(uid) is not None for uid in sop_instance_uids(paths)), 60,
                       f"round {round_}: the files sent indexed")  # fmt: skip
            wait_until(lambda: not list(server.spool_dir.glob("*.dcm")), 30, "an empty spool")
            server.stop()
            assert server.process.returncode == 0, server.log_tail()
        assert sorted(p.name for p in (server.spool_dir / "rejected").iterdir()) == [".1.2.840.99.1.dcm",
                                                                                       "1.2.840.99.2.dcm"]  # fmt: skip
        rejected = IngestQueue(redis.Redis.from_url(redis_server.url)).rejected()
        no_uid = rejected["spool:1.2.840.99.2.dcm"]  # no SOPInstanceUID to key it by: its source and file
        assert no_uid["reason"] == "no SOPInstanceUID" and no_uid["source_id"] == "1.2.840.99.2.dcm"
    finally:
        server.stop()


def test_a_failed_c_store_leaves_no_part_file(redis_server, tmp_path):
    """The spool cannot take the file (here its name is taken by a directory; a full disk fails
    the same code): the SCU gets 0xA700 and the half-written copy is removed at once."""
    path = synthetic_series(tmp_path / "one", slices=1)[0]
    with StandaloneServer(tmp_path / "serve", redis_url=redis_server.url) as server:
        blocker = server.spool_dir / Spool.name_for(str(dcmread(path).SOPInstanceUID))
        blocker.mkdir()
        (blocker / "occupied").write_bytes(b"x")
        assert c_store_file(server.dicom_port, server.aet, path) == 0xA700
        assert list(server.spool_dir.glob(".part-*")) == []


def test_files_refused_while_redis_is_down_leave_nothing_behind_and_are_indexed_when_sent_again(tmp_path):
    """The SCU was told 0xA700 (not kept): the server keeps nothing either, so the spool drains
    to nothing and only what the SCU sends again is indexed (issue 21, item 6: the refused files
    stayed in the spool and were indexed behind the sender's back)."""
    redis_server = RedisServer(tmp_path / "redis", persistent=True).start()
    store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(Embedder().card))
    paths = synthetic_series(tmp_path / "during", slices=3)
    try:
        with StandaloneServer(tmp_path / "serve", redis_url=redis_server.url) as server:
            redis_server.stop()
            statuses = [c_store_file(server.dicom_port, server.aet, path) for path in paths]
            assert statuses == [0xA700] * 3
            assert sorted(p.name for p in server.spool_dir.iterdir()) == [], "a refused store left a file"
            redis_server.start()
            wait_until(lambda: status(server)["redis"]["ok"], 30, "the server reaching Redis again")
            assert status(server)["spooled"] == 0
            assert [c_store_file(server.dicom_port, server.aet, path) for path in paths] == [0] * 3  # sent again
            wait_until(lambda: all(store.row(uid) is not None for uid in sop_instance_uids(paths)), 90,
                       "the files sent again indexed")  # fmt: skip
    finally:
        redis_server.stop()
