"""The anatomical level in the features (orthanc_cbir.model.level): read back, replaced, and
set per series so that a patient's bias in the model's predictions does not reach the index."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_cbir.index.schema import quantize
from orthanc_cbir.model.level import LevelEncoding, series_levels, series_offset
from orthanc_cbir.model.lung_extent import LUNG_SPAN_MM
from tests.records_factory import lung_profile

LEVEL = LevelEncoding(start=10, periods_mm=(3200.0, 800.0, 250.0, 160.0), weight=0.5)


def features_at(levels_mm: np.ndarray, seed: int = 0) -> np.ndarray:
    """Unit features: 10 random dims at half the squared length, then the level block."""
    rng = np.random.default_rng(seed)
    head = rng.normal(size=(len(levels_mm), 10))
    head *= np.sqrt(1 - LEVEL.weight) / np.linalg.norm(head, axis=1, keepdims=True)
    return np.concatenate([head, LEVEL.encode(np.asarray(levels_mm))], axis=1).astype(np.float32)


def test_a_level_is_read_back_from_stored_int8_features_within_a_millimetre():
    levels = np.linspace(-1500.0, 1500.0, 301)
    quantized, scales = quantize(features_at(levels))
    stored = quantized.astype(np.float32) * scales[:, None]
    assert np.abs(LEVEL.decode(stored) - levels).max() < 1.0


def test_replacing_the_level_keeps_the_other_dims_and_the_unit_length():
    features = features_at(np.array([-300.0, 0.0, 120.0]))
    moved = LEVEL.with_levels(features, np.array([10.0, 20.0, 30.0]))
    np.testing.assert_array_equal(moved[:, :10], features[:, :10])
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(LEVEL.decode(moved), [10.0, 20.0, 30.0], atol=1e-3)


def test_a_series_keeps_its_own_spacing_whatever_the_per_slice_bias():
    # what a chest CT training never saw gets: 0.8 of the true distances, 21 mm low, noise on top
    positions = np.arange(0.0, 250.0, 5.0)
    rng = np.random.default_rng(1)
    predicted = 0.8 * positions - 21.0 + rng.normal(0, 8, size=len(positions))
    no_lungs = np.full(len(positions), np.nan)
    refined = LEVEL.decode(LEVEL.refine_series(features_at(predicted), positions, no_lungs))
    np.testing.assert_allclose(np.diff(refined), np.diff(positions), atol=1e-3)
    assert abs(refined[0] - (positions[0] + np.median(predicted - positions))) < 1e-3


def test_a_series_showing_its_lung_apex_and_base_is_placed_in_the_lung_frame_whatever_the_model_reads():
    positions = np.arange(-500.0, -100.0, 5.0)
    predicted = 0.8 * positions + 60.0  # any bias: the anatomy overrules it
    levels = series_levels(predicted, positions, lung_profile(positions, apex=-150.0, base=-370.0))
    np.testing.assert_allclose(levels, (positions + 150.0) * LUNG_SPAN_MM / 220.0)


def test_a_series_that_shows_no_lungs_keeps_its_spacing_at_the_models_offset():
    positions = np.arange(-800.0, -600.0, 5.0)
    predicted = positions - 400.0
    np.testing.assert_allclose(series_levels(predicted, positions, np.zeros(len(positions))), positions - 400.0)


def test_the_offset_is_a_median_one_misread_slice_does_not_move():
    positions = np.arange(10.0)
    predicted = positions + 30.0
    predicted[3] = 900.0  # a scout, or the model misreading one slice
    assert series_offset(predicted, positions) == pytest.approx(30.0)


def test_the_offset_needs_one_position_per_prediction():
    with pytest.raises(ValueError, match="one position per predicted level"):
        series_offset(np.zeros(3), np.zeros(2))


def test_a_card_without_a_level_block_has_no_encoding_and_one_with_it_round_trips():
    assert LevelEncoding.from_card({"features": 512}) is None
    assert LevelEncoding.from_card({"level": LEVEL.to_card()}) == LEVEL
