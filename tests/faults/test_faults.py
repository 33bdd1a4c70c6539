"""Trustworthy under faults: a worker killed mid-batch, Redis restarted mid-push, Orthanc restarted
mid-push, Redis unreachable. After each, every instance Orthanc stores is indexed or rejected with
its reason, exactly once: Orthanc's instance count == index count + rejected count, and the Orthanc
ids the index records are exactly Orthanc's. Real redis-server (append-only file), Orthanc with the
plugin, storescu and ``orthanc-cbir worker`` processes with the shipped model; loopback only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from orthanc_cbir.ingest.queue import ORTHANC
from orthanc_cbir.local_services import WorkerProcess, dcmtk_environment
from tests import dicom_factory as factory
from tests.faults.conftest import Stack
from tests.integration.pushing import storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

SETTLE_S = 120
"""The longest a test waits for the index to catch up after a fault (2 shared cores)."""


def orthanc_instances(stack: Stack) -> list[str]:
    return stack.orthanc.get_json("/instances")


def accounted(stack: Stack) -> bool:
    """Everything Orthanc stores is indexed or rejected, and no entry is left in the stream."""
    counts = stack.queue.counts()
    return (counts["queued"] == 0 and counts["pending"] == 0
            and len(orthanc_instances(stack)) == stack.store.count() + counts["rejected"])  # fmt: skip


def assert_each_instance_once(stack: Stack, expected: int) -> None:
    """Indexed or rejected-with-reason, exactly once, for every instance Orthanc stores."""
    stored = set(orthanc_instances(stack))
    indexed = {key.decode() for key in stack.client.hkeys(stack.queue.keys.orthanc_ids)}
    rejected = stack.queue.rejected_from(ORTHANC)
    assert len(stored) == expected
    assert len(stored) == stack.store.count() + len(rejected), "a duplicate or a missing record"
    assert indexed.isdisjoint(rejected) and indexed | rejected == stored
    assert all(entry["reason"] for entry in stack.queue.rejected().values())


def push_in_thread(stack: Stack, paths) -> tuple[threading.Thread, list[int]]:
    """storescu in a thread (one association per run); its exit status lands in the list."""
    status: list[int] = []

    def push() -> None:
        done = subprocess.run(["storescu", "-aet", "TEST_PACS", "-aec", stack.orthanc.aet, "127.0.0.1",
                               str(stack.orthanc.dicom_port), *map(str, paths)],
                              capture_output=True, timeout=120, env=dcmtk_environment())  # fmt: skip
        status.append(done.returncode)

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    return thread, status


def wait_stored(stack: Stack, at_least: int) -> None:
    wait_until(lambda: len(orthanc_instances(stack)) >= at_least, 60, f"Orthanc to store {at_least}", every_s=0.05)


def stopped(worker: WorkerProcess) -> None:
    worker.stop()
    assert worker.process.returncode == 0, worker.log_tail()


def test_a_worker_killed_mid_batch_loses_nothing(stack, tmp_path):
    """SIGKILL a worker process while it holds a batch: another claims it after CLAIM_AFTER_S."""
    victim = stack.worker("victim", batch_size=4).start()
    paths = synthetic_series(tmp_path / "kill", slices=40, size=256)
    report = tmp_path / "report.dcm"  # rejected with its reason, counted once too
    factory.structured_report().save_as(report, enforce_file_format=True)
    try:
        thread, _ = push_in_thread(stack, [*paths, report])
        wait_until(lambda: stack.queue.counts()["pending"] > 0 or victim.process.poll() is not None, 60,
                   "the worker process to take a batch", every_s=0.002)  # fmt: skip
        assert victim.process.poll() is None, victim.log_tail()
    finally:
        victim.process.kill()
        victim.process.wait(timeout=10)
    thread.join(timeout=120)
    assert stack.store.count() < len(paths), "the worker finished before it was killed"
    survivor = stack.worker("survivor").start()
    try:
        wait_until(lambda: accounted(stack), SETTLE_S, "every instance indexed or rejected after the kill")
    finally:
        stopped(survivor)
    assert_each_instance_once(stack, len(paths) + 1)
    assert list(stack.queue.rejected().values())[0]["reason"] == "not an image"


def test_redis_restarted_mid_push_loses_nothing(stack, tmp_path):
    """redis-server stops (SIGTERM, append-only file on) while storescu pushes, and starts again on
    the same port and data dir: Orthanc kept storing, the plugin kept the changes, the worker
    waited; afterwards everything is indexed, without reconcile."""
    worker = stack.worker().start()
    first = synthetic_series(tmp_path / "first", slices=30, size=128)
    during = synthetic_series(tmp_path / "during", slices=10, size=128, texture=7)
    try:
        thread, status = push_in_thread(stack, first)
        wait_stored(stack, 5)
        stack.redis_server.stop()  # mid-push
        storescu(stack.orthanc, during)  # stored while Redis is down, for sure
        thread.join(timeout=120)
        assert status == [0]
        assert len(orthanc_instances(stack)) == len(first) + len(during), "Orthanc stopped storing"
        time.sleep(1)
        stack.redis_server.start()  # the same port, the same append-only file
        wait_until(lambda: accounted(stack), SETTLE_S, "everything indexed after Redis came back")
    finally:
        stopped(worker)
    assert_each_instance_once(stack, len(first) + len(during))
    assert stack.queue.rejected() == {}
    assert "kept changes" in stack.orthanc.log_tail(200) or "kept change" in stack.orthanc.log_tail(200)


def test_orthanc_restarted_mid_push_indexes_what_it_stored(stack, tmp_path):
    """Orthanc stops (SIGTERM) while storescu pushes and starts again on the same storage and ports;
    the worker's fetches fail meanwhile and its batch is claimed again. Every instance Orthanc
    stored (all those it acknowledged) ends indexed; the PACS sends the rest again."""
    worker = stack.worker().start()
    paths = synthetic_series(tmp_path / "push", slices=60, size=256)
    try:
        thread, status = push_in_thread(stack, paths)
        wait_stored(stack, 5)
        stack.orthanc.stop()  # mid-push: the association breaks
        thread.join(timeout=120)
        stack.orthanc.start()
        stored = len(orthanc_instances(stack))
        assert 5 <= stored
        wait_until(lambda: accounted(stack), SETTLE_S, f"the {stored} stored instances indexed after the restart")
        storescu(stack.orthanc, paths)  # the PACS sends again: what Orthanc has is not stored twice
        wait_until(lambda: accounted(stack) and stack.store.count() == len(paths), SETTLE_S, "all indexed")
    finally:
        stopped(worker)
    assert_each_instance_once(stack, len(paths))


def test_redis_unreachable_orthanc_stores_queries_answer_503_and_nothing_is_lost(stack, tmp_path):
    """Redis down for a while: Orthanc stores what is pushed, the similarity routes answer 503 with
    a message, and what was stored meanwhile is indexed once Redis is back (the plugin's buffer),
    without `orthanc-cbir reconcile`."""
    worker = stack.worker().start()
    before = synthetic_series(tmp_path / "before", slices=6, size=128)
    during = synthetic_series(tmp_path / "during", slices=20, size=128, texture=5)
    try:
        storescu(stack.orthanc, before)
        wait_until(lambda: accounted(stack) and stack.store.count() == len(before), SETTLE_S, "the first series")
        indexed = orthanc_instances(stack)[0]
        stack.redis_server.stop()

        storescu(stack.orthanc, during)  # Orthanc keeps storing
        assert len(orthanc_instances(stack)) == len(before) + len(during)
        new = next(oid for oid in orthanc_instances(stack) if oid != indexed)
        study = stack.orthanc.get_json(f"/instances/{new}/study")["ID"]
        for path in (f"/cbir/instances/{indexed}/similar", f"/cbir/instances/{new}/similar?k=3",
                     f"/cbir/studies/{study}/similar", "/cbir/rejected"):
            code, body, _ = stack.orthanc.request("GET", path)  # Orthanc sends an error without a content type
            answer = json.loads(body)
            assert code == 503 and answer["status"] == 503, (path, code, body)
            assert "unreachable" in answer["error"] and "the index cannot answer now" in answer["error"]
            assert f"127.0.0.1:{stack.redis_server.port}" in answer["error"]
        code, body, _ = stack.orthanc.request("POST", "/cbir/query", before[0].read_bytes(),
                                              content_type="application/dicom")  # fmt: skip
        assert code == 503 and "unreachable" in json.loads(body)["error"]
        status = stack.orthanc.get_json("/cbir/status")  # 200: a monitor reads what is wrong
        assert status["redis"]["ok"] is False

        stack.redis_server.start()
        wait_until(lambda: accounted(stack), SETTLE_S, "what was stored while Redis was down to be indexed")
        code, body, _ = stack.orthanc.request("GET", f"/cbir/instances/{new}/similar?k=3")
        assert code == 200 and len(json.loads(body)["hits"]) == 3
    finally:
        stopped(worker)
    assert_each_instance_once(stack, len(before) + len(during))


def test_a_hung_redis_gets_a_503_within_seconds_not_after_the_worker_wait(stack, tmp_path):
    """Redis stopped mid-answer (SIGSTOP: connections open, no replies): the similarity route
    answers 503 once a command times out. Its one client had the 130 s timeout of the worker
    request/reply, so a hung Redis held an Orthanc HTTP thread 130 s."""
    worker = stack.worker().start()
    paths = synthetic_series(tmp_path / "series", slices=4, size=64)
    try:
        storescu(stack.orthanc, paths)
        wait_until(lambda: accounted(stack) and stack.store.count() == len(paths), SETTLE_S, "the series")
        instance = orthanc_instances(stack)[0]
        os.kill(stack.redis_server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            code, body, _ = stack.orthanc.request("GET", f"/cbir/instances/{instance}/similar?k=2", timeout_s=60)
            waited = time.monotonic() - started
        finally:
            os.kill(stack.redis_server.process.pid, signal.SIGCONT)
        assert code == 503 and "unreachable" in json.loads(body)["error"], (code, body)
        assert waited < 40, f"{waited:.0f} s for an answer"
    finally:
        stopped(worker)
