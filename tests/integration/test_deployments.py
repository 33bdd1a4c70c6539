"""A standalone server and Orthanc's workers on one Redis (issue 17, item 4): each deployment reads
its own stream (``CBIR_INGEST_STREAM``), and a worker refuses a stream that the other kind of
worker reads before it takes an entry. Real redis-server, Orthanc with the plugin, ``orthanc-cbir
worker`` and ``orthanc-cbir serve`` processes, storescu, all on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orthanc_cbir.config import Settings
from orthanc_cbir.index import IndexStore
from orthanc_cbir.local_services import REPO_ROOT, StandaloneServer, WorkerProcess, free_port
from tests.integration.pushing import sop_instance_uids, storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

STANDALONE_STREAM = "cbir:standalone:ingest"


@pytest.fixture(scope="module")
def orthanc_worker(orthanc, redis_server, tmp_path_factory):
    """An ``orthanc-cbir worker`` of the default stream, as Orthanc's plugin fills it."""
    process = WorkerProcess(tmp_path_factory.mktemp("worker"), redis_url=redis_server.url, orthanc=orthanc,
                            batch_size=8).start()  # fmt: skip
    yield process
    process.stop()


def all_indexed(store: IndexStore, paths) -> bool:
    return all(store.row(uid) is not None for uid in sop_instance_uids(paths))


def test_a_standalone_server_and_orthanc_workers_share_one_redis(orthanc, orthanc_worker, redis_server, store,
                                                                tmp_path):  # fmt: skip
    server = StandaloneServer(tmp_path / "serve", redis_url=redis_server.url)
    server.environment["CBIR_INGEST_STREAM"] = STANDALONE_STREAM
    with server:
        to_orthanc = synthetic_series(tmp_path / "orthanc", slices=6)
        to_server = synthetic_series(tmp_path / "serve-push", slices=6, texture=3)
        for _ in range(2):  # interleaved, so each stream has entries while the other's workers read
            storescu(orthanc, to_orthanc[:3] if _ == 0 else to_orthanc[3:])
            storescu(server, to_server[:3] if _ == 0 else to_server[3:])
        wait_until(lambda: all_indexed(store, to_orthanc + to_server), 90, "what both deployments received indexed")
        assert orthanc_worker.process.poll() is None, orthanc_worker.log_tail()
        assert server.process.poll() is None, server.log_tail()
        assert "without a spool" not in orthanc_worker.log_tail(300)
        assert orthanc.get_json("/cbir/status").get("dead_letters") == 0


def test_a_worker_refuses_a_stream_that_a_standalone_server_reads(orthanc, redis_server, store, tmp_path):
    server = StandaloneServer(tmp_path / "serve", redis_url=redis_server.url)
    server.environment["CBIR_INGEST_STREAM"] = "refusal:ingest"
    with server:
        misconfigured = WorkerProcess(tmp_path / "worker", redis_url=redis_server.url, orthanc=orthanc)
        misconfigured.environment["CBIR_INGEST_STREAM"] = "refusal:ingest"
        misconfigured.start()
        try:
            misconfigured.process.wait(timeout=60)
        finally:
            misconfigured.stop()
        assert misconfigured.process.returncode != 0
        assert "CBIR_INGEST_STREAM" in misconfigured.log_tail(50)
        paths = synthetic_series(tmp_path / "push", slices=3, texture=6)
        storescu(server, paths)  # the server's entries were left to its own workers
        wait_until(lambda: all_indexed(store, paths), 60, "the server's files indexed")


def test_a_standalone_server_refuses_the_stream_of_orthanc_workers(orthanc_worker, orthanc, redis_server, tmp_path):
    wait_until(lambda: "stream cbir:ingest" in orthanc_worker.log_tail(100), 30, "the worker reading its stream")
    spool = tmp_path / "spool"
    environment = {"CBIR_REDIS_URL": redis_server.url, "CBIR_SPOOL_DIR": str(spool), "CBIR_SCP_PORT": str(free_port()),
                   "CBIR_HTTP_PORT": str(free_port()), "CBIR_INGEST_STREAM": Settings().ingest_stream}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "orthanc_cbir.cli", "serve"], env=environment, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "belongs to orthanc workers" in done.stderr and "CBIR_INGEST_STREAM" in done.stderr


def test_compose_gives_the_standalone_server_its_own_stream():
    services = yaml.safe_load(Path(REPO_ROOT / "docker" / "compose.yaml").read_text())["services"]
    streams = {name: service.get("environment", {}).get("CBIR_INGEST_STREAM", Settings().ingest_stream)
               for name, service in services.items() if name != "redis"}  # fmt: skip
    assert streams["orthanc"] == streams["worker"]
    assert streams["standalone"] != streams["orthanc"]
