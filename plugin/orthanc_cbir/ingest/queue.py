"""The ingest queue: a Redis Stream between Orthanc's callbacks and the workers.

Orthanc's stored-instance and deletion callbacks only :meth:`IngestQueue.enqueue`
(one ``XADD``); workers read with a consumer group, so each entry goes to one
worker, and acknowledge an entry only once its record is in the index (at least
once). Entries a dead worker left pending are claimed by another after
``claim_idle_ms`` (``XAUTOCLAIM``). Instances that cannot be indexed are kept in
the rejected hash with their reason, so an operator can see them.

This module owns every queue key: the stream, the rejected and dead-letter hashes, the
Orthanc id -> SOPInstanceUID map, the request / reply keys of what someone waits for
(:class:`WorkerRequests`) and the marks of long-running work (:class:`Marks`). With the index
(:mod:`orthanc_cbir.index`) and the audit trail (:mod:`orthanc_cbir.audit`), it is the only
code that sends Redis commands.

The queue carries Orthanc ids, not vectors, so it does not depend on the model
version.

Every command here, and every transaction (``ack``: ``XACK`` + ``XDEL`` of the
stream), touches one key, so the queue works unchanged on a Redis Cluster (each
key on the master of its slot) and its key names stay those of a single server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from ..errors import StreamKindError
from ..redis_client import RedisClient, text

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

ORTHANC, SPOOL, DICOMWEB = "orthanc", "spool", "dicomweb"
"""Where a rejected instance came from (:meth:`IngestQueue.reject`)."""

ORTHANC_WORKERS = "orthanc"
"""A stream of Orthanc's instances (``store`` entries): its workers fetch from Orthanc."""
SPOOL_WORKERS = "spool"
"""A stream of a standalone server (``store-file`` entries): its workers read its spool."""


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
        """Hash SOPInstanceUID (``<source>:<source id>`` when none could be read) -> JSON {reason,
        detail, sop_instance_uid, source, source_id, at} (:meth:`IngestQueue.reject`)."""
        return f"{self.prefix}:rejected"

    @property
    def rejected_sources(self) -> str:
        """Hash ``<source>:<source id>`` -> the rejected hash's key: a deleted Orthanc instance finds its entry."""
        return f"{self.prefix}:rejected-sources"

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

    def __init__(self, client: RedisClient, group: str = "cbir-workers", keys: QueueKeys = QueueKeys(),
                 claim_idle_ms: int = 60_000):  # fmt: skip
        self.client = client
        self.group = group
        self.keys = keys
        self.claim_idle_ms = claim_idle_ms

    @classmethod
    def for_settings(cls, client: RedisClient, settings: Settings, claim_idle_ms: int = 60_000) -> IngestQueue:
        """The queue of this deployment: the stream ``settings.ingest_stream`` (and its own
        consumer group: a Redis consumer group belongs to one stream)."""
        return cls(client, keys=QueueKeys(stream_name=settings.ingest_stream), claim_idle_ms=claim_idle_ms)

    def bind(self, kind: str) -> None:
        """Claim the stream for workers of ``kind`` (the first caller sets it); raises
        :class:`StreamKindError` when it is another kind's, before any entry is taken: an
        Orthanc worker cannot read a spool, nor a standalone server fetch from Orthanc."""
        self.client.set(self.keys.stream_kind, kind, nx=True)
        bound = self.client.get(self.keys.stream_kind)
        if bound is not None and text(bound) != kind:
            raise StreamKindError(
                f"the ingest stream {self.keys.stream!r} belongs to {text(bound)} workers, not {kind} workers: "
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
        return text(self.client.xadd(self.keys.stream, {"action": action, "orthanc_id": orthanc_id}))

    def read(self, consumer: str, count: int = 32, block_ms: int = 1000) -> list[IngestEvent]:
        """Up to ``count`` entries for ``consumer``: first any left idle by another worker, then new ones."""
        self.ensure_group()
        autoclaimed: Any = self.client.xautoclaim(self.keys.stream, self.group, consumer, self.claim_idle_ms,
                                                  start_id="0-0", count=count)  # fmt: skip
        claimed: list[tuple[bytes, dict[bytes, bytes]]] = autoclaimed[1]
        events = [self._event(entry_id, fields, deliveries=2) for entry_id, fields in claimed if fields]
        if len(events) < count:
            block = None if events else block_ms
            answer: Any = self.client.xreadgroup(self.group, consumer, {self.keys.stream: ">"},
                                                 count=count - len(events), block=block)  # fmt: skip
            for _, entries in answer or []:
                events.extend(self._event(entry_id, fields) for entry_id, fields in entries)
        return events

    @staticmethod
    def _event(entry_id: bytes, fields: dict[bytes, bytes], deliveries: int = 1) -> IngestEvent:
        return IngestEvent(text(entry_id), text(fields[b"action"]), text(fields[b"orthanc_id"]), deliveries)

    def ack(self, events: list[IngestEvent]) -> None:
        """Done with these entries: acknowledge and delete them (the stream keeps only open work)."""
        if events:
            ids = [event.entry_id for event in events]
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.keys.stream, self.group, *ids)
            pipe.xdel(self.keys.stream, *ids)
            pipe.execute()

    def reject(self, source: str, source_id: str, reason: str, detail: str,
               sop_instance_uid: str | None = None) -> None:  # fmt: skip
        """Record why an instance cannot be indexed: one entry per SOPInstanceUID, whichever way it came
        in (``source``: :data:`ORTHANC`, :data:`SPOOL` or :data:`DICOMWEB`; ``source_id``: the Orthanc id,
        the spool file, the SOPInstanceUID in the DICOMweb archive)."""
        key = sop_instance_uid or f"{source}:{source_id}"
        self.client.hset(self.keys.rejected, key, json.dumps(
            {"reason": reason, "detail": detail, "sop_instance_uid": sop_instance_uid, "source": source,
             "source_id": source_id, "at": time.time()}))  # fmt: skip
        self.client.hset(self.keys.rejected_sources, f"{source}:{source_id}", key)

    def dead_letter(self, event: IngestEvent, reason: str, detail: str) -> None:
        """Keep an entry a worker failed on, with the reason, for the operator (it is not retried)."""
        self.client.hset(self.keys.dead_letters, event.orthanc_id, json.dumps(
            {"reason": reason, "detail": detail, "action": event.action, "entry_id": event.entry_id,
             "at": time.time()}))  # fmt: skip

    def dead_letters(self) -> dict[str, dict]:
        return {text(k): json.loads(v) for k, v in self.client.hgetall(self.keys.dead_letters).items()}

    def rejected(self) -> dict[str, dict]:
        """What could not be indexed, by key: the files (bad input; :meth:`reject`) and the dead letters
        (``action`` set)."""
        return {**self.dead_letters(), **self._rejections()}

    def _rejections(self) -> dict[str, dict]:
        return {text(k): json.loads(v) for k, v in self.client.hgetall(self.keys.rejected).items()}

    def rejected_uids(self) -> set[str]:
        """The SOPInstanceUIDs rejected before, whichever way they came (entries of the old keying
        written by a backfill were ``dicomweb:<SOPInstanceUID>``)."""
        uids = set()
        for key, entry in self._rejections().items():
            if entry.get("sop_instance_uid"):
                uids.add(entry["sop_instance_uid"])
            elif key.startswith(f"{DICOMWEB}:"):
                uids.add(key[len(DICOMWEB) + 1 :])
        return uids

    def rejected_from(self, source: str) -> set[str]:
        """The source ids of ``source`` whose instance was rejected (entries written before sources
        were recorded were keyed by their Orthanc id)."""
        ids = set()
        for key, entry in self._rejections().items():
            if entry.get("source") == source:
                ids.add(entry["source_id"])
            elif "source" not in entry and source == ORTHANC:
                ids.add(key)
        return ids

    def counts(self) -> dict[str, int]:
        """``queued`` (entries not yet handed out or not yet acknowledged), ``pending``
        (handed to a worker, not acknowledged), ``rejected``, ``dead_letters``."""
        self.ensure_group()
        pending = self.client.xpending(self.keys.stream, self.group)["pending"]
        return {"queued": int(self.client.xlen(self.keys.stream)), "pending": int(pending),
                "rejected": int(self.client.hlen(self.keys.rejected)),
                "dead_letters": int(self.client.hlen(self.keys.dead_letters))}  # fmt: skip

    # -- the Orthanc id -> SOPInstanceUID map (what was indexed, for deletions) ------------------

    def remember_indexed(self, uids_by_orthanc_id: Mapping[str, str]) -> None:
        """Record which SOPInstanceUID each indexed Orthanc instance holds."""
        if uids_by_orthanc_id:
            mapping: dict[Any, Any] = dict(uids_by_orthanc_id)  # redis-py's Mapping is invariant in its key type
            self.client.hset(self.keys.orthanc_ids, mapping=mapping)

    def indexed_uids(self, orthanc_ids: Sequence[str]) -> list[str | None]:
        """The SOPInstanceUID indexed for each Orthanc instance (``None``: not indexed); one read."""
        if not orthanc_ids:
            return []
        return [text(uid) if uid else None for uid in self.client.hmget(self.keys.orthanc_ids, list(orthanc_ids))]

    def indexed_map(self, page: int = 1000) -> Iterator[tuple[str, str]]:
        """Every (Orthanc id, SOPInstanceUID) indexed, read ``page`` at a time (``HSCAN``)."""
        for orthanc_id, uid in self.client.hscan_iter(self.keys.orthanc_ids, count=page):
            yield text(orthanc_id), text(uid)

    def forget(self, orthanc_id: str) -> str | None:
        """An Orthanc instance was deleted: drop what the queue knows of it (its rejection, its dead
        letter, its map entry); returns the SOPInstanceUID it was indexed as, if it was."""
        uid = self.client.hget(self.keys.orthanc_ids, orthanc_id)
        rejected = self.client.hget(self.keys.rejected_sources, f"{ORTHANC}:{orthanc_id}")
        self.client.hdel(self.keys.rejected, text(rejected) if rejected is not None else orthanc_id)
        self.client.hdel(self.keys.rejected_sources, f"{ORTHANC}:{orthanc_id}")
        self.client.hdel(self.keys.dead_letters, orthanc_id)
        if uid is None:
            return None
        self.client.hdel(self.keys.orthanc_ids, orthanc_id)
        return text(uid)


@dataclass(frozen=True)
class Job:
    """An asynchronous "Similar cases" request as :meth:`WorkerRequests.job` finds it."""

    job_id: str
    instance: str
    created: float
    result: dict[str, Any] | None
    """The worker's reply (``error`` set when it failed); ``None`` while it has none."""
    queued: bool
    """No worker has taken it yet."""


class WorkerRequests:
    """The request / reply protocol beside the stream, for what someone waits for (``query``,
    ``similar-series``): the asker leaves the body under its own key (the stream holds small
    entries only), enqueues the request id and waits on a reply list; the worker takes the body
    (once: ``GETDEL``) and pushes its JSON reply, kept a minute. A body nobody took expires.

    ``replies`` is the connection the asker blocks on (``BLPOP``): give it a socket timeout
    longer than the longest wait, and every other command a short one, so that a hung Redis
    costs a route its short timeout, not the wait's."""

    REPLY_TTL_S = 60
    """How long a worker's reply waits to be read."""

    def __init__(self, queue: IngestQueue, replies: RedisClient | None = None):
        self.queue = queue
        self.client = queue.client
        self.keys = queue.keys
        self._replies = replies or queue.client

    # -- the asker's side -----------------------------------------------------------------------

    def ask(self, action: str, body: bytes, wait_s: float) -> dict[str, Any] | None:
        """Leave ``body``, enqueue ``action`` and wait for the worker's JSON reply; ``None`` when no
        worker answered in ``wait_s`` (the body is withdrawn: a worker that comes later finds nothing)."""
        request = uuid.uuid4().hex
        self.client.set(self.keys.query_body(request), body, ex=int(wait_s * 2))
        self.queue.enqueue(request, action)
        reply = self._replies.blpop([self.keys.query_reply(request)], timeout=wait_s)
        if reply is None:
            self.client.delete(self.keys.query_body(request))
            return None
        return json.loads(reply[1])

    def submit(self, action: str, body: bytes, instance: str, *, queue_s: int, keep_s: int, limit: int) -> str | None:
        """Enqueue a request nobody waits for: its job id, or ``None`` when ``limit`` jobs wait for a
        worker already (a job leaves the count once a worker takes it). The job is known ``keep_s``;
        a body no worker took within ``queue_s`` expires."""
        jobs: list[bytes] = self.client.zrange(self._jobs, 0, -1)  # type: ignore[assignment]  # without scores
        waiting = [text(job) for job in jobs]
        if waiting:
            pipe = self.client.pipeline(transaction=False)
            for job in waiting:
                pipe.exists(self.keys.query_body(job))
            taken = [job for job, queued in zip(waiting, pipe.execute(), strict=True) if not queued]
            if taken:
                self.client.zrem(self._jobs, *taken)
            waiting = [job for job in waiting if job not in taken]
        if len(waiting) >= limit:
            return None
        job, now = uuid.uuid4().hex, time.time()
        self.client.set(self._job(job), json.dumps({"instance": instance, "created": now}), ex=keep_s)
        self.client.set(self.keys.query_body(job), body, ex=queue_s)
        self.client.zadd(self._jobs, {job: now})
        self.queue.enqueue(job, action)
        return job

    def job(self, job_id: str) -> Job | None:
        """What became of a submitted job (``None``: unknown, or no longer kept). A reply is copied
        onto the job when first seen (the worker keeps it a minute only)."""
        raw = self.client.get(self._job(job_id))
        if raw is None:
            return None
        record = json.loads(raw)
        if "result" not in record:
            reply = self.client.lindex(self.keys.query_reply(job_id), 0)
            if reply is not None:
                record["result"] = json.loads(reply)
                self.client.set(self._job(job_id), json.dumps(record), keepttl=True)
                self.client.zrem(self._jobs, job_id)
        queued = "result" not in record and bool(self.client.exists(self.keys.query_body(job_id)))
        return Job(job_id, record["instance"], record["created"], record.get("result"), queued)

    @property
    def _jobs(self) -> str:
        """Sorted set of the jobs not yet seen taken (score: when submitted)."""
        return f"{self.keys.prefix}:jobs"

    def _job(self, job_id: str) -> str:
        return f"{self.keys.prefix}:job:{job_id}"

    # -- the worker's side ----------------------------------------------------------------------

    def take(self, request: str) -> bytes | None:
        """A request's body, once (``None``: the asker gave up, or another worker took it)."""
        body = self.client.getdel(self.keys.query_body(request))
        return body.encode() if isinstance(body, str) else body

    def reply(self, request: str, reply: Mapping[str, Any]) -> None:
        """Push the answer where the asker waits (kept :data:`REPLY_TTL_S`)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(self.keys.query_reply(request), json.dumps(reply))
        pipe.expire(self.keys.query_reply(request), self.REPLY_TTL_S)
        pipe.execute()


class Marks:
    """Where long-running work stands, kept beside the queue so that a restart resumes it: the
    Orthanc change-log cursor (:mod:`.change_log`), the studies a backfill walked completely
    (:mod:`.backfill`), and the "Similar cases" series being written
    (:mod:`orthanc_cbir.answers.similar_series`). Each caller names its own key."""

    def __init__(self, client: RedisClient):
        self.client = client

    def number(self, key: str) -> int | None:
        """A stored number (``None``: never stored)."""
        value = self.client.get(key)
        return None if value is None else int(value)

    def set_number(self, key: str, value: int) -> None:
        self.client.set(key, value)

    def entries(self, key: str) -> dict[str, dict[str, Any]]:
        """Every entry of a marks hash: name -> JSON object (read 1,000 at a time)."""
        return {text(name): json.loads(value) for name, value in self.client.hscan_iter(key, count=1000)}

    def set_entry(self, key: str, name: str, value: Mapping[str, Any]) -> None:
        self.client.hset(key, name, json.dumps(value))

    def remove_entry(self, key: str, name: str) -> None:
        self.client.hdel(key, name)

    def clear(self, key: str) -> None:
        self.client.delete(key)
