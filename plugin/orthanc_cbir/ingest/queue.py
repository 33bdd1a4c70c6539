"""The ingest queue: a Redis Stream between Orthanc's callbacks and the workers.

Orthanc's stored-instance and deletion callbacks only :meth:`IngestQueue.enqueue`
(one ``XADD``); workers read with a consumer group, so each entry goes to one
worker, and acknowledge an entry only once its record is in the index (at least
once). Entries a dead worker left pending are claimed by another after
``claim_idle_ms`` (``XAUTOCLAIM``). Instances that cannot be indexed are kept in
the rejected hash with their reason, so an operator can see them.

The queue carries Orthanc ids, not vectors, so it does not depend on the model
version.

Every command here, and every transaction (``ack``: ``XACK`` + ``XDEL`` of the
stream), touches one key, so the queue works unchanged on a Redis Cluster (each
key on the master of its slot) and its key names stay those of a single server.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from ..config import Settings

STORE = "store"
STORE_FILE = "store-file"
"""A file a standalone receiver (SCP, STOW-RS) left in the spool (:mod:`.spool`)."""
DELETE = "delete"
QUERY = "query"
"""A query image to embed for ``POST /cbir/query`` (Orthanc's process never runs the model)."""
SIMILAR_SERIES = "similar-series"
"""Make a "Similar cases" series for ``POST /cbir/instances/{id}/similar/series``."""
STABLE_STUDY = "stable-study"
"""A study Orthanc calls stable: make its "Similar cases" series (when the setting says so)."""
INTERACTIVE = (QUERY, SIMILAR_SERIES)
"""Actions someone waits for: the request's body and reply sit beside the stream."""

ORTHANC_WORKERS = "orthanc"
"""A stream of Orthanc's instances (``store`` entries): its workers fetch from Orthanc."""
SPOOL_WORKERS = "spool"
"""A stream of a standalone server (``store-file`` entries): its workers read its spool."""


class StreamKindError(RuntimeError):
    """The stream belongs to workers of the other kind (another deployment on this Redis)."""


@dataclass(frozen=True)
class IngestEvent:
    """One stream entry."""

    entry_id: str
    action: str
    """``store`` (index the instance), ``store-file`` (index a spool file), ``delete`` (drop it
    from the index), ``stable-study``, or an interactive request: ``query``, ``similar-series``."""
    orthanc_id: str
    """The instance (``store``, ``delete``), the spool file name (``store-file``), the study
    (``stable-study``) or the request id."""
    deliveries: int = 1
    """How many times the entry was handed to a worker (> 1 after a claim)."""


@dataclass(frozen=True)
class QueueKeys:
    prefix: str = "cbir"
    stream_name: str = ""
    """The stream's key (empty: ``<prefix>:ingest``); one per deployment sharing a Redis
    (``Settings.ingest_stream``)."""

    @property
    def stream(self) -> str:
        return self.stream_name or f"{self.prefix}:ingest"

    @property
    def stream_kind(self) -> str:
        """Which workers the stream is for (:data:`ORTHANC_WORKERS` or :data:`SPOOL_WORKERS`),
        set by the first worker or server that reads it."""
        return f"{self.stream}:kind"

    @property
    def dead_letters(self) -> str:
        """Hash id -> JSON {action, entry_id, reason, detail, at}: entries a worker failed on
        (a fault of this service, not of the file), kept for the operator instead of retried."""
        return f"{self.prefix}:dead-letters"

    @property
    def rejected(self) -> str:
        """Hash Orthanc id -> JSON {reason, detail, sop_instance_uid, at}."""
        return f"{self.prefix}:rejected"

    def query_body(self, request: str) -> str:
        """The body of an interactive request (kept apart: the stream holds small entries only)."""
        return f"{self.prefix}:query:{request}:body"

    def query_reply(self, request: str) -> str:
        """Where the worker pushes its answer to an interactive request (a list the route BLPOPs)."""
        return f"{self.prefix}:query:{request}:reply"

    @property
    def orthanc_ids(self) -> str:
        """Hash Orthanc instance id -> SOPInstanceUID of what was indexed (for deletions)."""
        return f"{self.prefix}:orthanc-instances"


class IngestQueue:
    """The stream, its consumer group and the rejected list."""

    def __init__(self, client: redis.Redis, group: str = "cbir-workers", keys: QueueKeys = QueueKeys(),
                 claim_idle_ms: int = 60_000):  # fmt: skip
        self.client = client
        self.group = group
        self.keys = keys
        self.claim_idle_ms = claim_idle_ms

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings, **options: int) -> IngestQueue:
        """The queue of this deployment: the stream ``settings.ingest_stream`` (and its own
        consumer group: a Redis consumer group belongs to one stream)."""
        return cls(client, keys=QueueKeys(stream_name=settings.ingest_stream), **options)

    def bind(self, kind: str) -> None:
        """Claim the stream for workers of ``kind`` (the first caller sets it); raises
        :class:`StreamKindError` when it is another kind's, before any entry is taken: an
        Orthanc worker cannot read a spool, nor a standalone server fetch from Orthanc."""
        self.client.set(self.keys.stream_kind, kind, nx=True)
        bound = self.client.get(self.keys.stream_kind)
        if bound is not None and bound.decode() != kind:
            raise StreamKindError(
                f"the ingest stream {self.keys.stream!r} belongs to {bound.decode()} workers, not {kind} workers: "
                "give each deployment on this Redis its own stream (CBIR_INGEST_STREAM), or delete the key "
                f"{self.keys.stream_kind!r} if this stream's deployment was replaced")

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if they do not exist yet."""
        try:
            self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def enqueue(self, orthanc_id: str, action: str = STORE) -> str:
        """Add one entry; returns its stream id. The only thing Orthanc's callbacks do."""
        return self.client.xadd(self.keys.stream, {"action": action, "orthanc_id": orthanc_id}).decode()

    def read(self, consumer: str, count: int = 32, block_ms: int = 1000) -> list[IngestEvent]:
        """Up to ``count`` entries for ``consumer``: first any left idle by another worker, then new ones."""
        self.ensure_group()
        _, claimed, _ = self.client.xautoclaim(self.keys.stream, self.group, consumer, self.claim_idle_ms,
                                               start_id="0-0", count=count)  # fmt: skip
        events = [self._event(entry_id, fields, deliveries=2) for entry_id, fields in claimed if fields]
        if len(events) < count:
            answer = self.client.xreadgroup(self.group, consumer, {self.keys.stream: ">"},
                                            count=count - len(events), block=None if events else block_ms)  # fmt: skip
            for _, entries in answer or []:
                events.extend(self._event(entry_id, fields) for entry_id, fields in entries)
        return events

    @staticmethod
    def _event(entry_id: bytes, fields: dict, deliveries: int = 1) -> IngestEvent:
        return IngestEvent(entry_id.decode(), fields[b"action"].decode(), fields[b"orthanc_id"].decode(), deliveries)

    def ack(self, events: list[IngestEvent]) -> None:
        """Done with these entries: acknowledge and delete them (the stream keeps only open work)."""
        if events:
            ids = [event.entry_id for event in events]
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.keys.stream, self.group, *ids)
            pipe.xdel(self.keys.stream, *ids)
            pipe.execute()

    def reject(self, orthanc_id: str, reason: str, detail: str, sop_instance_uid: str | None = None) -> None:
        self.client.hset(self.keys.rejected, orthanc_id, json.dumps(
            {"reason": reason, "detail": detail, "sop_instance_uid": sop_instance_uid, "at": time.time()}))  # fmt: skip

    def dead_letter(self, event: IngestEvent, reason: str, detail: str) -> None:
        """Keep an entry a worker failed on, with the reason, for the operator (it is not retried)."""
        self.client.hset(self.keys.dead_letters, event.orthanc_id, json.dumps(
            {"reason": reason, "detail": detail, "action": event.action, "entry_id": event.entry_id,
             "at": time.time()}))  # fmt: skip

    def dead_letters(self) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.client.hgetall(self.keys.dead_letters).items()}

    def rejected(self) -> dict[str, dict]:
        """What could not be indexed: the files (bad input) and the dead letters (``action`` set)."""
        rejected = {k.decode(): json.loads(v) for k, v in self.client.hgetall(self.keys.rejected).items()}
        return {**self.dead_letters(), **rejected}

    def counts(self) -> dict[str, int]:
        """``queued`` (entries not yet handed out or not yet acknowledged), ``pending``
        (handed to a worker, not acknowledged), ``rejected``, ``dead_letters``."""
        self.ensure_group()
        pending = self.client.xpending(self.keys.stream, self.group)["pending"]
        return {"queued": int(self.client.xlen(self.keys.stream)), "pending": int(pending),
                "rejected": int(self.client.hlen(self.keys.rejected)),
                "dead_letters": int(self.client.hlen(self.keys.dead_letters))}  # fmt: skip
