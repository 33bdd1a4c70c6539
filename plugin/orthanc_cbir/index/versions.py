"""The model versions that have an index in Redis, and dropping one that a newer index replaced.

A new model is a new key space (:mod:`.schema`): its workers index into it from the first
instance on, ``orthanc-cbir reconcile`` enqueues everything the new index lacks, and the old
key space stays untouched meanwhile. ``orthanc-cbir indexes`` lists every version with its
instance count; ``orthanc-cbir indexes --drop VERSION`` deletes an old key space only once the
current version's index holds at least as many instances (the re-index is complete), so an
upgrade never leaves an archive with no complete index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import IndexStillNeeded
from ..redis_client import RedisClient
from .schema import KeySpace

SCAN_BATCH = 1000


@dataclass(frozen=True)
class IndexVersion:
    version: str
    shards: int
    indexed: int
    """Instances indexed now, over every shard."""


def index_versions(client: RedisClient, prefix: str = "cbir") -> list[IndexVersion]:
    """Every model version with an index in Redis (its ``info`` hash), sorted by name."""
    found = []
    for key in client.scan_iter(match=f"{prefix}:{{*}}:info", count=SCAN_BATCH):
        name = key.decode() if isinstance(key, bytes) else key
        version = name[len(prefix) + 2 : -len("}:info")]
        if "#" in version:  # a shard's own key space, not an index
            continue
        found.append(describe_version(client, version, prefix))
    return sorted(found, key=lambda v: v.version)


def describe_version(client: RedisClient, version: str, prefix: str = "cbir") -> IndexVersion:
    """A version's shard count (as its ``info`` records it) and live instance count; 0 when absent."""
    raw = client.hget(KeySpace(version, prefix).info, "schema")
    shards = int(json.loads(raw).get("shards", 1)) if raw else 1
    counts = [client.get(KeySpace.of_shard(version, prefix, s, shards).count) for s in range(shards)]
    return IndexVersion(version, shards, sum(int(c or 0) for c in counts))


def drop_version(client: RedisClient, version: str, current: str, prefix: str = "cbir") -> int:
    """Delete every key of ``version``'s index; returns how many. Refused (:class:`IndexStillNeeded`)
    for the current version, and while the current index holds fewer instances than this one."""
    if version == current:
        raise IndexStillNeeded(f"{version} is the current model's index")
    old, new = describe_version(client, version, prefix), describe_version(client, current, prefix)
    if new.indexed < old.indexed:
        raise IndexStillNeeded(
            f"the current index {current} holds {new.indexed} instances, {version} holds {old.indexed}: "
            "run orthanc-cbir reconcile and wait until the workers have caught up"
        )
    deleted = 0
    bases = {KeySpace.of_shard(version, prefix, s, old.shards).base for s in range(old.shards)}
    bases.add(KeySpace(version, prefix).base)
    for base in sorted(bases):
        batch = []
        for key in client.scan_iter(match=f"{base}:*", count=SCAN_BATCH):
            batch.append(key)
            if len(batch) == SCAN_BATCH:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    return deleted
