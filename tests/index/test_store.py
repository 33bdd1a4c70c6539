"""The Redis index: idempotent adds, removal, counts, version isolation, the snapshot."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import redis

from orthanc_cbir.index import IndexLayoutError, IndexSnapshot, IndexStore
from orthanc_cbir.index.schema import LAYOUT, decode_entry, encode_entry, quantize
from orthanc_cbir.ingest.orthanc_client import OrthancClient
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.worker import Worker
from orthanc_cbir.model.level import LevelEncoding
from tests.records_factory import DIM, make_info, make_records


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

    def cut_off(self, pipe, *args):
        written(self, pipe, *args)  # everything queued in the transaction, then the worker dies
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
    rows = [store.describe([r.key])[0].row for r in records]
    features = np.stack([r.features for r in records])
    step = np.abs(features).max(axis=1, keepdims=True) / 127  # one int8 step of each row
    assert snapshot.quantized.dtype == np.int8 and not hasattr(snapshot, "features")  # no float32 copy
    assert np.all(np.abs(snapshot.vectors(rows) - features) <= 0.75 * step)
    np.testing.assert_array_equal(snapshot.codes[rows], np.stack([r.code for r in records]))
    assert snapshot.refresh() == 0  # nothing written since: nothing re-read


def test_record_keeps_metadata_without_patient_identifiers(store):
    record = make_records(1)[0]
    store.add([record])
    stored = store.describe([record.key])[0]
    assert stored.metadata.sop_instance_uid == record.key
    assert stored.metadata.modality == "CT"
    assert "patient_id" not in stored.metadata.to_json() and "patient_name" not in stored.metadata.to_json()


def test_two_model_versions_never_share_records(client):
    old, new = IndexStore(client, make_info("model@aaaa")), IndexStore(client, make_info("model@bbbb", dim=16))
    old.add(make_records(10))
    new.add(make_records(4, seed=3, dim=16))
    assert (old.count(), new.count()) == (10, 4)
    assert all(key.startswith(b"cbir:{model@aaaa}") or key.startswith(b"cbir:{model@bbbb}") for key in client.keys())
    with pytest.raises(ValueError, match="this index holds"):
        new.add(make_records(1, dim=DIM))


def test_rows_across_block_boundaries_read_back_in_place(store):
    from orthanc_cbir.index.schema import BLOCK_ROWS

    records = make_records(BLOCK_ROWS + 50, seed=4)
    store.add(records[:100])
    store.add(records[100:])
    snapshot = IndexSnapshot(store)
    assert snapshot.refresh() == 2
    last = store.describe([records[-1].key])[0].row
    assert last >= BLOCK_ROWS
    np.testing.assert_array_equal(snapshot.codes[last], records[-1].code)
    assert np.count_nonzero(snapshot.live) == BLOCK_ROWS + 50


def test_features_round_trip_within_int8_precision():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(200, 512)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    quantized, scales = quantize(features)
    assert quantized.dtype == np.int8 and scales.dtype == np.float32
    assert np.abs(quantized).max(axis=1).min() == 127  # every row uses the whole int8 range
    restored = quantized * scales[:, None]
    step = np.abs(features).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(restored - features) <= 0.75 * step)  # half a step, and the length kept
    np.testing.assert_allclose(np.linalg.norm(restored, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(restored * features, axis=1)) > 0.9999  # turned by less than 0.8 degree
    zero, scale = quantize(np.zeros((1, 8), np.float32))
    assert not zero.any() and scale[0] == 0


def test_snapshot_similarities_are_the_dequantized_dot_products(store):
    records = make_records(300, seed=5)
    store.add(records)
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    query = make_records(1, seed=6)[0].features
    expected = snapshot.vectors(np.arange(snapshot.rows)) @ query
    np.testing.assert_allclose(snapshot.similarities(query), expected, atol=1e-5)
    some = np.array([5, 17, 250, 3])
    np.testing.assert_allclose(snapshot.similarities(query, some), expected[some], atol=1e-5)
    np.testing.assert_allclose(snapshot.similarities(query, np.arange(1, 290)), expected[1:290], atol=1e-5)


def test_a_level_block_has_its_own_scale_so_the_other_dims_keep_their_precision(client):
    # the shipped model's proportions: a level block of half the squared length whose values
    # dwarf every other dim's; with one scale per row, its peak set every dim's step
    level = LevelEncoding(start=120, periods_mm=(3200.0, 800.0, 250.0, 160.0), weight=0.5)
    store = IndexStore(client, dataclasses.replace(make_info("level-model@000000000000", dim=128), level=level))
    rng = np.random.default_rng(7)
    records = make_records(200, seed=7, dim=128)
    appearance = rng.normal(size=(len(records), 120)).astype(np.float32)
    appearance *= np.sqrt(1 - level.weight) / np.linalg.norm(appearance, axis=1, keepdims=True)
    features = np.hstack([appearance, level.encode(rng.uniform(-600, 200, len(records)))])
    store.add([dataclasses.replace(r, features=f) for r, f in zip(records, features, strict=True)])
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    rows = np.array([store.row(r.key) for r in records])
    stored = snapshot.vectors(rows)
    step = np.abs(appearance).max(axis=1, keepdims=True) / 127  # the appearance dims' own int8 step
    assert np.all(np.abs(stored[:, :120] - appearance) <= 0.75 * step)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)  # each span keeps its length
    np.testing.assert_allclose(level.decode(stored), level.decode(features), atol=2.0)
    query = features[3]
    np.testing.assert_allclose(snapshot.similarities(query, rows), stored @ query, atol=1e-5)
    assert client.strlen("cbir:{level-model@000000000000}:block:scales:0") == 4095 * 2 * 4  # two scales a row


def test_an_index_written_with_one_scale_a_row_is_read_and_grown_as_it_is(client):
    # what the release before layout 3 made of a model with a level block: one scale per row
    level = LevelEncoding(start=120, periods_mm=(3200.0, 800.0, 250.0, 160.0), weight=0.5)
    info = dataclasses.replace(make_info("level-model@000000000000", dim=128), level=level)
    records = make_records(60, seed=11, dim=128)
    IndexStore(client, dataclasses.replace(info, level=None)).add(records[:40])  # one span, as layout 2 stored it
    schema = json.loads(client.hget("cbir:{level-model@000000000000}:info", "schema"))
    client.hset("cbir:{level-model@000000000000}:info", "schema", json.dumps({**schema, "layout": 2}))
    upgraded = IndexStore(client, info)
    assert upgraded.add(records[40:]).added == 20  # the workers keep indexing into it
    snapshot = IndexSnapshot(upgraded)
    snapshot.refresh()
    features = np.stack([r.features for r in records])
    quantized, scales = quantize(features)
    rows = np.array([upgraded.row(r.key) for r in records])
    np.testing.assert_allclose(snapshot.vectors(rows), quantized * scales[:, None], atol=1e-6)
    assert client.strlen("cbir:{level-model@000000000000}:block:scales:0") == 4095 * 4  # still one scale a row
    assert upgraded.stats()["layout"] == 2


def test_an_entry_keeps_the_record_in_a_few_hundred_bytes():
    record = make_records(1)[0]
    orthanc = {"instance": "0c5d6a4e-2f2a56fb-4d5a5c1e-8e1e2a47-03c1bd2f", "series": "x", "study": "s",
               "patient": "0c5d6a4e-2f2a56fb-4d5a5c1e-8e1e2a47-03c1bd2e"}
    record = type(record)(record.metadata, record.features, record.code, record.probabilities, orthanc, frame=2)
    raw = encode_entry(record, 12345)
    entry = decode_entry(record.key, raw)
    assert entry.row == 12345 and entry.frame == 2 and entry.orthanc == orthanc
    assert entry.metadata == record.metadata
    assert {h: np.argmax(p) for h, p in entry.probabilities.items()} == \
        {h: np.argmax(p) for h, p in record.probabilities.items()}  # fmt: skip
    assert len(raw) < 300


def test_an_index_of_another_layout_or_shard_count_is_refused(client):
    old = {"version": "test-model@000000000000", "feature_dim": DIM, "layout": make_info().layout.to_json()}
    client.hset("cbir:{test-model@000000000000}:info", "schema", json.dumps(old))  # as layout 1 wrote it
    with pytest.raises(IndexLayoutError, match="layout 1"):  # written before layouts were numbered
        IndexStore(client, make_info()).count()
    client.flushdb()
    IndexStore(client, make_info(), shards=2).add(make_records(3))
    with pytest.raises(IndexLayoutError, match="has 2 shard"):
        IndexStore(client, make_info(), shards=1).count()
    adopted = IndexStore(client, make_info())  # no number asked: the index's
    assert adopted.shards == 2 and adopted.count() == 3 and adopted.stats()["layout"] == LAYOUT


def test_a_worker_told_another_shard_count_stops_before_it_takes_an_entry(client):
    IndexStore(client, make_info(), shards=2).add(make_records(3))
    queue = IngestQueue(client)
    queue.ensure_group()
    queue.enqueue("an-orthanc-id")
    store = IndexStore(client, make_info(), shards=1)
    worker = Worker(queue, OrthancClient("http://127.0.0.1:9"), store, embedder=None)
    stop = threading.Event()
    deadline = threading.Timer(5, stop.set)  # a worker that did not refuse would go on until then
    deadline.daemon = True
    deadline.start()
    with pytest.raises(IndexLayoutError, match="has 2 shard"):
        worker.run(stop)
    deadline.cancel()
    assert queue.counts().items() >= {"queued": 1, "pending": 0, "rejected": 0}.items()  # nobody took the entry
