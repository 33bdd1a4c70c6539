"""The Redis index: idempotent adds, removal, counts, version isolation, the snapshot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis

from orthanc_cbir.index import IndexSnapshot, IndexStore
from orthanc_cbir.index.hamming import MultiIndex, probe
from orthanc_cbir.model.codes import hamming_distances

from .conftest import DIM, make_info, make_records


def test_adding_an_instance_twice_indexes_it_once(store):
    records = make_records(30)
    assert store.add(records).added == 30
    again = store.add(records[:10] + make_records(5, seed=1))
    assert (again.added, again.duplicates) == (5, 10)
    assert store.count() == 35 and store.stats()["instances"] == 35


def test_an_instance_twice_in_one_batch_is_added_once(store):
    records = make_records(6)
    result = store.add(records + records[:2])
    assert (result.added, result.duplicates) == (6, 2)
    assert store.count() == 6


def test_a_batch_cut_off_mid_write_leaves_no_instance_that_looks_indexed(store, monkeypatch):
    """A worker killed while writing never leaves a key that says "indexed" without its row
    (the next worker would skip it as a duplicate and the instance would never be found)."""
    records = make_records(8)
    written = IndexStore._write_rows

    def cut_off(self, pipe, new):
        written(self, pipe, new)  # everything queued in the transaction, then the worker dies
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexStore, "_write_rows", cut_off)
    with pytest.raises(KeyboardInterrupt):
        store.add(records)
    assert not any(store.contains(r.key) for r in records) and store.count() == 0
    monkeypatch.undo()
    assert store.add(records).added == 8 and store.count() == 8


def test_workers_racing_on_the_same_instances_add_each_once(redis_url):
    records = make_records(40)
    stores = [IndexStore(redis.Redis.from_url(redis_url), make_info()) for _ in range(4)]
    stores[0].client.flushdb()
    results = []
    threads = [threading.Thread(target=lambda s=s: results.extend(s.add(records[i::2] + records) for i in range(3)))
               for s in stores]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.added for r in results) == 40
    rows = [stores[0].row(r.key) for r in records]
    assert stores[0].count() == 40 and len(set(rows)) == 40
    assert stores[0].sop_uids(rows) == [r.key for r in records]


def test_removed_instance_leaves_count_and_snapshot(store):
    records = make_records(12)
    store.add(records)
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    assert store.remove(records[3].key) is True
    assert store.remove(records[3].key) is False
    assert store.count() == 11 and not store.contains(records[3].key)
    assert snapshot.refresh() == 1
    assert np.count_nonzero(snapshot.live) == 11
    assert store.add([records[3]]).added == 1  # and it can come back


def test_snapshot_holds_what_was_written(store):
    records = make_records(20)
    store.add(records)
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    rows = [store.describe([r.key])[0]["row"] for r in records]
    np.testing.assert_allclose(snapshot.features[rows].astype(np.float32), np.stack([r.features for r in records]),
                               atol=1e-3)  # fmt: skip
    np.testing.assert_array_equal(snapshot.codes[rows], np.stack([r.code for r in records]))
    assert snapshot.refresh() == 0  # nothing written since: nothing re-read


def test_record_keeps_metadata_without_patient_identifiers(store):
    record = make_records(1)[0]
    store.add([record])
    stored = store.describe([record.key])[0]
    assert stored["metadata"]["sop_instance_uid"] == record.key
    assert stored["metadata"]["modality"] == "CT"
    assert "patient_id" not in stored["metadata"] and "patient_name" not in stored["metadata"]


def test_two_model_versions_never_share_records(client):
    old, new = IndexStore(client, make_info("model@aaaa")), IndexStore(client, make_info("model@bbbb", dim=16))
    old.add(make_records(10))
    new.add(make_records(4, seed=3, dim=16))
    assert (old.count(), new.count()) == (10, 4)
    assert all(key.startswith(b"cbir:{model@aaaa}") or key.startswith(b"cbir:{model@bbbb}") for key in client.keys())
    with pytest.raises(ValueError, match="this index holds"):
        new.add(make_records(1, dim=DIM))


def test_multi_index_probe_finds_every_code_within_its_guaranteed_radius(store):
    records = make_records(400)
    store.add(records)
    index = store.multi_index
    query = records[0].code
    codes = np.stack([r.code for r in records])
    for radius in (0, 1):
        found = probe(store.client, store.keys, index, query, wanted=10**9, max_radius=radius)
        # codes within m * (r + 1) - 1 differing searched bits share a substring within r
        within = hamming_distances(_searched_bits(query, index), np.stack([_searched_bits(c, index) for c in codes]))
        guaranteed = np.flatnonzero(within <= index.count * (radius + 1) - 1)
        rows = {store.describe([r.key])[0]["row"] for r in np.array(records, dtype=object)[guaranteed]}
        assert len(rows) >= 1 and rows <= set(found.rows.tolist())


def _searched_bits(code: np.ndarray, index: MultiIndex) -> np.ndarray:
    bits = np.unpackbits(code)[index.start : index.start + index.bits * index.count]
    return np.packbits(bits)


def test_rows_across_block_boundaries_read_back_in_place(store):
    from orthanc_cbir.index.schema import BLOCK_ROWS

    records = make_records(BLOCK_ROWS + 50, seed=4)
    store.add(records[:100])
    store.add(records[100:])
    snapshot = IndexSnapshot(store)
    assert snapshot.refresh() == 2
    last = store.describe([records[-1].key])[0]["row"]
    assert last >= BLOCK_ROWS
    np.testing.assert_array_equal(snapshot.codes[last], records[-1].code)
    assert np.count_nonzero(snapshot.live) == BLOCK_ROWS + 50
