"""Retrieval measures on numpy arrays, with the definitions spelled out.

Conventions: features are L2-normalised rows, so ranking by Euclidean distance and
by cosine similarity agree; ties in a ranking are broken by gallery order (stable
sort), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..model.codes import hamming_distances, weighted_hamming_distances


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """(Q, k) gallery indices nearest to each query by feature distance, nearest first."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        similarity = queries[start : start + chunk] @ gallery.T
        part = np.argpartition(-similarity, kth=min(k, similarity.shape[1] - 1), axis=1)[:, :k]
        order = np.take_along_axis(similarity, part, axis=1)
        out[start : start + chunk] = np.take_along_axis(part, np.argsort(-order, axis=1, kind="stable"), axis=1)
    return out


def hamming_candidates(query_code: np.ndarray, gallery_codes: np.ndarray, pool: int,
                       bit_weights: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The ``pool`` gallery indices nearest to a packed query code by (weighted) Hamming distance."""
    if bit_weights is None:
        distances = hamming_distances(query_code, gallery_codes)
    else:
        distances = weighted_hamming_distances(query_code, gallery_codes, bit_weights)
    pool = min(pool, len(gallery_codes))
    return np.argsort(distances, kind="stable")[:pool]


def recall_vs_exact(
    query_features: np.ndarray,
    query_codes: np.ndarray,
    gallery_features: np.ndarray,
    gallery_codes: np.ndarray,
    pool_fractions: Sequence[float] = (0.005, 0.01, 0.02, 0.05, 0.1),
    k: int = 10,
    bit_weights: np.ndarray | None = None,
) -> dict[float, float]:
    """Coarse-to-fine recall: for each pool fraction, the share of the exact
    embedding top-``k`` found in the top-``k`` after taking the pool nearest by
    Hamming distance and re-ranking it by the embedding (seed 001)."""
    exact = exact_top_k(query_features, gallery_features, k)
    pools = {f: max(k, int(round(f * len(gallery_features)))) for f in pool_fractions}
    largest = max(pools.values())
    found = {f: 0 for f in pool_fractions}
    for q in range(len(query_features)):
        ranked = hamming_candidates(query_codes[q], gallery_codes, largest, bit_weights)
        for fraction, pool in pools.items():
            candidates = ranked[:pool]
            similarity = gallery_features[candidates] @ query_features[q]
            top = candidates[np.argsort(-similarity, kind="stable")[:k]]
            found[fraction] += len(np.intersect1d(top, exact[q]))
    return {f: found[f] / (k * len(query_features)) for f in pool_fractions}


def average_precision_at_k(relevant: np.ndarray, total_relevant: int, k: int) -> float:
    """AP@k of one ranking: mean of precision@i over the relevant ranks i <= k,
    divided by min(k, total relevant in the gallery)."""
    relevant = np.asarray(relevant[:k], dtype=bool)
    if total_relevant == 0:
        return 0.0
    hits = np.cumsum(relevant)
    precisions = hits[relevant] / (np.flatnonzero(relevant) + 1)
    return float(precisions.sum() / min(k, total_relevant))


def map_at_k(query_labels: np.ndarray, ranked_gallery_labels: np.ndarray, gallery_labels: np.ndarray, k: int) -> float:
    """Mean AP@k where a hit is relevant when its label equals the query's.
    ``ranked_gallery_labels`` is (Q, >=k): the labels of each query's ranking."""
    counts = {label: int((gallery_labels == label).sum()) for label in np.unique(query_labels)}
    return float(np.mean([
        average_precision_at_k(ranked_gallery_labels[q] == query_labels[q], counts[query_labels[q]], k)
        for q in range(len(query_labels))
    ]))  # fmt: skip


def code_statistics(packed_codes: np.ndarray) -> dict[str, float]:
    """Distinct codes, mean bucket size (how many images share an image's code, on
    average over images) and bit balance (mean |share of ones - 0.5| over bits: 0 is
    perfectly balanced, 0.5 a constant bit)."""
    _, inverse, counts = np.unique(packed_codes, axis=0, return_inverse=True, return_counts=True)
    ones = np.unpackbits(packed_codes, axis=1).mean(axis=0)
    return {
        "distinct_codes": int(len(counts)),
        "mean_bucket_size": float(counts[inverse.ravel()].mean()),
        "bit_imbalance": float(np.abs(ones - 0.5).mean()),
    }


def precision_at_k(relevant: np.ndarray, k: int) -> float:
    """Share of relevant hits among the first k (a short ranking counts its missing hits as wrong)."""
    return float(np.count_nonzero(np.asarray(relevant[:k], dtype=bool))) / k


def ndcg_at_k(relevant: np.ndarray, total_relevant: int, k: int) -> float:
    """Binary-relevance nDCG@k: DCG (1 / log2(rank + 1) per relevant hit) over the DCG of
    a perfect ranking of min(k, total relevant) relevant hits."""
    gains = np.asarray(relevant[:k], dtype=float) / np.log2(np.arange(2, min(k, len(relevant)) + 2))
    ideal = (1.0 / np.log2(np.arange(2, min(k, total_relevant) + 2))).sum()
    return float(gains.sum() / ideal) if ideal else 0.0
