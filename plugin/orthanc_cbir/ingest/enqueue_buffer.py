"""A bounded in-memory retry buffer in front of the ingest stream, for Orthanc's change callback.

When Redis does not answer, the callback must neither block Orthanc (its change
callbacks run in order on one thread) nor lose the change: :meth:`EnqueueBuffer.enqueue`
keeps ``(orthanc_id, action)`` in a deque and a background thread adds it to the
stream once Redis answers again, retrying with exponential backoff (0.5 s doubling
to 30 s). While the buffer holds anything, new changes go behind it (the stream keeps
Orthanc's order: a deletion never overtakes its store) and the callback does not
touch Redis at all, so only the first failure costs a socket timeout.

The buffer is bounded (``EnqueueBufferSize``): what does not fit is counted and
logged (a count, never an id or patient data) and left to ``orthanc-cbir reconcile``,
as is what the buffer still holds when Orthanc stops. An entry may reach the stream
twice (a connection lost after Redis applied the ``XADD``): workers index by
SOPInstanceUID, so a duplicate entry never makes a duplicate record.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

import redis

from ..redis_client import UNREACHABLE

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


class Enqueuer(Protocol):
    def enqueue(self, orthanc_id: str, action: str = ...) -> str: ...


class EnqueueBuffer:
    """Enqueue now when Redis answers; otherwise keep the entry (bounded) and retry in a thread."""

    def __init__(self, queue: Enqueuer, maxlen: int = 100_000, log: Callable[[str], None] = print,
                 min_backoff_s: float = MIN_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 errors: tuple[type[BaseException], ...] = (redis.RedisError, *UNREACHABLE,
                                                            OSError)):  # fmt: skip
        """``log`` gets one line per state change (Orthanc's ``LogWarning`` in the plugin);
        ``errors`` are the failures that mean "Redis does not answer, keep the entry"."""
        if maxlen < 1:
            raise ValueError("the enqueue buffer must hold at least one entry")
        self.queue = queue
        self.maxlen = maxlen
        self.log = log
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.errors = errors
        self.dropped = 0
        """Entries that did not fit (``orthanc-cbir reconcile`` finds them)."""
        self.flushed = 0
        """Entries the thread added to the stream after a failure."""
        self._pending: deque[tuple[str, str]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def enqueue(self, orthanc_id: str, action: str) -> bool:
        """Add one entry to the stream, or keep it for the thread; True if it reached the stream now.
        Never raises for an unreachable Redis and never waits longer than one attempt."""
        with self._lock:
            if not self._pending:
                try:
                    self.queue.enqueue(orthanc_id, action)
                    return True
                except self.errors as exc:
                    self.log(f"cbir: Redis does not answer ({type(exc).__name__}); keeping changes in memory "
                             f"(at most {self.maxlen}) until it does")  # fmt: skip
            self._keep(orthanc_id, action)
        self._ensure_thread()
        self._wake.set()
        return False

    def _keep(self, orthanc_id: str, action: str) -> None:
        if len(self._pending) < self.maxlen:
            self._pending.append((orthanc_id, action))
            return
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            self.log(f"cbir: enqueue buffer full ({self.maxlen} entries): {self.dropped} change(s) not kept; "
                     "run `orthanc-cbir reconcile` once Redis is back")  # fmt: skip

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="cbir-enqueue-buffer", daemon=True)
                self._thread.start()

    def _flush(self) -> int:
        """Move what the buffer holds to the stream, oldest first, until it is empty or Redis
        fails; returns how many entries went. Raises the failure (the entry stays first)."""
        sent = 0
        while True:
            with self._lock:  # only this thread takes entries out, so the first stays first
                if not self._pending:
                    return sent
                orthanc_id, action = self._pending[0]
            self.queue.enqueue(orthanc_id, action)  # outside the lock: the callback never waits on a retry
            with self._lock:
                self._pending.popleft()
                self.flushed += 1
            sent += 1

    def _run(self) -> None:
        backoff = self.min_backoff_s
        while not self._stop.is_set():
            self._stop.wait(backoff)
            if self._stop.is_set():
                return
            try:
                sent = self._flush()
            except self.errors:
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if sent:
                self.log(f"cbir: Redis answers again; {sent} kept change(s) added to the ingest stream")
            backoff = self.min_backoff_s
            with self._lock:
                if not self._pending:  # nothing left: the thread ends, the next failure starts another
                    self._thread = None
                    return

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (Orthanc stops); what is still kept is logged as a count and lost."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            left = len(self._pending)
        if left or self.dropped:
            self.log(f"cbir: {left} kept and {self.dropped} dropped change(s) never reached Redis; "
                     "run `orthanc-cbir reconcile`")  # fmt: skip
