"""Regions of a slice, for "find similar regions": a fixed grid of overlapping square patches
and, for each, the model's appearance embedding of the patch and of its surroundings.

A reader's rectangle is answered from these entries (:mod:`orthanc_cbir.index.regions`):
the query is the stored patch of the query image that best overlaps the rectangle, and the
hits are the patches of other images nearest to it. A patch alone is a few dozen pixels of
texture that many places share; the same patch seen with its surroundings (the window twice
its side, centred on it) tells a nodule at the lung's edge from one in the middle, which is
why each entry is the mean of the two embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .embedder import Embedder
from .preprocess import to_model_input

GRID = ((1 / 8, 1 / 8), (1 / 4, 1 / 8), (1 / 2, 1 / 4))
"""(patch side, stride) as fractions of the image's shorter side: 64, 49 and 9 patches of a square image."""
APPEARANCE_DIMS = 512
"""The appearance part of the model's features (CNN and spectrum; the level block is the slice's own)."""
POSITION_WEIGHT = 0.5
"""A patch's centre (fractions of the image's width and height) enters the distance at this weight:
the same texture on the other side of the body is a weaker match."""


@dataclass(frozen=True)
class SliceRegions:
    """The region entries of one image."""

    rows: int
    columns: int
    appearance: np.ndarray
    """float32 (P, :data:`APPEARANCE_DIMS`), L2-normalised, in :func:`region_grid` order."""


def region_grid(rows: int, columns: int) -> np.ndarray:
    """int32 (P, 4): ``x0, y0, x1, y1`` (pixels, end exclusive) of every patch of a ``rows`` x ``columns`` image."""
    side = min(rows, columns)
    boxes = []
    for size_fraction, stride_fraction in GRID:
        size, stride = max(1, int(side * size_fraction)), max(1, int(side * stride_fraction))
        for y in range(0, rows - size + 1, stride):
            for x in range(0, columns - size + 1, stride):
                boxes.append((x, y, x + size, y + size))
    return np.array(boxes, dtype=np.int32).reshape(-1, 4)


def context_box(box: np.ndarray, rows: int, columns: int) -> tuple[int, int, int, int]:
    """The patch's surroundings: the window twice its side on the same centre, inside the image."""
    x0, y0, x1, y1 = (int(v) for v in box)
    half = (x1 - x0) // 2
    return max(0, x0 - half), max(0, y0 - half), min(columns, x1 + half), min(rows, y1 + half)


def embed_regions(embedder: Embedder, pixels: np.ndarray) -> SliceRegions:
    """The region entries of one normalised grey image (``model_pixels``), one model pass."""
    rows, columns = pixels.shape
    grid = region_grid(rows, columns)
    size = embedder.card.input_size
    crops = [to_model_input(pixels[y0:y1, x0:x1], size) for x0, y0, x1, y1 in grid]
    crops += [to_model_input(pixels[y0:y1, x0:x1], size)
              for x0, y0, x1, y1 in (context_box(box, rows, columns) for box in grid)]  # fmt: skip
    features = embedder.embed(np.stack(crops)).features[:, :APPEARANCE_DIMS]
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    mean = features[: len(grid)] + features[len(grid) :]
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return SliceRegions(rows, columns, mean.astype(np.float32))


def region_positions(grid: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """float32 (P, 2): each patch's centre as fractions of the width and height, times :data:`POSITION_WEIGHT`."""
    centre = (grid[:, :2] + grid[:, 2:]) / 2
    return (centre / np.array([columns, rows]) * POSITION_WEIGHT).astype(np.float32)


def best_overlap(grid: np.ndarray, box: tuple[float, float, float, float]) -> int | None:
    """The patch of ``grid`` with the largest intersection over union with ``box`` (x0, y0, x1, y1);
    ``None`` when the box overlaps none (it lies outside the image)."""
    x0, y0, x1, y1 = box
    width = np.clip(np.minimum(grid[:, 2], x1) - np.maximum(grid[:, 0], x0), 0, None)
    height = np.clip(np.minimum(grid[:, 3], y1) - np.maximum(grid[:, 1], y0), 0, None)
    inter = width * height
    union = (grid[:, 2] - grid[:, 0]) * (grid[:, 3] - grid[:, 1]) + (x1 - x0) * (y1 - y0) - inter
    if not inter.any():
        return None
    return int(np.argmax(inter / np.maximum(union, 1e-9)))
