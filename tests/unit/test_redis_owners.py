"""Each Redis key has one owning module: only these send Redis commands (issue 18's rule), so a
new feature asks the queue or the store instead of reaching for a client."""

from __future__ import annotations

import re
from pathlib import Path

import orthanc_cbir

PACKAGE = Path(orthanc_cbir.__file__).parent
OWNERS = {
    "ingest/queue.py",  # the stream, rejected, dead letters, the Orthanc id map, request / reply, marks
    "index/store.py",  # one model version's index
    "index/versions.py",  # which model versions have an index
    "index/series_levels.py",  # each series' level offsets
    "index/regions.py",  # the region entries of an index version
    "audit.py",  # the audit trail
    "evaluation/retrieval.py",  # its own throw-away index
}
COMMAND = re.compile(
    r"\bclient\.(get|set|getdel|delete|unlink|exists|expire|incr|incrby|setrange|hget|hset|hdel|hgetall|hmget|"
    r"hscan_iter|hlen|xadd|xreadgroup|xautoclaim|xack|xdel|xpending|xlen|zadd|zrem|zrange|lindex|rpush|blpop|"
    r"pipeline|scan_iter)\("
)


def test_only_the_owning_modules_send_redis_commands():
    senders = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if COMMAND.search(path.read_text()) and str(path.relative_to(PACKAGE)) not in OWNERS
    )
    assert senders == []


def test_the_rule_sees_the_commands_the_worker_and_the_routes_used_to_send():
    assert COMMAND.search("data = self.store.client.getdel(self.queue.keys.query_body(request))")
    assert COMMAND.search("raw = self.client.get(self._job_key(job_id))")
    assert COMMAND.search("self.orthanc.client.get_json(path)") is None  # Orthanc's REST client, not Redis
