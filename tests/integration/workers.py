"""A worker in a thread of the test process, as ``orthanc-cbir worker`` (queue, index, "Similar
cases" series) or ``orthanc-cbir serve`` (its spool) runs it, against a real Orthanc or spool and
a real Redis that the caller started."""

from __future__ import annotations

import threading

import redis

from orthanc_cbir.answers.similar_series import SimilarSeriesMaker
from orthanc_cbir.config import Settings, load_settings
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.orthanc_client import OrthancClient
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.ingest.worker import Worker
from orthanc_cbir.model.embedder import Embedder


def make_settings(redis_url: str, orthanc, **overrides) -> Settings:
    """Settings that point at this Redis and this Orthanc (``OrthancServer``), with ``overrides``."""
    return load_settings(env={}, redis_url=redis_url, orthanc_url=orthanc.url, orthanc_username=orthanc.auth[0],
                         orthanc_password=orthanc.auth[1], **overrides)  # fmt: skip


class WorkerThread:
    """A worker in a daemon thread that a test can stop and start again."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.queue = worker.queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WorkerThread:
        self._stop.clear()
        self._thread = threading.Thread(target=self.worker.run, args=(self._stop,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def start_worker(orthanc, redis_url: str, embedder: Embedder, **settings_overrides) -> WorkerThread:
    """A worker thread of ``orthanc`` and ``redis_url``; ``settings_overrides`` as in :func:`make_settings`."""
    client = redis.Redis.from_url(redis_url)
    settings = make_settings(redis_url, orthanc, **settings_overrides)
    queue = IngestQueue(client, claim_idle_ms=1500)
    return WorkerThread(Worker(queue, orthanc.client, IndexStore(client, IndexInfo.from_card(embedder.card)), embedder,
                                batch_size=16, consumer="series-worker",
                                series_maker=SimilarSeriesMaker(settings, orthanc.client, client, queue.keys),
                                series_on_stable_study=settings.similar_series_on_stable_study,
                                regions=settings.regions)).start()  # fmt: skip


def start_spool_worker(client: redis.Redis, store: IndexStore, embedder: Embedder, spool: Spool, consumer: str,
                       **options) -> WorkerThread:  # fmt: skip
    """A worker thread of a standalone server: it indexes what ``spool`` received (there is no
    Orthanc; its client is never called). ``options`` go to :class:`Worker`."""
    return WorkerThread(Worker(IngestQueue(client, claim_idle_ms=1500), OrthancClient("http://127.0.0.1:9"), store,
                               embedder, batch_size=16, consumer=consumer, spool=spool, **options)).start()  # fmt: skip
