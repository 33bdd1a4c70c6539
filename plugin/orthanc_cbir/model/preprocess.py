"""The one preprocessing function: a normalised grey image to the model's input.

Training (:mod:`orthanc_cbir.training`) and the runtime embedder call the same
:func:`to_model_input`, so a model never sees pixels prepared two ways.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

INPUT_SIZE = 64
"""Side of the square model input, in pixels."""


def to_model_input(pixels: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """A (size, size) float32 array in 0..1 from a 2-D grey image in 0..1.

    The image is padded with black to a square around its centre (no distortion of
    anatomy), then resized with an area-averaging filter when shrinking and bilinear
    interpolation when enlarging.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
    pixels = np.asarray(pixels, dtype=np.float32)
    rows, columns = pixels.shape
    side = max(rows, columns)
    if rows != columns:
        square = np.zeros((side, side), dtype=np.float32)
        top, left = (side - rows) // 2, (side - columns) // 2
        square[top : top + rows, left : left + columns] = pixels
        pixels = square
    if side != size:
        picture = Image.fromarray(pixels, mode="F")
        if side % size == 0:  # PIL's reduce is its box filter for a whole factor (512 -> 64: 0.18 against 0.34 ms)
            picture = picture.reduce(side // size)
        else:
            picture = picture.resize((size, size), Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR)
        pixels = np.asarray(picture, dtype=np.float32)
    return np.clip(pixels, 0.0, 1.0)


def read_picture(source: str | os.PathLike | bytes) -> np.ndarray:
    """A PNG/JPEG (any mode) as a 2-D grey float32 image in 0..1 (ITU-R 601 luma for colour).

    Raises:
        PIL.UnidentifiedImageError: the data is not a picture Pillow can read.
    """
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(handle) as picture:
        if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(picture, dtype=np.float32)
            top = 65535.0 if picture.mode.startswith("I;16") else max(float(values.max()), 1.0)
            return np.clip(values / top, 0.0, 1.0)
        return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
