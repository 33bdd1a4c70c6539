"""The Redis index of one model version: add, remove, count, read back.

>>> store = IndexStore(redis.Redis(), IndexInfo.from_card(embedder.card))  # doctest: +SKIP
>>> store.add(records).added                                               # doctest: +SKIP
128

Writes for a batch go in one MULTI transaction. Adding an instance that is
already indexed is a no-op (its key is watched, so two workers racing on one
instance add it once). Removing an instance clears its ``live``
attribute and its row mapping; its multi-index bucket entries stay behind and
are skipped by every search until ``compact`` rewrites them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from ..model.codes import CodeLayout
from ..model.embedder import ModelCard, card_path
from .hamming import MultiIndex, bucket_writes
from .schema import ATTRIBUTES, BLOCK_ROWS, IndexRecord, KeySpace

FEATURE_DTYPE = np.dtype("<f2")


@dataclass(frozen=True)
class IndexInfo:
    """What every row of one index version has in common."""

    version: str
    """The model version (``name@sha256-prefix``): the key space of the index."""
    feature_dim: int
    layout: CodeLayout
    labels: dict[str, tuple[str, ...]]

    @classmethod
    def from_card(cls, card) -> IndexInfo:
        """From a :class:`~orthanc_cbir.model.embedder.ModelCard`."""
        return cls(card.version, card.embedding_dim, card.code_layout, {h: tuple(n) for h, n in card.labels.items()})

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

    def column_width(self, column: str) -> int:
        """Bytes per row of a column block."""
        return {"features": self.feature_dim * FEATURE_DTYPE.itemsize, "codes": self.code_bytes,
                "attributes": ATTRIBUTES.itemsize}[column]  # fmt: skip


COLUMNS = ("features", "codes", "attributes")


@dataclass(frozen=True)
class AddResult:
    added: int
    duplicates: int


class IndexStore:
    """One model version's index in one Redis database."""

    def __init__(self, client, info: IndexInfo, prefix: str = "cbir"):
        self.client = client
        self.info = info
        self.keys = KeySpace(info.version, prefix)
        self.multi_index = info.multi_index

    def add(self, records: Sequence[IndexRecord]) -> AddResult:
        """Index the records not indexed yet; returns how many were added and skipped.

        All or nothing: an instance's key, its row and every column are written in one
        transaction, so a worker killed mid-batch leaves no instance that looks indexed
        but has no row. ``WATCH`` on the instances' keys makes two workers racing on one
        instance add it once: the loser's transaction fails and it looks again."""
        if not records:
            return AddResult(0, 0)
        self._check(records)
        self._write_info()
        first = int(self.client.incrby(self.keys.next_row, len(records))) - len(records)
        rows = range(first, first + len(records))  # a duplicate's row stays a gap (no live attribute)
        keys = [self.keys.instance(record.key) for record in records]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*keys)
                    look = self.client.pipeline(transaction=False)
                    for key in keys:
                        look.exists(key)
                    seen = set()  # an instance twice in one batch is added once
                    new = [(record, row) for record, row, there in zip(records, rows, look.execute())
                           if not there and not (record.key in seen or seen.add(record.key))]  # fmt: skip
                    pipe.multi()
                    if new:
                        self._write_rows(pipe, new)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return AddResult(added=len(new), duplicates=len(records) - len(new))

    def _check(self, records: Sequence[IndexRecord]) -> None:
        for record in records:
            if record.features.shape != (self.info.feature_dim,) or record.code.shape != (self.info.code_bytes,):
                raise ValueError(f"record {record.key} has features {record.features.shape} and code "
                                 f"{record.code.shape}; this index holds ({self.info.feature_dim},) and "
                                 f"({self.info.code_bytes},)")  # fmt: skip

    def _write_info(self) -> None:
        self.client.hsetnx(self.keys.info, "schema", json.dumps({
            "version": self.info.version, "feature_dim": self.info.feature_dim, "layout": self.info.layout.to_json(),
            "labels": self.info.labels, "block_rows": BLOCK_ROWS,
            "multi_index": {"start": self.multi_index.start, "bits": self.multi_index.bits,
                            "count": self.multi_index.count},
        }))  # fmt: skip

    def _write_rows(self, pipe, new: list[tuple[IndexRecord, int]]) -> None:
        heads = tuple(self.info.labels)
        columns = {
            "features": [np.asarray(record.features, FEATURE_DTYPE).tobytes() for record, _ in new],
            "codes": [np.asarray(record.code, np.uint8).tobytes() for record, _ in new],
            "attributes": [record.attributes(heads).tobytes() for record, _ in new],
        }
        rows = np.array([row for _, row in new])
        for first, last in _runs(rows):  # consecutive rows of one block: one SETRANGE per column
            block, slot = divmod(int(rows[first]), BLOCK_ROWS)
            for column, payloads in columns.items():
                pipe.setrange(self.keys.block(column, block), slot * self.info.column_width(column),
                              b"".join(payloads[first:last]))  # fmt: skip
        for record, row in new:
            pipe.hset(self.keys.instance(record.key), mapping={
                "row": row, "metadata": json.dumps(record.metadata.to_json()),
                "probabilities": json.dumps({h: np.round(p.astype(float), 5).tolist()
                                             for h, p in record.probabilities.items()}),
                "orthanc": json.dumps(record.orthanc), "frame": record.frame, "indexed_at": time.time(),
            })  # fmt: skip
        pipe.hset(self.keys.rows, mapping={int(row): record.key for record, row in new})
        for key, payload in bucket_writes(self.keys, self.multi_index, rows, np.stack([r.code for r, _ in new])):
            pipe.append(key, payload)
        for block in np.unique(rows // BLOCK_ROWS):
            pipe.hincrby(self.keys.generations, int(block), 1)

    def row(self, sop_instance_uid: str) -> int | None:
        """The instance's row in the column blocks (``None`` when it is not indexed)."""
        row = self.client.hget(self.keys.instance(sop_instance_uid), "row")
        return None if row is None else int(row)

    def remove(self, sop_instance_uid: str) -> bool:
        """Take an instance out of every answer; False if it was not indexed."""
        key = self.keys.instance(sop_instance_uid)
        row = self.row(sop_instance_uid)
        if row is None:
            return False
        block, slot = divmod(row, BLOCK_ROWS)
        pipe = self.client.pipeline(transaction=True)
        live_offset = slot * ATTRIBUTES.itemsize + ATTRIBUTES.fields["live"][1]
        pipe.setrange(self.keys.block("attributes", block), live_offset, b"\x00")
        pipe.delete(key)
        pipe.hdel(self.keys.rows, row)
        pipe.hincrby(self.keys.generations, block, 1)
        pipe.execute()
        return True

    def set_attribute(self, rows: np.ndarray, name: str, values: np.ndarray) -> None:
        """Overwrite one attribute of many rows (e.g. ``cluster`` after re-clustering)."""
        kind, offset = ATTRIBUTES.fields[name][:2]
        encoded = np.asarray(values, dtype=kind)
        pipe = self.client.pipeline(transaction=True)
        blocks = set()
        for row, value in zip(rows, encoded):
            block, slot = divmod(int(row), BLOCK_ROWS)
            blocks.add(block)
            pipe.setrange(self.keys.block("attributes", block), slot * ATTRIBUTES.itemsize + offset, value.tobytes())
        for block in blocks:
            pipe.hincrby(self.keys.generations, block, 1)
        pipe.execute()

    def contains(self, sop_instance_uid: str) -> bool:
        return bool(self.client.hexists(self.keys.instance(sop_instance_uid), "row"))

    def count(self) -> int:
        """Instances indexed now (O(1))."""
        return int(self.client.hlen(self.keys.rows))

    def stats(self) -> dict:
        """Count, rows ever allocated, blocks, and the layout (all O(1) reads)."""
        allocated = int(self.client.get(self.keys.next_row) or 0)
        return {"version": self.info.version, "instances": self.count(), "rows_allocated": allocated,
                "blocks": -(-allocated // BLOCK_ROWS), "feature_dim": self.info.feature_dim,
                "code_bits": self.info.layout.bits,
                "multi_index": f"{self.multi_index.count} x {self.multi_index.bits} bits"}  # fmt: skip

    def sop_uids(self, rows: Iterable[int]) -> list[str | None]:
        rows = [int(r) for r in rows]
        return [v.decode() if v else None for v in (self.client.hmget(self.keys.rows, rows) if rows else [])]

    def describe(self, sop_instance_uids: Sequence[str]) -> list[dict | None]:
        """The stored metadata, probabilities and Orthanc ids of each instance (``None`` if absent)."""
        pipe = self.client.pipeline(transaction=False)
        for uid in sop_instance_uids:
            pipe.hgetall(self.keys.instance(uid))
        out = []
        for raw in pipe.execute():
            if not raw:
                out.append(None)
                continue
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            out.append({"row": int(fields["row"]), "metadata": json.loads(fields.get("metadata", "{}")),
                        "probabilities": json.loads(fields.get("probabilities", "{}")),
                        "orthanc": json.loads(fields.get("orthanc", "{}")), "frame": int(fields.get("frame", 0))})  # fmt: skip
        return out

    def read_blocks(self, blocks: Sequence[int]) -> dict[int, dict[str, bytes]]:
        """Raw column blocks (missing ones as empty bytes)."""
        pipe = self.client.pipeline(transaction=False)
        for block in blocks:
            for column in COLUMNS:
                pipe.get(self.keys.block(column, block))
        raw = pipe.execute()
        return {block: {column: raw[i * len(COLUMNS) + j] or b"" for j, column in enumerate(COLUMNS)}
                for i, block in enumerate(blocks)}  # fmt: skip

    def generations(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.client.hgetall(self.keys.generations).items()}


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) index ranges of ``rows`` that are consecutive and inside one block."""
    breaks = np.flatnonzero((np.diff(rows) != 1) | (rows[1:] // BLOCK_ROWS != rows[:-1] // BLOCK_ROWS)) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:]))
