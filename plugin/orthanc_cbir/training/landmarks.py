"""The lung apex and the lung base of a chest CT volume, found from its air-filled lungs.

Body-part regression trained on differences within a volume leaves each volume's offset
free: the network may place patient A's carina 30 mm above patient B's and no loss
objects. Two landmarks every chest CT shows fix that: the **lung apex** (the highest
slice showing aerated lung) and the **lung base** (the lowest, at the posterior
costophrenic recesses), the same two that ``evaluation/landmarks.json`` annotates by eye.
Training maps each volume that shows them onto one frame (apex at 0 mm, base at
``-LUNG_SPAN_MM``: :class:`~orthanc_cbir.model.lung_extent.LungLandmarks`), the frame in which
the index places a series that shows both (:mod:`orthanc_cbir.model.lung_extent` finds them
there slice by slice; here the whole volume is at hand, so in 3-D).

The lungs are the large air-density (< -500 HU) structure inside the body: in each slice
the body is the largest piece of tissue that does not enclose the whole picture, holes
filled; the air inside it is labelled in 3-D, and components of at least :data:`MIN_LUNG_ML`
are the lungs (bowel gas and the stomach bubble are smaller and not connected to them). The
trachea and the main bronchi lie on the body's midline; lung is counted only
:data:`~orthanc_cbir.model.lung_extent.MIDLINE_MM` or more from it, so the apex is the lung's
and not the windpipe's. A volume whose lungs reach its first or last slice (the volume ends
inside the lungs) lacks that landmark; a volume with neither (an abdomen, a pelvis) keeps only
its levels' differences.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..model.lung_extent import AIR_GREY, MIN_SLICE_SHARE, LungLandmarks, body_mask, lateral_columns

MIN_LUNG_ML = 500.0
"""Smallest 3-D air component counted as lung: both lungs of an adult hold litres."""


def lung_landmarks(grey: np.ndarray, z_mm: np.ndarray, row_mm: float, column_mm: float) -> LungLandmarks:
    """The lung apex and base of a CT volume in the model's grey scale, [z, row, column], z ascending."""
    air = grey < AIR_GREY
    bodies = np.stack([body_mask(~slice_air) for slice_air in air])
    components, count = ndimage.label(air & bodies)
    if count == 0:
        return LungLandmarks(None, None)
    slice_mm = float(np.median(np.diff(z_mm))) if len(z_mm) > 1 else 1.0
    millilitres = np.bincount(components.ravel())[1:] * row_mm * column_mm * slice_mm / 1000.0
    lung = np.isin(components, 1 + np.flatnonzero(millilitres >= MIN_LUNG_ML))
    if not lung.any():
        return LungLandmarks(None, None)
    areas = np.zeros(len(grey))
    for k, body in enumerate(bodies):
        areas[k] = lung[k][:, lateral_columns(body, column_mm)].sum() * row_mm * column_mm
    showing = np.flatnonzero(areas >= MIN_SLICE_SHARE * areas.max())
    if len(showing) == 0:
        return LungLandmarks(None, None)
    lowest, highest = int(showing.min()), int(showing.max())
    base = None if lowest == 0 else float(z_mm[lowest])
    apex = None if highest == len(z_mm) - 1 else float(z_mm[highest])
    return LungLandmarks(apex, base)
