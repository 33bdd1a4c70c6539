"""The standalone DICOM SCP: dcmtk's storescu and pynetdicom SCUs (several associations at once)
push to it, a worker indexes from its spool; strangers are refused. Real redis-server, real
pynetdicom server on loopback, the shipped model."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.scp import MAXIMUM_PDU_BYTES, StoreSCP
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import dcmtk_environment, free_port
from tests import dicom_factory as factory
from tests.integration.pushing import sop_instance_uids, synthetic_series, wait_until
from tests.integration.workers import start_spool_worker

pytestmark = pytest.mark.integration

ALLOWED = ("TEST_PACS", "MODALITY_1", "MODALITY_2", "MODALITY_3")


@pytest.fixture(scope="module")
def spool(client, tmp_path_factory):
    return Spool(tmp_path_factory.mktemp("spool"), IngestQueue(client))


@pytest.fixture(scope="module")
def scp(spool):
    server = StoreSCP(spool, "CBIR_SCP", ALLOWED).start("127.0.0.1", free_port())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(client, store, spool, embedder):
    running = start_spool_worker(client, store, embedder, spool, "scp-worker")
    yield running
    running.stop()


def storescu(scp, paths, calling: str = "TEST_PACS") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", calling, "-aec", "CBIR_SCP", "127.0.0.1", str(scp.port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120,
                          env=dcmtk_environment())  # fmt: skip


def test_storescu_pushes_are_indexed_and_leave_the_spool(scp, worker, store, spool, tmp_path):
    paths = synthetic_series(tmp_path / "series", slices=10)
    report = tmp_path / "report.dcm"
    factory.structured_report().save_as(report, enforce_file_format=True)
    done = storescu(scp, [*paths, report])
    assert done.returncode == 0, done.stderr
    wait_until(lambda: all(store.row(uid) is not None for uid in sop_instance_uids(paths)), 60,
               "the pushed slices indexed")  # fmt: skip
    report_uid = str(dcmread(report).SOPInstanceUID)
    wait_until(lambda: any(entry.get("sop_instance_uid") == report_uid for entry in worker.queue.rejected().values()),
               30, "the SR listed as rejected")  # fmt: skip
    wait_until(lambda: spool.pending() == 0, 10, "an empty spool")
    assert (spool.rejected_directory / Spool.name_for(report_uid)).is_file()  # kept for the operator


def test_several_pynetdicom_associations_at_once_are_all_indexed(scp, worker, store, tmp_path):
    series = [synthetic_series(tmp_path / f"s{n}", slices=6, texture=2 + n) for n in range(3)]
    statuses: list[int] = []

    def send(calling: str, paths) -> None:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage)
        association = ae.associate("127.0.0.1", scp.port, ae_title="CBIR_SCP")
        assert association.is_established
        try:
            for path in paths:
                statuses.append(int(association.send_c_store(dcmread(path)).Status))
        finally:
            association.release()

    threads = [threading.Thread(target=send, args=(f"MODALITY_{n + 1}", paths)) for n, paths in enumerate(series)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [0] * 18
    pushed = set().union(*(sop_instance_uids(paths) for paths in series))
    wait_until(lambda: all(store.row(uid) is not None for uid in pushed), 60, "18 slices from 3 associations indexed")


def test_a_calling_ae_outside_the_allowlist_is_refused(scp, tmp_path):
    paths = synthetic_series(tmp_path / "stranger", slices=1)
    done = storescu(scp, paths, calling="STRANGER")
    assert done.returncode != 0 and "Association Rejected" in (done.stdout + done.stderr)


def test_echo_answers(scp):
    ae = AE(ae_title="TEST_PACS")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", scp.port, ae_title="CBIR_SCP")
    try:
        assert int(association.send_c_echo().Status) == 0
    finally:
        association.release()


def test_the_scp_takes_pdus_of_a_mebibyte(scp):
    ae = AE(ae_title="TEST_PACS")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", scp.port, ae_title="CBIR_SCP")
    try:  # what a sender may put in one P-DATA PDU: a slice in one PDU instead of thirty-two
        assert association.is_established and association.acceptor.maximum_length == MAXIMUM_PDU_BYTES
    finally:
        association.release()


def test_a_file_left_in_the_spool_is_enqueued_again_at_start(client, store, spool, worker, tmp_path):
    """What a crash between writing the file and enqueuing it leaves behind is not lost."""
    path = synthetic_series(tmp_path / "orphan", slices=1, texture=7)[0]
    uid = str(dcmread(path).SOPInstanceUID)
    (spool.directory / ".part-halfwritten").write_bytes(b"\x00" * 10)  # a transfer never acknowledged
    Path(spool.directory / Spool.name_for(uid)).write_bytes(path.read_bytes())  # spooled, never enqueued
    assert spool.recover() >= 1
    wait_until(lambda: store.row(uid) is not None, 30, "the orphan indexed")
    assert not (spool.directory / ".part-halfwritten").exists()


def test_a_file_naming_another_sop_class_is_refused_and_the_association_goes_on(scp, worker, store, tmp_path):
    """pydicom's explicit_VR-UN.dcm carries a SOP Class UID unlike the one dcmsend negotiated: pynetdicom
    found no service for it and aborted the association, so the files after it were never sent while
    dcmsend exited 0 (issue 21, item 8). Now that one C-STORE fails with 0xA900 and the rest arrive."""
    from pydicom.data import get_testdata_file

    paths = synthetic_series(tmp_path / "after-bad", slices=3, texture=6)
    done = subprocess.run(["dcmsend", "-v", "-aet", "TEST_PACS", "-aec", "CBIR_SCP", "127.0.0.1", str(scp.port),
                           get_testdata_file("explicit_VR-UN.dcm"), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, env=dcmtk_environment())  # fmt: skip
    assert "Peer aborted" not in done.stderr + done.stdout, done.stderr
    assert "with status SUCCESS  : 3" in done.stderr and "with status ERROR    : 1" in done.stderr, done.stderr
    wait_until(lambda: all(store.row(uid) is not None for uid in sop_instance_uids(paths)), 60,
               "the files after the bad one indexed")  # fmt: skip
