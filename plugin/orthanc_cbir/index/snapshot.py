"""A searcher's local copy of the column blocks, kept current cheaply.

:meth:`IndexSnapshot.refresh` reads the ``generations`` hash (one small read)
and re-reads only the blocks written since the last refresh, so a query after
an insert costs one block (4096 rows), not the whole index. Between refreshes
the snapshot is a set of numpy arrays the strategies scan without Redis.
"""

from __future__ import annotations

import numpy as np

from .schema import ATTRIBUTES, BLOCK_ROWS
from .store import FEATURE_DTYPE, IndexStore


class IndexSnapshot:
    """``features`` (rows, D) float32 (stored as float16), ``codes`` (rows, B/8) uint8 and
    ``attributes``, one contiguous (rows,) array per :data:`~.schema.ATTRIBUTES` field (a
    filter over a million rows reads one column, not a strided field of a record array),
    for every allocated row."""

    def __init__(self, store: IndexStore):
        self.store = store
        self.rows = 0
        self._seen: dict[int, int] = {}
        info = store.info
        self.features = np.zeros((0, info.feature_dim), np.float32)
        self.codes = np.zeros((0, info.code_bytes), np.uint8)
        self.attributes: dict[str, np.ndarray] = {name: np.zeros(0, ATTRIBUTES[name]) for name in ATTRIBUTES.names}

    def refresh(self) -> int:
        """Bring the copy up to date; returns the number of blocks re-read."""
        current = self.store.generations()
        stale = sorted(block for block, generation in current.items() if self._seen.get(block) != generation)
        if not stale:
            return 0
        self._grow((max(current) + 1) * BLOCK_ROWS)
        for block, columns in self.store.read_blocks(stale).items():
            start = block * BLOCK_ROWS
            features = np.frombuffer(columns["features"], FEATURE_DTYPE)
            features = features[: len(features) // self.store.info.feature_dim * self.store.info.feature_dim]
            self._place(self.features, start, features.reshape(-1, self.store.info.feature_dim).astype(np.float32))
            codes = np.frombuffer(columns["codes"], np.uint8)
            self._place(self.codes, start, codes[: len(codes) // self.codes.shape[1] * self.codes.shape[1]]
                        .reshape(-1, self.codes.shape[1]))  # fmt: skip
            raw = columns["attributes"]
            records = np.frombuffer(raw[: len(raw) // ATTRIBUTES.itemsize * ATTRIBUTES.itemsize], ATTRIBUTES)
            for name, column in self.attributes.items():
                self._place(column, start, records[name])
            self._seen[block] = current[block]
        self.rows = len(self.features)
        return len(stale)

    @staticmethod
    def _place(target: np.ndarray, start: int, values: np.ndarray) -> None:
        # a block is written row by row, so its string may be shorter than BLOCK_ROWS rows
        target[start : start + len(values)] = values
        target[start + len(values) : start + BLOCK_ROWS] = 0

    def _grow(self, rows: int) -> None:
        if rows <= len(self.features):
            return
        self.features = _resized(self.features, rows)
        self.codes = _resized(self.codes, rows)
        self.attributes = {name: _resized(column, rows) for name, column in self.attributes.items()}

    @property
    def live(self) -> np.ndarray:
        """Boolean (rows,): rows that are indexed now."""
        return self.attributes["live"] == 1


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *array.shape[1:]), array.dtype)
    out[: len(array)] = array
    return out
