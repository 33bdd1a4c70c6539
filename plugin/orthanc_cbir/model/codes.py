"""Binary hash codes: the structured layout, packing, and Hamming distances.

A code of B bits is the sign of the model's ``code_logits`` (bit = logit > 0),
packed most significant bit first into B/8 bytes (``numpy.packbits`` order).
Its bits are split into named sub-codes (seed 004): one per label head
(modality, region, pathology) and ``appearance`` bits that order images within a
class; a query may weight each sub-code (multi-lateral search).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SubCode:
    """A named run of bits: ``[start, start + length)`` of the unpacked code."""

    name: str
    start: int
    length: int


@dataclass(frozen=True)
class CodeLayout:
    """The sub-codes of a code, in bit order, covering every bit once."""

    sub_codes: tuple[SubCode, ...]

    @property
    def bits(self) -> int:
        return sum(sub.length for sub in self.sub_codes)

    @classmethod
    def from_lengths(cls, lengths: Mapping[str, int]) -> CodeLayout:
        """Consecutive sub-codes of the given lengths, in the mapping's order."""
        subs, start = [], 0
        for name, length in lengths.items():
            subs.append(SubCode(name, start, int(length)))
            start += int(length)
        return cls(tuple(subs))

    def to_json(self) -> list[dict[str, object]]:
        return [{"name": s.name, "start": s.start, "length": s.length} for s in self.sub_codes]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> CodeLayout:
        layout = cls(tuple(SubCode(str(i["name"]), int(i["start"]), int(i["length"])) for i in items))
        expected = 0
        for sub in layout.sub_codes:
            if sub.start != expected or sub.length <= 0:
                raise ValueError(f"sub-codes must be consecutive and non-empty: {items}")
            expected += sub.length
        return layout

    def bit_weights(self, weights: Mapping[str, float] | None = None) -> np.ndarray:
        """One weight per bit (float32, length ``bits``); sub-codes not named weigh 1."""
        weights = dict(weights or {})
        unknown = set(weights) - {s.name for s in self.sub_codes}
        if unknown:
            raise ValueError(f"unknown sub-code(s) {sorted(unknown)}; known: {[s.name for s in self.sub_codes]}")
        out = np.ones(self.bits, dtype=np.float32)
        for sub in self.sub_codes:
            out[sub.start : sub.start + sub.length] = float(weights.get(sub.name, 1.0))
        return out


def pack_codes(code_logits: np.ndarray) -> np.ndarray:
    """(N, B) logits to (N, B/8) uint8 packed codes; bit = logit > 0."""
    if code_logits.shape[-1] % 8:
        raise ValueError("the number of bits must be a multiple of 8")
    return np.packbits(code_logits > 0, axis=-1)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """(N, B/8) uint8 to (N, B) bool."""
    return np.unpackbits(packed, axis=-1).astype(bool)


def hamming_distances(query: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance of one packed code (B/8,) to each of (N, B/8) packed codes: (N,) int32."""
    codes, query = np.ascontiguousarray(codes), np.ascontiguousarray(query)
    if codes.shape[-1] % 8 == 0:  # eight bytes at a time: one popcount per 64 bits
        codes, query = codes.view(np.uint64), query.view(np.uint64)
    # column by column: numpy's sum over a short last axis costs more than the popcounts
    distances = np.bitwise_count(codes[:, 0] ^ query[0]).astype(np.int32)
    for column in range(1, codes.shape[1]):
        distances += np.bitwise_count(codes[:, column] ^ query[column])
    return distances


def weighted_hamming_distances(query: np.ndarray, codes: np.ndarray, bit_weights: np.ndarray) -> np.ndarray:
    """Hamming distance where each differing bit costs its weight: (N,) float32.

    When the weight is constant within each byte (sub-codes on byte boundaries, as
    in the shipped layout) this is one popcount per byte, else the bits are unpacked."""
    differing = np.bitwise_xor(codes, query[None, :])
    per_byte = np.asarray(bit_weights, np.float32).reshape(-1, 8)
    if np.all(per_byte == per_byte[:, :1]):
        return np.bitwise_count(differing).astype(np.float32) @ per_byte[:, 0]
    return np.unpackbits(differing, axis=1).astype(np.float32) @ per_byte.ravel()
