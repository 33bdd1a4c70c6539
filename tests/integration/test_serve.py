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
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.local_services import StandaloneServer
from orthanc_cbir.model.embedder import Embedder
from tests.integration.pushing import storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration


def push(server: StandaloneServer, paths, acknowledged: list[str], started: threading.Event | None = None) -> None:
    """C-STORE each file on one association, recording the SOPInstanceUIDs answered Success,
    until the association breaks."""
    ae = AE(ae_title="TEST_PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    if not association.is_established:
        return
    try:
        for path in paths:
            ds = dcmread(path)
            status = association.send_c_store(ds)
            if not association.is_established or "Status" not in status or int(status.Status) != 0:
                return
            acknowledged.append(str(ds.SOPInstanceUID))
            if started is not None and len(acknowledged) == 5:
                started.set()
    finally:
        if association.is_established:
            association.release()


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
