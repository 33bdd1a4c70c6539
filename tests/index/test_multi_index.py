"""Multi-index hashing over the searcher's cached codes: the radius guarantee of
Norouzi et al., and that rows indexed after the tables were built are still found."""

from __future__ import annotations

import numpy as np

from orthanc_cbir.index.hamming import CodeTables, MultiIndex
from orthanc_cbir.model.codes import hamming_distances
from orthanc_cbir.search import Filters, Query, QueryContext, Searcher, SearchOptions, strategies
from tests.records_factory import make_records

INDEX = MultiIndex.for_span(0, 32, bits=8)  # 4 substrings of 8 bits


def searched_distance(query: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance over the 32 searched bits only."""
    return hamming_distances(query[:4], codes[:, :4])


def test_probing_to_radius_r_finds_every_code_within_m_times_r_plus_1_minus_1_bits():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(5000, 16), dtype=np.uint8)
    tables = CodeTables(INDEX, codes, np.arange(len(codes)))
    for query in codes[:20] ^ rng.integers(0, 2, size=(20, 16), dtype=np.uint8):
        probe = tables.probe(query, wanted=10**9)  # never satisfied: every radius probed
        assert probe.radius == CodeTables.MAX_RADIUS
        within = np.flatnonzero(searched_distance(query, codes) <= INDEX.count * (probe.radius + 1) - 1)
        assert len(within) and set(within) <= set(probe.rows.tolist())


def test_a_probe_reads_only_rows_the_tables_hold_each_with_its_own_code():
    rng = np.random.default_rng(1)
    codes = np.repeat(rng.integers(0, 256, size=(50, 16), dtype=np.uint8), 4, axis=0)  # every code 4 times
    held = np.arange(0, len(codes), 2)
    probe = CodeTables(INDEX, codes, held).probe(codes[0], wanted=10**9)
    assert set(probe.rows.tolist()) <= set(held.tolist()) and {0, 2} <= set(probe.rows.tolist())
    np.testing.assert_array_equal(probe.codes, codes[probe.rows])
    assert np.count_nonzero(probe.rows == 0) == INDEX.count  # found once per table: repeats are the caller's


def test_a_probe_stops_after_the_table_that_brings_the_rows_wanted():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(20000, 16), dtype=np.uint8)
    tables = CodeTables(INDEX, codes, np.arange(len(codes)))
    few, many = tables.probe(codes[0], wanted=50), tables.probe(codes[0], wanted=5000)
    assert 50 <= len(few.rows) < len(many.rows) and few.radius <= many.radius
    assert len(many.rows) >= 5000


def as_query(record) -> Query:
    return Query(record.features, record.code, record.probabilities, QueryContext())


def multi_index(k: int = 1) -> SearchOptions:
    return SearchOptions(
        "hamming", k=k, candidates=20, hamming_search="multi-index", filters=Filters(exclude_self=False)
    )


def test_instances_indexed_after_the_tables_were_built_are_found(store):
    first, later = make_records(300, seed=1), make_records(40, seed=2)
    store.add(first)
    searcher = Searcher(store)
    assert searcher.search(as_query(first[7]), multi_index()).sop_instance_uids == [first[7].key]
    tables = searcher._tables
    assert tables.rows > 340  # the tables end at the snapshot's last block: the new rows fall below that end
    store.add(later)
    for record in later[::7]:
        assert searcher.search(as_query(record), multi_index()).sop_instance_uids == [record.key]
    assert searcher._tables is tables  # found by the linear scan of the late rows, not a rebuild


def test_instances_indexed_past_the_tables_end_are_found(store):
    first, later = make_records(300, seed=3), make_records(10, seed=7)
    store.add(first)
    searcher = Searcher(store)
    searcher.search(as_query(first[0]), multi_index())
    tables = searcher._tables
    store.client.incrby(store.keys.next_row, tables.rows)  # as if that many rows had been taken meanwhile
    store.add(later)
    assert min(store.row(record.key) for record in later) >= tables.rows
    assert searcher.search(as_query(later[3]), multi_index()).sop_instance_uids == [later[3].key]
    assert searcher._tables is tables


def test_the_tables_are_rebuilt_once_the_late_rows_pass_the_limit(store, monkeypatch):
    monkeypatch.setattr(strategies, "REBUILD_ROWS", 10)
    first, later = make_records(200, seed=4), make_records(150, seed=5)  # more than a 32nd of the 4096 rows
    store.add(first)
    searcher = Searcher(store)
    searcher.search(as_query(first[0]), multi_index())
    tables = searcher._tables
    store.add(later)
    assert searcher.search(as_query(later[0]), multi_index()).sop_instance_uids == [later[0].key]
    assert searcher._tables is not tables and len(searcher._late(searcher.snapshot.live)) == 0


def test_removed_instances_never_come_back_from_the_tables(store):
    records = make_records(300, seed=6)
    store.add(records)
    searcher = Searcher(store)
    searcher.search(as_query(records[0]), multi_index())
    store.remove(records[5].key)
    assert records[5].key not in searcher.search(as_query(records[5]), multi_index(k=20)).sop_instance_uids
