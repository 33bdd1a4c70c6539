"""The plugin's bounded retry buffer (:mod:`orthanc_cbir.ingest.enqueue_buffer`) against a fake
queue that fails while "Redis is down": nothing is lost, order is kept, overflow is counted."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from orthanc_cbir.ingest.enqueue_buffer import EnqueueBuffer


class FlakyQueue:
    """Records entries; raises ``redis.ConnectionError`` while ``down`` is set."""

    def __init__(self):
        self.entries: list[tuple[str, str]] = []
        self.down = threading.Event()
        self.attempts = 0

    def enqueue(self, orthanc_id: str, action: str = "store") -> str:
        self.attempts += 1
        if self.down.is_set():
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.entries.append((orthanc_id, action))
        return f"{len(self.entries)}-0"


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_entries_go_straight_to_the_stream_while_redis_answers():
    queue = FlakyQueue()
    buffer = EnqueueBuffer(queue, log=lambda line: None)
    assert buffer.enqueue("a", "store") and buffer.enqueue("b", "delete")
    assert queue.entries == [("a", "store"), ("b", "delete")] and len(buffer) == 0


def test_what_is_kept_while_redis_is_down_reaches_the_stream_in_order_once_it_answers():
    queue, lines = FlakyQueue(), []
    buffer = EnqueueBuffer(queue, log=lines.append, min_backoff_s=0.01, max_backoff_s=0.05)
    buffer.enqueue("first", "store")
    queue.down.set()
    for i in range(50):
        assert not buffer.enqueue(f"i{i}", "store")
    buffer.enqueue("i3", "delete")
    attempts = queue.attempts
    assert len(buffer) == 51 and attempts >= 2, "only the first failure costs an attempt in the callback"
    time.sleep(0.2)  # the thread retries, with backoff, and keeps everything
    assert len(buffer) == 51
    queue.down.clear()
    wait_for(lambda: len(buffer) == 0)
    assert queue.entries == [("first", "store"), *[(f"i{i}", "store") for i in range(50)], ("i3", "delete")]
    assert buffer.flushed == 51 and buffer.dropped == 0
    assert any("answers again" in line for line in lines)
    buffer.enqueue("after", "store")  # straight to the stream again
    assert queue.entries[-1] == ("after", "store")
    buffer.close()


def test_changes_made_while_the_thread_flushes_stay_behind_the_kept_ones():
    queue = FlakyQueue()
    buffer = EnqueueBuffer(queue, log=lambda line: None, min_backoff_s=0.01, max_backoff_s=0.02)
    queue.down.set()
    for i in range(200):
        buffer.enqueue(str(i), "store")
    queue.down.clear()
    for i in range(200, 400):  # the callback goes on while the thread empties the buffer
        buffer.enqueue(str(i), "store")
    wait_for(lambda: len(buffer) == 0)
    assert [int(oid) for oid, _ in queue.entries] == list(range(400))
    buffer.close()


def test_the_buffer_is_bounded_and_overflow_is_counted_without_ids():
    queue, lines = FlakyQueue(), []
    buffer = EnqueueBuffer(queue, maxlen=10, log=lines.append, min_backoff_s=5, max_backoff_s=5)
    queue.down.set()
    for i in range(25):
        buffer.enqueue(f"secret-{i}", "store")
    assert len(buffer) == 10 and buffer.dropped == 15
    assert any("reconcile" in line for line in lines)
    buffer.close(timeout_s=0.1)
    assert "15 dropped" in lines[-1] and "10 kept" in lines[-1]
    assert not any("secret" in line for line in lines), "logs carry counts, never ids"


def test_a_failure_other_than_redis_is_not_swallowed():
    class Broken:
        def enqueue(self, orthanc_id, action="store"):
            raise TypeError("a bug")

    with pytest.raises(TypeError):
        EnqueueBuffer(Broken(), log=lambda line: None).enqueue("a", "store")


def test_a_buffer_must_hold_something():
    with pytest.raises(ValueError):
        EnqueueBuffer(FlakyQueue(), maxlen=0)


def test_the_503_of_an_unreachable_redis_names_where_it_is_but_never_its_password():
    from orthanc_cbir.api.similar import redis_unreachable

    answer = redis_unreachable("redis://:s3cret@cache.local:6380/2", redis.ConnectionError("Connection refused."))
    body = json.loads(answer.body)
    assert answer.status == 503 and body["status"] == 503
    assert body["error"] == ("Redis at cache.local:6380 is unreachable: ConnectionError: Connection refused.; "
                             "the index cannot answer now")  # fmt: skip
    assert "s3cret" not in body["error"]
