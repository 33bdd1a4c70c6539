"""Fault tests: a real redis-server (append-only file on), Orthanc with this project's plugin and
an ``orthanc-cbir worker`` process on free loopback ports, one set per test, in its temp dir;
the tests stop, kill and restart them. ``stack`` starts them and stops what is left at the end."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import redis

from orthanc_cbir.config import DEFAULT_MODEL
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.local_services import ORTHANC_BINARY, OrthancServer, RedisServer, WorkerProcess

MISSING = [tool for tool in ("redis-server", ORTHANC_BINARY, "storescu") if not shutil.which(tool)]
if MISSING:  # `make test` installs them; a bare `pytest` on another machine may not have them
    pytest.skip(f"fault tests need {', '.join(MISSING)} (run `make test`)", allow_module_level=True)

CLAIM_AFTER_S = 2
"""A batch a killed or stalled worker held goes to another read after this long (60 s in production)."""


@dataclass
class Stack:
    redis_server: RedisServer
    orthanc: OrthancServer
    client: redis.Redis
    store: IndexStore
    queue: IngestQueue
    tmp_path: object

    def worker(self, name: str = "worker", batch_size: int = 8) -> WorkerProcess:
        """A new ``orthanc-cbir worker`` process (not started), claiming after ``CLAIM_AFTER_S``."""
        process = WorkerProcess(self.tmp_path / name, redis_url=self.redis_server.url, orthanc=self.orthanc,
                                batch_size=batch_size)  # fmt: skip
        process.environment["CBIR_CLAIM_AFTER_S"] = str(CLAIM_AFTER_S)
        return process


@pytest.fixture
def stack(tmp_path):
    redis_server = RedisServer(tmp_path / "redis", persistent=True).start()
    orthanc = None
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    try:
        orthanc = OrthancServer(tmp_path / "orthanc", redis_url=redis_server.url).start()
        yield Stack(redis_server, orthanc, client, IndexStore(client, IndexInfo.for_model(str(DEFAULT_MODEL))),
                    IngestQueue(client), tmp_path)  # fmt: skip
    finally:
        client.close()
        if orthanc is not None:
            orthanc.stop()
        redis_server.stop()
