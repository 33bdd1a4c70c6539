"""The similarity core: what every adapter asks when it asks "what is similar to this?".

>>> core = SimilaritySearch(store)                                            # doctest: +SKIP
>>> answer = core.similar_to_stored("instance", sop_instance_uid, options)    # doctest: +SKIP
>>> [hit.sop_instance_uid for hit in answer.hits]                             # doctest: +SKIP

It resolves a query from a stored instance, series or study (or takes one an adapter
built from an upload), searches, and returns typed hits. It knows nothing of HTTP:
the routes (:mod:`orthanc_cbir.api.similar`) turn parameters into
:class:`~.strategies.SearchOptions` with :func:`search_options` and hits into JSON, DICOM
JSON and statuses; the "Similar cases" maker (:mod:`orthanc_cbir.answers.similar_series`)
calls it directly.

A stored-instance query costs two Redis round trips when the index has not changed since the
last one: the query's own entry with the snapshot's write counters, then the hits' entries (the
snapshot knows each row's SOPInstanceUID); an uploaded image's query one, its hits' entries with
the write counters (:meth:`~.strategies.Searcher.search`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dicom.metadata import looks_like_uid
from ..errors import BadParameters, NotIndexed
from ..index.graph_file import GraphFiles
from ..index.schema import uid_hash
from ..index.store import IndexStore
from ..model.codes import CodeLayout
from ..redis_client import server_of
from .filters import Filters, parse_weights
from .strategies import LEVELS, STRATEGIES, Hit, Query, Searcher, SearchOptions, SearchResult

FILTER_PARAMETERS = ("modality", "body_part", "sex", "age", "date", "exclude")
SEARCH_PARAMETERS = ("k", "limit", "strategy", "level", "offset", "weights", *FILTER_PARAMETERS)
"""The parameters :func:`search_options` reads (``limit`` is QIDO-RS's name for ``k``)."""
MAX_OFFSET_END = 1000
"""``offset + k`` at most: a page deeper than this is not a similar case any more."""

_FILTER_GRAMMAR = {
    "modality": "comma-separated modalities (CT,MR)", "body_part": "comma-separated body parts (CHEST)",
    "sex": "comma-separated M, F or O", "age": "MIN-MAX in years (40-70, 40-, -70)",
    "date": "YYYY-MM-DD..YYYY-MM-DD (either end may be left out)",
    "exclude": "comma-separated same-patient, same-study, same-series",
}  # fmt: skip


@dataclass(frozen=True)
class Page:
    """What to search and which part of the ranking to answer with."""

    options: SearchOptions
    """The search; its ``k`` is ``offset`` + the hits wanted."""
    offset: int = 0


@dataclass(frozen=True)
class Answer:
    """A search's outcome as every adapter shows it."""

    result: SearchResult
    hits: list[Hit]
    """The page asked for (``result.hits`` less the first ``offset``)."""
    query_uid: str | None
    """The DICOM UID of the query (instance, series or study), where known."""
    query_patient_key: str | None = None
    """The query's one-way patient key (:attr:`QueryContext.patient_key`): which hits are the same patient's."""
    query_region: tuple[int, int, int, int] | None = None
    """Region answers: the query image's patch that was searched (the one the reader's box overlaps most)."""


def search_options(parameters: Mapping[str, str], layout: CodeLayout, *, default_level: str, default_strategy: str,
                   max_results: int) -> Page:  # fmt: skip
    """The search a caller's parameters (strings, as in a query string) ask for, for a model whose
    code has ``layout`` (its sub-codes are what the weights may name). Raises
    :class:`~orthanc_cbir.errors.BadParameters` with a fixed message (none repeats the input).
    Parameters outside :data:`SEARCH_PARAMETERS` are the caller's to check."""
    try:
        k, offset = int(parameters.get("limit", parameters.get("k", 10))), int(parameters.get("offset", 0))
    except ValueError:
        raise BadParameters("k and offset must be whole numbers") from None
    if not 1 <= k <= max_results or not 0 <= offset <= MAX_OFFSET_END - k:
        raise BadParameters(f"k must be 1..{max_results} and offset 0..{MAX_OFFSET_END - k}")
    strategy, level = parameters.get("strategy", default_strategy), parameters.get("level", default_level)
    if strategy not in STRATEGIES:
        raise BadParameters(f"strategy is one of {', '.join(STRATEGIES)}")
    if level not in LEVELS:
        raise BadParameters(f"level is one of {', '.join(LEVELS)}")
    clauses = []
    for name in FILTER_PARAMETERS:
        if name in parameters:
            try:
                Filters.parse([f"{name}={parameters[name]}"])
            except ValueError:
                raise BadParameters(f"{name} is {_FILTER_GRAMMAR[name]}") from None
            clauses.append(f"{name}={parameters[name]}")
    try:
        weights = parse_weights(parameters.get("weights"))
        layout.bit_weights(weights)  # names a sub-code the model has
    except ValueError:
        sub_codes = ", ".join(sub.name for sub in layout.sub_codes)
        raise BadParameters(f"weights is SUB=WEIGHT,... with SUB one of {sub_codes} and WEIGHT a number >= 0") from None
    try:
        options = SearchOptions(strategy, k=k + offset, filters=Filters.parse(clauses), level=level, weights=weights)
    except ValueError as exc:  # the checks above cover the caller's part: what is left is ours
        raise BadParameters(f"these parameters cannot be searched ({type(exc).__name__})") from None
    return Page(options, offset)


_REGION_READS = 256  # region hits' entries read per round trip while filling a page


class SimilaritySearch:
    """Searches one index version for stored or uploaded queries; safe to share between threads
    (one query at a time touches the searcher's snapshot). It never runs the model: a stored
    resource is searched with its stored vector.

    Every core of one index in a process searches through one :class:`Searcher`
    (:func:`_process_searcher`): the HTTP routes' and each worker's "Similar cases" maker's in
    ``orthanc-cbir serve`` hold one snapshot and one graph between them, not one each (at 10^6
    instances a snapshot and its graph take 1.5 GB, and the graph 4 minutes of a core to build)."""

    def __init__(self, store: IndexStore, resolve_uid: Callable[[str, str], str | None] | None = None,
                 graph_dir: Path | None = None):  # fmt: skip
        """``resolve_uid(level, identifier)`` turns another identifier (an Orthanc id) into the
        DICOM UID of that level; without it only DICOM UIDs are accepted. ``graph_dir``: where
        the graph of the ``graph`` strategy is shared with the other processes of the host
        (the ``graph_dir`` setting, :mod:`orthanc_cbir.index.graph_file`)."""
        self.store = store
        self._shared = _process_searcher(store, graph_dir)
        self.searcher = self._shared.searcher
        self.resolve_uid = resolve_uid
        self._lock = self._shared.lock

    def page_for(self, parameters: Mapping[str, str], *, default_level: str, default_strategy: str,
                 max_results: int) -> Page:  # fmt: skip
        """:func:`search_options` for this index's model (its sub-codes name the weights)."""
        return search_options(parameters, self.store.info.layout, default_level=default_level,
                              default_strategy=default_strategy, max_results=max_results)  # fmt: skip

    def similar_to_stored(self, level: str, identifier: str, page: Page) -> Answer:
        """What is similar to a stored instance, series or study (``identifier``: its DICOM UID,
        or what ``resolve_uid`` knows). A series (study) never answers with itself.

        Raises:
            NotIndexed: nothing with this identifier is indexed at this level.
        """
        if level not in LEVELS:
            raise BadParameters(f"level is one of {', '.join(LEVELS)}")
        options = page.options
        if level != "instance":
            filters = options.filters
            if level == "series":
                filters = dataclasses.replace(filters, exclude_same_series=True)
            else:
                filters = dataclasses.replace(filters, exclude_same_study=True)
            options = dataclasses.replace(options, filters=filters)
        with self._lock:
            uid, query = self._stored_query(level, identifier)
            result = self.searcher.search(query, options, refresh=False)  # refreshed for the query just now
        return Answer(result, result.hits[page.offset :], uid, query.context.patient_key)

    def similar_to(self, query: Query, page: Page) -> Answer:
        """What is similar to a query built elsewhere (an upload a worker embedded)."""
        with self._lock:
            result = self.searcher.search(query, page.options)
        return Answer(result, result.hits[page.offset :], query.context.sop_instance_uid, query.context.patient_key)

    def similar_regions(self, identifier: str, box: tuple[float, float, float, float], page: Page) -> Answer:
        """What regions of other images are like the rectangle ``box`` (x0, y0, x1, y1, pixels) of a
        stored instance: the instance's region entry that overlaps the box most, against every
        other image's entries (:mod:`orthanc_cbir.index.regions`), one hit per image, nearest first,
        through the page's filters.

        Raises:
            NotIndexed: the instance is not indexed, or has no region entries.
        """
        started = time.perf_counter()
        with self._lock:
            uid, query = self._stored_query("instance", identifier)  # refreshes the snapshot
            snapshot = self.searcher.snapshot
            try:
                query_region, matches = self.store.regions.matches(uid, box)
            except KeyError:
                raise NotIndexed("this instance has no region entries: only CT and MR slices indexed with the "
                                 "regions setting on have them") from None  # fmt: skip
            except ValueError:
                raise BadParameters("box lies outside the image (x0,y0,x1,y1 are the image's pixels)") from None
            context = query.context
            keep = page.options.filters.mask(snapshot.attributes, context)
            wanted = page.options.k  # the page's end: search_options counts the offset in
            hits: list[Hit] = []
            for start in range(0, len(matches), _REGION_READS):
                chunk = matches[start : start + _REGION_READS]
                for match, found in zip(chunk, self.store.describe([m.sop_instance_uid for m in chunk]), strict=True):
                    if found is not None and found.row < snapshot.rows and keep[found.row] and len(hits) < wanted:
                        hits.append(Hit(len(hits) + 1, match.sop_instance_uid, match.distance, found,
                                        region=match.box))  # fmt: skip
                if len(hits) >= wanted:
                    break
            result = SearchResult("regions", "instance", hits, len(matches), snapshot.live_count,
                                  (time.perf_counter() - started) * 1000)  # fmt: skip
        return Answer(result, hits[page.offset :], uid, context.patient_key, query_region)

    def _stored_query(self, level: str, identifier: str) -> tuple[str, Query]:
        uid = identifier if looks_like_uid(identifier) else (self.resolve_uid(level, identifier)
                                                              if self.resolve_uid else None)  # fmt: skip
        if uid is None:
            raise _not_indexed(level)
        snapshot = self.searcher.snapshot
        if level == "instance":
            entry = snapshot.refresh_reading([uid])[0]  # the query's own entry, read once
            if entry is None or entry.row >= snapshot.rows or not snapshot.live[entry.row]:
                raise _not_indexed(level)
            return uid, self.searcher.query_of(entry)
        snapshot.refresh()
        column = snapshot.attributes["series" if level == "series" else "study"]
        rows = np.flatnonzero((column == uid_hash(uid)) & snapshot.live)
        if not len(rows):
            raise _not_indexed(level)
        return uid, self.searcher.stored_query(rows)


class _SharedSearcher:
    """A process's searcher of one index and the lock that lets one query at a time use it."""

    def __init__(self, store: IndexStore, graph_dir: Path | None):
        files = GraphFiles(graph_dir, store.info.version) if graph_dir is not None else None
        self.searcher = Searcher(store, graph_files=files)
        self.lock = threading.Lock()


_SEARCHERS: weakref.WeakValueDictionary[tuple[str, str], _SharedSearcher] = weakref.WeakValueDictionary()
_SEARCHERS_LOCK = threading.Lock()


def _process_searcher(store: IndexStore, graph_dir: Path | None) -> _SharedSearcher:
    """This process's searcher of ``store``'s index (its Redis server and key space), made by the
    first core that asks (with its ``graph_dir``: one process, one settings) and kept while a core holds it."""
    key = (server_of(store.client), store.keys.base)
    with _SEARCHERS_LOCK:
        shared = _SEARCHERS.get(key)
        if shared is None:
            shared = _SEARCHERS[key] = _SharedSearcher(store, graph_dir)
        return shared


def _not_indexed(level: str) -> NotIndexed:
    return NotIndexed(f"not in the index: no {level} with this identifier is stored and indexed "
                      "(not stored, not yet indexed, or rejected)")  # fmt: skip
