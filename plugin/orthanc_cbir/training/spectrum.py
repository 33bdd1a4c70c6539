"""The spectral half of the retrieval descriptor: a shift-invariant fingerprint.

A CNN embedding trained to ignore JPEG, shifts and intensity changes also learns
to ignore the fine detail that tells one slice from a near-identical one: with
the CNN alone, a re-encoded, 4-px-shifted copy of a MedNIST image found its
original at rank 1 only 63 % of the time. The magnitude of an image's Fourier
transform does not change when the image is shifted, changes little with JPEG,
and keeps the detail; so the descriptor the product ranks by is

    features = normalise([sqrt(1 - w) * cnn_embedding, sqrt(w) * spectral])

where ``spectral`` is the log-magnitude of the low-frequency coefficients
(|u|, |v| <= frequencies, Hann window, mean removed), centred and whitened by a
PCA fitted on the training images. Everything is matrix products with fixed
buffers, so it exports to ONNX like the network does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class SpectralDescriptor(nn.Module):
    """(N, 1, S, S) images in 0..1 -> (N, dims) L2-normalised whitened log-spectra.

    The projection is fitted by :meth:`fit`; until then the module is unusable.
    Only ``mean`` and ``projection`` are saved in a state dict: the DFT matrices
    and the window follow from ``size`` and ``frequencies``.
    """

    # the buffers __init__ registers (nn.Module's __getattr__ is typed Tensor | Module)
    row_cos: torch.Tensor
    row_sin: torch.Tensor
    column_cos: torch.Tensor
    column_sin: torch.Tensor
    window: torch.Tensor
    mean: torch.Tensor
    projection: torch.Tensor

    def __init__(self, size: int, frequencies: int, dims: int):
        super().__init__()
        self.size, self.frequencies, self.dims = size, frequencies, dims
        pixels = np.arange(size)
        rows = np.concatenate([np.arange(frequencies + 1), np.arange(-frequencies, 0)])  # u: both signs
        columns = np.arange(frequencies + 1)  # v >= 0: the other half mirrors it for a real image
        row_angle = 2 * math.pi * np.outer(rows, pixels) / size
        column_angle = 2 * math.pi * np.outer(columns, pixels) / size
        for name, value in {
            "row_cos": np.cos(row_angle), "row_sin": np.sin(row_angle),
            "column_cos": np.cos(column_angle).T, "column_sin": np.sin(column_angle).T,
            "window": np.outer(np.hanning(size), np.hanning(size)),
        }.items():  # fmt: skip
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)
        self.coefficients = len(rows) * len(columns)
        self.register_buffer("mean", torch.zeros(self.coefficients))
        self.register_buffer("projection", torch.zeros(self.coefficients, dims))

    def log_magnitudes(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, coefficients): log(1 + 10 |FFT|) of the windowed, mean-free image."""
        x = image[:, 0]
        x = (x - x.mean(dim=(1, 2), keepdim=True)) * self.window
        # F[u, v] = sum_yx x[y, x] exp(-2 pi i (u y + v x) / S), split into real matrix products
        by_cos, by_sin = x @ self.column_cos, x @ self.column_sin
        real = self.row_cos @ by_cos - self.row_sin @ by_sin
        imaginary = self.row_sin @ by_cos + self.row_cos @ by_sin
        magnitude = torch.sqrt(real * real + imaginary * imaginary)
        return torch.log1p(10.0 * magnitude).flatten(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize((self.log_magnitudes(image) - self.mean) @ self.projection, dim=1)

    @torch.no_grad()
    def fit(self, images: np.ndarray, batch: int = 2048) -> None:
        """Fit the centring and whitening PCA on float32 (N, 1, S, S) training images (N >= dims)."""
        if len(images) < self.dims or self.coefficients < self.dims:
            raise ValueError(f"a {self.dims}-d spectral PCA needs >= {self.dims} images and coefficients, "
                             f"got {len(images)} images and {self.coefficients} coefficients")  # fmt: skip
        spectra = np.concatenate(
            [self.log_magnitudes(torch.from_numpy(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
        ).astype(np.float64)
        mean = spectra.mean(axis=0)
        _, singular, components = np.linalg.svd(spectra - mean, full_matrices=False)
        # whitening: every kept direction weighs the same, so fine detail is not drowned by the first few
        projection = components[: self.dims].T / np.maximum(singular[: self.dims], 1e-8)
        self.mean.copy_(torch.from_numpy(mean))
        self.projection.copy_(torch.from_numpy(projection))


def combine_features(embedding: torch.Tensor, spectral: torch.Tensor, spectral_weight: float) -> torch.Tensor:
    """The product's descriptor: both halves concatenated, weighted, L2-normalised."""
    return F.normalize(
        torch.cat([math.sqrt(1 - spectral_weight) * embedding, math.sqrt(spectral_weight) * spectral], dim=1), dim=1
    )


def level_encoding(level: torch.Tensor, periods_mm: tuple[float, ...]) -> torch.Tensor:
    """(N,) levels in units of 100 mm -> (N, 2 * len(periods)) points on circles, norm 1.

    The longest period (over twice a body's length) orders head to pelvis without wrapping;
    the shorter ones separate slices 20 mm apart. Together, over 1.6 m, any two levels 50 mm
    or more apart lie farther apart than any two within 20 mm (tests/model pins it).
    """
    angles = torch.stack([level * (100.0 * 2 * math.pi / period) for period in periods_mm], dim=1)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1) / math.sqrt(len(periods_mm))


def with_level(descriptor: torch.Tensor, level: torch.Tensor, level_weight: float,
               periods_mm: tuple[float, ...]) -> torch.Tensor:  # fmt: skip
    """The descriptor (norm 1) with the level encoding appended at ``level_weight`` of the squared distance."""
    return torch.cat([math.sqrt(1 - level_weight) * descriptor,
                      math.sqrt(level_weight) * level_encoding(level, periods_mm)], dim=1)  # fmt: skip
