"""A graph index over a searcher's features: FAISS HNSW with 8-bit scalar-quantized vectors.

Malkov & Yashunin's hierarchical navigable small-world graph, as FAISS implements it
(``IndexHNSWSQ``): a query walks a few thousand vectors instead of scanning every row (at 10^5
rows, about 1 ms for FAISS's HNSW SQ8 alone against 20 ms for a numpy scan; recall@10 and latency
beside the other strategies: ``benchmarks/query_scale.py``). It serves the ``graph`` strategy
(:mod:`orthanc_cbir.search.strategies`), which re-ranks what it finds with the snapshot's own
features, so its distances are those of every other strategy.

Redis stays the durable truth and the only thing the workers write: each process that
answers queries grows its graph from its own snapshot (:mod:`.snapshot`), so all of them hold
the same rows. With the ``graph_dir`` setting a graph built in one process is written there and
read by the others, and by each process that starts again, instead of built once more
(:mod:`.graph_file`); a process then grows it from its own snapshot as before. A query never
waits for a build:

- A graph is built from every live row at once, in a random order and up to :data:`BUILD_BATCH`
  rows per FAISS ``add``: HNSW links each node to the nodes already there, so rows arriving
  in the order they were indexed (a series' slices together, one kind of study after another)
  make a worse graph (below).
- Live rows the graph does not hold yet (indexed since it last grew, or all of them while the
  first build runs) are *late*: :meth:`GraphIndex.late` gives them to the query, which scans
  them exactly beside the graph's answer, and a background thread adds them to the graph
  :data:`ADD_CHUNK` rows at a time. Once the rows added that way outnumber those of the last
  build (:data:`REBUILD_GROWN`), the thread builds a new graph beside the old one and swaps it
  in: a graph grown from ten rows to a million is rebuilt about seventeen times, each rebuild
  costing at most twice the one before.
- A removed instance stays a node of the graph (HNSW cannot drop one) but the query's
  selector keeps it out of every answer. Once :data:`REBUILD_REMOVED` of the nodes are removed
  rows, the thread builds a new graph beside the old one and swaps it in.
- A row rewritten where it is (an axial slice whose series' level moved, :mod:`.series_levels`)
  keeps its first vector as a node until the next rebuild. The answer's distances are the
  snapshot's, so only which candidates the walk meets lags behind.
- Filters reach the graph as a FAISS ``IDSelectorBitmap`` over its nodes, so a filtered query
  still returns k hits. The caller scans instead when the filters keep few rows
  (:data:`SCAN_BELOW`): a walk among nodes nearly all filtered out visits most of the graph.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .graph_file import NO_ROW, GraphFiles
from .snapshot import IndexSnapshot

log = logging.getLogger(__name__)

GRAPH_M = 32
"""Neighbours per node (64 on the bottom layer): 256 bytes a node besides its 8-bit vector."""
EF_CONSTRUCTION = 64
"""Candidates kept while a node is linked in: 4,300-6,300 nodes/s per core at 520 dimensions (10^6 and 10^5 rows)."""
EF_SEARCH = 128
"""Candidates kept while a query walks a graph of :data:`EF_SEARCH_NODES` nodes (at least the rows
asked for); :func:`ef_search` for a graph of another size."""
EF_SEARCH_NODES = 1_000_000
"""The graph size :data:`EF_SEARCH` is set for."""
EF_SEARCH_LEAST = 32
"""The smallest ``efSearch`` (a graph of 10^4 nodes or fewer)."""
SCAN_BELOW = 0.02
"""Filters that keep fewer than this share of the graph's nodes: the allowed rows are scanned."""
ADD_CHUNK = 512
"""Late rows the builder links into the graph that queries walk per FAISS ``add``, which holds the
lock: a query waits at most that long, ~0.2 s."""
BUILD_BATCH = 1_048_576
"""Rows per FAISS ``add`` while a new graph is built (beside the one queries walk: no lock), in a
random order: up to a million rows in one ``add`` (2 GB of float32 while it runs). Both matter. On
the benchmark's rows (MedNIST's real rows sorted by class, then interpolations), recall@10 of the
walk at efSearch 128: at 10^5, of its top 10, 0.881 added in index order 512 at a time, 0.953 in a
random order 512 at a time, 0.970 65,536 at a time or all at once; at 10^6, of its top 32
re-ranked, 0.879 65,536 at a time, 0.880 to 0.953 262,144 at a time (three random orders of the
same rows), 0.944 all at once, and the walk's own top 10 0.927 to 0.946 all at once (three runs)
against 0.868 to 0.934 262,144 at a time (FAISS shuffles each ``add``'s nodes and links its upper
layers first)."""
REBUILD_GROWN = 1.0
"""Rows linked in late (:data:`ADD_CHUNK` at a time, in the order they were indexed), as a share of
the rows of the last build, from which a new graph is built. On the same rows at efSearch 128, a
graph built from half of them that grew to all of them 512 at a time found 0.984 of the top 10, one
built from all of them at once 0.982."""
REBUILD_REMOVED = 0.2
"""Share of the graph's nodes that are removed rows from which a new graph is built."""
TRAIN_ROWS = 65_536
"""Rows the 8-bit quantizer learns each dimension's range from."""
SIMD_DIMENSIONS = 8
"""FAISS's scalar quantizer compares 8 dimensions per instruction (AVX2, or NEON) only when the
dimension is a multiple of 8, and one at a time otherwise: the graph's vectors are padded with zero
dimensions up to a multiple of 8, which changes no distance. The shipped model's 520 dimensions need
none; a model of another width would walk and link 4-6x slower without it. Measured on 5 * 10^4
synthetic rows of 518 dimensions (520 padded): a walk at efSearch 128 in 0.27 ms against 1.22 ms,
linking every row in 9 s against 56 s, the same top 10."""
READ_ROWS = 65_536
"""Rows of the snapshot dequantized at a time into the padded vectors of a build."""


class _Graph:
    """One FAISS graph and the snapshot row of each of its nodes (node ids are FAISS's: 0, 1, ...)."""

    def __init__(self, index: Any, rows: np.ndarray | None = None):
        """``index``: a FAISS ``IndexHNSWSQ`` whose nodes are ``rows`` (none yet by default)."""
        self.index = index
        rows = np.zeros(0, np.int64) if rows is None else np.asarray(rows, np.int64)
        # grows geometrically: late rows come ADD_CHUNK at a time
        self._rows = np.zeros(max(ADD_CHUNK, len(rows)), np.int64)
        self._rows[: len(rows)] = rows
        self._size = len(rows)

    @classmethod
    def trained(cls, training: np.ndarray) -> _Graph:
        """An empty graph whose 8-bit quantizer learnt each dimension's range from ``training``
        (:func:`padded_vectors`)."""
        # FAISS's stubs (SWIG) type its enum constants as int where the functions want the enum
        quantizer_type: Any = faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexHNSWSQ(training.shape[1], quantizer_type, GRAPH_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        index.train(training)
        return cls(index)

    @property
    def rows(self) -> np.ndarray:
        """int64 (nodes,): the snapshot row of each node."""
        return self._rows[: self._size]

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Link in the snapshot ``rows`` with their :func:`padded_vectors`."""
        self.index.add(vectors)
        if self._size + len(rows) > len(self._rows):
            grown = np.zeros(max(2 * len(self._rows), self._size + len(rows)), np.int64)
            grown[: self._size] = self.rows
            self._rows = grown
        self._rows[self._size : self._size + len(rows)] = rows
        self._size += len(rows)

    def nodes_in(self, mask: np.ndarray) -> np.ndarray:
        """Per node: whether its row is set in ``mask`` (bool over snapshot rows; a row past its end is not)."""
        rows = self.rows
        return np.take(mask, rows, mode="clip") & (rows < len(mask))


class GraphIndex:
    """The graph of one searcher's snapshot, grown and rebuilt by a background thread.

    Call :meth:`update` after each refresh of the snapshot (the searcher does), then
    :meth:`search` for the graph's part of an answer and :meth:`late` for the rows it does
    not cover yet."""

    def __init__(self, snapshot: IndexSnapshot, files: GraphFiles | None = None):
        """``files``: where graphs of this index are written and read (:mod:`.graph_file`, the
        ``graph_dir`` setting); ``None``: this process builds its own and keeps it to itself."""
        self.snapshot = snapshot
        self._files = files
        self._build_name: str | None = None
        """The build of :attr:`_files` the current graph is (written here, or read), if any."""
        self._graph: _Graph | None = None
        self._covered = np.zeros(0, bool)
        """Per snapshot row: a node of the current graph."""
        self._lock = threading.Lock()  # FAISS's HNSW may not be searched while nodes are added
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = -1
        self._resets = snapshot.resets
        self.builds = 0
        """Graphs built from scratch (the first one included)."""
        self.reads = 0
        """Graphs read from :attr:`_files` (another process built them, or this one before a restart)."""
        self._built_rows = 0
        """Rows linked in by the build of the current graph (the rest were linked in late)."""
        self._random = np.random.default_rng(0)
        self._live: tuple[tuple[int, int, int, int], _Selection, np.ndarray] | None = None
        """(snapshot generation, builds, reads, nodes): the live rows' selection and late rows (:meth:`search_live`)."""

    def update(self) -> None:
        """Note what the snapshot holds now: wake the builder when live rows are not nodes yet or
        too many nodes were removed. Cheap when the snapshot did not change."""
        if self.snapshot.generation == self._generation:
            return
        self._generation = self.snapshot.generation
        if self.snapshot.resets != self._resets:  # another index: its rows are not this graph's nodes
            self._resets = self.snapshot.resets
            with self._lock:
                self._graph, self._covered, self._build_name = None, np.zeros(0, bool), None
        if not self._work_waiting():
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="graph-builder", daemon=True)
            self._thread.start()
        self._wake.set()

    def wait(self, timeout_s: float) -> bool:
        """Wait until the graph holds every live row of the snapshot as last updated, and no
        rebuild is due (benchmarks time the warm-up with it; tests); whether it does."""
        deadline = time.monotonic() + timeout_s
        while self._work_waiting():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def nodes(self) -> int:
        graph = self._graph
        return len(graph.rows) if graph is not None else 0

    @property
    def dimensions(self) -> int:
        """The dimension of the graph's vectors: the features' padded (:data:`SIMD_DIMENSIONS`); 0 without a graph."""
        graph = self._graph
        return graph.index.d if graph is not None else 0

    def late(self, allowed: np.ndarray) -> np.ndarray:
        """Rows among ``allowed`` (bool over the snapshot's rows) that are not nodes of the graph."""
        return np.flatnonzero(allowed & ~_padded(self._covered, len(allowed))[: len(allowed)])

    def search(self, query: np.ndarray, allowed: np.ndarray, count: int) -> np.ndarray:
        """Up to ``count`` rows among ``allowed`` that are nodes of the graph, nearest first by the
        graph's 8-bit distance (``efSearch`` :func:`ef_search` of its nodes, or ``count`` if more)."""
        with self._lock:
            graph = self._graph
            if graph is None or not len(graph.rows):
                return np.zeros(0, np.int64)
            return _walk(graph, query, count, _Selection.of(graph.nodes_in(allowed)))

    def search_live(self, query: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` among every live row, and :meth:`late` of them. Finding the nodes of a
        mask reads every node, so for the live rows it is done once per refresh and growth of the
        graph, not per query."""
        with self._lock:
            graph = self._graph
            if graph is None or not len(graph.rows):
                return np.zeros(0, np.int64), self.late(self.snapshot.live)
            key = (self.snapshot.generation, self.builds, self.reads, len(graph.rows))
            if self._live is None or self._live[0] != key:
                live = self.snapshot.live  # a comparison over every row: only when the key moved
                self._live = (key, _Selection.of(graph.nodes_in(live)), self.late(live))
            _, selection, late = self._live
            return _walk(graph, query, count, selection), late

    def allowed_share(self, allowed_count: int) -> float:
        """How much of the graph ``allowed_count`` rows are (1.0 without a graph)."""
        return allowed_count / self.nodes if self.nodes else 1.0

    # -- the builder -----------------------------------------------------------------------

    def _work_waiting(self) -> bool:
        live = self.snapshot.live
        graph = self._graph
        if graph is None:
            return bool(live.any())
        if self._rebuild_due(live):
            return True
        return len(self.late(live)) > 0

    def _rebuild_due(self, live: np.ndarray) -> bool:
        """Too many of the graph's nodes are removed rows, or were linked in late."""
        graph = self._graph
        if graph is None:
            return True
        grown = len(graph.rows) - self._built_rows
        return self._removed_share(live) >= REBUILD_REMOVED or grown > REBUILD_GROWN * self._built_rows

    def _removed_share(self, live: np.ndarray) -> float:
        graph = self._graph
        if graph is None or not len(graph.rows):
            return 0.0
        return 1.0 - float(np.count_nonzero(graph.nodes_in(live))) / len(graph.rows)

    def _run(self) -> None:
        # one OpenMP thread (a per-thread setting): a background build leaves the other cores to
        # the queries and to ingest, and FAISS links a batch no better with more threads
        faiss.omp_set_num_threads(1)
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self._build()
            except Exception:  # a failed build leaves the old graph answering (and late rows scanned)
                log.exception("graph index: building failed; queries scan the rows it lacks")

    def _build(self) -> None:
        """Until the graph holds every live row: build a new one when there is none or
        :meth:`_rebuild_due` (linking late rows in may make it due), else link in the live rows
        it lacks, :data:`ADD_CHUNK` at a time."""
        while True:
            live = self.snapshot.live
            if self._rebuild_due(live):
                if not self._renew(live):
                    return
                continue
            late = self.late(live)
            if not len(late):
                return
            chunk = late[:ADD_CHUNK]
            vectors = padded_vectors(self.snapshot, chunk)
            with self._lock:
                assert self._graph is not None
                self._graph.add(chunk, vectors)
                covered = _padded(self._covered, len(live))  # the chunk's rows are rows of live
                covered[chunk] = True
                self._covered = covered

    def _renew(self, live: np.ndarray) -> bool:
        """A new graph in place of the one queries walk (none yet, or a rebuild is due): the one
        another process wrote since, when it is not due for a rebuild itself, else one built here
        of the ``live`` rows (and written for the others); whether there was a row to build it from."""
        if self._files is None:
            return self._rebuild(live)
        with ExitStack() as stack:
            try:  # another process building this index's graph: wait for it
                stack.enter_context(self._files.building())
            except OSError as exc:
                log.warning("graph index: %s cannot be used (%s); built here alone", self._files.directory,
                            type(exc).__name__)  # fmt: skip
                return self._rebuild(live)
            if self._read_written() and not self._rebuild_due(self.snapshot.live):
                return True
            return self._rebuild(self.snapshot.live)

    def _read_written(self) -> bool:
        """Take the graph :attr:`_files` holds for this index, if it is not the current one; whether it did.
        A node whose row holds another instance in this snapshot than when it was linked in becomes a
        removed row (:data:`~.graph_file.NO_ROW`)."""
        assert self._files is not None
        snapshot = self.snapshot
        build = self._files.current(snapshot.epoch, padded_dimension(snapshot.info.feature_dim))
        if build is None or build == self._build_name:
            return False
        started = time.perf_counter()
        saved = self._files.load(build)
        if saved is None:
            return False
        rows = saved.rows.copy()
        same = rows < snapshot.rows
        same[same] = snapshot.uid_fingerprints(rows[same]) == saved.fingerprints[same]
        rows[~same] = NO_ROW
        covered = np.zeros(snapshot.rows, bool)
        covered[rows[same]] = True
        with self._lock:
            self._graph, self._covered, self._built_rows = _Graph(saved.index, rows), covered, saved.built_rows
            self._build_name = build
            self.reads += 1
        log.info("graph index: %d nodes read in %.1f s (%d of them removed rows)", len(rows),
                 time.perf_counter() - started, np.count_nonzero(~same))  # fmt: skip
        return True

    def _rebuild(self, live: np.ndarray) -> bool:
        """Build a graph of the ``live`` rows beside the one queries walk and swap it in (and write
        it to :attr:`_files`); whether there was a row to build it from."""
        started = time.perf_counter()
        rows = np.flatnonzero(live)
        if not len(rows):
            return False
        graph = _Graph.trained(padded_vectors(self.snapshot, rows[:: max(1, len(rows) // TRAIN_ROWS)]))
        order = self._random.permutation(rows)  # see BUILD_BATCH: index order makes a worse graph
        # what its nodes are, for the other processes: only where they read it (0.5 s at 10^6 rows)
        fingerprints = self.snapshot.uid_fingerprints(order) if self._files is not None else None
        epoch = self.snapshot.epoch
        for start in range(0, len(order), BUILD_BATCH):
            chunk = order[start : start + BUILD_BATCH]
            graph.add(chunk, padded_vectors(self.snapshot, chunk))
        covered = live.copy()  # every live row is a node now
        with self._lock:  # the count moves with the graph: caches keyed on it never meet another graph's nodes
            self._graph, self._covered, self._built_rows = graph, covered, len(rows)
            self._build_name = None
            self.builds += 1
        log.info("graph index: %d rows linked in %.1f s", len(rows), time.perf_counter() - started)
        if fingerprints is not None and epoch == self.snapshot.epoch:  # not written for an index flushed since
            self._write(graph, fingerprints, epoch)
        return True

    def _write(self, graph: _Graph, fingerprints: np.ndarray, epoch: str) -> None:
        """Write a graph just built for the other processes (and this one's next start); a folder that
        cannot be written costs them a build, not this process its graph."""
        assert self._files is not None
        started = time.perf_counter()
        try:
            build = self._files.save(graph.index, graph.rows, fingerprints, len(graph.rows), epoch)
        except (OSError, RuntimeError) as exc:  # FAISS raises RuntimeError when its write fails (a full disk)
            log.warning("graph index: not written to %s (%s)", self._files.directory, type(exc).__name__)
            return
        with self._lock:
            if self._graph is graph:
                self._build_name = build
        log.info("graph index: written in %.1f s", time.perf_counter() - started)


def _walk(graph: _Graph, query: np.ndarray, count: int, selection: _Selection) -> np.ndarray:
    """The graph's search among the ``selection``'s nodes: a selector costs ~0.4 ms a query at 10^5
    nodes, so there is none when every node is allowed."""
    nodes = len(graph.rows)
    # in FAISS since 1.7.3, missing from its stubs
    parameters = faiss.SearchParametersHNSW(efSearch=max(ef_search(nodes, selection.allowed), count))  # type: ignore[attr-defined]
    if selection.bits is not None:
        parameters.sel = faiss.IDSelectorBitmap(nodes, faiss.swig_ptr(selection.bits))
    padded = np.zeros((1, graph.index.d), np.float32)
    padded[0, : len(query)] = query
    _, found = graph.index.search(padded, count, params=parameters)
    return graph.rows[found[0][found[0] >= 0]]


def ef_search(nodes: int, allowed: int) -> int:
    """``efSearch`` for a walk among ``allowed`` of a graph's ``nodes``: :data:`EF_SEARCH` for every
    node of :data:`EF_SEARCH_NODES`, half as many for each tenfold fewer nodes (twice as many for
    each tenfold more), at least :data:`EF_SEARCH_LEAST`; a walk among a share of the nodes is given
    that of a graph as many times larger as the share is smaller.

    An HNSW walk at one ``efSearch`` finds less of the true top 10 the larger the graph, and the
    fewer of its nodes a selector allows; its cost grows with ``efSearch``: a fixed 128 spends on a
    small index what only a large one needs. Measured on ``benchmarks/query_scale.py``'s rows (200
    held-out queries, the ``graph`` ranking with its re-rank of
    :data:`~orthanc_cbir.search.strategies.GRAPH_RERANKED`): at 10^6 nodes recall@10 0.945 at 96,
    0.962 at 128, 0.965 at 160; at 10^5 0.979 at 32, 0.990 at 48, 0.993 at 64 (0.40 ms), 0.994
    at 128 (0.59 ms); at 10^5 with a filter keeping 10%, 0.943 at 64 and 0.986 at 128."""
    effective = max(nodes, 1) * max(nodes, 1) / max(allowed, 1)
    return max(EF_SEARCH_LEAST, round(EF_SEARCH * 2 ** math.log10(effective / EF_SEARCH_NODES)))


def padded_dimension(dim: int) -> int:
    """The dimension the graph pads ``dim`` features to: the next multiple of :data:`SIMD_DIMENSIONS`."""
    return -(-dim // SIMD_DIMENSIONS) * SIMD_DIMENSIONS


def padded_vectors(snapshot: IndexSnapshot, rows: np.ndarray) -> np.ndarray:
    """float32 (rows, D'): the snapshot's (dequantized) vectors of ``rows``, padded with zero
    dimensions to D' (:func:`padded_dimension`); read :data:`READ_ROWS` rows at a
    time, so a build of a million rows holds one padded copy, not two."""
    dim = snapshot.info.feature_dim
    vectors = np.zeros((len(rows), padded_dimension(dim)), np.float32)
    for start in range(0, len(rows), READ_ROWS):
        piece = rows[start : start + READ_ROWS]
        vectors[start : start + len(piece), :dim] = snapshot.vectors(piece)
    return vectors


@dataclass(frozen=True)
class _Selection:
    """The nodes a walk may return: an ``IDSelectorBitmap``'s bits (``None``: all of them, no
    selector) and how many are allowed."""

    bits: np.ndarray | None
    allowed: int

    @classmethod
    def of(cls, nodes: np.ndarray) -> _Selection:
        """The selection of the allowed ``nodes`` (bool per node)."""
        allowed = int(np.count_nonzero(nodes))
        return cls(None if allowed == len(nodes) else np.packbits(nodes, bitorder="little"), allowed)


def _padded(covered: np.ndarray, rows: int) -> np.ndarray:
    """``covered`` extended with False to at least ``rows`` rows (the snapshot grew since)."""
    if len(covered) >= rows:
        return covered
    return np.concatenate([covered, np.zeros(rows - len(covered), bool)])
