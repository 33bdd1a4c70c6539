"""``orthanc-cbir reconcile``: make the index agree with what Orthanc holds.

Walks Orthanc's instances page by page and enqueues every one that is neither in
the index of the current model version nor rejected (an entry lost while Redis
was down, an archive stored before the plugin, a model change that needs
everything re-embedded); enqueues a deletion for every indexed Orthanc instance
Orthanc no longer has. The workers do the rest, as for live traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from ..index import IndexStore
from .orthanc_client import OrthancClient
from .queue import DELETE, ORTHANC, STORE, IngestQueue

PAGE = 1000


@dataclass(frozen=True)
class ReconcileSummary:
    in_orthanc: int
    already_indexed: int
    rejected: int
    enqueued: int
    """Instances sent to the workers to be indexed."""
    gone: int
    """Indexed instances Orthanc no longer has, sent to the workers to be removed."""


def reconcile(orthanc: OrthancClient, queue: IngestQueue, store: IndexStore, progress: bool = True) -> ReconcileSummary:
    indexed_uid = dict(queue.indexed_map(page=PAGE))
    rejected = queue.rejected_from(ORTHANC)
    total = int(orthanc.get_json("/statistics").get("CountInstances", 0))
    seen: set[str] = set()
    already = enqueued = skipped = 0
    bar = tqdm(total=total, desc="reconcile", unit="instance", disable=not progress, dynamic_ncols=True)
    since = 0
    while True:
        page = orthanc.get_json(f"/instances?since={since}&limit={PAGE}")
        if not page:
            break
        since += len(page)
        seen.update(page)
        candidates = [oid for oid in page if oid not in rejected]
        skipped += len(page) - len(candidates)
        known = [oid for oid in candidates if oid in indexed_uid]
        # indexed once, but maybe under another model version
        flags = store.indexed([indexed_uid[oid] for oid in known])  # one per instance of known
        present = {oid for oid, indexed in zip(known, flags, strict=True) if indexed}
        already += len(present)
        for oid in candidates:
            if oid not in present:
                queue.enqueue(oid, STORE)
                enqueued += 1
        bar.update(len(page))
    bar.close()
    gone = [oid for oid in indexed_uid if oid not in seen]
    for oid in gone:
        queue.enqueue(oid, DELETE)
    return ReconcileSummary(len(seen), already, skipped, enqueued, len(gone))
