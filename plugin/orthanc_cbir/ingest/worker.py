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
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..config import Settings
from ..dicom import Rejection, decode_dataset, read_instance
from ..dicom.pixels import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS_PER_FRAME
from ..errors import CbirError, Unavailable, UpstreamFailed, WorkerFailed
from ..index import IndexInfo, IndexLayoutError, IndexRecord, IndexStore
from ..index.records import decode_bytes, embed_instances
from ..model.embedder import Embedder
from ..redis_client import UNREACHABLE as REDIS_UNREACHABLE
from ..redis_client import RedisClient
from .orthanc_client import OrthancClient, dicom_identifiers
from .pipeline import EmbeddingBatch, admit
from .queue import (
    DELETE,
    INTERACTIVE,
    ORTHANC,
    ORTHANC_WORKERS,
    QUERY,
    SIMILAR_SERIES,
    SPOOL,
    SPOOL_WORKERS,
    STABLE_STUDY,
    STORE,
    STORE_FILE,
    IngestEvent,
    IngestQueue,
    QueueKeys,
    WorkerRequests,
)
from .spool import Spool

log = logging.getLogger(__name__)

UNREACHABLE: tuple[type[BaseException], ...] = (*REDIS_UNREACHABLE, OSError)
"""What Redis or Orthanc down (or restarting) raises in a worker: it waits and goes on."""

NOT_AN_ENTRY_FAULT: tuple[type[BaseException], ...] = (*UNREACHABLE, IndexLayoutError)
"""Raised while handling an entry but not the entry's fault: never a dead letter."""

Handled = TypeVar("Handled")


class SeriesMaker(Protocol):
    """What makes "Similar cases" series (:class:`orthanc_cbir.answers.similar_series.SimilarSeriesMaker`):
    given to the worker by whoever starts it, so that the ingest room never imports the answers."""

    def for_instance(self, instance: str, parameters: Mapping[str, str] | None = None) -> dict[str, Any]: ...

    def for_stable_study(self, study: str) -> dict[str, Any] | None: ...


SeriesMakerFactory = Callable[[OrthancClient, QueueKeys], SeriesMaker]
"""Builds the series maker of a worker from its Orthanc client and queue keys."""


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
                 series_maker: SeriesMaker | None = None, series_on_stable_study: bool = False,
                 spool: Spool | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME, regions: bool = False):  # fmt: skip
        """``series_maker`` answers ``similar-series`` requests (without it they get an error) and,
        with ``series_on_stable_study``, makes the series of each stable study; ``spool`` holds the
        files of ``store-file`` entries (a standalone server's receivers); ``regions``: index the
        region entries of CT and MR slices too."""
        self.queue = queue
        self.requests = WorkerRequests(queue)
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
        self.regions = regions
        self.totals: Counter = Counter()

    @classmethod
    def from_settings(cls, settings: Settings, client: RedisClient,
                      series_maker: SeriesMakerFactory | None = None) -> Worker:  # fmt: skip
        """The worker the settings describe; ``series_maker`` builds what answers ``similar-series``
        requests (:meth:`orthanc_cbir.answers.similar_series.SimilarSeriesMaker.factory`)."""
        embedder = Embedder.from_settings(settings)
        orthanc = OrthancClient(settings.orthanc_url, settings.orthanc_username, settings.orthanc_password)
        queue = IngestQueue.for_settings(client, settings, claim_idle_ms=int(settings.claim_after_s * 1000))
        return cls(
            queue, orthanc, IndexStore(client, IndexInfo.from_card(embedder.card), shards=settings.index_shards),
            embedder,
            settings.frames_per_instance, settings.worker_batch_size,
            series_maker=series_maker(orthanc, queue.keys) if series_maker is not None else None,
            series_on_stable_study=settings.similar_series_on_stable_study,
            spool=Spool(Path(settings.spool_dir), queue) if Path(settings.spool_dir).is_dir() else None,
            max_file_bytes=settings.max_file_bytes, max_pixels_per_frame=settings.max_pixels_per_frame,
            regions=settings.regions,
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
        bound = False
        while not stop.is_set():
            try:
                _ = self.store.shards  # an index of another layout or shard count ends the worker now, not at a batch
                if not bound:  # a stream of the other kind of worker ends it before it takes an entry
                    self.queue.bind(SPOOL_WORKERS if self.spool is not None else ORTHANC_WORKERS)
                    bound = True
                self.run_once()
                backoff = 0.0
            except UNREACHABLE as exc:
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.warning("Redis or Orthanc does not answer (%s: %s); trying again in %.1f s",
                            type(exc).__name__, exc, backoff)  # fmt: skip
                stop.wait(backoff)

    def process(self, events: list[IngestEvent]) -> BatchOutcome:
        """Everything but the acknowledgement. Raises (and so leaves the batch pending) only
        when Orthanc or Redis cannot be reached; any other exception while handling an entry
        makes that entry a dead letter (:meth:`_dead_letter`) and the others go on."""
        outcome = BatchOutcome()
        for event in events:  # interactive first: someone is waiting for these
            if event.action == QUERY:
                self._guarded(event, lambda e: self._embed_query(e.orthanc_id))
        # Decoded pictures are embedded (and let go) whenever they hold more than HELD_PIXELS: a
        # batch of large frames never holds more than one instance's pictures beside that.
        batch: EmbeddingBatch[IngestEvent] = EmbeddingBatch(self.embedder, max_instances=len(events),
                                                            regions=self.regions)  # fmt: skip
        embedded: list[tuple[IngestEvent, IndexRecord]] = []
        for event in events:
            if event.action in INTERACTIVE or event.action == STABLE_STUDY:
                continue
            self._guarded(event, lambda e: self._take(e, outcome, batch))
            if batch.full:
                embedded += self._embed(batch)
        embedded += self._embed(batch)
        if embedded:
            try:
                self._index(embedded, outcome)
            except NOT_AN_ENTRY_FAULT:
                raise
            except Exception:  # noqa: BLE001 - one instance the index cannot take must not cost the others theirs
                for item in embedded:
                    self._guarded(item[0], lambda e, item=item: self._index([item], outcome))  # type: ignore[misc]
        spool = self.spool
        for event in events:  # indexed or rejected (its reason recorded): the spool's copy is done
            if event.action == STORE_FILE and spool is not None:
                self._guarded(event, lambda e: spool.path(e.orthanc_id).unlink(missing_ok=True))
        for event in events:  # after the batch's instances are in the index: a stable study may be among them
            if event.action == SIMILAR_SERIES:
                outcome.series += self._guarded(event, lambda e: self._make_series(e.orthanc_id)) or 0
            elif event.action == STABLE_STUDY and self.series_on_stable_study and self.series_maker:
                outcome.series += self._guarded(event, lambda e: self._stable_study(e.orthanc_id)) or 0
        return outcome

    def _take(self, event: IngestEvent, outcome: BatchOutcome, batch: EmbeddingBatch[IngestEvent]) -> None:
        """Remove, read and decode one ``delete``, ``store`` or ``store-file`` entry; what can be
        indexed joins ``batch``, what cannot is recorded as rejected."""
        if event.action == DELETE:
            outcome.removed += self._remove(event.orthanc_id)
            return
        data = self._read(event)
        if data is None:
            outcome.gone += 1
            return
        dataset = read_instance(data, **self.limits)  # parsed once: decoded, and the identifiers of Orthanc's ids
        if isinstance(dataset, Rejection):
            self._rejected(event, dataset, outcome)
            return
        result = admit(decode_dataset(dataset, max_frames=self.frames_per_instance,
                                      max_pixels_per_frame=self.limits["max_pixels_per_frame"]))  # fmt: skip
        if isinstance(result, Rejection):
            self._rejected(event, result, outcome)
            return
        parents = {} if event.action != STORE else self.orthanc.parents(event.orthanc_id, dicom_identifiers(dataset))
        batch.add(event, result, parents)

    def _rejected(self, event: IngestEvent, rejection: Rejection, outcome: BatchOutcome) -> None:
        uid = rejection.metadata.sop_instance_uid if rejection.metadata else None
        self.queue.reject(SPOOL if event.action == STORE_FILE else ORTHANC, event.orthanc_id, rejection.reason.value,
                          rejection.detail, uid)  # fmt: skip
        outcome.rejected += 1
        if event.action == STORE_FILE and self.spool is not None:  # kept for the operator to look at
            self.spool.set_aside(event.orthanc_id)

    def _embed(self, batch: EmbeddingBatch[IngestEvent]) -> list[tuple[IngestEvent, IndexRecord]]:
        """Embed the batch (one onnxruntime pass) and empty it, so that its pictures can be freed; if
        that pass fails, each instance alone: one the model cannot take is a dead letter."""
        return batch.embed(lambda event, make: self._guarded(event, lambda e: make()), NOT_AN_ENTRY_FAULT)

    def _index(self, items: list[tuple[IngestEvent, IndexRecord]], outcome: BatchOutcome) -> None:
        """Add embedded instances to the index."""
        records = [item[1] for item in items]
        added = self.store.add(records)
        outcome.indexed += added.added
        outcome.duplicates += added.duplicates
        stored = {r.orthanc["instance"]: uid for r in records
                  if r.orthanc.get("instance") and (uid := r.metadata.sop_instance_uid)}  # fmt: skip
        self.queue.remember_indexed(stored)

    def _guarded(self, event: IngestEvent, handle: Callable[[IngestEvent], Handled]) -> Handled | None:
        """``handle(event)``; an exception that is not Redis or Orthanc being away makes the
        entry a dead letter instead of ending the worker (``None`` then)."""
        try:
            return handle(event)
        except NOT_AN_ENTRY_FAULT:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault on one entry makes it a dead letter, not a dead worker
            self._dead_letter(event, exc)
            return None

    def _dead_letter(self, event: IngestEvent, exc: Exception) -> None:
        """Record the entry and where it failed (the exception's type and place, not its
        message, which may quote a patient's data); someone waiting for it gets a 500."""
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"{type(exc).__name__} in {Path(frame.filename).name}:{frame.lineno} ({frame.name})"
        log.error("%s entry %s is a dead letter: %s", event.action, event.entry_id, detail)  # its id may be a UID
        self.queue.dead_letter(event, "worker error", detail)
        if event.action == STORE_FILE and self.spool is not None:  # not enqueued again at the next start
            self.spool.set_aside(event.orthanc_id)
        if event.action in INTERACTIVE:
            self.requests.reply(event.orthanc_id, {"error": f"the worker failed on this request ({detail}); "
                                                            "it is kept in the dead-letter list",
                                                   "kind": WorkerFailed.__name__})  # fmt: skip

    def _embed_query(self, request: str) -> None:
        """Embed an uploaded query file and push the result (or the reason it cannot be used)."""
        data = self.requests.take(request)
        if data is None:  # the route gave up waiting and its body expired
            return
        result = decode_bytes(data, f"query-{request}", max_frames=self.frames_per_instance, **self.limits)
        reply: dict[str, Any]
        if isinstance(result, Rejection):
            reply = {"error": str(result)}
        else:
            record = embed_instances(self.embedder, [result])[0]
            meta = record.metadata
            reply = {"features": base64.b64encode(record.features.astype("<f4").tobytes()).decode(),
                     "code": record.code.tobytes().hex(),
                     "probabilities": {h: p.astype(float).tolist() for h, p in record.probabilities.items()},
                     "patient_key": meta.patient_key, "study_instance_uid": meta.study_instance_uid,
                     "sop_instance_uid": meta.sop_instance_uid,
                     "series_instance_uid": meta.series_instance_uid}  # fmt: skip
        self.requests.reply(request, reply)

    def _read(self, event: IngestEvent) -> bytes | Path | None:
        """The file of a ``store`` (from Orthanc) or ``store-file`` (from the spool) entry;
        ``None`` when it is gone."""
        if event.action == STORE_FILE:
            if self.spool is None:
                raise RuntimeError("a store-file entry reached a worker without a spool (set CBIR_SPOOL_DIR)")
            path = self.spool.path(event.orthanc_id)  # decoded from disk: measured before it is read
            return path if path.exists() else None
        return self.orthanc.instance_file(event.orthanc_id)

    def _make_series(self, request: str) -> int:
        """Answer a ``similar-series`` request; 1 if a series was stored."""
        body = self.requests.take(request)
        if body is None:  # the route gave up waiting
            return 0
        asked = json.loads(body)
        try:
            if self.series_maker is None:
                raise Unavailable("this worker makes no similar cases series")
            reply = self.series_maker.for_instance(asked["instance"], asked["parameters"])
        except CbirError as exc:  # the route answers with the error's kind (api.similar.ERROR_STATUS)
            reply = {"error": str(exc), "kind": type(exc).__name__}
        except (ValueError, OSError) as exc:  # Orthanc refused or failed: the client reads why, the worker goes on
            log.warning("similar cases series for %s failed: %s", asked["instance"], exc)
            reply = {"error": f"the series could not be made: {exc}", "kind": UpstreamFailed.__name__}
        self.requests.reply(request, reply)
        return int("error" not in reply)

    def _stable_study(self, study: str) -> int:
        """Make the series of a stable study; 1 if one was stored. Orthanc unreachable raises
        (the entry stays pending); anything else is logged and the study is left as it is."""
        if self.series_maker is None:
            return 0
        try:
            return int(self.series_maker.for_stable_study(study) is not None)
        except (CbirError, ValueError) as exc:
            log.warning("stable study %s: no similar cases series: %s", study, exc)
            return 0

    def _remove(self, orthanc_id: str) -> int:
        uid = self.queue.forget(orthanc_id)
        return int(uid is not None and self.store.remove(uid))
