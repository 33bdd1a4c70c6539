"""``orthanc-cbir worker``: take stream entries, fetch, decode, embed, index, acknowledge.

A batch is acknowledged only after its records are in Redis, so a worker killed
mid-batch loses nothing: its entries are claimed by another worker once they
have been idle for ``claim_after_s``. An instance Orthanc no longer has is
acknowledged and skipped; one that cannot be decoded is recorded as rejected
with its reason. Logs name Orthanc ids and counts, never patient data.
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

from ..config import Settings
from ..dicom import Rejection, decode_instance
from ..index import IndexInfo, IndexStore
from ..index.records import decode_bytes, embed_instances
from ..model.embedder import Embedder
from .orthanc_client import OrthancClient
from .queue import DELETE, QUERY, IngestEvent, IngestQueue, QueueKeys

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    indexed: int = 0
    duplicates: int = 0
    rejected: int = 0
    removed: int = 0
    gone: int = 0
    """Instances deleted from Orthanc before the worker reached them."""


class Worker:
    """One consumer of the ingest stream."""

    def __init__(self, queue: IngestQueue, orthanc: OrthancClient, store: IndexStore, embedder: Embedder,
                 frames_per_instance: int = 1, batch_size: int = 32, consumer: str | None = None):  # fmt: skip
        self.queue = queue
        self.orthanc = orthanc
        self.store = store
        self.embedder = embedder
        self.frames_per_instance = frames_per_instance
        self.batch_size = batch_size
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.totals: Counter = Counter()

    @classmethod
    def from_settings(cls, settings: Settings, client) -> Worker:
        embedder = Embedder.from_settings(settings)
        return cls(
            IngestQueue(client, claim_idle_ms=int(settings.claim_after_s * 1000)),
            OrthancClient(settings.orthanc_url, settings.orthanc_username, settings.orthanc_password),
            IndexStore(client, IndexInfo.from_card(embedder.card)), embedder,
            settings.frames_per_instance, settings.worker_batch_size,
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
        log.info("batch of %d: indexed %d, duplicate %d, rejected %d, removed %d, gone %d", len(events),
                 outcome.indexed, outcome.duplicates, outcome.rejected, outcome.removed, outcome.gone)  # fmt: skip
        return outcome

    def run(self, stop: threading.Event | None = None) -> None:
        """Process batches until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        log.info("worker %s: model %s, stream %s", self.consumer, self.store.info.version, self.queue.keys.stream)
        while not stop.is_set():
            self.run_once()

    def process(self, events: list[IngestEvent]) -> BatchOutcome:
        """Everything but the acknowledgement. Raises (and so leaves the batch pending) only
        when Orthanc or Redis cannot be reached."""
        outcome = BatchOutcome()
        for event in events:  # interactive first: someone is waiting for these
            if event.action == QUERY:
                self._embed_query(event.orthanc_id)
        decoded, ids = [], []
        for event in events:
            if event.action == QUERY:
                continue
            if event.action == DELETE:
                outcome.removed += self._remove(event.orthanc_id)
                continue
            data = self.orthanc.instance_file(event.orthanc_id)
            if data is None:
                outcome.gone += 1
                continue
            result = decode_instance(data, max_frames=self.frames_per_instance)
            if isinstance(result, Rejection):
                uid = result.metadata.sop_instance_uid if result.metadata else None
                self.queue.reject(event.orthanc_id, result.reason.value, result.detail, uid)
                outcome.rejected += 1
                continue
            decoded.append(result)
            ids.append(self.orthanc.parents(event.orthanc_id))
        if decoded:
            added = self.store.add(embed_instances(self.embedder, decoded, ids))
            outcome.indexed, outcome.duplicates = added.added, added.duplicates
            self.store.client.hset(self.queue.keys.orthanc_ids,
                                   mapping={i["instance"]: d.metadata.sop_instance_uid for i, d in zip(ids, decoded)})  # fmt: skip
        return outcome

    def _embed_query(self, request: str) -> None:
        """Embed an uploaded query file and push the result (or the reason it cannot be used)."""
        keys = self.queue.keys
        data = self.store.client.getdel(keys.query_body(request))
        if data is None:  # the route gave up waiting and its body expired
            return
        result = decode_bytes(data, f"query-{request}", max_frames=self.frames_per_instance)
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
