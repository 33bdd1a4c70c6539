"""The graph written to ``graph_dir`` (index.graph_file): built once by one process, read by the
others and by the next start; never taken for another index, never answering with an instance
removed since it was written; a folder that cannot be used or a damaged file costs a build, not
the graph. Each searcher here stands for a process of its own (its own Redis client, its own lock
file handle), over a real redis-server."""

from __future__ import annotations

import threading

import numpy as np
import redis

from orthanc_cbir.index import IndexSnapshot, IndexStore
from orthanc_cbir.index.graph_file import GraphFiles
from orthanc_cbir.search import Filters, Query, Searcher, SearchOptions
from tests.records_factory import make_records

GRAPH = SearchOptions("graph", k=10, filters=Filters(exclude_self=False))


def process(redis_url: str, store: IndexStore, directory) -> Searcher:
    """A searcher as another process has it: its own client, the same index and graph folder."""
    client = redis.Redis.from_url(redis_url)
    return Searcher(IndexStore(client, store.info), graph_files=GraphFiles(directory, store.info.version))


def graph_ready(searcher: Searcher, record) -> list[str]:
    """Ask once (which starts the graph), wait for it, and answer ``record``'s query through it."""
    query = Query(record.features, record.code)
    searcher.search(query, GRAPH)
    assert searcher.graph().wait(60)
    return searcher.search(query, GRAPH).sop_instance_uids


def test_a_graph_built_by_one_process_is_read_by_the_next_and_answers_alike(redis_url, store, tmp_path):
    records = make_records(2000, seed=21)
    store.add(records)
    first = process(redis_url, store, tmp_path)
    answers = [graph_ready(first, record) for record in records[::400]]
    assert (first.graph().builds, first.graph().reads) == (1, 0)
    second = process(redis_url, store, tmp_path)  # another process, or this one started again
    assert [graph_ready(second, record) for record in records[::400]] == answers
    assert (second.graph().builds, second.graph().reads, second.graph().nodes) == (0, 1, 2000)


def test_processes_starting_together_build_one_graph_between_them(redis_url, store, tmp_path):
    records = make_records(2000, seed=22)
    store.add(records)
    searchers = [process(redis_url, store, tmp_path) for _ in range(3)]
    threads = [threading.Thread(target=graph_ready, args=(searcher, records[0])) for searcher in searchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(searcher.graph().builds for searcher in searchers) == [0, 0, 1]
    assert all(searcher.graph().nodes == 2000 for searcher in searchers)


def test_instances_removed_since_the_graph_was_written_never_answer_from_it(redis_url, store, tmp_path):
    records = make_records(2000, seed=23)
    store.add(records)
    first = process(redis_url, store, tmp_path)
    answered = graph_ready(first, records[5])
    removed = set(answered[:5])
    for key in removed:
        assert store.remove(key)
    second = process(redis_url, store, tmp_path)
    again = graph_ready(second, records[5])
    assert second.graph().reads == 1 and second.graph().builds == 0  # few removed: no rebuild
    assert len(again) == 10 and not removed & set(again)


def test_a_graph_written_for_an_index_since_flushed_is_not_read(redis_url, store, client, tmp_path):
    before, after = make_records(500, seed=24), make_records(500, seed=25, prefix="1.2.826.0.1.3680043.8.499")
    store.add(before)
    graph_ready(process(redis_url, store, tmp_path), before[0])
    client.flushdb()  # the index made again: another epoch, rows that are other instances
    store.add(after)
    assert_built_not_read(process(redis_url, store, tmp_path), after[3])


def test_a_damaged_graph_file_is_built_again(redis_url, store, tmp_path):
    records = make_records(800, seed=26)
    store.add(records)
    graph_ready(process(redis_url, store, tmp_path), records[0])
    files = GraphFiles(tmp_path, store.info.version)
    with files.building():  # the builder holds it until the graph it built is written
        (written,) = files.directory.glob("*.faiss")
        written.write_bytes(written.read_bytes()[:1000])  # cut short: a disk that failed under it
    assert_built_not_read(process(redis_url, store, tmp_path), records[7])


def assert_built_not_read(searcher: Searcher, record) -> None:
    """``searcher`` built a graph of its own, which finds ``record`` by its own vector first."""
    assert graph_ready(searcher, record)[0] == record.key
    assert (searcher.graph().builds, searcher.graph().reads) == (1, 0)


def test_a_graph_folder_that_cannot_be_used_leaves_each_process_its_own_graph(redis_url, store, tmp_path):
    records = make_records(800, seed=27)
    store.add(records)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    searcher = process(redis_url, store, blocked)
    assert graph_ready(searcher, records[9])[0] == records[9].key
    assert searcher.graph().builds == 1


def test_a_rows_fingerprint_is_its_uids_whatever_the_width_of_the_uid_column(store):
    """A key longer than a DICOM UID widens a snapshot's UID column: the fingerprints its graph file
    is checked with must not change with it, or one process would take every node for removed."""
    uids = ["1.2.3", "", "1.2.4", "1.2.3"]
    narrow = IndexSnapshot.from_arrays(store.info, *rows_of(len(uids)), uids)
    wide = IndexSnapshot.from_arrays(store.info, *rows_of(len(uids) + 1), [*uids, "9" * 80])
    fingerprints = narrow.uid_fingerprints(np.arange(4))
    assert np.array_equal(wide.uid_fingerprints(np.arange(4)), fingerprints)
    assert fingerprints[0] == fingerprints[3] and len(set(fingerprints[:3].tolist())) == 3


def rows_of(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    records = make_records(count, seed=28)
    return (np.stack([r.features for r in records]), np.stack([r.code for r in records]),
            np.stack([r.attributes() for r in records]))  # fmt: skip


def test_a_graph_that_cannot_be_written_still_answers_and_grows(redis_url, store, tmp_path, monkeypatch):
    """A full disk fails FAISS's write with a RuntimeError: the graph just built stays and answers,
    and the rows indexed after it are linked in."""
    import faiss

    def full_disk(*_):
        raise RuntimeError("Error in faiss::FileIOWriter::operator(): fwrite failed")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    first, later = make_records(800, seed=29), make_records(100, seed=30, prefix="1.2.826.0.1.3680043.8.499")
    store.add(first)
    searcher = process(redis_url, store, tmp_path)
    graph_ready(searcher, first[0])
    store.add(later)
    assert graph_ready(searcher, later[5])[0] == later[5].key
    assert searcher.graph().builds == 1 and searcher.graph().nodes == 900
    files = GraphFiles(tmp_path, store.info.version)
    assert files.current(searcher.snapshot.epoch, searcher.graph().dimensions) is None  # nothing half-written
