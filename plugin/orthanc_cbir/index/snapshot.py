"""A searcher's local copy of the column blocks, kept current cheaply.

:meth:`IndexSnapshot.refresh` reads the ``generations`` hash of each shard (one
small read each) and re-reads only the blocks written since the last refresh, so a
query after an insert costs one block (4096 rows), not the whole index. Between
refreshes the snapshot is a set of numpy arrays the strategies scan without Redis.

Rows are global rows: shard ``s`` of ``S``'s block ``b`` holds the global rows
``(b * BLOCK_ROWS + i) * S + s``, so the shards' rows interleave and every strategy
works on one set of arrays whatever ``S``.

Features stay int8 (``quantized``, with float32 ``scales`` per span of each row): a float32
copy of 10^7 rows would take 20 GB. :meth:`IndexSnapshot.similarities` computes
dot products from them in chunks and :meth:`IndexSnapshot.vectors` dequantizes the
rows it is given. The snapshot also knows each row's SOPInstanceUID (read with its
block), so that an answer reads its hits' entries in one round trip, and keeps the last
:data:`ENTRY_CACHE` entries it decoded (:meth:`IndexSnapshot.entries`): an entry never changes
while its instance stays indexed, and a reader paging through an answer, changing a filter or
opening the same study again asks for the same hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .schema import ATTRIBUTES, BLOCK_ROWS, FeatureQuantizer, StoredEntry
from .store import FEATURE_DTYPE, SCALE_DTYPE, IndexInfo, IndexStore, WriteCounters

CHUNK_ROWS = 65536
"""Rows whose int8 features one step of :meth:`IndexSnapshot.similarities` converts at a time."""
READ_BLOCKS = 8
"""Blocks read from Redis per round trip while refreshing (bounds the bytes in flight)."""
UID_BYTES = 64
"""Width of the SOPInstanceUID column: a DICOM UID has at most 64 characters (a longer key widens it)."""
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)  # 64-bit FNV-1a's
ENTRY_CACHE = 8192
"""Decoded entries kept (a few MB): the oldest half goes when it is full."""


class IndexSnapshot:
    """For every allocated global row: ``quantized`` (rows, D) int8 and ``scales`` (rows, spans)
    float32 (the row's features, :attr:`quantizer`), ``codes`` (rows, B/8) uint8
    and ``attributes``, one contiguous (rows,) array per :data:`~.schema.ATTRIBUTES` field
    (a filter over a million rows reads one column, not a strided field of a record array).

    The arrays are views of buffers that grow geometrically, so a new block costs a
    copy of the index only now and then."""

    def __init__(self, store: IndexStore | None, info: IndexInfo | None = None):
        """``store``: the index this copies. ``None`` (with ``info``) for a snapshot built from
        arrays (:meth:`from_arrays`), which :meth:`refresh` leaves as it is."""
        if info is None:
            if store is None:
                raise ValueError("a snapshot without a store needs the index's info")
            info = store.info
        self.store = store
        self.info = info
        self.quantizer = info.quantizer
        self.rows = 0
        self.generation = 0
        """Counts the refreshes that changed anything: what a cache of derived columns is keyed on."""
        self._seen: dict[tuple[int, int], int] = {}
        self._entries: dict[int, StoredEntry] = {}
        """Decoded entries by global row, oldest first."""
        self._writes: WriteCounters | None = None
        """The index's epoch and per-shard write counts as of the last refresh (:meth:`IndexStore.writes`)."""
        self._live: tuple[tuple[int, int], np.ndarray, int] = ((-1, -1), np.zeros(0, bool), 0)
        """(generation, rows) it was made at, :attr:`live` and :attr:`live_count`."""
        self.resets = 0
        """Times the index turned out to be another one (flushed and made again) and everything was re-read."""
        info = self.info
        self._capacity = 0
        names: tuple[str, ...] = ATTRIBUTES.names or ()
        self._buffers: dict[str, np.ndarray] = {
            "quantized": np.zeros((0, info.feature_dim), FEATURE_DTYPE),
            "scales": np.zeros((0, self.quantizer.scales_per_row), np.float32),
            "codes": np.zeros((0, info.code_bytes), np.uint8),
            "uids": np.zeros(0, f"S{UID_BYTES}"),
            **{f"attribute:{name}": np.zeros(0, ATTRIBUTES[name]) for name in names},
        }
        self._views()

    def _views(self) -> None:
        self.quantized = self._buffers["quantized"][: self.rows]
        self.scales = self._buffers["scales"][: self.rows]
        self.codes = self._buffers["codes"][: self.rows]
        self._uids = self._buffers["uids"][: self.rows]
        self.attributes: dict[str, np.ndarray] = {name: self._buffers[f"attribute:{name}"][: self.rows]
                                                  for name in ATTRIBUTES.names or ()}  # fmt: skip

    def refresh(self, writes: WriteCounters | None = None) -> int:
        """Bring the copy up to date; returns the number of blocks re-read. ``writes``: the write
        counters (:meth:`IndexStore.writes`) as just read with something else, not read again."""
        if self.store is None:  # built from arrays: nothing to read
            return 0
        if writes is None:
            writes = self.store.writes()  # before the generations: a write between the two is seen next time
        if writes == self._writes:
            return 0
        if self._writes is not None and writes[0] != self._writes[0]:
            self._forget()
        current = self.store.generations()
        self._use_quantizer(self.store.quantizer)
        stale = sorted(key for key, generation in current.items() if self._seen.get(key) != generation)
        if not stale:
            self._writes = writes
            return 0
        shards = self.store.shards
        self._grow((max(block for _, block in current) + 1) * BLOCK_ROWS * shards)
        dim = self.info.feature_dim
        for start in range(0, len(stale), READ_BLOCKS):
            for (shard, block), data in self.store.read_blocks(stale[start : start + READ_BLOCKS]).items():
                columns = data.columns
                # shard s's block b: global rows (b * BLOCK_ROWS + i) * S + s
                where = slice(block * BLOCK_ROWS * shards + shard, (block + 1) * BLOCK_ROWS * shards, shards)
                self._place("quantized", where, _rows(columns["features"], FEATURE_DTYPE, dim))
                self._place("scales", where, _rows(columns["scales"], SCALE_DTYPE, self.quantizer.scales_per_row))
                self._place("codes", where, _rows(columns["codes"], np.uint8, self.codes.shape[1]))
                records = _rows(columns["attributes"], ATTRIBUTES)
                for name in ATTRIBUTES.names or ():
                    self._place(f"attribute:{name}", where, records[name])
                self._place("uids", where, self._uid_column(data.uids))
                self._seen[(shard, block)] = current[(shard, block)]
        self._writes = writes
        self.generation += 1
        return len(stale)

    def _use_quantizer(self, quantizer: FeatureQuantizer) -> None:
        """Read the index's scales as it stores them (an index of layout 2 has one a row): on the
        first refresh, or when the index turned out to be another one; every block is read again."""
        if quantizer == self.quantizer:
            return
        self.quantizer = quantizer
        self._buffers["scales"] = np.zeros((self._capacity, quantizer.scales_per_row), np.float32)
        self._seen.clear()
        self._views()

    @classmethod
    def from_arrays(cls, info: IndexInfo, features: np.ndarray, codes: np.ndarray, attributes: np.ndarray,
                    uids: Sequence[str | None] | None = None) -> IndexSnapshot:  # fmt: skip
        """A snapshot of rows given as arrays, without Redis: ``features`` (n, D) float, ``codes``
        (n, B/8) uint8, ``attributes`` (n,) of :data:`~.schema.ATTRIBUTES` (``IndexRecord.attributes``),
        ``uids`` the rows' SOPInstanceUIDs. The strategies rank it as they rank an index (tests, benchmarks)."""
        rows = len(features)
        snapshot = cls(None, info)
        snapshot._grow(rows)
        everything = slice(0, rows)
        quantized, scales = snapshot.quantizer.quantize(np.asarray(features, np.float32))
        snapshot._place("quantized", everything, quantized)
        snapshot._place("scales", everything, scales)
        snapshot._place("codes", everything, np.asarray(codes, np.uint8))
        for name in ATTRIBUTES.names or ():
            snapshot._place(f"attribute:{name}", everything, attributes[name])
        snapshot._place("uids", everything, snapshot._uid_column(list(uids) if uids is not None else [None] * rows))
        snapshot.generation = 1
        return snapshot

    def _forget(self) -> None:
        """Drop every row: the index is another one now (its epoch moved), and its blocks'
        generations say nothing about what this copy holds."""
        for array in self._buffers.values():
            array[...] = np.zeros((), array.dtype)
        self._seen.clear()
        self._entries.clear()
        self.rows = 0
        self._views()
        self.resets += 1
        self.generation += 1

    def _place(self, buffer: str, where: slice, values: np.ndarray) -> None:
        # a block may be shorter than BLOCK_ROWS rows: the rest of its rows are zero
        target = self._buffers[buffer][where]
        target[: len(values)] = values
        target[len(values) :] = np.zeros((), target.dtype)

    def _grow(self, rows: int) -> None:
        if rows <= self.rows:
            return
        if rows > self._capacity:
            self._capacity = max(rows, self._capacity + self._capacity // 2)
            self._buffers = {name: _resized(array, self._capacity) for name, array in self._buffers.items()}
        self.rows = rows
        self._views()

    def _uid_column(self, uids: list[str | None]) -> np.ndarray:
        encoded = [uid.encode() if uid else b"" for uid in uids]
        width = max((len(uid) for uid in encoded), default=0)
        if width > self._buffers["uids"].dtype.itemsize:  # a key longer than a DICOM UID: widen the column
            self._buffers["uids"] = self._buffers["uids"].astype(f"S{width}")
            self._views()
        return np.asarray(encoded, dtype=self._buffers["uids"].dtype)

    def sop_uids(self, rows: ArrayLike) -> list[str | None]:
        """The SOPInstanceUID of each row as of the last refresh (``None``: a gap or a removed instance)."""
        return [uid.decode() if uid else None for uid in np.take(self._uids, np.asarray(rows, dtype=np.int64))]

    def uid_fingerprints(self, rows: ArrayLike) -> np.ndarray:
        """uint64 per row: a hash of its SOPInstanceUID as of the last refresh (a gap's is the empty
        UID's): what a graph written by another process (:mod:`.graph_file`) checks that a node's
        row still holds the instance it was linked in for."""
        uids = np.take(self._uids, np.asarray(rows, dtype=np.int64))
        width = -(-uids.dtype.itemsize // 8) * 8  # whole words
        words = np.frombuffer(uids.astype(f"S{width}").tobytes(), "<u8").reshape(len(uids), width // 8)
        fingerprints = np.full(len(uids), _FNV_OFFSET, np.uint64)
        for word in words.T:  # FNV-1a over 64-bit words (wrapping); the padding's zero words left out,
            # so a column widened for a longer key gives every UID the fingerprint it has in another process
            fingerprints = np.where(word != 0, (fingerprints ^ word) * _FNV_PRIME, fingerprints)
        return fingerprints

    def refresh_reading(self, sop_instance_uids: Sequence[str]) -> list[StoredEntry | None]:
        """:meth:`refresh`, and the stored entries of ``sop_instance_uids`` read with the write
        counters it compares: one round trip while the index stands still."""
        if self.store is None:
            raise ValueError("a snapshot built from arrays has no stored entries")
        entries, writes = self.store.describe_with_writes(sop_instance_uids)
        self.refresh(writes)
        return entries

    def entries(self, rows: ArrayLike) -> list[StoredEntry | None]:
        """The stored entry of each row (``None``: not an indexed instance as of the last refresh, or
        removed since); the rows not decoded before are read in one round trip."""
        return self._entries_of(rows, check_writes=False)[0]

    def entries_checking_writes(self, rows: ArrayLike) -> tuple[list[StoredEntry | None], WriteCounters]:
        """:meth:`entries`, and the index's write counters read in the same round trip: an answer
        ranked on this copy reads its hits and learns whether it must be ranked again at once
        (:meth:`is_current`; :meth:`refresh` takes them as read)."""
        entries, writes = self._entries_of(rows, check_writes=True)
        assert writes is not None  # read whenever they are asked for
        return entries, writes

    def forget_entries(self) -> None:
        """Drop the decoded entries kept from earlier answers: what a benchmark does before each
        query it times, so that a hit's entry is read as a new query's would be."""
        self._entries.clear()

    def is_current(self, writes: WriteCounters) -> bool:
        """Whether write counters read since the last refresh are those it read: nothing moved."""
        return writes == self._writes

    def _entries_of(self, rows: ArrayLike, check_writes: bool) -> tuple[list[StoredEntry | None], WriteCounters | None]:
        rows = np.asarray(rows, dtype=np.int64)
        uids = self.sop_uids(rows)
        live = np.take(self.attributes["live"], rows) == 1
        out: list[StoredEntry | None] = [None] * len(rows)
        missing: list[int] = []
        for i, (row, uid, indexed) in enumerate(zip(rows.tolist(), uids, live.tolist(), strict=True)):
            if not uid or not indexed:
                continue
            cached = self._entries.get(row)
            if cached is not None and cached.sop_instance_uid == uid:  # the row was not reused since
                out[i] = cached
            else:
                missing.append(i)
        writes = None
        if missing or check_writes:
            if self.store is None:
                raise ValueError("a snapshot built from arrays has no stored entries")
            wanted = [uids[i] or "" for i in missing]
            if check_writes:
                read, writes = self.store.describe_with_writes(wanted)
            else:
                read = self.store.describe(wanted)
            for i, entry in zip(missing, read, strict=True):
                out[i] = entry
                if entry is not None and entry.row == rows[i]:
                    self._entries[int(rows[i])] = entry
            if len(self._entries) > ENTRY_CACHE:
                for row in list(islice(self._entries, len(self._entries) - ENTRY_CACHE // 2)):
                    self._entries.pop(row, None)
        return out, writes

    @property
    def epoch(self) -> str:
        """The index's epoch as of the last refresh (``""`` before it, or before the index's first
        write): another one once the index was flushed and made again."""
        return self._writes[0] if self._writes is not None else ""

    @property
    def refreshed(self) -> bool:
        """Whether :meth:`refresh` read the index at least once."""
        return self._writes is not None

    @property
    def live(self) -> np.ndarray:
        """Boolean (rows,), read-only: rows that are indexed now. Made once per refresh that moved
        anything (a comparison over every row: 30 us a query at 10^6 rows, twice)."""
        return self._live_and_count()[0]

    @property
    def live_count(self) -> int:
        """How many rows are indexed now."""
        return self._live_and_count()[1]

    def _live_and_count(self) -> tuple[np.ndarray, int]:
        key, live, count = self._live
        if key != (self.generation, self.rows):
            live = self.attributes["live"] == 1
            live.flags.writeable = False  # shared by every caller until the next refresh
            key, count = (self.generation, self.rows), int(np.count_nonzero(live))
            self._live = (key, live, count)
        return live, count

    def vectors(self, rows: ArrayLike) -> np.ndarray:
        """float32 (n, D): the dequantized features of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.quantizer.dequantize(np.take(self.quantized, rows, axis=0), np.take(self.scales, rows, axis=0))

    def similarities(self, query: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """float32: the dot product of ``query`` (D,) with the features of ``rows`` (every row
        when ``None``), ``CHUNK_ROWS`` rows at a time: a scan of 10^6 rows never holds their
        float32 features."""
        query = np.asarray(query, np.float32).ravel()
        if rows is None:
            out = np.empty(self.rows, np.float32)
            for start in range(0, self.rows, CHUNK_ROWS):
                rows_here = slice(start, start + CHUNK_ROWS)
                out[rows_here] = self.quantizer.dot(self.quantized[rows_here], self.scales[rows_here], query)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > self.rows // 4:  # most rows: one pass in place beats gathering copies
            return self.similarities(query)[rows]
        out = np.empty(len(rows), np.float32)
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            # np.take gathers whole rows five times faster than fancy indexing
            gathered = np.take(self.quantized, chunk, axis=0)
            out[start : start + len(chunk)] = self.quantizer.dot(gathered, np.take(self.scales, chunk, axis=0), query)
        return out


def _rows(raw: bytes, dtype: DTypeLike, width: int | None = None) -> np.ndarray:
    """A block's bytes as whole rows of ``dtype`` (``width`` values per row)."""
    itemsize = np.dtype(dtype).itemsize * (width or 1)
    values = np.frombuffer(raw[: len(raw) // itemsize * itemsize], dtype)
    return values if width is None else values.reshape(-1, width)


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *array.shape[1:]), array.dtype)
    out[: len(array)] = array
    return out
