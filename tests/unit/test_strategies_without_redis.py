"""The strategies on an array-built snapshot (IndexSnapshot.from_arrays): every ranker checked
against numpy on known rows, with no redis-server."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_cbir.index import IndexSnapshot
from orthanc_cbir.search import Filters, Query, QueryContext, Searcher, SearchOptions
from tests.records_factory import make_info, make_records

ROWS = 600


@pytest.fixture(scope="module")
def rows():
    records = make_records(ROWS, seed=11)
    features = np.stack([r.features for r in records])
    codes = np.stack([r.code for r in records])
    attributes = np.stack([r.attributes() for r in records])
    snapshot = IndexSnapshot.from_arrays(make_info(), features, codes, attributes, [r.key for r in records])
    return records, Searcher(None, snapshot)


def rank(searcher: Searcher, query: Query, **options) -> list[int]:
    result = searcher.search(query, SearchOptions(with_records=False, copies=False, **options), refresh=False)
    return [int(hit.sop_instance_uid.rsplit(".", 1)[1]) for hit in result.hits]


def stored(records, searcher: Searcher, i: int) -> Query:
    meta = records[i].metadata
    context = QueryContext(meta.patient_key, meta.study_instance_uid, meta.sop_instance_uid,
                           meta.series_instance_uid, meta.modality, meta.body_part_examined)  # fmt: skip
    snapshot = searcher.snapshot
    return Query(snapshot.vectors([i])[0], snapshot.codes[i], records[i].probabilities, context, row=i)


def nearest(searcher: Searcher, query: Query, allowed: np.ndarray, k: int) -> list[int]:
    vectors = searcher.snapshot.vectors(np.arange(ROWS))
    distances = np.linalg.norm(vectors - query.features, axis=1)
    distances[~allowed] = np.inf
    return [int(i) for i in np.argsort(distances, kind="stable")[:k]]


def test_exact_is_the_nearest_rows_by_feature_distance_and_never_the_query(rows):
    records, searcher = rows
    for i in (0, 17, 301):
        query = stored(records, searcher, i)
        allowed = np.ones(ROWS, bool)
        allowed[i] = False  # exclude_self
        assert rank(searcher, query, strategy="exact", k=10) == nearest(searcher, query, allowed, 10)


def test_hamming_with_a_pool_of_every_row_is_exact_and_a_small_pool_keeps_most_of_it(rows):
    records, searcher = rows
    query = stored(records, searcher, 5)
    exact = rank(searcher, query, strategy="exact", k=10)
    assert rank(searcher, query, strategy="hamming", k=10, candidates=ROWS) == exact
    for search in ("scan", "multi-index"):
        pooled = rank(searcher, query, strategy="hamming", k=10, candidates=150, hamming_search=search)
        assert len(set(pooled) & set(exact)) >= 7, search


def test_filters_and_the_class_strategy_keep_only_the_rows_they_allow(rows):
    records, searcher = rows
    query = stored(records, searcher, 4)  # a CT chest row
    ct = rank(searcher, query, strategy="exact", k=20, filters=Filters.parse(["modality=CT"]))
    assert len(ct) == 20 and all(records[i].metadata.modality == "CT" for i in ct)
    same_class = rank(searcher, query, strategy="class", k=20)  # the file's Modality and BodyPartExamined
    assert len(same_class) == 20
    assert all((records[i].metadata.modality, records[i].metadata.body_part_examined) == ("CT", "CHEST")
               for i in same_class)  # fmt: skip
    others = rank(searcher, query, strategy="exact", k=30, filters=Filters.parse(["exclude=same-patient"]))
    assert all(records[i].metadata.patient_key != records[4].metadata.patient_key for i in others)


def test_multilateral_ranks_by_the_weighted_sub_codes_first(rows):
    records, searcher = rows
    query = stored(records, searcher, 2)  # class 2: XR hand
    ranked = rank(searcher, query, strategy="multilateral", k=40, candidates=ROWS)
    assert all(records[i].metadata.modality == "XR" for i in ranked[:40])
    # the class sub-codes weighed 0: the distance is the appearance bits' Hamming distance alone
    options = SearchOptions("multilateral", k=10, candidates=ROWS, with_records=False, copies=False,
                            weights={"modality": 0, "region": 0, "pathology": 0, "appearance": 1})  # fmt: skip
    hits = searcher.search(query, options, refresh=False).hits
    bits = np.unpackbits(searcher.snapshot.codes, axis=1)[:, 24:]
    apart = (bits != bits[2]).sum(axis=1)
    apart[2] = 10**6  # the query itself is left out
    shown = [int(hit.sop_instance_uid.rsplit(".", 1)[1]) for hit in hits]
    assert [hit.distance for hit in hits] == [float(apart[i]) for i in shown]
    assert sorted(apart)[:10] == [apart[i] for i in shown]


def test_a_series_answer_names_each_series_once_by_its_best_instance(rows):
    records, searcher = rows
    query = stored(records, searcher, 9)
    instances = rank(searcher, query, strategy="exact", k=ROWS - 1)
    result = searcher.search(query, SearchOptions("exact", k=8, level="series", with_records=False), refresh=False)
    best = [int(hit.sop_instance_uid.rsplit(".", 1)[1]) for hit in result.hits]
    series = [records[i].metadata.series_instance_uid for i in best]
    assert len(set(series)) == 8
    first_of_each: dict[str, int] = {}
    for i in instances:
        first_of_each.setdefault(records[i].metadata.series_instance_uid, i)
    assert best == list(first_of_each.values())[:8]


def test_a_searcher_without_redis_refuses_to_read_records(rows):
    records, searcher = rows
    with pytest.raises(ValueError, match="rows only"):
        searcher.search(stored(records, searcher, 1), SearchOptions("exact"), refresh=False)
