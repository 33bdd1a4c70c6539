"""Retrieval strategies, one per seed, selectable per query.

- ``exact``: Euclidean distance of the features over every instance that passes
  the filters. The reference the others are measured against.
- ``graph`` (the default): the same distance as ``exact``, found through an HNSW graph of the
  features (FAISS, :mod:`orthanc_cbir.index.graph`) and re-ranked with the snapshot's features:
  approximate (recall@10 0.977 of the float32 top 10 at 10^5 instances, ``exact`` 0.996; 0.962 at
  10^6, ``exact`` 0.989; 1.1 and 1.2 ms with the hits' records, timed alone: README, "Query latency
  against index size"). Rows the graph does not
  hold yet are scanned beside it; filters that keep few rows
  (:data:`~orthanc_cbir.index.graph.SCAN_BELOW`) scan the rows they keep.
- ``hamming`` (seed 001, coarse-to-fine): the ``candidates`` instances nearest by
  Hamming distance of the whole code, re-ranked by feature distance. Who finds
  them depends on the index size (``SearchOptions.hamming_search``): below
  :data:`MULTI_INDEX_MIN_ROWS` a popcount scan of the searcher's cached codes
  (16 bytes a row: under a millisecond for 50,000), above it multi-index hashing
  (:mod:`orthanc_cbir.index.hamming`) over the same cached codes, which reads the
  codes of about a tenth of a million-instance index (recall@10 against ``exact``
  and latency: ``benchmarks/query_scale.py``).
- ``class`` (seeds 000, 002): rank only instances of the query's class (modality
  and region). A class is the file's own word where it says one (DICOM Modality,
  BodyPartExamined: :mod:`.labels`), the model's predicted head where it does not.
- ``cluster`` (seed 003): instances are grouped offline by modularity
  clustering of a cosine k-NN graph (``orthanc-cbir recluster``); a query ranks
  the instances of its nearest cluster(s), plus any indexed since the last
  clustering (so a new instance is never unreachable).
- ``multilateral`` (seed 004): a Hamming distance in which each sub-code
  (modality, region, pathology, appearance) weighs what the user says, e.g.
  ``pathology=0`` for "same organ and modality, any finding"; ties broken by
  feature distance. Where the query's or a row's file names its modality (region),
  that sub-code counts by label instead of bits: 0 for the same class, half the
  sub-code's bits (the distance between two classes' hash centres) for another.

One picture, one hit: at the instance level, hits that are the same picture (one
image stored in several encodings, or twice under two SOPInstanceUIDs) are one hit
whose record lists the others under ``copies`` (:meth:`Searcher._collapse`); the
answer still holds ``k`` distinct pictures when the index has them. Each hit's
record also says which ``labels`` the search took from the file and which from the
model.

Every strategy applies the same :class:`~.filters.Filters` first. Distances in
answers are feature distances (0 = identical, 2 = opposite) except for
``multilateral``, whose distance is the weighted Hamming distance.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..index.graph import SCAN_BELOW, GraphIndex
from ..index.graph_file import GraphFiles
from ..index.hamming import CodeTables
from ..index.schema import NO_CLUSTER, StoredEntry
from ..index.snapshot import IndexSnapshot
from ..index.store import IndexStore, WriteCounters
from ..model.codes import hamming_distances, weighted_hamming_distances
from .filters import Filters, QueryContext
from .labels import FILE, LabelMap

STRATEGIES = ("exact", "graph", "hamming", "class", "cluster", "multilateral")
LEVELS = ("instance", "series", "study")
MULTI_INDEX_MIN_ROWS = 200_000
"""From this many indexed instances on, ``hamming`` probes the multi-index tables
instead of scanning every code (``hamming_search="auto"``)."""
PROBED_PER_CANDIDATE = 20
"""A multi-index probe reads buckets until they hold this many rows per candidate
wanted: at 10^6 instances, 7,800 candidates from ~150,000 probed rows keep
recall@10 above 0.95 (``benchmarks/query_scale.py``)."""
REPEATS = 2.5
"""Probed rows repeat (a row near the query on several substrings is found in several
tables): ``hamming`` ranks this many times the pool by code distance, then keeps each
row's first place, which leaves about a full pool of distinct rows at 10^6 instances."""
REBUILD_ROWS = 16_384
"""Rows indexed since the multi-index tables were built are scanned linearly; the
tables are rebuilt when there are more than this many, or a 32nd of the index."""
CLASS_HEADS = ("modality", "region")
"""The heads whose classes define ``class``: the body-region classes of seeds 000 / 002. The file's
Modality and BodyPartExamined give them where they can (:mod:`.labels`), the model's heads elsewhere."""
GRAPH_RERANKED = 32
"""``graph``: rows the walk returns, at least, to be ranked again by the snapshot's features (the
walk ranks by its 8-bit distances): at 10^6 rows, recall@10 0.953 against 0.934 for the walk's own
top 10 at the same cost (``index/graph.py``'s ``BUILD_BATCH`` note)."""
COPY_DISTANCE = 0.15
"""Two rows whose stored features are at most this far apart (and whose Rows, Columns, Modality
and ImagePositionPatient agree where both say) are one picture. Measured with the shipped model on
``shared/data/dicom``: copies of one image in other transfer syntaxes are 0.0000-0.0007 apart
(lossless), up to 0.064 (lossy JPEG, NM1_JPLY); the nearest two different slices of the real
series 0.356 (neighbours in a 3-slice CT), the nearest two different NEMA pictures 1.04."""
SINGLE_THREAD_PRODUCT = 2**18
"""Multiply-adds below which OpenBLAS computes a matrix product on the calling thread (its
``GEMM_MULTITHREAD_THRESHOLD`` of 4 times 65,536)."""
COPY_DEPTH = 4
"""An instance answer ranks ``COPY_DEPTH * k + 32`` rows, collapses copies, and ranks four times
deeper while that leaves fewer than ``k`` pictures."""


@dataclass(frozen=True)
class Query:
    """A query image as the model saw it."""

    features: np.ndarray
    code: np.ndarray
    probabilities: Mapping[str, np.ndarray] = field(default_factory=dict)
    context: QueryContext = QueryContext()
    row: int | None = None
    """The query's own row when it is a stored instance (``exclude_self`` needs no read then)."""


@dataclass(frozen=True)
class SearchOptions:
    """How to search. Defaults suit an interactive query."""

    strategy: str = "graph"
    k: int = 10
    filters: Filters = Filters()
    level: str = "instance"
    """``instance``, or ``series`` / ``study``: a group ranks by its best instance among
    the top ``group_depth`` instances."""
    candidates: int | None = None
    """``hamming`` / ``multilateral``: instances re-ranked by feature distance; ``None``: a
    128th of the instances the filters allow, at least 1,000 and at most 10,000 (1,000 up to
    128,000 instances, 7,812 at a million: recall@10 about 0.96 there)."""
    weights: Mapping[str, float] | None = None
    """``multilateral``: weight per sub-code name (unnamed sub-codes weigh 1)."""
    clusters: int = 1
    """``cluster``: nearest clusters searched."""
    hamming_search: str = "auto"
    """``hamming``: ``scan`` (every cached code), ``multi-index`` (bucket tables over the
    cached codes) or ``auto`` (multi-index from :data:`MULTI_INDEX_MIN_ROWS` instances on)."""
    group_depth: int = 1000
    with_records: bool = True
    """Read each hit's stored record (metadata, probabilities, Orthanc ids); off for bulk evaluation."""
    copies: bool = True
    """At the instance level with records: one hit per picture, its copies listed in the hit's
    record (``copies``). Bulk evaluation (``with_records=False``) ranks every row as stored."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}; choose one of {', '.join(LEVELS)}")
        if self.hamming_search not in ("auto", "scan", "multi-index"):
            raise ValueError(f"hamming_search must be auto, scan or multi-index, not {self.hamming_search!r}")
        if not 1 <= self.k <= 1000:
            raise ValueError("k must be between 1 and 1000")
        if self.candidates is not None and not 1 <= self.candidates <= 100_000:
            raise ValueError("candidates must be between 1 and 100000")

    def pool(self, allowed: int) -> int:
        """How many instances ``hamming`` / ``multilateral`` re-rank among ``allowed``."""
        if self.candidates is not None:
            return self.candidates
        return int(np.clip(allowed // 128, 1000, 10_000))


@dataclass(frozen=True)
class Ranking:
    """A strategy's answer in rows, best first."""

    rows: np.ndarray
    distances: np.ndarray
    candidates: int
    """Instances whose features (or weighted codes) were compared to the query's."""
    examined: int = 0
    """``hamming``: codes compared with the query's (a probed row counts once per table that held it)."""


@dataclass(frozen=True)
class Copy:
    """The same picture as a hit, stored under another SOPInstanceUID."""

    entry: StoredEntry
    distance: float
    """Its distance to the query."""


@dataclass(frozen=True)
class Hit:
    rank: int
    sop_instance_uid: str
    distance: float
    entry: StoredEntry | None
    """What the index stores about the instance (``None`` when the search was asked for no records)."""
    instances: int = 1
    """For series / study answers: how many of its instances were among the ranked ones."""
    labels: dict[str, dict[str, str | None]] = field(default_factory=dict)
    """Per label head, ``{"value", "source": "file" | "model"}``: what ``class`` and ``multilateral``
    take the instance to be."""
    copies: list[Copy] = field(default_factory=list)
    """The same picture stored under other SOPInstanceUIDs, best first (instance answers)."""
    region: tuple[int, int, int, int] | None = None
    """Region answers: the hit's matching patch, ``x0, y0, x1, y1`` in its pixels."""


@dataclass(frozen=True)
class SearchResult:
    strategy: str
    level: str
    hits: list[Hit]
    candidates: int
    index_size: int
    elapsed_ms: float
    examined: int = 0

    @property
    def candidate_fraction(self) -> float:
        return self.candidates / self.index_size if self.index_size else 0.0

    @property
    def sop_instance_uids(self) -> list[str]:
        return [hit.sop_instance_uid for hit in self.hits]


class Searcher:
    """Runs queries against one index version, on a snapshot refreshed before each query."""

    def __init__(self, store: IndexStore | None, snapshot: IndexSnapshot | None = None,
                 graph_files: GraphFiles | None = None):  # fmt: skip
        """``store``: the index searched, its snapshot refreshed before each query. ``None`` with an
        array-built ``snapshot`` (:meth:`~orthanc_cbir.index.IndexSnapshot.from_arrays`): the
        strategies without Redis, which rank rows only (``SearchOptions(with_records=False)``).
        ``graph_files``: where the ``graph`` strategy's graph is shared with other processes
        (:mod:`orthanc_cbir.index.graph_file`)."""
        if snapshot is None:
            if store is None:
                raise ValueError("a searcher needs an index store or a snapshot")
            snapshot = IndexSnapshot(store)
        self.store = store
        self.snapshot = snapshot
        self.info = snapshot.info
        self._centroids: tuple[bytes | None, np.ndarray] = (None, np.zeros((0, self.info.feature_dim), np.float32))
        self._tables: CodeTables | None = None
        self._unindexed = np.zeros(0, np.int64)  # rows below the tables' end that were not live when they were built
        self._scratch = np.zeros(0, np.int32)
        self.labels = LabelMap(self.info.labels)
        self._classes: dict[str, tuple[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._graph: GraphIndex | None = None
        self._graph_files = graph_files
        self._checking = False
        """The next read of entries also reads the index's write counters (:meth:`search`)."""
        self._writes_read: WriteCounters | None = None
        """The write counters that read found (``None``: no entry read)."""

    def search(self, query: Query, options: SearchOptions = SearchOptions(), refresh: bool = True) -> SearchResult:
        """Rank the index for ``query``; ``refresh=False`` when the caller refreshed the snapshot
        for this query already (:class:`.service.SimilaritySearch`: one read of the writes, not two).

        An answer with its hits' records is ranked on the snapshot as it stands, and the read of the
        hits learns in the same round trip whether the index moved since the snapshot's refresh:
        when it did, the snapshot is refreshed (the counters as read) and the answer ranked again. A
        query costs one round trip while the index stands still (a refresh before each query: two),
        and as many as a refresh before the query when it moved."""
        started = time.perf_counter()
        if refresh and options.with_records and self.store is not None and self.snapshot.refreshed:
            self._checking, self._writes_read = True, None  # the first read of entries reads the write counters too
            try:
                result = self._answer(query, options, started)
            finally:
                self._checking = False
            writes = self._writes_read
            if writes is not None and self.snapshot.is_current(writes):
                return result
            generation = self.snapshot.generation  # moved, or no entry read: refresh
            self.snapshot.refresh(writes)
            if self.snapshot.generation == generation:  # nothing re-read: the answer stands
                return result
        elif refresh:
            self.snapshot.refresh()
        return self._answer(query, options, started)

    def _answer(self, query: Query, options: SearchOptions, started: float) -> SearchResult:
        excluded = None
        if options.filters.exclude_self and query.context.sop_instance_uid:
            excluded = query.row if query.row is not None else self._store().row(query.context.sop_instance_uid)
        allowed = AllowedRows(self.snapshot, options.filters, query.context, excluded)
        ranker = _RANKERS[options.strategy]
        if options.level == "instance" and options.copies and options.with_records:
            depth = COPY_DEPTH * options.k + 32
            while True:
                ranking = ranker(self, query, options, allowed, depth)
                leads, copies, records = self._collapse(ranking, options.k)
                if len(leads) >= options.k or len(ranking.rows) < depth:  # enough pictures, or no more rows
                    break
                depth *= 4  # copies took places: rank deeper to refill
            hits = self._collapsed_hits(ranking, leads, copies, records)
        else:
            depth = options.k if options.level == "instance" else max(options.group_depth, options.k)
            ranking = ranker(self, query, options, allowed, depth)
            hits = self._hits(ranking, options)
        return SearchResult(options.strategy, options.level, hits, ranking.candidates,
                            self.snapshot.live_count, (time.perf_counter() - started) * 1000,
                            ranking.examined or ranking.candidates)  # fmt: skip

    # -- the strategies ---------------------------------------------------------------------

    def _exact(self, query: Query, options: SearchOptions, allowed: AllowedRows, depth: int) -> Ranking:
        return _nearest(self.snapshot, query.features, np.flatnonzero(allowed.mask), depth)

    def _graph_ranking(self, query: Query, options: SearchOptions, allowed: AllowedRows, depth: int) -> Ranking:
        graph = self.graph()
        if allowed.count <= depth or graph.allowed_share(allowed.count) < SCAN_BELOW:  # few rows: exact and quick
            return self._exact(query, options, allowed, depth)
        wanted = max(depth, GRAPH_RERANKED)
        if options.filters.is_empty():  # the live rows less at most the query's own row
            found, late = graph.search_live(query.features, wanted + 1)
            found, late = allowed.among(found), allowed.among(late)
        else:
            found, late = graph.search(query.features, allowed.mask, wanted), graph.late(allowed.mask)
        pool = np.concatenate([found, late])  # the rows the graph does not hold yet, scanned
        return _nearest(self.snapshot, query.features, pool, depth)

    def graph(self) -> GraphIndex:
        """The HNSW graph of this searcher's snapshot, made on the first ``graph`` query (a process
        never asked for one holds none) and told of each refresh."""
        if self._graph is None:
            self._graph = GraphIndex(self.snapshot, self._graph_files)
        self._graph.update()
        return self._graph

    def _hamming(self, query: Query, options: SearchOptions, allowed: AllowedRows, depth: int) -> Ranking:
        pool_size = options.pool(allowed.count)
        if allowed.count <= pool_size:  # the filters leave fewer instances than the pool: rank them all
            return self._exact(query, options, allowed, depth)
        mask = allowed.mask
        use_tables = options.hamming_search == "multi-index" or (
            options.hamming_search == "auto" and allowed.count >= MULTI_INDEX_MIN_ROWS
        )
        if use_tables:
            tables, late = self._code_tables()
            probe = tables.probe(query.code, pool_size * PROBED_PER_CANDIDATE)
            rows, codes = probe.rows, probe.codes
            if len(late):
                late_codes = np.take(self.snapshot.codes, late, axis=0)
                rows, codes = np.concatenate([rows, late]), np.concatenate([codes, late_codes])
            allowed_rows = np.take(mask, rows)
            if not allowed_rows.all():  # np.compress: boolean indexing of 2-D rows is seven times slower
                rows, codes = rows[allowed_rows], np.compress(allowed_rows, codes, axis=0)
            distances = hamming_distances(query.code, codes)
            # a row found on several substrings repeats (with its one distance): take REPEATS pools'
            # worth of the nearest, drop the repeats, and take more in the rare case that leaves less
            ranked = int(pool_size * REPEATS)
            while True:
                nearest = _nearest_unordered(distances, ranked)
                distinct = nearest[self._first_occurrences(rows[nearest])]
                if len(distinct) >= pool_size or ranked >= len(rows):
                    break
                ranked *= 2
            pool, examined = rows[distinct[_nearest_unordered(distances[distinct], pool_size)]], len(rows)
        else:
            rows = np.flatnonzero(mask)
            # every row allowed (no filter): scan the cached codes in place instead of gathering a copy
            every_row = len(rows) == len(self.snapshot.codes)
            codes = self.snapshot.codes if every_row else np.take(self.snapshot.codes, rows, axis=0)
            pool, examined = rows[_smallest(hamming_distances(query.code, codes), pool_size)], len(rows)
        ranking = _nearest(self.snapshot, query.features, pool, depth)
        return Ranking(ranking.rows, ranking.distances, ranking.candidates, examined=examined)

    def _first_occurrences(self, rows: np.ndarray) -> np.ndarray:
        """Indices of ``rows`` that keep each row once, at its first place; O(n) with a scratch
        array where ``np.unique`` would sort."""
        if len(self._scratch) < len(self.snapshot.codes):
            self._scratch = np.zeros(len(self.snapshot.codes), np.int32)
        places = np.arange(len(rows), dtype=np.int32)
        np.put(self._scratch, rows[::-1], places[::-1])  # the last write wins: the first place
        return np.flatnonzero(np.take(self._scratch, rows) == places)

    def _code_tables(self) -> tuple[CodeTables, np.ndarray]:
        """The multi-index tables over the snapshot's live rows, and the rows they do not
        hold but a query must still see (indexed since the build: scanned linearly). Rebuilt
        when those pass :data:`REBUILD_ROWS` or a 32nd of the index."""
        live = self.snapshot.live
        if self._tables is not None:
            late = self._late(live)
            if len(late) <= max(REBUILD_ROWS, self._tables.rows // 32):
                return self._tables, late
        indexed = np.flatnonzero(live)
        self._tables = CodeTables(self.info.multi_index, self.snapshot.codes, indexed)
        self._unindexed = np.flatnonzero(~live)
        return self._tables, np.zeros(0, np.int64)

    def _late(self, live: np.ndarray) -> np.ndarray:
        """Live rows the tables do not hold: below their end but not live at the build
        (a row is allocated before it is written), or past their end."""
        end = self._tables.rows if self._tables is not None else 0
        below = self._unindexed[live[self._unindexed]]
        return np.concatenate([below, end + np.flatnonzero(live[end:])])

    def _class(self, query: Query, options: SearchOptions, allowed: AllowedRows, depth: int) -> Ranking:
        mask = allowed.mask
        for head in CLASS_HEADS:
            wanted, _ = self._query_class(query, head)
            if wanted is not None:
                mask = mask & (self.row_classes(head)[0] == wanted)
        return _nearest(self.snapshot, query.features, np.flatnonzero(mask), depth)

    def _query_class(self, query: Query, head: str) -> tuple[int | None, str]:
        """The query's class for ``head`` (``None`` when the model has no such head) and its source."""
        if f"predicted_{head}" not in self.snapshot.attributes or head not in self.labels.labels:
            return None, "model"
        said = {"modality": query.context.modality, "region": query.context.body_part}.get(head)
        return self.labels.query_class(head, said, query.probabilities)

    def row_classes(self, head: str) -> tuple[np.ndarray, np.ndarray]:
        """Every row's class for ``head`` (the file's word, else the model's) and whether the file
        gave it; cached until the snapshot changes."""
        cached = self._classes.get(head)
        if cached is None or cached[0] != self.snapshot.generation:
            cached = (self.snapshot.generation, self.labels.row_classes(head, self.snapshot.attributes))
            self._classes[head] = cached
        return cached[1]

    def _cluster(self, query: Query, options: SearchOptions, allowed: AllowedRows, depth: int) -> Ranking:
        centroids = self.centroids()
        cluster = self.snapshot.attributes["cluster"]
        mask = allowed.mask
        if len(centroids):
            nearest = _smallest(((centroids - query.features) ** 2).sum(axis=1), options.clusters)
            mask = mask & (np.isin(cluster, nearest) | (cluster == NO_CLUSTER))
        return _nearest(self.snapshot, query.features, np.flatnonzero(mask), depth)

    def _multilateral(self, query: Query, options: SearchOptions, allowed: AllowedRows, depth: int) -> Ranking:
        rows = np.flatnonzero(allowed.mask)
        layout = self.info.layout
        weights = layout.bit_weights(options.weights)
        codes = np.take(self.snapshot.codes, rows, axis=0)
        by_label = []  # class sub-codes: by label where a file says, by bits where only the model does
        for sub in layout.sub_codes:
            wanted, source = self._query_class(query, sub.name) if sub.name in CLASS_HEADS else (None, "model")
            weight = float(weights[sub.start]) if sub.length else 0.0
            if wanted is None or weight == 0:
                continue
            classes, from_file = self.row_classes(sub.name)
            from_file = np.take(from_file, rows) if source != FILE else np.ones(len(rows), bool)
            bits = np.zeros_like(weights)
            bits[sub.start : sub.start + sub.length] = weight
            by_label.append((np.take(classes, rows) != wanted, from_file, bits, weight * (sub.length // 2)))
            weights = weights.copy()
            weights[sub.start : sub.start + sub.length] = 0
        distances = weighted_hamming_distances(query.code, codes, weights)
        for differs, from_file, bits, apart in by_label:
            distances += np.where(differs & from_file, np.float32(apart), np.float32(0))
            model_only = np.flatnonzero(~from_file)
            if len(model_only):  # neither file says: the model's bits, as before
                model_codes = np.take(codes, model_only, axis=0)
                distances[model_only] += weighted_hamming_distances(query.code, model_codes, bits)
        pool = rows[_smallest(distances, max(options.pool(len(rows)), depth))]
        pool_distances = distances[np.searchsorted(rows, pool)]
        features = _feature_distances(self.snapshot, query.features, pool)
        order = np.lexsort((features, pool_distances))[:depth]
        return Ranking(pool[order], pool_distances[order], candidates=len(rows))

    def stored_query(self, rows: np.ndarray) -> Query:
        """What indexed rows ask with (refresh the snapshot first). One instance: its stored
        vector, code, class probabilities and context. Several (a series, a study): the
        normalised mean of their features, with the code, probabilities and context of the
        instance nearest that mean (a code cannot be averaged). One read: that instance's entry."""
        features = self.snapshot.vectors(rows)  # dequantized: normalised again below
        vector = features.mean(axis=0)
        vector /= max(float(np.linalg.norm(vector)), 1e-12)
        nearest = int(rows[0]) if len(rows) == 1 else int(rows[int(np.argmax(features @ vector))])
        uid = self.snapshot.sop_uids([nearest])[0]
        entry = self._store().describe([uid])[0] if uid else None
        query = self.query_of(entry) if entry is not None else Query(vector, self.snapshot.codes[nearest])
        return dataclasses.replace(query, features=vector, row=nearest if len(rows) == 1 else None)

    def query_of(self, entry: StoredEntry) -> Query:
        """The query of one stored instance from its entry (read already) and the snapshot's columns."""
        meta = entry.metadata
        context = QueryContext(meta.patient_key, meta.study_instance_uid, meta.sop_instance_uid,
                               meta.series_instance_uid, meta.modality, meta.body_part_examined)  # fmt: skip
        vector = self.snapshot.vectors([entry.row])[0]
        vector /= max(float(np.linalg.norm(vector)), 1e-12)
        return Query(vector, self.snapshot.codes[entry.row], entry.probabilities, context, row=entry.row)

    def _store(self) -> IndexStore:
        """The index store, for what only Redis holds (entries, rows by UID)."""
        if self.store is None:
            raise ValueError("this searcher ranks an array-built snapshot: ask it for rows only "
                             "(SearchOptions(with_records=False)) and give queries their row")  # fmt: skip
        return self.store

    def centroids(self) -> np.ndarray:
        """(clusters, D) float32 centroids of the last re-clustering (empty before)."""
        raw = self.store.centroids_raw() if self.store is not None else None
        if raw != self._centroids[0]:
            centroids = np.frombuffer(raw or b"", np.float32).reshape(-1, self.info.feature_dim)
            self._centroids = (raw, centroids)
        return self._centroids[1]

    # -- answers ----------------------------------------------------------------------------

    def _hits(self, ranking: Ranking, options: SearchOptions) -> list[Hit]:
        rows, distances, counts = ranking.rows, ranking.distances, np.ones(len(ranking.rows), dtype=np.int64)
        if options.level != "instance":
            groups = self.snapshot.attributes["series" if options.level == "series" else "study"][rows]
            # rows are best first, so a group's first row is its best instance
            _, first, counts = np.unique(groups, return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")
            best = first[order][: options.k]
            rows, distances, counts = rows[best], distances[best], counts[order][: options.k]
        rows, distances, counts = rows[: options.k], distances[: options.k], counts[: options.k]
        uids = self.snapshot.sop_uids(rows)
        entries = self._stored_entries(rows) if options.with_records else [None] * len(rows)
        hits: list[Hit] = []
        for row_uid, entry, distance, count in zip(uids, entries, distances, counts, strict=True):
            if row_uid is None or (options.with_records and entry is None):  # removed since the snapshot was taken
                continue
            labels = self._labels(entry) if entry is not None else {}
            hits.append(Hit(len(hits) + 1, row_uid, round(float(distance), 6), entry, int(count), labels))
        return hits

    def _labels(self, entry: StoredEntry) -> dict[str, dict[str, str | None]]:
        said = {"modality": entry.metadata.modality, "body_part_examined": entry.metadata.body_part_examined}
        return self.labels.describe(said, entry.probabilities)

    def _collapse(self, ranking: Ranking, k: int
                  ) -> tuple[list[int], dict[int, list[int]], dict[int, StoredEntry | None]]:  # fmt: skip
        """One picture, one hit: walk the ranking best first; a row is a copy of an earlier
        picture (a lead) when their stored features are within :data:`COPY_DISTANCE` and their
        entries agree (:func:`same_picture`), else it is a new picture. Returns the first ``k``
        leads (indices into the ranking), each lead's copies, and the entries read (by index;
        ``None`` for a row removed since the snapshot), all in one read."""
        rows = ranking.rows
        vectors = self.snapshot.vectors(rows)
        floor = 1.0 - COPY_DISTANCE**2 / 2  # |a - b| <= d  <=>  a.b >= 1 - d^2 / 2 for unit vectors
        near: dict[int, list[int]] = {}  # index -> earlier indices within COPY_DISTANCE
        # BLAS in blocks of rows small enough that OpenBLAS multiplies them on this thread (it spreads
        # a product of over 2^18 multiply-adds over its threads, which on a busy machine wait for a
        # core): 72 rows of 520 dimensions in 0.09 ms, against 0.33 ms for numpy's einsum
        step = max(1, SINGLE_THREAD_PRODUCT // max(1, len(rows) * vectors.shape[1]))
        for start in range(0, len(rows), step):
            block = vectors[start : start + step] @ vectors[: start + step].T
            for i, j in zip(*np.nonzero(block >= floor), strict=True):
                if j < start + i:
                    near.setdefault(start + int(i), []).append(int(j))
        # every index that is a copy is in ``near``, so the k-th lead lies within k + len(near)
        # indices: read those and the near rows once, instead of reading the leads after the walk
        wanted = set(range(min(len(rows), k + len(near)))) | set(near) | {j for js in near.values() for j in js}
        records = self._entries(rows, sorted(wanted))
        leads: list[int] = []
        copies: dict[int, list[int]] = {}
        lead_of: dict[int, int] = {}
        for i in range(len(rows)):
            leads_near = (j for j in near.get(i, ()) if lead_of.get(j) == j)
            lead = next((j for j in leads_near if same_picture(records[j], records[i])), None)
            if lead is not None:
                lead_of[i] = lead
                copies[lead].append(i)
            elif len(leads) < k:
                lead_of[i] = i
                leads.append(i)
                copies[i] = []
        # a lead removed since the snapshot is no picture: its first copy still standing takes its place
        for n, lead in enumerate(leads):
            if records.get(lead) is None:
                standing = [c for c in copies[lead] if records.get(c) is not None]
                if standing:
                    leads[n], copies[standing[0]] = standing[0], standing[1:]
        return leads, copies, records

    def _entries(self, rows: np.ndarray, indices: list[int]) -> dict[int, StoredEntry | None]:
        """The stored entries of ``rows[indices]``, by index (``None``: removed since the snapshot)."""
        if not indices:
            return {}
        return dict(zip(indices, self._stored_entries(rows[indices]), strict=True))

    def _stored_entries(self, rows: np.ndarray) -> list[StoredEntry | None]:
        """The entries of ``rows``, kept by the snapshot once read (only Redis holds them); the first
        read of an answer :meth:`search` ranked before refreshing learns whether the index moved."""
        self._store()
        if self._checking:
            self._checking = False
            entries, self._writes_read = self.snapshot.entries_checking_writes(rows)
            return entries
        return self.snapshot.entries(rows)

    def _collapsed_hits(self, ranking: Ranking, leads: list[int], copies: dict[int, list[int]],
                        records: dict[int, StoredEntry | None]) -> list[Hit]:  # fmt: skip
        hits: list[Hit] = []
        for lead in leads:
            entry = records.get(lead)
            if entry is None:  # removed since the snapshot was taken
                continue
            listed = [Copy(copy, round(float(ranking.distances[c]), 6)) for c in copies.get(lead, ())
                      if (copy := records.get(c)) is not None]  # fmt: skip
            hits.append(Hit(len(hits) + 1, entry.sop_instance_uid, round(float(ranking.distances[lead]), 6), entry,
                            labels=self._labels(entry), copies=listed))  # fmt: skip
        return hits


class AllowedRows:
    """The rows a query may find: the live rows its filters keep, less its own row (``exclude_self``).

    The mask over every row is made when a strategy first asks for it. An unfiltered ``graph`` query
    never does: how many rows are allowed, and which of the few rows its walk found, the snapshot's
    live rows say, without two passes over every row (90 us a query at 10^6 rows)."""

    def __init__(self, snapshot: IndexSnapshot, filters: Filters, context: QueryContext, excluded: int | None):
        self._snapshot, self._filters, self._context, self._excluded = snapshot, filters, context, excluded

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """bool (rows,): whether each row is allowed."""
        mask = self._filters.mask(self._snapshot.attributes, self._context)
        if self._excluded is not None and self._excluded < len(mask):
            mask[self._excluded] = False
        return mask

    @functools.cached_property
    def count(self) -> int:
        """How many rows are allowed."""
        if not self._filters.is_empty():
            return int(np.count_nonzero(self.mask))
        return self._snapshot.live_count - int(self._excluded_live())

    def among(self, rows: np.ndarray) -> np.ndarray:
        """The allowed ones of ``rows`` (snapshot rows), in their order."""
        if not self._filters.is_empty():
            return rows[np.take(self.mask, rows)]
        keep = np.take(self._snapshot.live, rows)
        if self._excluded_live():
            keep &= rows != self._excluded
        return rows[keep]

    def _excluded_live(self) -> bool:
        excluded, live = self._excluded, self._snapshot.live
        return excluded is not None and 0 <= excluded < len(live) and bool(live[excluded])


def same_picture(a: StoredEntry | None, b: StoredEntry | None) -> bool:
    """Whether two stored entries whose features are within :data:`COPY_DISTANCE` may be one
    picture: Rows, Columns and Modality equal and ImagePositionPatient within 0.01 mm, each
    where both entries say (a PNG says none of them)."""
    if a is None or b is None:
        return False
    ma, mb = a.metadata, b.metadata
    for name in ("rows", "columns", "modality"):
        if getattr(ma, name) is not None and getattr(mb, name) is not None and getattr(ma, name) != getattr(mb, name):
            return False
    pa, pb = ma.image_position_patient, mb.image_position_patient
    if pa is None or pb is None:
        return True
    return len(pa) == len(pb) and max(abs(x - y) for x, y in zip(pa, pb, strict=True)) <= 0.01


_RANKERS = {
    "exact": Searcher._exact,
    "graph": Searcher._graph_ranking,
    "hamming": Searcher._hamming,
    "class": Searcher._class,
    "cluster": Searcher._cluster,
    "multilateral": Searcher._multilateral,
}


def _nearest_unordered(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest values, in no order (all of them when there are fewer)."""
    return np.argpartition(values, count - 1)[:count] if count < len(values) else np.arange(len(values))


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest values, smallest first."""
    nearest = _nearest_unordered(values, count)
    return nearest[np.argsort(values[nearest], kind="stable")]


def _feature_distances(snapshot: IndexSnapshot, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distances of the (unit) query to the rows' (dequantized int8) features."""
    similarities = snapshot.similarities(features, rows)
    return np.sqrt(np.maximum(2.0 - 2.0 * similarities, 0.0))


def _nearest(snapshot: IndexSnapshot, features: np.ndarray, rows: np.ndarray, depth: int) -> Ranking:
    distances = _feature_distances(snapshot, features, rows)
    best = _smallest(distances, depth)
    return Ranking(rows[best], distances[best], candidates=len(rows))
