"""A standalone server and Orthanc's workers on one Redis (issue 17, item 4): each deployment reads
its own stream (``CBIR_INGEST_STREAM``), and a worker refuses a stream that the other kind of
worker reads before it takes an entry. Real redis-server, Orthanc with the plugin, ``orthanc-cbir
worker`` and ``orthanc-cbir serve`` processes, storescu, all on loopback.

The deployment defaults (issue: docker/compose.yaml published everything, admitted any AE title,
ran Redis without a password): a Redis password given apart from the URL, ``serve`` refusing to
listen off loopback without a list of calling AE titles (``*`` admits any), and the container's
Orthanc storing only what a listed AE title sends, with the options docker/orthanc_config.py writes.
docker/compose.yaml itself: tests/unit/test_compose.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from orthanc_cbir.config import Settings
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.scp import StoreSCP
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import (
    REPO_ROOT,
    OrthancServer,
    RedisServer,
    StandaloneServer,
    WorkerProcess,
    dcmtk_environment,
    free_port,
)
from orthanc_cbir.model.embedder import Embedder
from orthanc_cbir.redis_client import client_for
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


def test_a_standalone_server_without_worker_threads_is_indexed_by_worker_processes(tmp_path):
    """``serve --workers 0`` beside ``orthanc-cbir worker`` processes reading its spool: the receiver
    no longer shares its GIL with the workers (``benchmarks/scp.py``: 117 against 82 received/s)."""
    with RedisServer(tmp_path / "redis") as redis_server, \
            StandaloneServer(tmp_path / "serve", redis_url=redis_server.url, workers=0) as server, \
            WorkerProcess(tmp_path / "worker", redis_url=redis_server.url, spool_dir=server.spool_dir,
                          batch_size=4):  # fmt: skip
        store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(Embedder().card))
        paths = synthetic_series(tmp_path / "push", slices=4, texture=5)
        storescu(server, paths)
        wait_until(lambda: all_indexed(store, paths), 90, "what the server spooled indexed by the worker process")
        assert not list(server.spool_dir.glob("*.dcm")), "an indexed file left in the spool"


def test_a_standalone_server_refuses_the_stream_of_orthanc_workers(orthanc_worker, orthanc, redis_server, tmp_path):
    wait_until(lambda: "stream cbir:ingest" in orthanc_worker.log_tail(100), 30, "the worker reading its stream")
    spool = tmp_path / "spool"
    environment = {"CBIR_REDIS_URL": redis_server.url, "CBIR_SPOOL_DIR": str(spool), "CBIR_SCP_PORT": str(free_port()),
                   "CBIR_HTTP_PORT": str(free_port()), "CBIR_INGEST_STREAM": Settings().ingest_stream}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "orthanc_cbir.cli", "serve"], env=environment, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "belongs to orthanc workers" in done.stderr and "CBIR_INGEST_STREAM" in done.stderr


# -- deployment defaults: Redis's password apart from its URL, calling AE titles listed -------------

ODD_PASSWORD = "p@ss/w:rd%20 with spaces"
"""A Redis password a URL cannot carry as it is (``@``, ``/``, ``:``, ``%``)."""


def test_a_redis_password_given_apart_from_the_url_opens_redis_and_none_is_refused(tmp_path):
    with RedisServer(tmp_path / "redis", password=ODD_PASSWORD) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        with client_for(Settings(redis_url=url, redis_password=ODD_PASSWORD)) as client:
            assert client.ping()
        for refused in ("", "wrong"):
            with client_for(Settings(redis_url=url, redis_password=refused)) as other, \
                    pytest.raises(redis.AuthenticationError):  # fmt: skip
                other.ping()
        # a password in the URL is the one sent (redis-py: the URL's values win over keyword arguments)
        with client_for(Settings(redis_url=server.url, redis_password="wrong")) as client:
            assert client.ping()


def serve_refusal(tmp_path, *flags: str, **settings: str) -> subprocess.CompletedProcess:
    """``orthanc-cbir serve`` with ``flags`` and ``settings`` over a Redis that is not there: what it says when it
    refuses."""
    environment = {
        "CBIR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there: refused before Redis
        "CBIR_SPOOL_DIR": str(tmp_path / "spool"),
        "CBIR_SCP_PORT": str(free_port()),
        "CBIR_HTTP_PORT": str(free_port()),
        **settings,
    }
    return subprocess.run([sys.executable, "-m", "orthanc_cbir.cli", "serve", *flags], env=environment,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip


def test_serve_refuses_to_listen_off_loopback_without_a_list_of_calling_ae_titles(tmp_path):
    done = serve_refusal(tmp_path, CBIR_SCP_HOST="0.0.0.0", CBIR_HTTP_TOKEN="t0ken")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CBIR_SCP_ALLOWED_AETS" in done.stderr and "0.0.0.0" in done.stderr
    assert not (tmp_path / "spool").exists()


def test_serve_refuses_an_http_api_off_loopback_without_authentication_with_a_message(tmp_path):
    """It died of a ValueError traceback (exit 1) after reaching for Redis."""
    done = serve_refusal(tmp_path, CBIR_HTTP_HOST="0.0.0.0")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "without authentication" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_fewer_than_one_receiving_process_with_a_message(tmp_path):
    for done in (serve_refusal(tmp_path, CBIR_SCP_PROCESSES="0"), serve_refusal(tmp_path, "--scp-processes", "-1")):
        assert done.returncode == 2, done.stdout + done.stderr
        assert "CBIR_SCP_PROCESSES (--scp-processes)" in done.stderr and "Traceback" not in done.stderr


def echo(port: int, calling: str, called: str) -> bool:
    """Whether ``calling`` gets an association with ``called`` at 127.0.0.1:``port`` and a C-ECHO answered."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return False
    try:
        return int(association.send_c_echo().Status) == 0
    finally:
        association.release()


def test_serve_off_loopback_with_a_star_admits_any_calling_ae_title(redis_server, tmp_path):
    server = StandaloneServer(tmp_path / "serve", redis_url=redis_server.url, allowed_aets="*")
    server.environment |= {"CBIR_SCP_HOST": "0.0.0.0", "CBIR_INGEST_STREAM": "star:ingest"}
    with server:
        assert echo(server.dicom_port, "ANY_SCU_AT_ALL", server.aet)


def test_a_list_of_calling_ae_titles_admits_those_only_and_a_star_any(client, tmp_path):
    spool = Spool(tmp_path / "spool", IngestQueue(client))
    listed = StoreSCP(spool, "CBIR_SCP", ("PACS_MAIN", "CT_2")).start("127.0.0.1", free_port())
    star = StoreSCP(spool, "CBIR_SCP", ("*",)).start("127.0.0.1", free_port())
    try:
        assert echo(listed.port, "CT_2", "CBIR_SCP") and not echo(listed.port, "STRANGER", "CBIR_SCP")
        assert echo(star.port, "STRANGER", "CBIR_SCP")
    finally:
        listed.stop()
        star.stop()


class ContainerDicomOrthanc(OrthancServer):
    """A bare Orthanc (no plugin: only its DICOM server is under test) with the DICOM options
    that docker/orthanc_config.py writes for the container."""

    def __init__(self, state_dir: Path, dicom_options: dict[str, Any]):
        super().__init__(state_dir, redis_url="redis://127.0.0.1:1/0")  # unused: no plugin
        self.dicom_options = dicom_options

    def configuration(self) -> dict[str, Any]:
        config = {**super().configuration(), **self.dicom_options, "Plugins": []}
        del config["PythonScript"]
        return config


def container_dicom_options(tmp_path: Path, allowed_aets: str) -> dict[str, Any]:
    target = tmp_path / "container-orthanc.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "docker" / "orthanc_config.py"), str(REPO_ROOT / "orthanc.json"),
                    str(target)], env={"CBIR_DICOM_ALLOWED_AETS": allowed_aets}, check=True, timeout=30)  # fmt: skip
    config = json.loads(target.read_text())
    return {key: config[key] for key in ("DicomAlwaysAllowStore", "DicomAlwaysAllowEcho", "DicomCheckModalityHost",
                                         "DicomModalities") if key in config}  # fmt: skip


def storescu_as(orthanc: OrthancServer, calling: str, paths) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", calling, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                           *map(str, paths)], capture_output=True, text=True, timeout=60,
                          env=dcmtk_environment())  # fmt: skip


def test_the_container_orthanc_stores_only_what_a_listed_ae_title_sends(tmp_path):
    options = container_dicom_options(tmp_path, "PACS_MAIN,CT_2")
    with ContainerDicomOrthanc(tmp_path / "orthanc", options) as orthanc:
        # Orthanc answers a C-ECHO from anyone unless told otherwise: a stranger learnt the AE was there
        assert echo(orthanc.dicom_port, "CT_2", orthanc.aet) and not echo(orthanc.dicom_port, "STRANGER", orthanc.aet)
        refused = synthetic_series(tmp_path / "stranger", slices=1)
        done = storescu_as(orthanc, "STRANGER", refused)
        assert done.returncode != 0, done.stdout + done.stderr
        assert "Rejected association for remote AET STRANGER" in orthanc.log_tail(50)  # not even associated
        assert orthanc.get_json("/instances") == []
        accepted = synthetic_series(tmp_path / "listed", slices=1, texture=4)
        done = storescu_as(orthanc, "CT_2", accepted)
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(orthanc.get_json("/instances")) == 1
