"""Transport-free HTTP handlers: plain functions from a request to a :class:`Response`.

An adapter (Orthanc's Python plugin, a standalone server) turns its own request
into arguments, calls the handler and writes the :class:`Response` back. Handlers
never raise for a client's mistake: they answer 4xx with a JSON message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..audit import MAX_READ, VOTES, AuditLog, is_valid_entry_id
from ..config import Settings
from ..dicom.metadata import looks_like_uid
from ..errors import (
    BadParameters,
    Busy,
    CbirError,
    NotFound,
    TooLarge,
    Unavailable,
    Undrawable,
    UpstreamFailed,
    WorkerFailed,
)
from ..index import IndexInfo, IndexLayoutError, IndexStore
from ..ingest.queue import IngestQueue
from ..redis_client import REDIS_ERRORS, UNREACHABLE, client_for, connect
from ..search import STRATEGIES

MAX_VOTE_BYTES = 4096
"""The largest ``POST /cbir/votes`` body: a vote is a few UIDs and words."""
MAX_UID_CHARS = 64
"""A DICOM UID's longest (PS3.5 9.1)."""

ERROR_STATUS: dict[type[CbirError], int] = {
    BadParameters: 400, NotFound: 404, TooLarge: 413, Undrawable: 422, Busy: 429, WorkerFailed: 500,
    UpstreamFailed: 502, Unavailable: 503,
}  # fmt: skip
"""The HTTP status of each error the core and the answers raise (a subclass takes its base's)."""


def status_for(error: type[CbirError]) -> int:
    """The status of an error class (:data:`ERROR_STATUS`; 500 for one it does not name)."""
    return next((status for kind, status in ERROR_STATUS.items() if issubclass(error, kind)), 500)


@dataclass(frozen=True)
class Response:
    """What an adapter sends back."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        return cls(status=status, body=json.dumps(payload, indent=2).encode())

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json({"error": message, "status": status}, status=status)

    @classmethod
    def of_error(cls, error: CbirError) -> Response:
        """The answer to an error the core or an answer raised: its status, its (fixed-text) message."""
        return cls.error(status_for(type(error)), str(error))


def thumbnail_answer(draw: Callable[[], bytes]) -> Response:
    """``GET /cbir/instances/{id}/thumbnail`` (:func:`orthanc_cbir.answers.thumbnail.thumbnail`) as an answer."""
    try:
        return Response(200, draw(), content_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    except CbirError as exc:
        return Response.of_error(exc)


def status(settings: Settings) -> Response:
    """``GET /cbir/status``: version, model, Redis health and the counts indexed / queued /
    pending / rejected (HTTP 200 even when Redis is down, so that a monitor can read what is wrong)."""
    health = redis_health(settings.redis_url, settings.redis_cluster, settings.redis_password)
    answer: dict[str, Any] = {"version": __version__, "redis": health}
    try:
        info = IndexInfo.for_model(settings.model)
        answer["model"] = info.version
    except Exception as exc:  # noqa: BLE001 - a missing or broken card is what the operator must read here
        answer["model"] = None
        answer["model_error"] = f"{type(exc).__name__}: {exc}"
    if health["ok"] and answer["model"]:
        client = client_for(settings, socket_timeout=2)
        try:
            counts: dict[str, Any] = {}
            try:
                counts["indexed"] = IndexStore(client, info, shards=settings.index_shards).count()
            except IndexLayoutError as exc:  # what the operator must read here (the workers refuse it too)
                counts["indexed"] = None
                counts["index_error"] = str(exc)
            counts.update(IngestQueue.for_settings(client, settings).counts())
            answer.update(counts)
        except REDIS_ERRORS as exc:  # a part of Redis (a cluster's shard) does not answer
            answer["redis"] = {"ok": False, "error": f"{type(exc).__name__} while counting: {exc}"}
        finally:
            client.close()
    return Response.json(answer)


def redis_health(url: str, cluster: bool = False, password: str = "") -> dict[str, Any]:
    """``{"ok": true, "version": ...}`` or ``{"ok": false, "error": ...}``; never raises. ``password``:
    the ``redis_password`` setting (sent when the URL carries none)."""
    try:
        client = connect(url, cluster=cluster, password=password, socket_timeout=2, socket_connect_timeout=2)
    except REDIS_ERRORS as exc:  # a cluster client connects when it is made
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        info = client.info("server")
        return {"ok": True, "version": info.get("redis_version")}
    except REDIS_ERRORS as exc:  # RedisClusterException is no RedisError
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def audit_trail(audit: AuditLog, parameters: Mapping[str, str], user: str, readers: str) -> Response:
    """``GET /cbir/audit``: the audit trail, newest first (``count``, 100, at most 1000; ``before``,
    an entry id, pages back). ``readers`` (comma-separated users; empty: anyone let in) may read it."""
    allowed = {name.strip() for name in readers.split(",") if name.strip()}
    if allowed and user not in allowed:
        return Response.error(403, "the audit trail is for the users of the AuditReaders setting")
    if set(parameters) - {"count", "before"}:
        return Response.error(400, "unknown parameter: the parameters are count and before")
    count = parameters.get("count", "100")
    before = parameters.get("before") or None
    if not count.isdigit() or not 1 <= int(count) <= MAX_READ:
        return Response.error(400, f"count must be 1..{MAX_READ}")
    if before is not None and not is_valid_entry_id(before):
        return Response.error(400, "before is an entry id (<milliseconds>-<sequence>)")
    try:
        entries = audit.read(int(count), before)
    except UNREACHABLE as exc:
        return Response.error(503, f"Redis is unreachable ({type(exc).__name__}): the audit trail cannot be read now")
    return Response.json({"entries": entries, "next": entries[-1]["id"] if len(entries) == int(count) else None})


def vote(audit: AuditLog, body: bytes, user: str) -> Response:
    """``POST /cbir/votes``: a reader's thumbs up or down on one hit, a JSON object ``{"query":
    <SOPInstanceUID>, "hit": <SOPInstanceUID>, "vote": "up" | "down", "rank": <1..1000>, "strategy":
    <name>}`` (rank and strategy may be left out, not null), recorded in the audit trail with who voted and when."""
    if len(body) > MAX_VOTE_BYTES:
        return Response.error(413, f"a vote is at most {MAX_VOTE_BYTES} bytes of JSON")
    try:
        asked = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        asked = None
    if not isinstance(asked, dict):
        return Response.error(400, 'a vote is a JSON object: {"query": uid, "hit": uid, "vote": "up" or "down"}')
    unknown = set(asked) - {"query", "hit", "vote", "rank", "strategy"}
    if unknown:
        return Response.error(400, "unknown field: a vote has query, hit, vote, rank and strategy")
    query, hit, choice = asked.get("query"), asked.get("hit"), asked.get("vote")
    for name, uid in (("query", query), ("hit", hit)):
        if not isinstance(uid, str) or len(uid) > MAX_UID_CHARS or not looks_like_uid(uid):
            return Response.error(400, f"{name} must be a SOPInstanceUID (digits and dots, at most 64)")
    if choice not in VOTES:
        return Response.error(400, "vote must be up or down")
    rank, strategy = asked.get("rank"), asked.get("strategy")
    if "rank" in asked and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_READ):
        return Response.error(400, f"rank must be a whole number 1..{MAX_READ}")
    if "strategy" in asked and strategy not in STRATEGIES:
        return Response.error(400, f"strategy must be one of {', '.join(STRATEGIES)}")
    try:
        audit.record_vote(user=user, query_uid=str(query), hit_uid=str(hit), vote=choice, rank=rank, strategy=strategy)
    except UNREACHABLE as exc:
        return Response.error(503, f"Redis is unreachable ({type(exc).__name__}): the vote was not recorded")
    return Response.json({"recorded": {"query": query, "hit": hit, "vote": choice, "rank": rank,
                                       "strategy": strategy, "user": user}}, status=201)  # fmt: skip
