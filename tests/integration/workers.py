"""A worker in a thread of the test process, as ``orthanc-cbir worker`` runs it (queue, index,
"Similar cases" series), against a real Orthanc and Redis that the caller started."""

from __future__ import annotations

import threading

import redis

from orthanc_cbir.config import Settings, load_settings
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.similar_series import SimilarSeriesMaker
from orthanc_cbir.ingest.worker import Worker
from orthanc_cbir.model.embedder import Embedder


def make_settings(redis_url: str, orthanc, **overrides) -> Settings:
    """Settings that point at this Redis and this Orthanc (``OrthancServer``), with ``overrides``."""
    return load_settings(env={}, redis_url=redis_url, orthanc_url=orthanc.url, orthanc_username=orthanc.auth[0],
                         orthanc_password=orthanc.auth[1], **overrides)  # fmt: skip


class RunningWorker:
    """A worker running in a daemon thread until :meth:`stop`."""

    def __init__(self, worker: Worker):
        self.worker, self._stop = worker, threading.Event()
        self._thread = threading.Thread(target=worker.run, args=(self._stop,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def start_worker(orthanc, redis_url: str, embedder: Embedder, **settings_overrides) -> RunningWorker:
    """A worker thread of ``orthanc`` and ``redis_url``; ``settings_overrides`` as in :func:`make_settings`."""
    client = redis.Redis.from_url(redis_url)
    settings = make_settings(redis_url, orthanc, **settings_overrides)
    queue = IngestQueue(client, claim_idle_ms=1500)
    return RunningWorker(Worker(queue, orthanc.client, IndexStore(client, IndexInfo.from_card(embedder.card)), embedder,
                                batch_size=16, consumer="series-worker",
                                series_maker=SimilarSeriesMaker(settings, orthanc.client, client, queue.keys),
                                series_on_stable_study=settings.similar_series_on_stable_study))  # fmt: skip
