"""Views of an image for instance-level training: the changes a copy of an image
goes through in an archive (re-encoding, small shifts and zooms, intensity and
contrast drift, noise), so that the embedding learns to ignore them."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F


def jpeg_recompress(images: np.ndarray, rng: np.random.Generator, probability: float = 0.5,
                    quality: tuple[int, int] = (50, 95)) -> np.ndarray:  # fmt: skip
    """uint8 (N, H, W) with a random share re-encoded as JPEG at a random quality."""
    out = images.copy()
    for i in np.flatnonzero(rng.random(len(images)) < probability):
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, format="JPEG", quality=int(rng.integers(*quality)))
        out[i] = np.asarray(Image.open(buffer))
    return out


def random_view(batch: torch.Tensor, generator: torch.Generator, max_shift_px: float = 4.0,
                max_zoom: float = 0.05) -> torch.Tensor:  # fmt: skip
    """float (N, 1, H, W) in 0..1 -> a randomly shifted, zoomed (1 +- ``max_zoom``), rotated,
    intensity-changed view."""
    n, _, height, _ = batch.shape
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-0.05, 0.05)  # about +-3 degrees
    scale = uniform(1 - max_zoom, 1 + max_zoom)
    shift = uniform(-1, 1), uniform(-1, 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2] = shift[0] * (2 * max_shift_px / height)
    theta[:, 1, 2] = shift[1] * (2 * max_shift_px / height)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    view = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    gain = uniform(0.85, 1.15).view(n, 1, 1, 1)
    offset = uniform(-0.06, 0.06).view(n, 1, 1, 1)
    gamma = torch.exp(uniform(-0.1, 0.1)).view(n, 1, 1, 1)
    view = (view.clamp(0, 1) ** gamma) * gain + offset
    noise = uniform(0.0, 0.02).view(n, 1, 1, 1) * torch.randn(view.shape, generator=generator)
    return (view + noise).clamp(0, 1)
