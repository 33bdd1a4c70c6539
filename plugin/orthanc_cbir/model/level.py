"""The anatomical level in the features, and its refinement over a series.

The model's ``features`` end with a block that places the image along the body axis
(body-part regression, Yan et al. 2018): the predicted level in mm on a few circles of
different periods (:class:`LevelEncoding`, described by the card's ``outputs.level``).

One slice alone says its level to within a few centimetres, and the error is not random
noise but a bias per patient: on a chest CT training never saw, predictions run about
0.8 times the true distances, shifted by 20 mm (README, "The model"). A series of parallel
slices knows more: its slices lie exactly their positions' distances apart. So the level a
slice is indexed with comes from its position along the body axis and its whole series
(:func:`series_levels`):
- a CT series that shows the lung apex or the lung base is placed in the lung frame they
  define (:mod:`.lung_extent`), the frame the network learnt its level in: the level is then
  the patient's anatomy, not the network's reading of it;
- any other series (an abdomen, a chest cut inside the lungs, an MR) is placed at its positions
  plus one offset, the median of its predicted levels less their positions
  (:func:`series_offset`, the line fit of body-part regression with its slope fixed at 1 mm
  per mm), so that at least its slices share the series' own spacing.

:mod:`orthanc_cbir.index.series_levels` applies this as slices are indexed; the evaluation
applies the same functions to the volumes it measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .lung_extent import series_landmarks


@dataclass(frozen=True)
class LevelEncoding:
    """Where and how the features hold the level: ``2 * len(periods_mm)`` dims from ``start``,
    ``[cos a_1 .. cos a_P, sin a_1 .. sin a_P] / sqrt(P)`` with ``a_i = 2 pi level / period_i``,
    times ``sqrt(weight)`` (the level's share of a squared distance between unit features)."""

    start: int
    periods_mm: tuple[float, ...]
    weight: float

    @classmethod
    def from_card(cls, outputs: dict[str, Any]) -> LevelEncoding | None:
        """From a card's ``outputs`` (``None`` when the model has no level block)."""
        level = outputs.get("level")
        if level is None:
            return None
        return cls(int(level["start"]), tuple(float(p) for p in level["periods_mm"]), float(level["weight"]))

    def to_card(self) -> dict[str, Any]:
        return {"start": self.start, "periods_mm": list(self.periods_mm), "weight": self.weight}

    @property
    def stop(self) -> int:
        return self.start + 2 * len(self.periods_mm)

    def encode(self, level_mm: np.ndarray) -> np.ndarray:
        """(N,) levels in mm -> (N, 2P) blocks as the features hold them."""
        angles = np.asarray(level_mm, np.float64)[:, None] * (2 * math.pi / np.asarray(self.periods_mm))[None, :]
        scale = math.sqrt(self.weight / len(self.periods_mm))
        return (scale * np.concatenate([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)

    def decode(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) levels in mm: the longest period fixes the turn, each shorter one
        refines within it (exact for levels within half the longest period of 0)."""
        block = np.asarray(features, np.float64)[:, self.start : self.stop]
        count = len(self.periods_mm)
        angles = np.arctan2(block[:, count:], block[:, :count])
        level = np.zeros(len(block))
        for i, period in enumerate(self.periods_mm):
            measured = angles[:, i] / (2 * math.pi) * period
            if i == 0:
                level = measured
            else:  # the multiple of this period nearest to the coarser estimate
                level = measured + period * np.round((level - measured) / period)
        return level

    def with_levels(self, features: np.ndarray, level_mm: np.ndarray) -> np.ndarray:
        """A copy of (N, D) features with their level blocks set to ``level_mm``; the other dims and
        the norm (every block has the same length) are unchanged."""
        out = np.array(features, dtype=np.float32, copy=True)
        out[:, self.start : self.stop] = self.encode(level_mm)
        return out

    def refine_series(self, features: np.ndarray, positions_mm: np.ndarray, lung_mm2: np.ndarray) -> np.ndarray:
        """:meth:`with_levels` at :func:`series_levels`: the (N, D) features of one series' parallel
        slices at their positions along the body axis (mm, towards the head), with each slice's
        :func:`~.lung_extent.aerated_lung_mm2` (NaN where not measured)."""
        return self.with_levels(features, series_levels(self.decode(features), positions_mm, lung_mm2))


def series_levels(predicted_mm: np.ndarray, positions_mm: np.ndarray, lung_mm2: np.ndarray) -> np.ndarray:
    """The level of each slice of one series: its position in the lung frame where the series shows
    a lung landmark (:func:`~.lung_extent.series_landmarks`), its position plus :func:`series_offset`
    otherwise."""
    positions = np.asarray(positions_mm, np.float64)
    framed = series_landmarks(lung_mm2, positions).frame(positions)
    return positions + series_offset(predicted_mm, positions) if framed is None else framed


def series_offset(predicted_mm: np.ndarray, positions_mm: np.ndarray) -> float:
    """The series' level at position 0: the median of predicted level less position over its slices
    (a median: a slice the model misreads, a scout or a slice of the legs, does not move it)."""
    predicted, positions = np.asarray(predicted_mm, np.float64), np.asarray(positions_mm, np.float64)
    if predicted.shape != positions.shape or not len(predicted):
        raise ValueError(f"one position per predicted level, at least one: {predicted.shape} and {positions.shape}")
    return float(np.median(predicted - positions))
