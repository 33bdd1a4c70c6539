"""Catch up, after Orthanc restarts, on the changes its callback never saw.

Orthanc writes each change to its database (``/changes``, numbered ``Seq``) and only
later runs the plugins' change callbacks from an in-memory queue, which it drops when
it stops: instances it stored (and acknowledged to the sender) just before a stop
would never reach the ingest stream. :class:`ChangeCursor` keeps, in Redis, the
``Seq`` up to which every relevant change is known to be in the stream (advanced every
few seconds from what the callback handled), and when Orthanc starts it enqueues again
every relevant change after it. A change may so reach the stream twice: workers index
by SOPInstanceUID, so the index still holds each instance once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..redis_client import RedisClient
from .queue import DELETE, STABLE_STUDY, STORE, Marks

PAGE = 1000
ADVANCE_EVERY_S = 5.0


def action_of(change: dict[str, Any], series_on_stable_study: bool) -> str | None:
    """The stream action of one ``/changes`` entry (``None``: nothing to do for it)."""
    kind, level = change.get("ChangeType"), change.get("ResourceType")
    if kind == "NewInstance":
        return STORE
    if kind == "Deleted" and level == "Instance":
        return DELETE
    if kind == "StableStudy" and series_on_stable_study:
        return STABLE_STUDY
    return None


class ChangeCursor:
    """The change-log position below which every relevant change is in the stream."""

    def __init__(self, get_json: Callable[[str], Any], client: RedisClient, enqueue: Callable[[str, str], Any],
                 pending: Callable[[], int], series_on_stable_study: bool = False,
                 key: str = "cbir:orthanc-changes-seq", log: Callable[[str], None] = print,
                 remember: int = 100_000):  # fmt: skip
        """``get_json(path)`` asks Orthanc's REST API; ``enqueue(orthanc_id, action)`` adds an entry (the
        enqueue buffer's); ``pending()`` counts entries that have not reached Redis yet."""
        self.get_json = get_json
        self.marks = Marks(client)
        self.enqueue = enqueue
        self.pending = pending
        self.series_on_stable_study = series_on_stable_study
        self.key = key
        self.log = log
        self._handled: deque[tuple[str, str]] = deque(maxlen=remember)
        self._handled_set: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handled(self, orthanc_id: str, action: str) -> None:
        """The callback handed this change to the enqueue buffer (call it after, never before)."""
        with self._lock:
            if len(self._handled) == self._handled.maxlen:
                self._handled_set.discard(self._handled[0])
            self._handled.append((action, orthanc_id))
            self._handled_set.add((action, orthanc_id))

    def start(self) -> None:
        """Orthanc has started: replay what the last run left behind, then keep the cursor moving."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cbir-change-cursor", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _changes(self, since: int) -> tuple[list[dict[str, Any]], int, bool]:
        page = self.get_json(f"/changes?since={since}&limit={PAGE}")
        return page.get("Changes", []), int(page.get("Last", since)), bool(page.get("Done", True))

    def replay(self) -> int:
        """Enqueue every relevant change after the stored cursor; returns how many. The first run
        only records where the log is (what was stored before the plugin is `reconcile`'s job)."""
        last = int(self.get_json("/changes?last").get("Last", 0))
        stored = self.marks.number(self.key)
        cursor = stored if stored is not None else last
        if cursor > last:  # another Orthanc database (its log starts again at 1)
            cursor = 0
        replayed = 0
        while True:
            changes, end, done = self._changes(cursor)
            for change in changes:
                action = action_of(change, self.series_on_stable_study)
                if action is not None:
                    self.enqueue(change["ID"], action)
                    replayed += 1
            cursor = max(cursor, end)
            if done or not changes:
                break
        self._save(cursor)
        return replayed

    def advance(self) -> int:
        """Move the stored cursor past the changes known to be in the stream; returns the new cursor."""
        cursor = self.marks.number(self.key) or 0
        with self._lock:
            handled = set(self._handled_set)
        if self.pending():  # handled, but some may still wait in the enqueue buffer
            return cursor
        changes, _, _ = self._changes(cursor)
        for change in changes:
            action = action_of(change, self.series_on_stable_study)
            if action is not None and (action, change["ID"]) not in handled:
                break  # its callback has not run yet: the cursor stays before it
            cursor = int(change["Seq"])
        self._save(cursor)
        return cursor

    def _save(self, cursor: int) -> None:
        self.marks.set_number(self.key, cursor)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():  # Redis may be down when Orthanc starts
            try:
                replayed = self.replay()
                if replayed:
                    self.log(f"cbir: {replayed} change(s) from before Orthanc's restart enqueued again")
                break
            except Exception as exc:  # noqa: BLE001 - Redis down, Orthanc's API not up yet: the thread must go on
                self.log(f"cbir: cannot replay Orthanc's change log yet ({type(exc).__name__}); trying again")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        while not self._stop.wait(ADVANCE_EVERY_S):
            try:
                self.advance()
            except Exception:  # noqa: BLE001
                pass  # Redis or Orthanc busy: next time
