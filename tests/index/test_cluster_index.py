"""The index in shards: on a real three-master Redis Cluster (each shard's keys on one
master, queries fanning out and merging) and on one redis-server, answering what an
unsharded index of the same records answers; the ingest queue on the cluster."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import redis

from orthanc_cbir.api.routes import redis_health
from orthanc_cbir.config import load_settings
from orthanc_cbir.index import IndexSnapshot, IndexStore
from orthanc_cbir.index.schema import key_slot, shard_of
from orthanc_cbir.ingest.queue import DELETE, ORTHANC, STORE, IngestQueue
from orthanc_cbir.local_services import RedisCluster
from orthanc_cbir.redis_client import client_for, connect
from orthanc_cbir.search import Filters, Query, QueryContext, Searcher, SearchOptions
from tests.records_factory import make_info, make_records

pytestmark = pytest.mark.integration

COMPARED = ("exact", "class", "multilateral")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisCluster(tmp_path_factory.mktemp("cluster"), masters=3) as running:
        yield running


@pytest.fixture
def cluster_client(cluster):
    client = connect(cluster.url, cluster=True)
    client.flushall()  # every master
    yield client
    client.close()


@pytest.fixture(scope="module")
def records():
    return make_records(300, seed=11)


def as_query(record, **context) -> Query:
    return Query(record.features, record.code, record.probabilities, QueryContext(**context))


def answers(store: IndexStore, queries) -> dict:
    searcher = Searcher(store)
    out = {}
    for strategy in COMPARED:
        for i, query in enumerate(queries):
            for options in (SearchOptions(strategy, k=12), SearchOptions(strategy, k=5, level="study")):
                result = searcher.search(as_query(query, sop_instance_uid=query.key), options)
                out[strategy, options.level, i] = [(h.sop_instance_uid, round(h.distance, 5)) for h in result.hits]
    return out


def test_three_shards_on_three_masters_answer_as_one_server(cluster, cluster_client, client, records):
    sharded, single = IndexStore(cluster_client, make_info(), shards=3), IndexStore(client, make_info())
    for start in range(0, len(records), 64):  # batches that span the shards, as a worker's do
        assert sharded.add(records[start : start + 64]).added == len(records[start : start + 64])
    single.add(records)
    assert sharded.count() == single.count() == 300

    shard_tags = {shard: sharded.shard_keys(shard).base for shard in range(3)}
    per_node = []
    for host, port in cluster.nodes:
        with redis.Redis(host=host, port=port) as node:
            keys = [k.decode() for k in node.keys("*") if b":info" not in k]
            per_node.append(({tag for tag in shard_tags.values() if any(k.startswith(tag) for k in keys)}, len(keys)))
    assert all(size > 0 for _, size in per_node), per_node  # every master holds a part
    assert sorted(len(tags) for tags, _ in per_node) == [1, 1, 1]  # one shard each (tags spread by slot)
    held = {shard_of(r.key, 3) for r in records}
    assert held == {0, 1, 2}

    queries = make_records(4, seed=12) + records[7:9]
    assert answers(sharded, queries) == answers(single, queries)
    described = sharded.describe([records[5].key])[0]
    assert described.row % 3 == shard_of(records[5].key, 3)
    assert sharded.sop_uids([described.row]) == [records[5].key]
    assert described.metadata == records[5].metadata


def test_removal_and_racing_adds_on_the_cluster(cluster, cluster_client, records):
    stores = [IndexStore(connect(cluster.url, cluster=True), make_info(), shards=3) for _ in range(3)]
    results = []
    threads = [threading.Thread(target=lambda s=s, i=i: results.extend(s.add(records[i::2] + records[:120])
                                                                      for _ in range(2)))
               for i, s in enumerate(stores)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = stores[0]
    assert sum(r.added for r in results) == 300 and store.count() == 300
    rows = [store.row(r.key) for r in records]
    assert len(set(rows)) == 300 and store.sop_uids(rows) == [r.key for r in records]

    searcher = Searcher(store)
    query = as_query(make_records(1, seed=12)[0])
    first = searcher.search(query, SearchOptions("exact", k=5)).sop_instance_uids
    assert store.remove(first[0]) and not store.remove(first[0])
    assert store.count() == 299 and not store.contains(first[0]) and store.indexed(first[:2]) == [False, True]
    for strategy in COMPARED:
        assert first[0] not in searcher.search(query, SearchOptions(strategy, k=50)).sop_instance_uids
    assert store.add([r for r in records if r.key == first[0]]).added == 1
    for other in stores:
        other.client.close()


def test_the_ingest_queue_works_on_the_cluster(cluster_client):
    queue = IngestQueue(cluster_client, claim_idle_ms=50)
    ids = [queue.enqueue(f"orthanc-{i}", STORE) for i in range(5)] + [queue.enqueue("orthanc-9", DELETE)]
    events = queue.read("worker-a", count=10, block_ms=100)
    assert [e.entry_id for e in events] == ids and events[-1].action == DELETE
    assert queue.counts().items() >= {"queued": 6, "pending": 6, "rejected": 0}.items()
    queue.ack(events[:4])
    queue.reject(ORTHANC, "orthanc-4", "unsupported", "no pixels", "1.2.3")
    assert queue.rejected()["1.2.3"]["source_id"] == "orthanc-4"  # keyed by SOPInstanceUID, the source a field
    threading.Event().wait(0.1)
    claimed = queue.read("worker-b", count=10, block_ms=100)  # left idle by worker-a: claimed
    assert [e.entry_id for e in claimed] == ids[4:] and all(e.deliveries == 2 for e in claimed)
    queue.ack(claimed)
    assert queue.counts().items() >= {"queued": 0, "pending": 0, "rejected": 1}.items()


def test_three_shards_on_one_server(client, records):
    sharded = IndexStore(client, make_info(), shards=3)
    single = IndexStore(client, make_info("other-model@000000000000"))
    sharded.add(records[:150])
    sharded.add(records[150:])
    single.add(records)
    assert sharded.stats()["shards"] == 3 and sharded.stats()["rows_allocated"] == 300
    assert {key_slot(sharded.shard_keys(s).base.split("{")[1].rstrip("}")) * 3 // 16384 for s in range(3)} == {0, 1, 2}

    snapshot = IndexSnapshot(sharded)
    assert snapshot.refresh() == 3  # one block per shard
    live = np.flatnonzero(snapshot.live)
    assert len(live) == 300 and set(live % 3) == {0, 1, 2}  # the shards' rows interleave
    rows = [sharded.row(r.key) for r in records]
    assert [row % 3 for row in rows] == [shard_of(r.key, 3) for r in records]
    np.testing.assert_array_equal(snapshot.codes[rows], np.stack([r.code for r in records]))

    queries = make_records(3, seed=13)
    assert answers(sharded, queries) == answers(single, queries)
    searcher = Searcher(sharded)
    searcher.snapshot.refresh()
    stored = searcher.stored_query(np.array([rows[40]]))
    assert stored.context.sop_instance_uid == records[40].key
    options = SearchOptions("exact", k=1, filters=Filters(exclude_self=False))
    assert searcher.search(stored, options).sop_instance_uids == [records[40].key]

    assert sharded.remove(records[40].key) and sharded.count() == 299
    assert sharded.sop_uids([rows[40], rows[41]]) == [None, records[41].key]
    assert snapshot.refresh() == 1 and np.count_nonzero(snapshot.live) == 299


def test_settings_make_a_cluster_client_that_fails_like_a_server_client(cluster):
    settings = load_settings(env={"CBIR_REDIS_URL": cluster.url, "CBIR_REDIS_CLUSTER": "yes", "CBIR_INDEX_SHARDS": "3"})
    assert settings.redis_cluster and settings.index_shards == 3
    with client_for(settings) as client:
        assert client.ping() and len(client.get_primaries()) == 3
    assert redis_health(cluster.url, cluster=True)["ok"] is True
    unreachable = connect("redis://127.0.0.1:1", cluster=True, socket_connect_timeout=1)  # made, not yet connected
    with pytest.raises(redis.ConnectionError):  # what callers that wait out a Redis outage catch
        unreachable.ping()
    assert redis_health("redis://127.0.0.1:1", cluster=True)["ok"] is False


def test_a_cluster_gone_after_its_client_connected_counts_as_redis_unreachable(tmp_path):
    """redis-py then raises RedisClusterException, which is no RedisError: the workers, the enqueue
    buffer and the 503 of the similarity routes must still see an outage, not a bug."""
    from orthanc_cbir.api.similar import SimilarityService
    from orthanc_cbir.ingest.enqueue_buffer import EnqueueBuffer
    from orthanc_cbir.ingest.worker import UNREACHABLE as WORKER_WAITS_ON
    from orthanc_cbir.redis_client import UNREACHABLE

    with RedisCluster(tmp_path / "short-lived") as short_lived:
        client = connect(short_lived.url, cluster=True, socket_timeout=2)
        client.set("k", 1)
    with pytest.raises(UNREACHABLE) as raised:
        client.get("k")
    assert not isinstance(raised.value, redis.RedisError)
    assert isinstance(raised.value, WORKER_WAITS_ON)

    buffer = EnqueueBuffer(IngestQueue(client), log=lambda line: None, min_backoff_s=60)
    buffer.enqueue("orthanc-id", STORE)  # kept for later, not raised
    assert len(buffer) == 1
    buffer.close()

    settings = dataclasses.replace(load_settings(), redis_url=short_lived.url, redis_cluster=True)
    answer = SimilarityService(settings).similar("instances", "1.2.3.4", {})
    assert answer.status == 503 and "unreachable" in json.loads(answer.body)["error"]


def test_status_answers_200_with_redis_not_ok_when_one_shard_of_the_cluster_is_down(tmp_path):
    """A monitor reads what is wrong from GET /cbir/status (README, OpenAPI): with one master of three
    gone, the health check reached a surviving node and the counts raised on the dead shard, so the
    route answered 503 (issue 21, item 5)."""
    from orthanc_cbir.api.routes import status
    from orthanc_cbir.index import IndexInfo

    with RedisCluster(tmp_path / "one-down", masters=3) as cluster:
        settings = dataclasses.replace(load_settings(), redis_url=cluster.url, redis_cluster=True, index_shards=3)
        info = IndexInfo.for_model(settings.model)
        client = connect(cluster.url, cluster=True, socket_timeout=2)
        IndexStore(client, info, shards=3).add(make_records(12, dim=info.feature_dim))
        healthy = json.loads(status(settings).body)
        assert healthy["redis"]["ok"] is True and healthy["indexed"] == 12
        cluster._nodes[1].stop()  # one master and its slots gone, no replica
        answer = status(settings)
        body = json.loads(answer.body)
        assert answer.status == 200 and body["redis"]["ok"] is False, body
        assert body["redis"]["error"] and "indexed" not in body
        client.close()


def test_series_levels_on_three_shards_of_a_cluster_move_and_forget_without_crossing_slots(cluster_client):
    from tests.index.test_series_levels import LEVEL, POSITIONS, TOLERANCE_MM, biased, indexed_levels, series

    store = IndexStore(cluster_client, dataclasses.replace(make_info(), level=LEVEL), shards=3)
    predicted = biased()
    records = series(predicted)
    assert {shard_of(r.key, 3) for r in records} == {0, 1, 2}
    for start in (30, 0, 20, 10):  # moves rows on every shard, one transaction per shard
        store.add(records[start : start + 10])
    assert store.remove(records[0].key)
    assert store.series_levels is not None and cluster_client.hlen(store.series_levels.key("1.2.3.s1")) == 39
    levels = indexed_levels(store, records[1:])
    np.testing.assert_allclose(levels - POSITIONS[1:], np.median(predicted - POSITIONS), atol=TOLERANCE_MM + 0.5)
