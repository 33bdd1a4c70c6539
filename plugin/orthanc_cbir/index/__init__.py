"""The Redis index: schema and key layout (:mod:`.schema`), writes (:mod:`.store`),
multi-index hashing (:mod:`.hamming`) and a searcher's cached copy (:mod:`.snapshot`)."""

from .schema import IndexRecord, KeySpace
from .snapshot import IndexSnapshot
from .store import AddResult, IndexInfo, IndexLayoutError, IndexStore

__all__ = ["AddResult", "IndexInfo", "IndexLayoutError", "IndexRecord", "IndexSnapshot", "IndexStore", "KeySpace"]
