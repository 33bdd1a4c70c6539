"""The region entries of an index version (the ``regions`` setting): per image, the patches of
:func:`~orthanc_cbir.model.regions.region_grid` with their appearance, and the search of a
reader's rectangle among them. This module owns the keys ``{base}:regions`` (hash
SOPInstanceUID -> :func:`encode_regions`) and ``{base}:regions:writes`` (a counter that moves
on every write, so that a searcher re-reads the entries only when they changed).

Region entries are an addition beside the instance rows, not part of them: written after the
instance's row, removed with it, and every hit is joined with the instance's stored entry, so
an entry whose instance is gone is never answered.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model.regions import APPEARANCE_DIMS, SliceRegions, best_overlap, region_grid, region_positions
from ..redis_client import RedisClient, as_bytes
from .schema import KeySpace, quantize

_HEADER = struct.Struct("<4sHHHH")
_MAGIC = b"RGN1"
REGION_BYTES_PER_PATCH = APPEARANCE_DIMS + 4
"""What a patch costs in Redis, before the hash's own overhead: int8 appearance and a float32 scale."""


def _box(values: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in values)
    return x0, y0, x1, y1


def encode_regions(regions: SliceRegions, level: np.ndarray) -> bytes:
    """One image's entries: header (magic, rows, columns, patches, level dims), its level block
    (float32, the slice's own from its features), per patch a float32 scale, then the int8 appearance."""
    quantized, scales = quantize(regions.appearance)
    level = np.asarray(level, "<f4").ravel()
    header = _HEADER.pack(_MAGIC, regions.rows, regions.columns, len(quantized), len(level))
    return header + level.tobytes() + scales.astype("<f4").tobytes() + quantized.tobytes()


@dataclass(frozen=True)
class _Decoded:
    rows: int
    columns: int
    level: np.ndarray
    appearance: np.ndarray  # float32 (P, D)


def decode_regions(raw: bytes) -> _Decoded:
    """The other half of :func:`encode_regions`. Raises ValueError on bytes it did not write."""
    if len(raw) < _HEADER.size:
        raise ValueError("a region entry shorter than its header")
    magic, rows, columns, patches, level_dims = _HEADER.unpack_from(raw)
    expected = _HEADER.size + 4 * level_dims + patches * REGION_BYTES_PER_PATCH
    if magic != _MAGIC or len(raw) != expected or patches != len(region_grid(rows, columns)):
        raise ValueError("not a region entry of this version")
    offset = _HEADER.size
    level = np.frombuffer(raw, "<f4", level_dims, offset)
    offset += 4 * level_dims
    scales = np.frombuffer(raw, "<f4", patches, offset)
    offset += 4 * patches
    quantized = np.frombuffer(raw, np.int8, patches * APPEARANCE_DIMS, offset).reshape(patches, APPEARANCE_DIMS)
    return _Decoded(rows, columns, level, quantized.astype(np.float32) * scales[:, None])


@dataclass(frozen=True)
class RegionMatch:
    """The best patch of one image for a region query."""

    sop_instance_uid: str
    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 in the image's pixels (end exclusive)."""
    distance: float


@dataclass
class _Matrix:
    writes: tuple[str, int]  # the index's epoch and the entries' write count
    uids: list[str]
    owner: np.ndarray  # image index of each patch
    boxes: np.ndarray  # (N, 4)
    vectors: np.ndarray  # (N, D + 2 + L): appearance, weighted position, level
    norms: np.ndarray  # (N,): squared lengths of the vectors


class RegionIndex:
    """The region entries of one index version (its unsharded key space)."""

    def __init__(self, client: RedisClient, keys: KeySpace):
        self.client = client
        self.entries = f"{keys.base}:regions"
        self.writes = f"{keys.base}:regions:writes"
        self._info = keys.info  # its epoch: an index flushed and made again may count the same writes
        self._matrix: _Matrix | None = None
        self._lock = threading.Lock()

    def put(self, entries: dict[str, bytes]) -> None:
        """Store the entries (SOPInstanceUID -> :func:`encode_regions`) of several images."""
        if not entries:
            return
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.entries, mapping=dict[Any, Any](entries))  # redis-py's Mapping: invariant key type
            pipe.incr(self.writes)
            pipe.execute()

    def set_levels(self, blocks: dict[str, np.ndarray]) -> None:
        """Replace the level block of these images' entries (their slices moved to their series'
        level); images without entries are skipped."""
        if not blocks:
            return
        uids = list(blocks)
        values = self.client.hmget(self.entries, uids)
        changed = {}
        for uid, raw in zip(uids, values, strict=True):
            if raw is None:
                continue
            raw = as_bytes(raw)
            level = np.asarray(blocks[uid], "<f4").ravel()
            if len(raw) < _HEADER.size or _HEADER.unpack_from(raw)[4] != len(level):
                continue  # not an entry this version wrote
            changed[uid] = raw[: _HEADER.size] + level.tobytes() + raw[_HEADER.size + level.nbytes :]
        self.put(changed)

    def remove(self, sop_instance_uids: Iterable[str]) -> None:
        uids = list(sop_instance_uids)
        if uids:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hdel(self.entries, *uids)
                pipe.incr(self.writes)
                pipe.execute()

    def count(self) -> int:
        return int(self.client.hlen(self.entries))

    def stored_bytes(self) -> int:
        """Redis's own count of the bytes the entries' hash takes (``MEMORY USAGE``, every field)."""
        return int(self.client.memory_usage(self.entries, samples=0) or 0)

    def matches(self, query_uid: str, box: tuple[float, float, float, float]
                ) -> tuple[tuple[int, int, int, int], list[RegionMatch]]:  # fmt: skip
        """The query image's patch that best overlaps ``box`` (x0, y0, x1, y1 in its pixels), and
        the best patch of every other image, nearest first (the caller filters and pages).

        Raises:
            KeyError: the query image has no region entries.
            ValueError: the box lies outside the query image.
        """
        matrix = self._current()
        try:
            image = matrix.uids.index(query_uid)
        except ValueError:
            raise KeyError(query_uid) from None
        own = np.flatnonzero(matrix.owner == image)
        best = best_overlap(matrix.boxes[own], box)
        if best is None:
            raise ValueError("the box lies outside the image")
        query = own[best]
        # |v - q|^2 = |v|^2 + |q|^2 - 2 v.q: one matrix-vector product
        distances = np.maximum(matrix.norms + matrix.norms[query] - 2 * (matrix.vectors @ matrix.vectors[query]), 0)
        # each image's nearest patch: patches sorted by (image, distance), the first of each image
        order = np.lexsort((distances, matrix.owner))
        first = order[np.r_[True, matrix.owner[order][1:] != matrix.owner[order][:-1]]]
        first = first[matrix.owner[first] != image]
        first = first[np.argsort(distances[first], kind="stable")]
        found = [RegionMatch(matrix.uids[int(matrix.owner[patch])], _box(matrix.boxes[patch]), float(distances[patch]))
                 for patch in first]  # fmt: skip
        return _box(matrix.boxes[query]), found

    def _current(self) -> _Matrix:
        """Every entry as one matrix, read again only when the write counter (or the index) moved."""
        with self._lock:
            pipe = self.client.pipeline(transaction=False)
            pipe.hget(self._info, "epoch")
            pipe.get(self.writes)
            epoch, count = pipe.execute()
            writes = (as_bytes(epoch).decode() if epoch else "", int(count or 0))
            if self._matrix is not None and self._matrix.writes == writes:
                return self._matrix
            raw = self.client.hgetall(self.entries)
            uids: list[str] = []
            owners, boxes, vectors = [], [], []
            for uid, value in sorted((as_bytes(k).decode(), as_bytes(v)) for k, v in raw.items()):
                try:
                    decoded = decode_regions(value)
                except ValueError:
                    continue  # written by another version of this module: not searched
                grid = region_grid(decoded.rows, decoded.columns)
                positions = region_positions(grid, decoded.rows, decoded.columns)
                level = np.repeat(decoded.level[None], len(grid), axis=0)
                owners.append(np.full(len(grid), len(uids)))
                boxes.append(grid)
                vectors.append(np.hstack([decoded.appearance, positions, level]))
                uids.append(uid)
            self._matrix = _Matrix(
                writes, uids,
                np.concatenate(owners) if owners else np.zeros(0, np.int64),
                np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int32),
                stacked := np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, 1), np.float32),
                (stacked**2).sum(axis=1),
            )  # fmt: skip
            return self._matrix

