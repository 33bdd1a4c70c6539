"""Queries against the index: filters (:mod:`.filters`) and the strategies of the seeds (:mod:`.strategies`)."""

from .filters import Filters, QueryContext
from .strategies import LEVELS, STRATEGIES, Query, Searcher, SearchOptions, SearchResult

__all__ = ["LEVELS", "STRATEGIES", "Filters", "Query", "QueryContext", "SearchOptions", "SearchResult", "Searcher"]
