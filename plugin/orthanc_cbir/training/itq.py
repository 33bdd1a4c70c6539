"""Iterative quantisation (Gong & Lazebnik, CVPR 2011): binary codes whose Hamming
distances follow the embedding's distances.

The embedding is centred, projected on its top principal components, and rotated
so that the signs lose as little as possible. The result is one linear map,
``bits = (features - mean) @ projection > 0``, that the export bakes into the ONNX
graph as the ``appearance`` sub-code.
"""

from __future__ import annotations

import numpy as np


def fit_itq(features: np.ndarray, bits: int, iterations: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), projection (D, bits)) fitted on (N, D) features; needs bits <= D."""
    if bits > features.shape[1]:
        raise ValueError(f"ITQ needs bits <= feature dimension ({bits} > {features.shape[1]})")
    mean = features.mean(axis=0)
    centred = (features - mean).astype(np.float64)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    pca = components[:bits].T  # (D, bits)
    projected = centred @ pca
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        codes = np.sign(projected @ rotation)
        codes[codes == 0] = 1
        u, _, vt = np.linalg.svd(codes.T @ projected)
        rotation = (u @ vt).T
    return mean.astype(np.float32), (pca @ rotation).astype(np.float32)
