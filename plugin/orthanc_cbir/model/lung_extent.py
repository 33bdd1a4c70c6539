"""The lung apex and base of a CT series, and the common frame they define.

A patient's slices are compared with another patient's at the same anatomical level, and
the level the network reads from one picture carries a bias of its patient (about 15 mm
on a held-out chest CT, README "The model"). Two landmarks every chest CT shows fix the
level exactly: the **lung apex** (the highest slice showing aerated lung) and the **lung
base** (the lowest, at the posterior costophrenic recesses). The **lung frame** puts the apex
at 0 mm and the base at ``-LUNG_SPAN_MM``, linear in between and beyond
(:meth:`LungLandmarks.frame`). The network learns its level in this frame
(:mod:`orthanc_cbir.training.landmarks` finds the landmarks of the training volumes in 3-D),
and the index places a series of axial CT slices that shows both landmarks in it directly
(:func:`orthanc_cbir.model.level.series_levels`).

The index sees a series one slice at a time, so the lungs are measured per slice
(:func:`aerated_lung_mm2`, about 1 ms a slice) and the landmarks found from those areas when the
series' level is set (:func:`series_landmarks`):
- aerated lung is tissue between :data:`GAS_HU` and :data:`AIR_HU` (parenchyma; the gas of the
  bowel and the stomach is darker), inside the body (the largest piece of tissue, holes
  filled) and at least :data:`MIDLINE_MM` from its midline (not the trachea);
- the lungs are the run of consecutive slices around the one showing most of it, each showing at
  least :data:`MIN_SLICE_SHARE` of that; the apex and the base are the run's ends;
- a landmark counts only where the series goes on beyond it, the next slice at most
  :data:`MAX_GAP_MM` away (a series still arriving, or one cut inside the lungs, has no base);
  both only a lung's length apart (:data:`SPAN_RANGE_MM`), one alone only with
  :data:`MIN_RUN_ALONE_MM` of lung beside it;
- where the lungs run off the series' top (an abdomen that begins at the lung bases), the base is
  placed from where they shrink to :data:`BASE_SHARE` of the top slice's: below that, the gas of
  the stomach and the bowel can carry a faint run on for centimetres.

A series without a landmark keeps the network's level. The rules were set on the training
volumes; on the 15 real CT volumes at hand they find the landmarks of each chest within 10 mm of
those found in 3-D, and no landmark in an abdomen that does not show the lungs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..dicom.pixels import hounsfield_to_grey

AIR_HU = -500.0
"""Aerated lung (-900..-500 HU) and air lie below this; soft tissue above."""
GAS_HU = -950.0
"""Gas in the bowel and the stomach lies below this, aerated lung above it."""
AIR_GREY, GAS_GREY = (float(hounsfield_to_grey(hu)) for hu in (AIR_HU, GAS_HU))
"""The two in the model's grey scale, in which the slices are measured."""
MIDLINE_MM = 20.0
"""Air within this distance of the body's left-right centre is windpipe, not lung."""
MIN_SLICE_SHARE = 0.03
"""A slice shows lung when its lateral lung area is at least this share of the largest slice's."""
MIN_BASES_MM2 = 3_000.0
"""Aerated lung of the top slice of an abdomen CT that begins at the lung bases, at least (30 cm²;
the training and held-out abdomens: 94-199 cm²)."""
BASE_SHARE = 0.1
"""Where only the lung bases are shown, the base is found where the lung shrinks to this share of
the top slice's."""
BASE_BELOW_SHRUNK_MM = 12.0
"""... and lies this far below that: the median over the training chest CTs that show the whole lung
(10, 10, 12, 20 and 25 mm)."""
MIN_WIDEST_MM2 = 10_000.0
"""Aerated lung of the widest slice, at least: both adult lungs at the carina show 150-350 cm²
(the held-out and training chest CTs: 167-333 cm²); bowel gas of an abdomen rarely does."""
MIN_RUN_ALONE_MM = 100.0
"""One landmark without the other counts only where the lungs run this far from it in the series
(the chest CTs cut inside the lungs: 200-220 mm; a gas-filled loop of bowel is shorter)."""
SPAN_RANGE_MM = (150.0, 350.0)
"""Apex-to-base distances of adult lungs on CT; anything else is a detection error."""
LUNG_SPAN_MM = 250.0
"""Apex-to-base distance of the common frame (a typical adult's, on CT)."""
MAX_GAP_MM = 15.0
"""A landmark is placed to within the distance to the series' next slice beyond it."""
MAX_BODY_SHARE = 0.9
"""A piece of tissue whose filled outline covers more of the picture is a field-of-view ring."""
MEASURED_SIDE = 128
"""Slices are measured on every n-th pixel, n chosen so that the longer side has at most this many
(2.7 mm pixels for a 350 mm field of view: the areas change by about 1 %, the time by 10x)."""


@dataclass(frozen=True)
class LungLandmarks:
    """Positions along the body axis (mm, the series' own z), ``None`` where not shown."""

    apex_mm: float | None
    base_mm: float | None

    def frame(self, z_mm: np.ndarray) -> np.ndarray | None:
        """Positions in the lung frame (apex 0, base ``-LUNG_SPAN_MM``): scaled to it when both
        landmarks are shown a lung's length apart, shifted onto it (mm kept) when one is; ``None``
        when neither is."""
        apex, base = self.apex_mm, self.base_mm
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


def body_mask(tissue: np.ndarray) -> np.ndarray:
    """One slice's body with its holes (the lungs, the airways, gas) filled: the largest piece of
    tissue that does not enclose the whole picture. Air outside it (around the body, inside the
    table's hollow shell) is not lung; a bright ring outside a scanner's field of view encloses
    everything and is passed over."""
    labels, _ = ndimage.label(tissue)
    for label in np.argsort(np.bincount(labels.ravel())[1:])[::-1] + 1:
        filled = filled_holes(labels == label)
        if filled.mean() < MAX_BODY_SHARE:
            return filled
    return np.zeros_like(tissue)


def filled_holes(piece: np.ndarray) -> np.ndarray:
    """``piece`` (2-D bool) with its holes filled, as :func:`scipy.ndimage.binary_fill_holes` fills
    them: a hole is a piece of the background (4-connected) that does not reach the picture's edge.
    One labelling of the background instead of scipy's dilation until nothing changes: the same
    mask in 0.14 against 0.42 ms on the real chest CT's 128 x 128 slices (a third of the lung
    measure, which every axial CT slice the workers index goes through)."""
    background, count = ndimage.label(~piece)  # scipy's default structure: 4-connected, as its fill's
    outside = np.zeros(count + 1, bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    outside[0] = False  # label 0: the piece itself
    return ~np.take(outside, background)


def lateral_columns(body: np.ndarray, column_mm: float) -> np.ndarray:
    """The columns at least :data:`MIDLINE_MM` from the body's left-right centre."""
    columns = np.arange(body.shape[1])
    centre = float((body.sum(axis=0) * columns).sum() / max(int(body.sum()), 1))
    return np.abs(columns - centre) * column_mm >= MIDLINE_MM


def aerated_lung_mm2(grey: np.ndarray, row_mm: float, column_mm: float) -> float:
    """The aerated lung of one axial CT slice (the model's grey scale, rows x columns) in mm²."""
    step = max(1, -(-max(grey.shape) // MEASURED_SIDE))
    picture = np.asarray(grey)[::step, ::step]
    air = picture < AIR_GREY
    body = body_mask(~air)
    if not body.any():
        return 0.0
    lung = air & body & (picture > GAS_GREY)
    return float(lung[:, lateral_columns(body, column_mm * step)].sum() * row_mm * column_mm * step * step)


def series_landmarks(lung_mm2: np.ndarray, positions_mm: np.ndarray) -> LungLandmarks:
    """The lung apex and base of a series from its slices' :func:`aerated_lung_mm2` (NaN: not
    measured, left out) at their positions along the body axis (mm, towards the head)."""
    areas, positions = np.asarray(lung_mm2, np.float64), np.asarray(positions_mm, np.float64)
    measured = np.isfinite(areas) & np.isfinite(positions)
    order = np.argsort(positions[measured], kind="stable")
    areas, positions = areas[measured][order], positions[measured][order]
    if not len(areas) or areas.max() < MIN_BASES_MM2:
        return LungLandmarks(None, None)
    low, high = _run(areas, MIN_SLICE_SHARE)
    if high == len(areas) - 1:
        # The lungs run off the series' top: an abdomen that begins at the lung bases. Bowel and stomach
        # gas below them can carry the faint 3 % run on down; where the lungs shrink to a tenth is theirs.
        if int(areas.argmax()) != len(areas) - 1:
            return LungLandmarks(None, None)
        low, _ = _run(areas, BASE_SHARE)
        shrunk = _beyond(positions, low, -1)
        return LungLandmarks(None, None if shrunk is None else shrunk - BASE_BELOW_SHRUNK_MM)
    if areas.max() < MIN_WIDEST_MM2:
        return LungLandmarks(None, None)
    apex, base = _beyond(positions, high, +1), _beyond(positions, low, -1)
    if (apex is None) != (base is None) and positions[high] - positions[low] < MIN_RUN_ALONE_MM:
        return LungLandmarks(None, None)  # a chest still arriving, or gas that ends like a lung would
    return LungLandmarks(apex, base)


def _run(areas: np.ndarray, share: float) -> tuple[int, int]:
    """The first and last index of the consecutive slices around the widest that show at least
    ``share`` of its lung."""
    widest = int(areas.argmax())
    showing = areas >= share * areas[widest]
    low = high = widest
    while low > 0 and showing[low - 1]:
        low -= 1
    while high < len(areas) - 1 and showing[high + 1]:
        high += 1
    return low, high


def _beyond(positions: np.ndarray, end: int, step: int) -> float | None:
    """The position of the run's ``end``, if the series goes on beyond it (``step``: +1 towards the
    head, -1 towards the feet), its next slice at most :data:`MAX_GAP_MM` away."""
    after = end + step
    if not 0 <= after < len(positions) or abs(positions[after] - positions[end]) > MAX_GAP_MM:
        return None
    return float(positions[end])
