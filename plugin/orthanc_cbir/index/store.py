"""The Redis index of one model version: add, remove, count, read back.

>>> store = IndexStore(redis.Redis(), IndexInfo.from_card(embedder.card))  # doctest: +SKIP
>>> store.add(records).added                                               # doctest: +SKIP
128

Writes for a batch go in one MULTI transaction per shard (the keys of a shard share
one hash tag, so on a Redis Cluster each transaction stays on one master). Adding an
instance that is already indexed is a no-op (its key is watched, so two workers racing
on one instance add it once). Removing an instance clears its ``live`` attribute, its
row mapping and its entry; its row stays a gap.

The layout of the keys and values is :data:`~.schema.LAYOUT` (see :mod:`.schema`);
an index of layout 2 (one scale per row: :class:`~.schema.FeatureQuantizer`) is read and
written as it is, its rows keeping one scale; one written with layout 1 (float16 features, a
hash per instance and multi-index buckets) is refused with :class:`IndexLayoutError`: the key
space is per model version, so re-indexing (``orthanc-cbir reconcile`` or ``backfill`` after
deleting the old ``cbir:{<version>}*`` keys) is the way forward, not a reader of that layout.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import redis
from redis.client import Pipeline

from ..errors import IndexLayoutError
from ..model.codes import CodeLayout
from ..model.embedder import ModelCard, card_path
from ..model.level import LevelEncoding
from ..redis_client import RedisClient, as_bytes, text
from .hamming import MultiIndex
from .regions import RegionIndex, encode_regions
from .schema import (
    ATTRIBUTES,
    BLOCK_ROWS,
    LAYOUT,
    MAX_SHARDS,
    READABLE_LAYOUTS,
    ROWS_PER_MAP,
    FeatureQuantizer,
    IndexRecord,
    KeySpace,
    StoredEntry,
    decode_entry,  # fmt: skip
    encode_entry,
    entry_row,
    shard_of,
)
from .series_levels import Placed, SeriesLevels

FEATURE_DTYPE = np.dtype("i1")
"""Stored features: int8, with a float32 scale per span of each row in the ``scales`` column
(:class:`~.schema.FeatureQuantizer`)."""
SCALE_DTYPE = np.dtype("<f4")
WriteCounters: TypeAlias = tuple[str, tuple[int, ...]]
"""The index's epoch and, per shard, its write count (:meth:`IndexStore.writes`)."""
_FIELDS: Mapping[str, tuple[Any, ...]] = ATTRIBUTES.fields or {}
"""Each attribute's (dtype, byte offset) in an attributes row (a structured dtype always has them)."""


@dataclass(frozen=True)
class IndexInfo:
    """What every row of one index version has in common."""

    version: str
    """The model version (``name@sha256-prefix``): the key space of the index."""
    feature_dim: int
    layout: CodeLayout
    labels: dict[str, tuple[str, ...]]
    level: LevelEncoding | None = None
    """Where the features hold the anatomical level: axial slices are then indexed at their
    series' level (:mod:`.series_levels`); ``None``: features are stored as given."""

    @classmethod
    def from_card(cls, card: ModelCard) -> IndexInfo:
        """From a :class:`~orthanc_cbir.model.embedder.ModelCard`."""
        return cls(card.version, card.embedding_dim, card.code_layout, {h: tuple(n) for h, n in card.labels.items()},
                   card.level)  # fmt: skip

    @classmethod
    def for_model(cls, model_path: str | Path) -> IndexInfo:
        """From the card beside an ONNX model file (no model is loaded)."""
        return cls.from_card(ModelCard.load(card_path(Path(model_path))))

    @property
    def code_bytes(self) -> int:
        return self.layout.bits // 8

    @property
    def multi_index(self) -> MultiIndex:
        searched = next((s for s in self.layout.sub_codes if s.name == "appearance"), None)
        if searched is None:
            return MultiIndex.for_span(0, self.layout.bits)
        return MultiIndex.for_span(searched.start, searched.length)

    @property
    def quantizer(self) -> FeatureQuantizer:
        """How a new index stores the features: the level block, where there is one, has a scale of
        its own (an index of layout 2 keeps one scale per row: :attr:`IndexStore.quantizer`)."""
        return FeatureQuantizer.split(self.feature_dim, (self.level.start, self.level.stop) if self.level else None)


COLUMNS = ("features", "scales", "codes", "attributes")


@dataclass(frozen=True)
class BlockData:
    """One column block of one shard as read: each column's bytes and, per row, its instance."""

    columns: dict[str, bytes]
    uids: list[str | None]
    """SOPInstanceUID of each of the block's :data:`~.schema.BLOCK_ROWS` rows (``None``: a gap)."""


@dataclass(frozen=True)
class AddResult:
    added: int
    duplicates: int


class IndexStore:
    """One model version's index in one Redis database or Redis Cluster, in ``shards`` shards.

    ``shards=None`` takes the shard count the index records (1 for an index not written
    yet); a number is checked against it, and a mismatch raises :class:`IndexLayoutError`
    (so every process agrees where an instance lives). The first :meth:`add` records it."""

    def __init__(self, client: RedisClient, info: IndexInfo, prefix: str = "cbir", shards: int | None = None):
        if shards is not None and not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"an index has 1 to {MAX_SHARDS} shards, not {shards}")
        self.client = client
        self.info = info
        self.prefix = prefix
        self.keys = KeySpace(info.version, prefix)
        """The index's unsharded key space: its ``info`` hash (and, with one shard, every key)."""
        self._asked = shards
        self._shards: int | None = None  # known once the index in Redis says (nothing is asked before a use)
        self._layout = LAYOUT  # the index's own once it says (a new one is written with this)
        self._shard_keys: list[KeySpace] = []
        self.series_levels = None if info.level is None else SeriesLevels(client, self.keys, info.level)
        self.regions = RegionIndex(client, self.keys)

    # -- shards and the recorded layout -----------------------------------------------------

    @property
    def shards(self) -> int:
        """How many shards the index has (as recorded in Redis; before the first write, as asked:
        one read of the ``info`` hash each time until then)."""
        return self._resolve()

    def shard_keys(self, shard: int) -> KeySpace:
        """Key names of one shard."""
        self._resolve()
        return self._shard_keys[shard]

    def _keys_of(self, uid: str, shards: int) -> KeySpace:
        return self._shard_keys[shard_of(uid, shards)]

    def _resolve(self) -> int:
        if self._shards is not None:
            return self._shards
        raw = self.client.hget(self.keys.info, "schema")
        if raw is None:  # nothing written yet: as asked, and looked at again next time
            return self._use(self._asked or 1)
        schema = json.loads(raw)
        layout, shards = schema.get("layout"), schema.get("shards", 1)
        layout = layout if isinstance(layout, int) else 1  # layout 1 kept the code layout (a list) there
        if layout not in READABLE_LAYOUTS:
            readable = ", ".join(map(str, READABLE_LAYOUTS))
            raise IndexLayoutError(
                f"the index {self.keys.base} was written with layout {layout}; this version reads layouts "
                f"{readable} only: delete its keys ({self.keys.base}*) and index again")  # fmt: skip
        if self._asked is not None and shards != self._asked:
            raise IndexLayoutError(
                f"the index {self.keys.base} has {shards} shard(s), this process was told {self._asked} "
                f"(setting index_shards / CBIR_INDEX_SHARDS): set it to {shards}")  # fmt: skip
        self._layout = layout
        self._shards = self._use(shards)
        return shards

    @property
    def layout(self) -> int:
        """The index's layout (:data:`~.schema.READABLE_LAYOUTS`; before its first write, a new one's)."""
        self._resolve()
        return self._layout

    @property
    def quantizer(self) -> FeatureQuantizer:
        """How this index stores its features: layout 2 kept one scale per row, for as long as it lives."""
        return self.info.quantizer if self.layout >= 3 else FeatureQuantizer.split(self.info.feature_dim)

    def column_width(self, column: str) -> int:
        """Bytes per row of a column block."""
        scales = SCALE_DTYPE.itemsize * self.quantizer.scales_per_row
        return {"features": self.info.feature_dim * FEATURE_DTYPE.itemsize, "scales": scales,
                "codes": self.info.code_bytes, "attributes": ATTRIBUTES.itemsize}[column]  # fmt: skip

    def _use(self, shards: int) -> int:
        if len(self._shard_keys) != shards:
            self._shard_keys = [KeySpace.of_shard(self.info.version, self.prefix, shard, shards)
                                for shard in range(shards)]  # fmt: skip
        return shards

    def _write_info(self) -> None:
        shards = self._resolve()
        self.client.hsetnx(self.keys.info, "schema", json.dumps({
            "layout": LAYOUT, "shards": shards, "version": self.info.version, "feature_dim": self.info.feature_dim,
            "layout_of_codes": self.info.layout.to_json(), "labels": self.info.labels, "block_rows": BLOCK_ROWS,
            "rows_per_map": ROWS_PER_MAP,
        }))  # fmt: skip
        # Set once, when the index is made: an index flushed and filled again has another, though its
        # write counters and block generations may be back at the same numbers (IndexSnapshot.refresh).
        self.client.hsetnx(self.keys.info, "epoch", secrets.token_hex(8))
        if self._shards is None:
            self._resolve()  # another process may have written it first: its word counts

    def _locate(self, rows: Iterable[int], shards: int) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (shard, local row)."""
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        return rows % shards, rows // shards

    # -- writes -----------------------------------------------------------------------------

    def add(self, records: Sequence[IndexRecord]) -> AddResult:
        """Index the records not indexed yet; returns how many were added and skipped.

        All or nothing per shard: an instance's key, its row and every column are written
        in one transaction, so a worker killed mid-batch leaves no instance that looks
        indexed but has no row. ``WATCH`` on the instances' keys makes two workers racing
        on one instance add it once: the loser's transaction fails and it looks again.

        When the features hold a level (:attr:`IndexInfo.level`), axial slices are written at
        their series' level, and the series' earlier rows that the batch moves are rewritten
        (:mod:`.series_levels`)."""
        if not records:
            return AddResult(0, 0)
        self._check(records)
        self._write_info()
        placed: list[Placed] = []
        if self.series_levels is not None:
            records, placed = self.series_levels.place(records)
        shards = self.shards
        by_shard: dict[int, list[IndexRecord]] = defaultdict(list)
        for record in records:
            by_shard[shard_of(record.key, shards)].append(record)
        added = sum(self._add_to_shard(shard, group) for shard, group in sorted(by_shard.items()))
        self.regions.put({record.key: encode_regions(record.regions, self._level_block(record.features))
                          for record in records if record.regions is not None})  # fmt: skip
        if self.series_levels is not None and placed:
            moves = self.series_levels.settle(placed)
            rewritten = self._set_levels(moves)
            self.series_levels.moved([m for m, done in zip(moves, rewritten, strict=True) if done],
                                     [m for m, done in zip(moves, rewritten, strict=True) if not done])  # fmt: skip
            level = self.info.level
            if level is not None:  # a moved slice's regions move with it (those without regions are skipped)
                self.regions.set_levels({m.sop_instance_uid: level.encode(np.array([m.level_mm]))[0]
                                         for m, done in zip(moves, rewritten, strict=True) if done})  # fmt: skip
        return AddResult(added=added, duplicates=len(records) - added)

    def _level_block(self, features: np.ndarray) -> np.ndarray:
        """The level block a record's region entries carry: its level as :meth:`LevelEncoding.encode`
        writes it (what :meth:`_set_levels` writes too when the slice moves); empty without a level."""
        level = self.info.level
        if level is None:
            return np.zeros(0, np.float32)
        return level.encode(level.decode(features[None]))[0]

    def _set_levels(self, moves: Sequence[Placed]) -> list[bool]:
        """Rewrite the level block of each moved slice's row (the other dims kept, the row
        requantised); per move, whether its slice is indexed (a removed one is skipped)."""
        level = self.info.level
        if not moves or level is None:
            return [False] * len(moves)
        shards = self.shards
        widths = {column: self.column_width(column) for column in ("features", "scales")}
        look = self.client.pipeline(transaction=False)
        for move in moves:
            look.get(self._keys_of(move.sop_instance_uid, shards).instance(move.sop_instance_uid))
        rows = [None if raw is None else entry_row(as_bytes(raw)) for raw in look.execute()]
        found = [(self._keys_of(move.sop_instance_uid, shards), *divmod(row, BLOCK_ROWS), move.level_mm)
                 for move, row in zip(moves, rows, strict=True) if row is not None]  # fmt: skip
        if not found:
            return [False] * len(moves)
        read = self.client.pipeline(transaction=False)
        for keys, block, slot, _ in found:
            for column, width in widths.items():
                read.getrange(keys.block(column, block), slot * width, (slot + 1) * width - 1)
        raw = [as_bytes(value) for value in read.execute()]
        quantizer = self.quantizer
        stored = quantizer.dequantize(np.frombuffer(b"".join(raw[0::2]), FEATURE_DTYPE).reshape(len(found), -1),
                                      np.frombuffer(b"".join(raw[1::2]), SCALE_DTYPE).reshape(len(found), -1))
        levels = np.array([level_mm for *_, level_mm in found])
        quantized, scales = quantizer.quantize(level.with_levels(stored, levels))
        by_shard: dict[str, list[int]] = defaultdict(list)  # one transaction per shard: one hash tag each
        for n, (keys, *_) in enumerate(found):
            by_shard[keys.base].append(n)
        for members in by_shard.values():
            write = self.client.pipeline(transaction=True)
            for n in members:
                keys, block, slot, _ = found[n]
                write.setrange(keys.block("features", block), slot * widths["features"], quantized[n].tobytes())
                write.setrange(keys.block("scales", block), slot * widths["scales"],
                               scales[n].astype(SCALE_DTYPE).tobytes())  # fmt: skip
                write.hincrby(keys.generations, block, 1)
            write.incr(found[members[0]][0].writes)
            write.execute()
        return [row is not None for row in rows]

    def _add_to_shard(self, shard: int, records: list[IndexRecord]) -> int:
        keys = self._shard_keys[shard]
        first = int(self.client.incrby(keys.next_row, len(records))) - len(records)
        rows = range(first, first + len(records))  # a duplicate's row stays a gap (no live attribute)
        names = [keys.instance(record.key) for record in records]
        blocks = sorted({row // BLOCK_ROWS for row in rows})
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*names)
                    look = self.client.pipeline(transaction=False)
                    for name in names:
                        look.exists(name)
                    for block in blocks:
                        look.exists(keys.block("features", block))
                    there = look.execute()
                    seen: set[str] = set()  # an instance twice in one batch is added once
                    new = []
                    for record, row, indexed in zip(records, rows, there, strict=False):  # there: names, then blocks
                        if not indexed and record.key not in seen:
                            seen.add(record.key)
                            new.append((record, row))
                    missing = {block for block, exists in zip(blocks, there[len(names):], strict=True) if not exists}
                    pipe.multi()
                    if new:
                        self._write_rows(pipe, keys, new, missing)
                    pipe.execute()
                    return len(new)
                except redis.WatchError:
                    continue

    def _check(self, records: Sequence[IndexRecord]) -> None:
        for record in records:
            if record.features.shape != (self.info.feature_dim,) or record.code.shape != (self.info.code_bytes,):
                raise ValueError(f"record {record.key} has features {record.features.shape} and code "
                                 f"{record.code.shape}; this index holds ({self.info.feature_dim},) and "
                                 f"({self.info.code_bytes},)")  # fmt: skip

    def _write_rows(self, pipe: Pipeline, keys: KeySpace, new: list[tuple[IndexRecord, int]],
                    missing: set[int]) -> None:  # fmt: skip
        """Queue the writes of new (record, local row) pairs of one shard in its transaction;
        ``missing``: blocks that may not exist yet, created at full size first."""
        heads = tuple(self.info.labels)
        quantized, scales = self.quantizer.quantize(np.stack([record.features for record, _ in new]))
        columns = {
            "features": [row.tobytes() for row in quantized],
            "scales": [row.tobytes() for row in scales.astype(SCALE_DTYPE)],
            "codes": [np.asarray(record.code, np.uint8).tobytes() for record, _ in new],
            "attributes": [record.attributes(heads).tobytes() for record, _ in new],
        }
        rows = np.array([row for _, row in new])
        widths = {column: self.column_width(column) for column in COLUMNS}
        for block in sorted(missing & set((rows // BLOCK_ROWS).tolist())):
            for column in COLUMNS:  # SET NX: a block another worker made meanwhile is kept
                pipe.set(keys.block(column, block), bytes(BLOCK_ROWS * widths[column]), nx=True)
        for first, last in _runs(rows):  # consecutive rows of one block: one SETRANGE per column
            block, slot = divmod(int(rows[first]), BLOCK_ROWS)
            for column, payloads in columns.items():
                pipe.setrange(keys.block(column, block), slot * widths[column], b"".join(payloads[first:last]))
        maps: dict[int, dict[int, str]] = defaultdict(dict)
        for record, row in new:
            pipe.set(keys.instance(record.key), encode_entry(record, row))
            maps[row // ROWS_PER_MAP][row % ROWS_PER_MAP] = record.key
        for number, mapping in maps.items():
            pipe.hset(keys.rows(number), mapping=dict[Any, Any](mapping))  # redis-py's Mapping: invariant key type
        pipe.incrby(keys.count, len(new))
        for block in np.unique(rows // BLOCK_ROWS):
            pipe.hincrby(keys.generations, int(block), 1)
        pipe.incr(keys.writes)

    def remove(self, sop_instance_uid: str) -> bool:
        """Take an instance out of every answer; False if it was not indexed."""
        keys = self._keys_of(sop_instance_uid, self.shards)
        name = keys.instance(sop_instance_uid)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(name)  # two removers of one instance: one of them counts it
                    raw = pipe.get(name)
                    if raw is None:
                        return False
                    row = entry_row(as_bytes(raw))
                    block, slot = divmod(row, BLOCK_ROWS)
                    series = None  # decoding the entry is needed only to find its series' levels
                    if self.series_levels is not None:
                        series = decode_entry(sop_instance_uid, as_bytes(raw)).metadata.series_instance_uid
                    pipe.multi()
                    live_offset = slot * ATTRIBUTES.itemsize + _FIELDS["live"][1]
                    pipe.setrange(keys.block("attributes", block), live_offset, b"\x00")
                    pipe.delete(name)
                    pipe.hdel(keys.rows(row // ROWS_PER_MAP), row % ROWS_PER_MAP)
                    pipe.decr(keys.count)
                    pipe.hincrby(keys.generations, block, 1)
                    pipe.incr(keys.writes)
                    pipe.execute()
                    self.regions.remove([sop_instance_uid])
                    # after, not inside, the shard's transaction: the series' key has another hash tag
                    if self.series_levels is not None and series:
                        self.series_levels.forget(series, sop_instance_uid)
                    return True
                except redis.WatchError:
                    continue

    def set_attribute(self, rows: np.ndarray, name: str, values: np.ndarray) -> None:
        """Overwrite one attribute of many rows (global rows, e.g. ``cluster`` after re-clustering)."""
        kind, offset = _FIELDS[name][:2]
        encoded = np.asarray(values, dtype=kind)
        shards, local = self._locate(rows, self.shards)
        for shard in np.unique(shards):
            keys = self._shard_keys[int(shard)]
            pipe = self.client.pipeline(transaction=True)
            blocks = set()
            for row, value in zip(local[shards == shard], encoded[shards == shard], strict=True):
                block, slot = divmod(int(row), BLOCK_ROWS)
                blocks.add(block)
                pipe.setrange(keys.block("attributes", block), slot * ATTRIBUTES.itemsize + offset, value.tobytes())
            for block in blocks:
                pipe.hincrby(keys.generations, block, 1)
            pipe.incr(keys.writes)
            pipe.execute()

    # -- reads ------------------------------------------------------------------------------

    def row(self, sop_instance_uid: str) -> int | None:
        """The instance's global row (``None`` when it is not indexed)."""
        shards = self.shards
        shard = shard_of(sop_instance_uid, shards)
        raw = self.client.get(self._shard_keys[shard].instance(sop_instance_uid))
        return None if raw is None else entry_row(as_bytes(raw)) * shards + shard

    def contains(self, sop_instance_uid: str) -> bool:
        return bool(self.client.exists(self._keys_of(sop_instance_uid, self.shards).instance(sop_instance_uid)))

    def indexed(self, sop_instance_uids: Sequence[str]) -> list[bool]:
        """:meth:`contains` of many instances (one pipeline)."""
        if not sop_instance_uids:
            return []
        shards = self.shards
        pipe = self.client.pipeline(transaction=False)
        for uid in sop_instance_uids:
            pipe.exists(self._keys_of(uid, shards).instance(uid))
        return [bool(x) for x in pipe.execute()]

    def count(self) -> int:
        """Instances indexed now (O(shards))."""
        return sum(self._per_shard(lambda pipe, keys: pipe.get(keys.count)))

    def stats(self) -> dict:
        """Count, rows ever allocated, blocks, shards and the layout (all O(shards) reads)."""
        allocated = self._per_shard(lambda pipe, keys: pipe.get(keys.next_row))
        return {"version": self.info.version, "instances": self.count(), "rows_allocated": sum(allocated),
                "blocks": sum(-(-n // BLOCK_ROWS) for n in allocated), "shards": self.shards,
                "feature_dim": self.info.feature_dim, "code_bits": self.info.layout.bits,
                "layout": self.layout}  # fmt: skip

    def _per_shard(self, command: Callable[[Pipeline, KeySpace], object]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            command(pipe, self._shard_keys[shard])
        return [int(value or 0) for value in pipe.execute()]

    def sop_uids(self, rows: Iterable[int]) -> list[str | None]:
        """The SOPInstanceUID of each global row (``None`` for a gap or a removed instance)."""
        shards, local = self._locate(rows, self.shards)
        if not len(local):
            return []
        pipe = self.client.pipeline(transaction=False)
        for shard, row in zip(shards.tolist(), local.tolist(), strict=True):
            pipe.hget(self._shard_keys[shard].rows(row // ROWS_PER_MAP), row % ROWS_PER_MAP)
        return [v.decode() if v else None for v in pipe.execute()]

    def describe(self, sop_instance_uids: Sequence[str]) -> list[StoredEntry | None]:
        """The stored entry of each instance, its row the global row (``None`` if absent); one round trip."""
        if not sop_instance_uids:
            return []
        keys = self._entry_keys(sop_instance_uids)
        # one MGET, not a GET per hit: redis-py packs each command in Python (~15 us apiece); a
        # cluster's (redis-py's mget_nonatomic, a LazyCluster's too) is one per slot, and a shard's
        # keys share one slot (one hash tag)
        mget = getattr(self.client, "mget_nonatomic", None) or self.client.mget
        return self._decoded(sop_instance_uids, mget(keys))

    def describe_with_writes(self, sop_instance_uids: Sequence[str]) -> tuple[list[StoredEntry | None], WriteCounters]:
        """:meth:`describe` and :meth:`writes` in one round trip (two on a Redis Cluster, whose
        pipelines take no MGET of keys in several slots): an answer ranked on a searcher's copy
        reads its hits and learns whether the index moved since that copy's refresh together."""
        if not sop_instance_uids or hasattr(self.client, "mget_nonatomic"):
            return self.describe(sop_instance_uids), self.writes()
        pipe = self.client.pipeline(transaction=False)
        pipe.mget(self._entry_keys(sop_instance_uids))
        self._queue_writes(pipe)
        raws, *writes = pipe.execute()
        return self._decoded(sop_instance_uids, raws), self._writes_of(writes)

    def _entry_keys(self, sop_instance_uids: Sequence[str]) -> list[str]:
        count = self.shards
        return [self._shard_keys[shard_of(uid, count)].instance(uid) for uid in sop_instance_uids]

    def _decoded(self, sop_instance_uids: Sequence[str], raws: Sequence[bytes | str | None]
                 ) -> list[StoredEntry | None]:  # fmt: skip
        """Entries as read, each with its global row (``None`` where absent)."""
        count = self.shards
        out: list[StoredEntry | None] = []
        for uid, raw in zip(sop_instance_uids, raws, strict=True):
            out.append(None if raw is None else decode_entry(uid, as_bytes(raw), count, shard_of(uid, count)))
        return out

    def read_blocks(self, blocks: Sequence[tuple[int, int]]) -> dict[tuple[int, int], BlockData]:
        """Raw column blocks (missing ones as empty bytes) and the SOPInstanceUIDs of their rows,
        by (shard, block number); one round trip."""
        self._resolve()
        pipe = self.client.pipeline(transaction=False)
        maps: list[range] = []
        for shard, block in blocks:
            for column in COLUMNS:
                pipe.get(self._shard_keys[shard].block(column, block))
            # the row maps covering the block's local rows (a map may straddle two blocks)
            numbers = range(block * BLOCK_ROWS // ROWS_PER_MAP, ((block + 1) * BLOCK_ROWS - 1) // ROWS_PER_MAP + 1)
            maps.append(numbers)
            for number in numbers:
                pipe.hgetall(self._shard_keys[shard].rows(number))
        raw = pipe.execute()
        out, at = {}, 0
        for (shard, block), numbers in zip(blocks, maps, strict=True):
            columns = {column: raw[at + j] or b"" for j, column in enumerate(COLUMNS)}
            at += len(COLUMNS)
            uids: list[str | None] = [None] * BLOCK_ROWS
            for number in numbers:
                for slot, uid in raw[at].items():
                    local = number * ROWS_PER_MAP + int(slot)
                    if block * BLOCK_ROWS <= local < (block + 1) * BLOCK_ROWS:
                        uids[local - block * BLOCK_ROWS] = uid.decode()
                at += 1
            out[(shard, block)] = BlockData(columns, uids)
        return out

    def set_centroids(self, centroids: np.ndarray) -> None:
        """Keep the (clusters, D) float32 centroids of a re-clustering (``cluster`` strategy)."""
        self.client.hset(self.keys.info, "centroids", np.asarray(centroids, np.float32).tobytes())

    def centroids_raw(self) -> bytes | None:
        """The kept centroids as stored (``None`` before the first clustering): a reader caches the
        array decoded from them and decodes again only when these bytes change."""
        raw = self.client.hget(self.keys.info, "centroids")
        return None if raw is None else as_bytes(raw)

    def writes(self) -> WriteCounters:
        """The index's epoch (``""`` before its first write) and, per shard, how many writes have
        moved a block's generation, in one round trip: both unchanged, nothing to re-read."""
        pipe = self.client.pipeline(transaction=False)
        self._queue_writes(pipe)
        return self._writes_of(pipe.execute())

    def _queue_writes(self, pipe: Pipeline) -> None:
        pipe.hget(self.keys.info, "epoch")
        for shard in range(self.shards):
            pipe.get(self._shard_keys[shard].writes)

    @staticmethod
    def _writes_of(replies: Sequence[Any]) -> WriteCounters:
        epoch, *counts = replies
        return (text(epoch) if epoch else ""), tuple(int(count or 0) for count in counts)

    def generations(self) -> dict[tuple[int, int], int]:
        """(shard, block number) -> write count, of every block of every shard."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.hgetall(self._shard_keys[shard].generations)
        return {(shard, int(k)): int(v) for shard, answer in enumerate(pipe.execute()) for k, v in answer.items()}


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) index ranges of ``rows`` that are consecutive and inside one block."""
    breaks = np.flatnonzero((np.diff(rows) != 1) | (rows[1:] // BLOCK_ROWS != rows[:-1] // BLOCK_ROWS)) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:], strict=True))
