"""``orthanc-cbir worker``: take stream entries, fetch, decode, embed, index, acknowledge.

A batch is acknowledged only after its records are in Redis, so a worker killed
mid-batch loses nothing: its entries are claimed by another worker once they
have been idle for ``claim_after_s``. An instance Orthanc no longer has is
acknowledged and skipped; one that cannot be decoded, or that is a "Similar
cases" image this service made, is recorded as rejected with its reason. The
worker also answers the interactive requests (embed a query file, make a
"Similar cases" series) and makes the series of stable studies when the
setting asks for it. Logs name Orthanc ids and counts, never patient data.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..dicom import Rejection, decode_instance
from ..dicom.pixels import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS_PER_FRAME
from ..dicom.similar_cases import is_own_output
from ..index import IndexInfo, IndexStore
from ..index.records import decode_bytes, embed_instances
from ..model.embedder import Embedder
from ..redis_client import UNREACHABLE as REDIS_UNREACHABLE
from .orthanc_client import OrthancClient
from .queue import (
    DELETE,
    INTERACTIVE,
    QUERY,
    SIMILAR_SERIES,
    STABLE_STUDY,
    STORE,
    STORE_FILE,
    IngestEvent,
    IngestQueue,
    QueueKeys,
)
from .similar_series import SimilarSeriesError, SimilarSeriesMaker
from .spool import Spool

log = logging.getLogger(__name__)

UNREACHABLE = (*REDIS_UNREACHABLE, OSError)
"""What Redis or Orthanc down (or restarting) raises in a worker: it waits and goes on."""


@dataclass
class BatchOutcome:
    indexed: int = 0
    duplicates: int = 0
    rejected: int = 0
    removed: int = 0
    gone: int = 0
    """Instances deleted from Orthanc before the worker reached them."""
    series: int = 0
    """"Similar cases" series stored."""


class Worker:
    """One consumer of the ingest stream."""

    def __init__(self, queue: IngestQueue, orthanc: OrthancClient, store: IndexStore, embedder: Embedder,
                 frames_per_instance: int = 1, batch_size: int = 32, consumer: str | None = None,
                 series_maker: SimilarSeriesMaker | None = None, series_on_stable_study: bool = False,
                 spool: Spool | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME):  # fmt: skip
        """``series_maker`` answers ``similar-series`` requests (without it they get an error) and,
        with ``series_on_stable_study``, makes the series of each stable study; ``spool`` holds the
        files of ``store-file`` entries (a standalone server's receivers)."""
        self.queue = queue
        self.orthanc = orthanc
        self.store = store
        self.embedder = embedder
        self.frames_per_instance = frames_per_instance
        self.batch_size = batch_size
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.series_maker = series_maker
        self.series_on_stable_study = series_on_stable_study
        self.spool = spool
        self.limits = {"max_file_bytes": max_file_bytes, "max_pixels_per_frame": max_pixels_per_frame}
        self.totals: Counter = Counter()

    @classmethod
    def from_settings(cls, settings: Settings, client) -> Worker:
        embedder = Embedder.from_settings(settings)
        orthanc = OrthancClient(settings.orthanc_url, settings.orthanc_username, settings.orthanc_password)
        queue = IngestQueue(client, claim_idle_ms=int(settings.claim_after_s * 1000))
        return cls(
            queue, orthanc, IndexStore(client, IndexInfo.from_card(embedder.card), shards=settings.index_shards),
            embedder,
            settings.frames_per_instance, settings.worker_batch_size,
            series_maker=SimilarSeriesMaker(settings, orthanc, client, queue.keys),
            series_on_stable_study=settings.similar_series_on_stable_study,
            spool=Spool(Path(settings.spool_dir), queue) if Path(settings.spool_dir).is_dir() else None,
            max_file_bytes=settings.max_file_bytes, max_pixels_per_frame=settings.max_pixels_per_frame,
        )  # fmt: skip

    def run_once(self, block_ms: int = 1000) -> BatchOutcome | None:
        """Process one batch; ``None`` when the stream had nothing for this worker."""
        events = self.queue.read(self.consumer, self.batch_size, block_ms)
        if not events:
            return None
        outcome = self.process(events)
        self.queue.ack(events)
        for name, value in vars(outcome).items():
            self.totals[name] += value
        log.info("batch of %d: indexed %d, duplicate %d, rejected %d, removed %d, gone %d, series %d", len(events),
                 outcome.indexed, outcome.duplicates, outcome.rejected, outcome.removed, outcome.gone,
                 outcome.series)  # fmt: skip
        return outcome

    def run(self, stop: threading.Event | None = None) -> None:
        """Process batches until ``stop`` is set (or forever). Redis or Orthanc not answering
        (restarting) does not end the worker: it waits, 0.5 s doubling to 30 s, and goes on;
        a batch it held stays pending and is claimed again after ``claim_after_s``. An index
        this worker must not write (another layout, another shard count) ends it at once with
        :class:`~orthanc_cbir.index.IndexLayoutError`, before it takes any entry."""
        stop = stop or threading.Event()
        log.info("worker %s: model %s, stream %s", self.consumer, self.store.info.version, self.queue.keys.stream)
        backoff = 0.0
        while not stop.is_set():
            try:
                _ = self.store.shards  # an index of another layout or shard count ends the worker now, not at a batch
                self.run_once()
                backoff = 0.0
            except UNREACHABLE as exc:
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.warning("Redis or Orthanc does not answer (%s: %s); trying again in %.1f s",
                            type(exc).__name__, exc, backoff)  # fmt: skip
                stop.wait(backoff)

    def process(self, events: list[IngestEvent]) -> BatchOutcome:
        """Everything but the acknowledgement. Raises (and so leaves the batch pending) only
        when Orthanc or Redis cannot be reached."""
        outcome = BatchOutcome()
        for event in events:  # interactive first: someone is waiting for these
            if event.action == QUERY:
                self._embed_query(event.orthanc_id)
        decoded, ids = [], []
        for event in events:
            if event.action in INTERACTIVE or event.action == STABLE_STUDY:
                continue
            if event.action == DELETE:
                outcome.removed += self._remove(event.orthanc_id)
                continue
            data = self._read(event)
            if data is None:
                outcome.gone += 1
                continue
            result = decode_instance(data, max_frames=self.frames_per_instance, **self.limits)
            if isinstance(result, Rejection):
                uid = result.metadata.sop_instance_uid if result.metadata else None
                self.queue.reject(event.orthanc_id, result.reason.value, result.detail, uid)
                if event.action == STORE_FILE and self.spool is not None:  # kept for the operator to look at
                    self.spool.set_aside(event.orthanc_id)
                outcome.rejected += 1
                continue
            if is_own_output(result.metadata):  # indexed, its copies of hits would answer every query
                self.queue.reject(event.orthanc_id, "orthanc-cbir output",
                                  "a Similar cases image made by this service", result.metadata.sop_instance_uid)  # fmt: skip
                outcome.rejected += 1
                continue
            decoded.append(result)
            ids.append(self.orthanc.parents(event.orthanc_id) if event.action == STORE else {})
        if decoded:
            added = self.store.add(embed_instances(self.embedder, decoded, ids))
            outcome.indexed, outcome.duplicates = added.added, added.duplicates
            stored = {i["instance"]: d.metadata.sop_instance_uid for i, d in zip(ids, decoded) if i}
            if stored:
                self.store.client.hset(self.queue.keys.orthanc_ids, mapping=stored)
        for event in events:  # indexed or rejected (its reason recorded): the spool's copy is done
            if event.action == STORE_FILE and self.spool is not None:
                self.spool.path(event.orthanc_id).unlink(missing_ok=True)
        for event in events:  # after the batch's instances are in the index: a stable study may be among them
            if event.action == SIMILAR_SERIES:
                outcome.series += self._make_series(event.orthanc_id)
            elif event.action == STABLE_STUDY and self.series_on_stable_study and self.series_maker:
                outcome.series += self._stable_study(event.orthanc_id)
        return outcome

    def _embed_query(self, request: str) -> None:
        """Embed an uploaded query file and push the result (or the reason it cannot be used)."""
        data = self.store.client.getdel(self.queue.keys.query_body(request))
        if data is None:  # the route gave up waiting and its body expired
            return
        result = decode_bytes(data, f"query-{request}", max_frames=self.frames_per_instance, **self.limits)
        if isinstance(result, Rejection):
            reply = {"error": str(result)}
        else:
            record = embed_instances(self.embedder, [result])[0]
            meta = record.metadata
            reply = {"features": base64.b64encode(record.features.astype("<f4").tobytes()).decode(),
                     "code": record.code.tobytes().hex(),
                     "probabilities": {h: p.astype(float).tolist() for h, p in record.probabilities.items()},
                     "patient_key": meta.patient_key, "study_instance_uid": meta.study_instance_uid,
                     "sop_instance_uid": meta.sop_instance_uid, "series_instance_uid": meta.series_instance_uid}  # fmt: skip
        self._reply(request, reply)

    def _read(self, event: IngestEvent) -> bytes | None:
        """The file of a ``store`` (from Orthanc) or ``store-file`` (from the spool) entry;
        ``None`` when it is gone."""
        if event.action == STORE_FILE:
            if self.spool is None:
                raise RuntimeError("a store-file entry reached a worker without a spool (set CBIR_SPOOL_DIR)")
            path = self.spool.path(event.orthanc_id)
            return path.read_bytes() if path.exists() else None
        return self.orthanc.instance_file(event.orthanc_id)

    def _make_series(self, request: str) -> int:
        """Answer a ``similar-series`` request; 1 if a series was stored."""
        body = self.store.client.getdel(self.queue.keys.query_body(request))
        if body is None:  # the route gave up waiting
            return 0
        asked = json.loads(body)
        try:
            if self.series_maker is None:
                raise SimilarSeriesError(503, "this worker makes no similar cases series")
            reply = self.series_maker.for_instance(asked["instance"], asked["parameters"])
        except SimilarSeriesError as exc:
            reply = {"error": str(exc), "status": exc.status}
        except (ValueError, OSError) as exc:  # Orthanc refused or failed: the client reads why, the worker goes on
            log.warning("similar cases series for %s failed: %s", asked["instance"], exc)
            reply = {"error": f"the series could not be made: {exc}", "status": 502}
        self._reply(request, reply)
        return int("error" not in reply)

    def _stable_study(self, study: str) -> int:
        """Make the series of a stable study; 1 if one was stored. Orthanc unreachable raises
        (the entry stays pending); anything else is logged and the study is left as it is."""
        try:
            return int(self.series_maker.for_stable_study(study) is not None)
        except (SimilarSeriesError, ValueError) as exc:
            log.warning("stable study %s: no similar cases series: %s", study, exc)
            return 0

    def _reply(self, request: str, reply: dict) -> None:
        """Push the answer of an interactive request where its route waits (kept a minute)."""
        keys = self.queue.keys
        pipe = self.store.client.pipeline(transaction=True)
        pipe.rpush(keys.query_reply(request), json.dumps(reply))
        pipe.expire(keys.query_reply(request), 60)
        pipe.execute()

    def _remove(self, orthanc_id: str) -> int:
        keys: QueueKeys = self.queue.keys
        uid = self.store.client.hget(keys.orthanc_ids, orthanc_id)
        self.store.client.hdel(keys.rejected, orthanc_id)
        if uid is None:
            return 0
        self.store.client.hdel(keys.orthanc_ids, orthanc_id)
        return int(self.store.remove(uid.decode()))
