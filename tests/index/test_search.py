"""The strategies against a real Redis: where they must agree with ``exact``, and
that no filter ever lets a non-matching record through."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from orthanc_cbir.index.schema import quantize
from orthanc_cbir.model.codes import hamming_distances, weighted_hamming_distances
from orthanc_cbir.search import STRATEGIES, Filters, Query, QueryContext, Searcher, SearchOptions
from orthanc_cbir.search.clustering import recluster
from tests.records_factory import LAYOUT, make_records


@pytest.fixture
def indexed(store):
    records = make_records(600)
    store.add(records)
    return store, records, Searcher(store)


def as_query(record, **context) -> Query:
    return Query(record.features, record.code, record.probabilities, QueryContext(**context))


def distances(records, query_features, stored=True):
    """Feature distances to the query: of the stored (int8, dequantized) or of the float32 features."""
    features = np.stack([r.features for r in records])
    if stored:
        quantized, scales = quantize(features)
        features = quantized * scales[:, None]
    return np.sqrt(np.maximum(2 - 2 * features @ query_features, 0))


def brute_force(records, query_features, k):
    order = np.argsort(distances(records, query_features), kind="stable")
    return [records[i].key for i in order[:k]]


def test_exact_is_the_brute_force_ranking(indexed):
    store, records, searcher = indexed
    query = make_records(1, seed=9)[0]
    result = searcher.search(as_query(query), SearchOptions("exact", k=15))
    assert result.sop_instance_uids == brute_force(records, query.features, 15)
    assert result.candidates == 600 and result.candidate_fraction == 1.0
    assert [h.rank for h in result.hits] == list(range(1, 16))


def test_exact_is_the_float32_brute_force_but_for_ties_within_quantisation_error(indexed):
    _, records, searcher = indexed
    tolerance = 0.02  # how far int8 storage moves a distance (at most ~0.01 here)
    for seed in range(9, 14):
        query = make_records(1, seed=seed)[0]
        result = searcher.search(as_query(query), SearchOptions("exact", k=15))
        exact = dict(zip((r.key for r in records), distances(records, query.features, stored=False), strict=True))
        kth = sorted(exact.values())[14]
        answered = set(result.sop_instance_uids)
        assert len(answered) == 15
        assert all(exact[uid] <= kth + tolerance for uid in answered)  # nothing from outside the tie band
        assert {uid for uid, d in exact.items() if d < kth - tolerance} <= answered  # everything clearly inside
        assert all(abs(hit.distance - exact[hit.sop_instance_uid]) < tolerance for hit in result.hits)


def test_hamming_with_a_pool_as_large_as_the_index_is_exact(indexed):
    _, records, searcher = indexed
    query = as_query(make_records(1, seed=9)[0])
    exact = searcher.search(query, SearchOptions("exact", k=10))
    hamming = searcher.search(query, SearchOptions("hamming", k=10, candidates=600))
    assert hamming.sop_instance_uids == exact.sop_instance_uids


def test_hamming_ranks_a_small_pool_of_near_codes(indexed):
    _, records, searcher = indexed
    query = make_records(1, seed=9)[0]
    result = searcher.search(as_query(query), SearchOptions("hamming", k=10, candidates=60))
    assert result.candidates == 60 and result.candidate_fraction == pytest.approx(0.1)
    pool_limit = np.sort(hamming_distances(query.code, np.stack([r.code for r in records])))[59]
    by_key = {r.key: r for r in records}
    assert all(
        hamming_distances(query.code, by_key[u].code[None])[0] <= pool_limit + 2 for u in result.sop_instance_uids
    )


def test_class_answers_only_instances_predicted_as_the_query_class(indexed):
    _, records, searcher = indexed
    query = records[5]
    result = searcher.search(as_query(query), SearchOptions("class", k=20))
    assert len(result.hits) == 20
    for hit in result.hits:
        assert np.argmax(hit.entry.probabilities["region"]) == np.argmax(query.probabilities["region"])


def test_multilateral_ranks_by_the_weighted_sub_code_distance(indexed):
    _, records, searcher = indexed
    query = make_records(1, seed=9)[0]
    weights = {"appearance": 0.0, "pathology": 0.0}
    result = searcher.search(as_query(query), SearchOptions("multilateral", k=30, weights=weights))
    expected = weighted_hamming_distances(query.code, np.stack([r.code for r in records]), LAYOUT.bit_weights(weights))
    assert [h.distance for h in result.hits] == sorted(h.distance for h in result.hits)
    assert result.hits[0].distance == expected.min()
    assert sorted(h.distance for h in result.hits) == sorted(expected)[:30]


def test_cluster_searches_the_nearest_cluster(indexed):
    store, records, searcher = indexed
    summary = recluster(store, neighbours=8)
    assert summary.clusters >= 2 and summary.instances == 600
    query = records[2]
    result = searcher.search(as_query(query, sop_instance_uid=query.key), SearchOptions("cluster", k=10))
    assert query.key not in result.sop_instance_uids  # the query itself is left out
    assert result.candidates < 600
    assert result.sop_instance_uids[:5] == searcher.search(as_query(query, sop_instance_uid=query.key),
                                                           SearchOptions("exact", k=5)).sop_instance_uids  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("filters", [
    ["modality=MR"], ["sex=F", "age=30-50"], ["date=2020-03-01..2020-06-30"], ["body_part=hand,head"],
    ["exclude=same-patient,same-study"], ["exclude=same-series"],
])  # fmt: skip
def test_filters_never_let_a_non_matching_record_through(indexed, strategy, filters):
    _, records, searcher = indexed
    query = records[17]
    parsed = Filters.parse(filters)
    context = {"patient_key": query.metadata.patient_key, "study_instance_uid": query.metadata.study_instance_uid,
               "series_instance_uid": query.metadata.series_instance_uid}
    result = searcher.search(as_query(query, **context), SearchOptions(strategy, k=25, filters=parsed, candidates=50))
    assert result.hits, "the filters leave matching records: the answer must not be empty"
    for hit in result.hits:
        meta = hit.entry.metadata.to_json()
        if parsed.modality:
            assert meta["modality"] in parsed.modality
        if parsed.body_part:
            assert meta["body_part_examined"] in parsed.body_part
        if parsed.sex:
            assert meta["patient_sex"] in parsed.sex
        if parsed.age_min is not None:
            assert parsed.age_min <= meta["patient_age_years"] <= parsed.age_max
        if parsed.date_from is not None:
            assert parsed.date_from <= dt.date.fromisoformat(meta["study_date"]) <= parsed.date_to
        if parsed.exclude_same_patient:
            assert meta["patient_key"] != query.metadata.patient_key
            assert meta["study_instance_uid"] != query.metadata.study_instance_uid
        if parsed.exclude_same_series:
            assert meta["series_instance_uid"] != query.metadata.series_instance_uid


def test_removed_instances_are_never_answered(indexed):
    store, records, searcher = indexed
    query = make_records(1, seed=9)[0]
    first = searcher.search(as_query(query), SearchOptions("exact", k=5)).sop_instance_uids
    store.remove(first[0])
    for strategy in STRATEGIES:
        assert first[0] not in searcher.search(as_query(query), SearchOptions(strategy, k=50)).sop_instance_uids


@pytest.mark.parametrize("level", ["series", "study"])
def test_series_and_study_rank_by_their_best_instance(indexed, level):
    _, records, searcher = indexed
    query = make_records(1, seed=9)[0]
    groups = searcher.search(as_query(query), SearchOptions("exact", k=5, level=level)).hits
    instances = searcher.search(as_query(query), SearchOptions("exact", k=600)).hits
    field = f"{level}_instance_uid"
    seen = []
    for hit in instances:
        group = hit.entry.metadata.to_json()[field]
        if group not in seen:
            seen.append(group)
    assert [h.entry.metadata.to_json()[field] for h in groups] == seen[:5]
    assert all(h.instances >= 1 for h in groups)


def test_bad_options_are_refused_with_a_message():
    with pytest.raises(ValueError, match="unknown strategy"):
        SearchOptions("nearest")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        Filters.parse(["colour=red"])
    with pytest.raises(ValueError, match="age is MIN-MAX"):
        Filters.parse(["age=old"])


@pytest.mark.parametrize("hamming_search", ["scan", "multi-index"])
def test_hamming_finds_an_indexed_image_by_its_own_code_either_way(indexed, hamming_search):
    _, records, searcher = indexed
    target = records[123]
    options = SearchOptions("hamming", k=3, candidates=50, hamming_search=hamming_search,
                            filters=Filters(exclude_self=False))  # fmt: skip
    result = searcher.search(as_query(target), options)
    assert result.sop_instance_uids[0] == target.key and result.hits[0].distance < 0.02  # int8 storage
    assert result.candidates == 50 and 50 <= result.examined <= 600


def test_multi_index_search_respects_filters(indexed):
    _, records, searcher = indexed
    filters = Filters.parse(["modality=XR", "sex=M"])
    options = SearchOptions("hamming", k=20, candidates=40, hamming_search="multi-index", filters=filters)
    result = searcher.search(as_query(make_records(1, seed=9)[0]), options)
    assert result.hits
    assert all(h.entry.metadata.modality == "XR" and h.entry.metadata.patient_sex == "M"
               for h in result.hits)  # fmt: skip


def entry_reads(client) -> int:
    """Keys the Redis server has looked up (hits and misses): the hits' entries are read by one
    MGET, which looks up each of its keys."""
    stats = client.info("stats")
    return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])


def test_an_answer_asked_again_reads_no_entry_and_a_removed_hit_still_goes(indexed, client):
    store, records, searcher = indexed
    query, options = as_query(records[0]), SearchOptions(strategy="exact", k=8, copies=False)
    searcher.snapshot.refresh()
    start = entry_reads(client)
    first = searcher.search(query, options)
    middle = entry_reads(client)
    again = searcher.search(query, options)
    # the second answer reads what every answer reads (the index's write counters), not its 8 hits' entries
    assert (middle - start) - (entry_reads(client) - middle) == len(first.hits) == 8
    assert [h.entry for h in again.hits] == [h.entry for h in first.hits]
    gone = first.hits[1].sop_instance_uid
    assert store.remove(gone)
    after = searcher.search(query, options)
    assert gone not in after.sop_instance_uids and len(after.hits) == 8


def test_rows_that_hold_other_instances_after_a_reindex_answer_with_those_instances_entries(indexed, client):
    store, records, searcher = indexed
    options = SearchOptions(strategy="exact", k=10, copies=False)
    first = searcher.search(as_query(records[0]), options)  # entries decoded and kept, by row
    row = store.row(records[0].key)
    client.flushdb()
    for start in range(0, len(records), 100):  # the same rows now hold other instances
        store.add(records[::-1][start : start + 100])
    searcher.snapshot.refresh()
    newcomer = next(r for r in records if r.key == searcher.snapshot.sop_uids([row])[0])
    assert newcomer.key != first.hits[0].sop_instance_uid
    answer = searcher.search(as_query(newcomer), options)
    assert answer.sop_instance_uids[0] == newcomer.key  # found at the row whose old entry was kept
    assert [h.entry.sop_instance_uid for h in answer.hits] == answer.sop_instance_uids
