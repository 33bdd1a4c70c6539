"""Multi-index hashing: sublinear Hamming candidate search on plain Redis strings.

Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index
hashing" (CVPR 2012): split the searched bits of a code into ``m`` disjoint
substrings and keep one bucket table per substring. If two codes differ in at
most ``m * (r + 1) - 1`` bits, they agree within ``r`` bits on at least one
substring, so probing every substring's buckets within radius ``r`` of the
query finds them all. The search widens ``r`` until it has enough candidates,
then ranks the candidates by their full (optionally weighted) code distance.

Only the ``appearance`` bits are searched this way: the label sub-codes are
nearly constant within a class, so their buckets would hold a whole class each.
Buckets are Redis strings of little-endian uint32 rows (``APPEND`` on insert, a
``GET`` per probe), so nothing here needs a Redis module or a single server.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from .schema import KeySpace

ROW_DTYPE = np.dtype("<u4")


@dataclass(frozen=True)
class MultiIndex:
    """Which bits are searched and how they are cut: ``count`` substrings of
    ``bits`` bits starting at bit ``start`` of the unpacked code."""

    start: int
    bits: int
    count: int

    @classmethod
    def for_span(cls, start: int, length: int, bits: int = 13) -> MultiIndex:
        """As many ``bits``-bit substrings as fit in ``[start, start + length)``.

        13 bits (8192 buckets per substring) suits 10^4 to 10^6 instances: at a
        million, radius 0 already yields about a thousand candidates."""
        return cls(start, bits, max(1, length // bits))

    def values(self, codes: np.ndarray) -> np.ndarray:
        """(N, B/8) packed codes -> (N, count) int64 substring values."""
        unpacked = np.unpackbits(np.atleast_2d(codes), axis=1)[:, self.start : self.start + self.bits * self.count]
        weights = 1 << np.arange(self.bits - 1, -1, -1, dtype=np.int64)
        return unpacked.reshape(len(unpacked), self.count, self.bits).astype(np.int64) @ weights

    def flips(self, radius: int) -> np.ndarray:
        """Every ``bits``-bit mask with exactly ``radius`` bits set."""
        return np.array([sum(1 << b for b in chosen) for chosen in combinations(range(self.bits), radius)], np.int64)


def bucket_writes(keys: KeySpace, index: MultiIndex, rows: np.ndarray, codes: np.ndarray) -> list[tuple[str, bytes]]:
    """(bucket key, bytes to append) for new rows; the caller appends them in its pipeline."""
    out = []
    for row, values in zip(rows, index.values(codes)):
        payload = np.array([row], ROW_DTYPE).tobytes()
        out.extend((keys.bucket(j, int(value)), payload) for j, value in enumerate(values))
    return out


@dataclass
class Probe:
    """What a multi-index search looked at."""

    rows: np.ndarray
    """Distinct candidate rows (may include removed rows: the caller filters by ``live``)."""
    radius: int
    """The largest per-substring radius probed."""
    buckets: int
    """Bucket keys read."""


def probe(client, keys: KeySpace, index: MultiIndex, code: np.ndarray, wanted: int, max_radius: int = 3,
          accept=None) -> Probe:  # fmt: skip
    """Widen the radius until at least ``wanted`` accepted rows are found (or ``max_radius``).

    ``accept`` maps an array of rows to a boolean mask (filters, liveness); the
    stopping rule counts accepted rows only, so a selective filter probes further.
    """
    values = index.values(code)[0]
    parts: list[np.ndarray] = []
    rows = np.zeros(0, dtype=np.int64)
    buckets = 0
    for radius in range(max_radius + 1):
        masks = index.flips(radius)
        names = [keys.bucket(j, int(v)) for j, value in enumerate(values) for v in (value ^ masks)]
        buckets += len(names)
        parts.extend(np.frombuffer(p, ROW_DTYPE) for p in client.mget(names) if p)
        if parts:
            rows = np.unique(np.concatenate(parts)).astype(np.int64)
        accepted = int(np.count_nonzero(accept(rows))) if accept is not None else len(rows)
        if accepted >= wanted:
            break
    return Probe(rows=rows, radius=radius, buckets=buckets)
