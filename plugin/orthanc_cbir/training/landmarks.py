"""The lung apex and the lung base of a chest CT volume, found from its air-filled lungs.

Body-part regression trained on differences within a volume leaves each volume's offset
free: the network may place patient A's carina 30 mm above patient B's and no loss
objects. Two landmarks every chest CT shows fix that: the **lung apex** (the highest
slice showing aerated lung) and the **lung base** (the lowest, at the posterior
costophrenic recesses), the same two that ``evaluation/landmarks.json`` annotates by eye.
Training maps each volume that shows them onto one frame (:func:`anatomical_levels`):
apex at 0 mm, base at ``-LUNG_SPAN_MM``, linear in between and beyond.

The lungs are the large air-density (< -500 HU) structure inside the body: in each slice
the body is the largest piece of tissue that does not enclose the whole picture, holes
filled; the air inside it is labelled in 3-D, and components of at least :data:`MIN_LUNG_ML`
are the lungs (bowel gas and the stomach bubble are smaller and not connected to them). The
trachea and the main bronchi lie on the body's midline; lung is counted only
:data:`MIDLINE_MM` or more from it, so the apex is the lung's and not the windpipe's. A volume
whose lungs reach its first or last slice (the volume ends inside the lungs) lacks that
landmark; a volume with neither (an abdomen, a pelvis) keeps only its levels' differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..dicom.pixels import CT_MODEL_MAPPING

AIR_HU = -500.0
"""Aerated lung (-900..-500 HU) and air lie below this; soft tissue above."""
MIN_LUNG_ML = 500.0
"""Smallest 3-D air component counted as lung: both lungs of an adult hold litres."""
MIDLINE_MM = 20.0
"""Air within this distance of the body's left-right centre is windpipe, not lung."""
MIN_SLICE_SHARE = 0.03
"""A slice shows lung when its lateral lung area is at least this share of the largest slice's."""
SPAN_RANGE_MM = (150.0, 350.0)
"""Apex-to-base distances of adult lungs on CT; anything else is a detection error."""
MAX_BODY_SHARE = 0.9
"""A piece of tissue whose filled outline covers more of the picture is a field-of-view ring."""
LUNG_SPAN_MM = 250.0
"""Apex-to-base distance of the common frame (a typical adult's, on CT)."""


@dataclass(frozen=True)
class LungLandmarks:
    """Positions along the body axis (mm, the volume's own z), ``None`` where not shown."""

    apex_mm: float | None
    base_mm: float | None


def lung_landmarks(grey: np.ndarray, z_mm: np.ndarray, row_mm: float, column_mm: float) -> LungLandmarks:
    """The lung apex and base of a CT volume in the model's grey scale, [z, row, column], z ascending."""
    knots_hu, knots_grey = zip(*CT_MODEL_MAPPING, strict=True)
    air_grey = float(np.interp(AIR_HU, knots_hu, knots_grey))
    air = grey < air_grey
    bodies = np.stack([_body(~slice_air) for slice_air in air])
    components, count = ndimage.label(air & bodies)
    if count == 0:
        return LungLandmarks(None, None)
    slice_mm = float(np.median(np.diff(z_mm))) if len(z_mm) > 1 else 1.0
    millilitres = np.bincount(components.ravel())[1:] * row_mm * column_mm * slice_mm / 1000.0
    lung = np.isin(components, 1 + np.flatnonzero(millilitres >= MIN_LUNG_ML))
    if not lung.any():
        return LungLandmarks(None, None)
    columns = np.arange(grey.shape[2])
    areas = np.zeros(len(grey))
    for k, body in enumerate(bodies):
        centre = float((body.sum(axis=0) * columns).sum() / max(body.sum(), 1))
        lateral = np.abs(columns - centre) * column_mm >= MIDLINE_MM
        areas[k] = lung[k][:, lateral].sum() * row_mm * column_mm
    showing = np.flatnonzero(areas >= MIN_SLICE_SHARE * areas.max())
    if len(showing) == 0:
        return LungLandmarks(None, None)
    lowest, highest = int(showing.min()), int(showing.max())
    base = None if lowest == 0 else float(z_mm[lowest])
    apex = None if highest == len(z_mm) - 1 else float(z_mm[highest])
    return LungLandmarks(apex, base)


def _body(tissue: np.ndarray) -> np.ndarray:
    """One slice's body with its holes (the lungs, the airways, gas) filled: the largest piece of
    tissue that does not enclose the whole picture. Air outside it (around the body, inside the
    table's hollow shell) is not lung; a bright ring outside a scanner's field of view encloses
    everything and is passed over."""
    labels, _ = ndimage.label(tissue)
    for label in np.argsort(np.bincount(labels.ravel())[1:])[::-1] + 1:
        filled = ndimage.binary_fill_holes(labels == label)
        if filled.mean() < MAX_BODY_SHARE:
            return filled
    return np.zeros_like(tissue)


def anatomical_levels(z_mm: np.ndarray, landmarks: LungLandmarks) -> np.ndarray | None:
    """The volume's slice positions in the common frame (apex 0, base ``-LUNG_SPAN_MM``): scaled
    to it when both landmarks are shown a lung's length apart, shifted onto it (mm kept) when
    one is; ``None`` when neither is."""
    apex, base = landmarks.apex_mm, landmarks.base_mm
    z = np.asarray(z_mm, dtype=np.float64)
    if apex is not None and base is not None:
        if not SPAN_RANGE_MM[0] <= apex - base <= SPAN_RANGE_MM[1]:
            return None
        return (z - apex) * LUNG_SPAN_MM / (apex - base)
    if apex is not None:
        return z - apex
    if base is not None:
        return z - base - LUNG_SPAN_MM
    return None
