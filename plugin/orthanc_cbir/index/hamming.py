"""Multi-index hashing: sublinear Hamming candidate search over a searcher's cached codes.

Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index
hashing" (CVPR 2012): split the searched bits of a code into ``m`` disjoint
substrings and keep one bucket table per substring. If two codes differ in at
most ``m * (r + 1) - 1`` bits, they agree within ``r`` bits on at least one
substring, so probing every substring's buckets within radius ``r`` of the
query finds them all. The probe widens ``r`` until it has enough candidates;
the caller ranks them by their full code distance.

Only the ``appearance`` bits are searched this way: the label sub-codes are
nearly constant within a class, so their buckets would hold a whole class each.

The tables live in the searcher's process, built from the snapshot's codes (no
Redis keys: nothing to write on insert, nothing to compact). A table is one
array of rows sorted by substring value plus the offsets of each value, so a
bucket is a slice, and probing a thousand buckets is a few numpy calls. Rows
indexed after the tables were built are scanned linearly until the next build
(:class:`CodeTables`, :meth:`Searcher._code_tables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np


@dataclass(frozen=True)
class MultiIndex:
    """Which bits are searched and how they are cut: ``count`` substrings of
    ``bits`` bits starting at bit ``start`` of the unpacked code."""

    start: int
    bits: int
    count: int

    @classmethod
    def for_span(cls, start: int, length: int, bits: int = 16) -> MultiIndex:
        """As many ``bits``-bit substrings as fit in ``[start, start + length)``.

        16 bits (65,536 buckets a table) suits 10^5 to 10^7 instances: at 10^6 the
        104 appearance bits give 6 tables, and radius 2 to 3 yields the 10^5 rows a
        query of 6,000 candidates wants (``benchmarks/query_scale.py``)."""
        if bits > 16:
            raise ValueError("substrings are at most 16 bits (one uint16 bucket value)")
        return cls(start, bits, max(1, length // bits))

    def values(self, codes: np.ndarray) -> np.ndarray:
        """(N, B/8) packed codes -> (N, count) int64 substring values."""
        unpacked = np.unpackbits(np.atleast_2d(codes), axis=1)[:, self.start : self.start + self.bits * self.count]
        weights = 1 << np.arange(self.bits - 1, -1, -1, dtype=np.int64)
        return unpacked.reshape(len(unpacked), self.count, self.bits).astype(np.int64) @ weights

    def flips(self, radius: int) -> np.ndarray:
        """Every ``bits``-bit mask with exactly ``radius`` bits set."""
        return np.array([sum(1 << b for b in chosen) for chosen in combinations(range(self.bits), radius)], np.int64)


@dataclass(frozen=True)
class Probe:
    """What a probe read: rows with their codes, a row once per bucket it was found in."""

    rows: np.ndarray
    """int64 (n,): rows in the order read; a row near the query on several substrings repeats."""
    codes: np.ndarray
    """uint8 (n, B/8): the packed code of each of ``rows``."""
    radius: int
    """The largest substring radius probed."""


class CodeTables:
    """One bucket table per substring over the codes of the rows ``indexed``, built once.

    ``sorted_rows[j * n : (j + 1) * n]`` are the ``n`` indexed rows sorted by substring
    ``j`` (stable, so rows ascend within a bucket); bucket ``v`` of table ``j`` is the
    slice ``offsets[j, v] : offsets[j, v + 1]`` of ``sorted_rows``, and ``sorted_codes``
    holds each of those rows' full code beside it, so a probe reads whole buckets of codes
    as contiguous runs rather than gathering them row by row (twice as fast at 10^6).
    ``count * (4 + B/8)`` bytes a row: 120 at 6 tables of a 128-bit code; a build is one
    radix sort per table (~0.2 s a million rows). ``rows`` is where the tables end: rows
    from there on are the caller's."""

    MAX_RADIUS = 3

    def __init__(self, index: MultiIndex, codes: np.ndarray, indexed: np.ndarray):
        self.index = index
        self.rows = len(codes)
        n, size = len(indexed), 1 << index.bits
        values = index.values(codes[indexed]) if n else np.zeros((0, index.count), np.int64)
        self.sorted_rows = np.empty(index.count * n, np.int32)
        self.sorted_codes = np.empty((index.count * n, codes.shape[1]), np.uint8)
        self.offsets = np.empty((index.count, size + 1), np.int64)
        for j in range(index.count):
            column = values[:, j].astype(np.uint16)
            rows = indexed[np.argsort(column, kind="stable")]
            self.sorted_rows[j * n : (j + 1) * n] = rows
            self.sorted_codes[j * n : (j + 1) * n] = np.take(codes, rows, axis=0)
            self.offsets[j, 0] = j * n
            np.cumsum(np.bincount(column, minlength=size), out=self.offsets[j, 1:])
            self.offsets[j, 1:] += j * n
        self._masks = [index.flips(radius) for radius in range(min(self.MAX_RADIUS, index.bits) + 1)]

    def probe(self, code: np.ndarray, wanted: int) -> Probe:
        """The buckets nearest the query's substrings: radius by radius (every table at
        radius 0, then every table at radius 1, ...), stopping after the first table whose
        buckets bring the rows read to ``wanted`` (repeats counted), or at :data:`MAX_RADIUS`."""
        values = self.index.values(code)[0]
        parts: list[np.ndarray] = []
        found = 0
        for radius, masks in enumerate(self._masks):  # noqa: B007 - the last radius probed is returned below
            probed = values[:, None] ^ masks[None, :]
            starts = np.take_along_axis(self.offsets, probed, axis=1)
            lengths = np.take_along_axis(self.offsets, probed + 1, axis=1) - starts
            per_table = np.cumsum(lengths.sum(axis=1))
            tables = int(np.searchsorted(per_table, wanted - found)) + 1  # the tables this radius still needs
            starts, lengths = starts[:tables].ravel(), lengths[:tables].ravel()
            total = int(lengths.sum())
            if total:
                # the concatenation of the slices starts[i] : starts[i] + lengths[i], without a Python loop
                parts.append(np.arange(total) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths))
                found += total
            if found >= wanted:
                break
        positions = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return Probe(np.take(self.sorted_rows, positions).astype(np.int64),
                     np.take(self.sorted_codes, positions, axis=0), radius)  # fmt: skip
