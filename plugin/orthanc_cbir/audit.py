"""The audit trail: who asked for similar images of which instance, and whose studies came back.

Every similarity answer (``GET .../similar``, the QIDO-RS form, ``POST /cbir/query``) and every
"Similar cases" series request is one entry of an append-only Redis stream (:data:`STREAM`),
written before the answer leaves, so that a hospital can answer "who looked at whose images".
An entry holds the time, the user (Orthanc's authenticated user, or the name of the standalone
server's token or Basic user), the route, the query (its level and DICOM UID) and the hits'
StudyInstanceUIDs in rank order: UIDs only, never a patient's name or ID (the index holds none).

A reader's vote on a hit (``POST /cbir/votes``: thumbs up or down) is an entry of the same stream,
route ``vote``, with the query's and the hit's SOPInstanceUIDs, the vote, the hit's rank and the
strategy that ranked it (:meth:`AuditLog.record_vote`), so that ``orthanc-cbir evaluate --votes``
can say how often a site's readers found the hits similar (:meth:`AuditLog.votes`).

Nothing ever deletes an entry but the retention trim: each ``XADD`` drops entries older than
``audit_retention_days`` (``MINID``, exact: an approximate trim keeps old entries as long as
newer ones share their stream node). ``GET /cbir/audit`` (both
servers) reads it back, newest first.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STREAM = "cbir:audit"
"""The stream's key (one per Redis, whatever deployment writes it: the entries say which route)."""
MAX_READ = 1000
"""Most entries one ``GET /cbir/audit`` returns."""
DAY_MS = 86_400_000
VOTE_ROUTE = "vote"
VOTES = ("up", "down")
"""A vote says the hit is similar to the query (``up``) or not (``down``)."""


@dataclass(frozen=True)
class Vote:
    """One reader's vote on one hit, as the audit trail holds it."""

    at: float
    """Seconds since the epoch."""
    user: str
    query: str
    """The query's SOPInstanceUID."""
    hit: str
    """The hit's SOPInstanceUID."""
    vote: str
    """``up`` or ``down``."""
    rank: int | None
    strategy: str | None


class AuditLog:
    """Writes and reads the audit stream. ``retention_days`` <= 0 keeps every entry."""

    def __init__(self, client: Any, retention_days: float, key: str = STREAM):
        self.client, self.retention_days, self.key = client, retention_days, key

    def record(self, *, user: str, route: str, level: str, query_uid: str | None,
               studies: Sequence[str | None], hits: int) -> None:  # fmt: skip
        """Append one entry. Raises what Redis raises: a route that cannot record does not answer."""
        now_ms = int(time.time() * 1000)
        fields = {"at": f"{now_ms / 1000:.3f}", "user": user, "route": route, "level": level,
                  "query": query_uid or "", "hits": str(hits),
                  "studies": json.dumps(list(dict.fromkeys(s for s in studies if s)))}  # fmt: skip
        self._append(now_ms, fields)

    def record_vote(self, *, user: str, query_uid: str, hit_uid: str, vote: str, rank: int | None,
                    strategy: str | None) -> None:  # fmt: skip
        """Append one vote (:data:`VOTES`). Raises what Redis raises."""
        if vote not in VOTES:
            raise ValueError(f"a vote is one of {VOTES}, not {vote!r}")
        now_ms = int(time.time() * 1000)
        self._append(now_ms, {"at": f"{now_ms / 1000:.3f}", "user": user, "route": VOTE_ROUTE, "level": "instance",
                              "query": query_uid, "hits": "1", "studies": "[]", "hit": hit_uid, "vote": vote,
                              "rank": "" if rank is None else str(rank), "strategy": strategy or ""})  # fmt: skip

    def votes(self, page: int = MAX_READ) -> Iterator[Vote]:
        """Every vote the trail still holds, oldest first (read ``page`` entries at a time)."""
        low = "-"
        while True:
            entries = self.client.xrange(self.key, min=low, max="+", count=page)
            for entry_id, fields in entries:
                entry = _entry(entry_id, fields)
                if entry["route"] == VOTE_ROUTE and entry["vote"] in VOTES:
                    yield Vote(entry["at"], entry["user"], entry["query"] or "", entry["hit"] or "", entry["vote"],
                               entry["rank"], entry["strategy"])  # fmt: skip
            if len(entries) < page:
                return
            low = f"({_str(entries[-1][0])}"

    def _append(self, now_ms: int, fields: dict[str, str]) -> None:
        if self.retention_days > 0:
            self.client.xadd(self.key, fields, minid=now_ms - int(self.retention_days * DAY_MS), approximate=False)
        else:
            self.client.xadd(self.key, fields)

    def read(self, count: int = 100, before: str | None = None) -> list[dict[str, Any]]:
        """Up to ``count`` entries, newest first; ``before`` (an entry id) pages back from there."""
        if before is not None and before.strip("0-") == "":  # nothing is before 0-0 (Redis refuses "(0-0")
            return []
        high = f"({before}" if before else "+"
        entries = self.client.xrevrange(self.key, max=high, min="-", count=count)
        return [_entry(entry_id, fields) for entry_id, fields in entries]


def _entry(entry_id: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    text = {_str(k): _str(v) for k, v in fields.items()}
    entry = {"id": _str(entry_id), "at": float(text.get("at", 0)), "user": text.get("user", ""),
             "route": text.get("route", ""), "level": text.get("level", ""), "query": text.get("query") or None,
             "hits": int(text.get("hits", 0)), "studies": json.loads(text.get("studies", "[]"))}  # fmt: skip
    if entry["route"] == VOTE_ROUTE:
        rank = text.get("rank", "")
        entry.update(hit=text.get("hit"), vote=text.get("vote"), rank=int(rank) if rank.isdigit() else None,
                     strategy=text.get("strategy") or None)  # fmt: skip
    return entry


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


ANONYMOUS = "anonymous"


def basic_user(authorization: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (``None`` for another scheme or a
    malformed one). The password is not looked at: the server checked it before the route ran.

    >>> basic_user("Basic " + base64.b64encode(b"alice:secret").decode()), basic_user("Bearer x")
    ('alice', None)
    """
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, _ = base64.b64decode(credentials.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return user.decode("utf-8", "replace") if colon else None


def is_valid_entry_id(text: str) -> bool:
    """Whether ``text`` is a stream entry id (``<ms>-<seq>``), what ``before`` must be.

    >>> is_valid_entry_id("1700000000000-0"), is_valid_entry_id("+"), is_valid_entry_id("1-2-3")
    (True, False, False)
    >>> is_valid_entry_id("18446744073709551616-0")  # past a stream id's 64 bits
    False
    """
    ms, dash, seq = text.partition("-")
    return bool(dash) and ms.isdigit() and seq.isdigit() and int(ms) < 2**64 and int(seq) < 2**64
