"""The similarity core (search.service): a stored query read once, typed hits, fixed-text
parameter errors, and the Redis round trips a query costs, counted on a real redis-server."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from orthanc_cbir.errors import BadParameters, NotIndexed
from orthanc_cbir.index import IndexStore
from orthanc_cbir.search import Query, Searcher, SearchOptions
from orthanc_cbir.search.service import Page, SimilaritySearch
from tests.records_factory import make_records


class CountingConnection(redis.Connection):
    """A real connection that counts requests sent (a pipeline is one): the round trips."""

    sent = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sent += 1
        return super().send_packed_command(command, check_health)


@pytest.fixture
def counted(redis_url, store):
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    yield SimilaritySearch(IndexStore(client, store.info))
    client.close()


def round_trips(call):
    CountingConnection.sent = 0
    result = call()
    return CountingConnection.sent, result


@pytest.mark.parametrize("strategy", ["exact", "graph", "hamming", "multilateral"])
def test_a_stored_instance_query_makes_at_most_two_redis_round_trips(store, counted, strategy):
    records = make_records(300)
    store.add(records)
    page = Page(SearchOptions(strategy, k=10, candidates=50))
    counted.similar_to_stored("instance", records[0].key, page)  # loads the snapshot and the shard count
    trips, answer = round_trips(lambda: counted.similar_to_stored("instance", records[7].key, page))
    # the query's own entry with the snapshot's write counters, then the hits' entries
    assert trips <= 2, trips
    assert len(answer.hits) == 10 and answer.query_uid == records[7].key
    assert all(hit.entry is not None and hit.entry.sop_instance_uid == hit.sop_instance_uid for hit in answer.hits)


def test_an_uploaded_query_reads_its_hits_and_the_write_counters_in_one_round_trip(store, counted):
    records = make_records(300, seed=8)
    store.add(records)
    page = Page(SearchOptions("graph", k=10))
    counted.similar_to(as_query(records[0]), page)  # loads the snapshot
    trips, answer = round_trips(lambda: counted.similar_to(as_query(records[5]), page))
    assert trips == 1, trips
    assert answer.hits[0].sop_instance_uid == records[5].key and len(answer.hits) == 10


@pytest.mark.parametrize("strategy", ["exact", "graph"])
def test_an_answer_ranked_on_a_copy_the_index_moved_past_is_ranked_again(store, counted, strategy):
    records = make_records(301, seed=9)
    store.add(records[:300])
    page = Page(SearchOptions(strategy, k=5))
    first = counted.similar_to(as_query(records[300]), page)
    assert records[300].key not in [h.sop_instance_uid for h in first.hits]
    store.add([records[300]])  # another process indexes the query's own picture
    again = counted.similar_to(as_query(records[300]), page)
    assert again.hits[0].sop_instance_uid == records[300].key and again.hits[0].distance < 0.02
    gone = again.hits[1].sop_instance_uid
    assert store.remove(gone)
    assert gone not in [h.sop_instance_uid for h in counted.similar_to(as_query(records[300]), page).hits]
    assert counted.similar_to_stored("instance", records[300].key, page).hits  # the stored path sees it too


def test_the_cores_of_one_index_in_a_process_search_through_one_snapshot_and_graph(redis_url, store):
    """``orthanc-cbir serve`` makes a core for its HTTP routes and one for each worker's "Similar
    cases" maker, each over a client of its own: one snapshot and graph between them, not one each."""
    records = make_records(300, seed=11)
    store.add(records)
    routes, maker = (SimilaritySearch(IndexStore(redis.Redis.from_url(redis_url), store.info)) for _ in range(2))
    page = Page(SearchOptions("graph", k=10))
    routes.similar_to_stored("instance", records[0].key, page)
    assert routes.searcher.graph().wait(30)
    answer = maker.similar_to_stored("instance", records[1].key, page)
    assert maker.searcher is routes.searcher and maker.searcher.graph().builds == 1
    assert len(answer.hits) == 10 and records[1].key not in [hit.sop_instance_uid for hit in answer.hits]
    elsewhere = SimilaritySearch(IndexStore(redis.Redis.from_url(redis_url), store.info, prefix="other"))
    assert elsewhere.searcher is not routes.searcher  # another index: a searcher of its own


def as_query(record) -> Query:
    return Query(record.features, record.code, record.probabilities)


def test_the_core_answers_as_the_searcher_with_the_stored_vector(store):
    records = make_records(200, seed=3)
    store.add(records)
    core, searcher = SimilaritySearch(store), Searcher(store)
    searcher.snapshot.refresh()
    for query in records[:20:4]:
        options = SearchOptions("exact", k=8)
        expected = searcher.search(searcher.stored_query(np.array([store.row(query.key)])), options)
        answer = core.similar_to_stored("instance", query.key, Page(options, offset=3))
        assert [h.sop_instance_uid for h in answer.hits] == expected.sop_instance_uids[3:]
        assert answer.hits[0].rank == 4  # ranks are the ranking's, not the page's


def test_a_series_never_answers_with_itself_and_an_unknown_uid_is_not_indexed(store):
    records = make_records(100, seed=4)
    store.add(records)
    series = records[12].metadata.series_instance_uid  # not UID-shaped: found through the resolver
    core = SimilaritySearch(store, resolve_uid=lambda level, orthanc_id: series if level == "series" else None)
    answer = core.similar_to_stored("series", "an-orthanc-id", Page(SearchOptions("exact", k=5, level="series")))
    assert answer.query_uid == series and len(answer.hits) == 5
    assert series not in {h.entry.metadata.series_instance_uid for h in answer.hits}
    with pytest.raises(NotIndexed):
        core.similar_to_stored("instance", "1.2.3.4.5.6.7", Page(SearchOptions("exact")))
    with pytest.raises(NotIndexed):  # an Orthanc id with no resolver: nothing to look up
        core.similar_to_stored("instance", "0c5d6a4e-2f2a56fb-4d5a5c1e-8e1e2a47-03c1bd2f", Page(SearchOptions()))


def test_a_removed_instance_is_not_indexed_for_the_core(store):
    records = make_records(50, seed=5)
    store.add(records)
    core = SimilaritySearch(store)
    core.similar_to_stored("instance", records[3].key, Page(SearchOptions("exact")))
    store.remove(records[3].key)
    with pytest.raises(NotIndexed):
        core.similar_to_stored("instance", records[3].key, Page(SearchOptions("exact")))
    answer = core.similar_to_stored("instance", records[4].key, Page(SearchOptions("exact", k=49)))
    assert records[3].key not in {h.sop_instance_uid for h in answer.hits}


@pytest.mark.parametrize("parameters, message", [
    ({"k": "ten"}, "whole numbers"), ({"k": "0"}, "k must be"), ({"offset": "999", "k": "5"}, "offset"),
    ({"strategy": "<script>"}, "strategy is one of"), ({"level": "patient"}, "level is one of"),
    ({"age": "old"}, "age is MIN-MAX"), ({"weights": "colour=2"}, "weights is SUB=WEIGHT"),
])  # fmt: skip
def test_parameters_that_cannot_be_searched_are_bad_parameters_in_fixed_text(store, parameters, message):
    core = SimilaritySearch(store)
    with pytest.raises(BadParameters) as raised:
        core.page_for(parameters, default_level="instance", default_strategy="hamming", max_results=100)
    assert message in str(raised.value)
    assert not any(value in str(raised.value) for value in parameters.values() if len(value) > 2)


def test_parameters_become_a_page_whose_search_covers_the_offset(store):
    asked = {"k": "5", "offset": "10", "modality": "CT,MR", "weights": "pathology=0"}
    page = SimilaritySearch(store).page_for(asked, default_level="series", default_strategy="exact", max_results=100)
    assert page.offset == 10 and page.options.k == 15 and page.options.level == "series"
    assert page.options.filters.modality == ("CT", "MR") and page.options.weights == {"pathology": 0.0}
