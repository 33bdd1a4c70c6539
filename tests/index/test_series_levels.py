"""Axial slices indexed at their series' level (orthanc_cbir.index.series_levels), on a real
redis-server: a patient's bias in the model's per-slice levels must not reach the index."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from orthanc_cbir.index import IndexStore
from orthanc_cbir.index.series_levels import ENTRY, TOLERANCE_MM
from orthanc_cbir.index.snapshot import IndexSnapshot
from orthanc_cbir.model.level import LevelEncoding
from orthanc_cbir.model.lung_extent import LUNG_SPAN_MM
from tests.records_factory import DIM, lung_profile, make_info, make_records

LEVEL = LevelEncoding(start=DIM - 6, periods_mm=(3200.0, 800.0, 250.0), weight=0.5)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
POSITIONS = np.arange(-400.0, -200.0, 5.0)  # 40 slices of 5 mm


@pytest.fixture
def level_store(client):
    return IndexStore(client, dataclasses.replace(make_info(), level=LEVEL))


def series(predicted_mm: np.ndarray, positions: np.ndarray = POSITIONS, orientation=AXIAL, name: str = "s1",
           lung_mm2: np.ndarray | None = None):  # fmt: skip
    """One series' records whose features say the model's ``predicted_mm`` levels (and whose slices
    show ``lung_mm2`` of aerated lung, where given)."""
    records = make_records(len(positions), seed=len(name), prefix=f"1.2.826.0.1.3680043.8.498.{len(name)}")
    lungs = [None] * len(positions) if lung_mm2 is None else [float(area) for area in lung_mm2]
    out = []
    for record, position, level, lung in zip(records, positions, predicted_mm, lungs, strict=True):
        head = record.features[: LEVEL.start]
        head = head * np.sqrt(1 - LEVEL.weight) / np.linalg.norm(head)
        features = np.concatenate([head, LEVEL.encode(np.array([level]))[0]]).astype(np.float32)
        metadata = dataclasses.replace(record.metadata, series_instance_uid=f"1.2.3.{name}",
                                       image_position_patient=(-150.0, -150.0, float(position)),
                                       image_orientation_patient=orientation)  # fmt: skip
        out.append(dataclasses.replace(record, metadata=metadata, features=features, lung_mm2=lung))
    return out


def biased(positions: np.ndarray = POSITIONS, seed: int = 0) -> np.ndarray:
    """What the model gives a chest CT it never saw: 0.8 of the distances, 21 mm low, 8 mm noise."""
    return 0.8 * positions - 21.0 + np.random.default_rng(seed).normal(0, 8, size=len(positions))


def indexed_levels(store: IndexStore, records) -> np.ndarray:
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    return LEVEL.decode(snapshot.vectors(np.array([store.row(r.key) for r in records])))


def test_every_slice_ends_at_its_series_level_whatever_order_its_batches_come_in(level_store):
    predicted = biased()
    records = series(predicted)
    snapshot = IndexSnapshot(level_store)
    for start in (30, 0, 20, 10):  # the worker's batches, out of order
        level_store.add(records[start : start + 10])
        snapshot.refresh()  # a searcher that follows the writes sees the rewritten rows too
    levels = indexed_levels(level_store, records)
    offset = np.median(predicted - POSITIONS)
    # the series' own spacing (not 0.8 of it), at the offset of all its slices
    np.testing.assert_allclose(levels - POSITIONS, offset, atol=TOLERANCE_MM + 0.5)
    rows = np.array([level_store.row(r.key) for r in records])
    np.testing.assert_allclose(LEVEL.decode(snapshot.vectors(rows)), levels, atol=0.5)


def test_a_chest_that_shows_its_lung_apex_and_base_ends_in_the_lung_frame_whatever_the_model_reads(level_store):
    positions = np.arange(-500.0, -95.0, 5.0)
    lungs = lung_profile(positions, apex=-150.0, base=-370.0)
    records = series(biased(positions) + 45.0, positions, lung_mm2=lungs)
    for start in range(len(records) - 20, -1, -20):  # sent from the feet up: the base arrives first
        level_store.add(records[start : start + 20])
    level_store.add(records[: len(records) % 20])
    frame = (positions + 150.0) * LUNG_SPAN_MM / 220.0
    np.testing.assert_allclose(indexed_levels(level_store, records), frame, atol=TOLERANCE_MM + 0.5)


def test_slices_indexed_before_the_lungs_were_measured_still_count_in_their_series(level_store, client):
    """Entries of the version before the lung measure (12 bytes: predicted, position, offset) are read."""
    records = series(biased())
    level_store.add(records[:20])
    key = level_store.series_levels.key("1.2.3.s1")
    for uid, value in client.hgetall(key).items():  # what that version wrote for the same slices
        entry = np.frombuffer(value, ENTRY)[0]
        old = (entry["predicted"], entry["position"], entry["level"] - entry["position"])
        client.hset(key, uid, np.array(old, "<f4").tobytes())
    level_store.add(records[20:])
    levels = indexed_levels(level_store, records)
    np.testing.assert_allclose(levels - POSITIONS, np.median(biased() - POSITIONS), atol=TOLERANCE_MM + 0.5)


def test_the_rest_of_a_slices_features_is_kept_when_its_level_moves(level_store):
    records = series(biased())
    level_store.add(records[:5])
    level_store.add(records[5:])  # moves the first five
    snapshot = IndexSnapshot(level_store)
    snapshot.refresh()
    stored = snapshot.vectors(np.array([level_store.row(r.key) for r in records]))
    given = np.stack([r.features for r in records])
    # within int8 steps (the level block is each row's largest value: a step is about 0.41 / 127)
    np.testing.assert_allclose(stored[:, : LEVEL.start], given[:, : LEVEL.start], atol=0.008)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-3)


def test_images_that_are_not_axial_slices_keep_the_models_own_level(level_store):
    predicted = biased()
    coronal = series(predicted, orientation=CORONAL)
    unpositioned = [dataclasses.replace(r, metadata=dataclasses.replace(r.metadata, image_position_patient=None))
                    for r in series(predicted, name="s22")]  # fmt: skip
    level_store.add(coronal + unpositioned)
    np.testing.assert_allclose(indexed_levels(level_store, coronal), predicted, atol=0.5)
    np.testing.assert_allclose(indexed_levels(level_store, unpositioned), predicted, atol=0.5)


def test_two_series_of_one_batch_each_get_their_own_offset(level_store):
    first, second = series(biased(seed=1)), series(biased(seed=2) + 200.0, name="s333")
    level_store.add(first[::2] + second[::2])
    level_store.add(first[1::2] + second[1::2])
    for records, shift in ((first, 0.0), (second, 200.0)):
        offset = np.median(biased(seed=1 if shift == 0 else 2) + shift - POSITIONS)
        np.testing.assert_allclose(indexed_levels(level_store, records) - POSITIONS, offset, atol=TOLERANCE_MM + 0.5)


def test_a_slice_sent_again_keeps_its_row_and_its_series_stays_consistent(level_store):
    predicted = biased()
    records = series(predicted)
    level_store.add(records[:20])
    rows = [level_store.row(r.key) for r in records[:20]]
    again = series(predicted + 60.0)[:20]  # the same instances, read differently this time
    assert level_store.add(again + records[20:]).duplicates == 20
    assert [level_store.row(r.key) for r in records[:20]] == rows
    levels = indexed_levels(level_store, records)
    np.testing.assert_allclose(np.diff(levels), np.diff(POSITIONS), atol=2 * TOLERANCE_MM + 1.0)


def test_a_removed_slice_leaves_its_series_and_the_rest_still_moves(level_store, client):
    records = series(biased())
    level_store.add(records[:10])
    assert level_store.series_levels is not None
    key = level_store.series_levels.key("1.2.3.s1")
    assert level_store.remove(records[0].key) and client.hlen(key) == 9
    level_store.add(records[10:])  # moves the first batch, the removed slice aside
    assert client.hlen(key) == len(records) - 1
    assert level_store.count() == len(records) - 1
    levels = indexed_levels(level_store, records[1:])
    np.testing.assert_allclose(np.diff(levels), np.diff(POSITIONS[1:]), atol=2 * TOLERANCE_MM + 1.0)
    for record in records[1:]:
        level_store.remove(record.key)
    assert not client.exists(key)  # a series deleted from the archive leaves nothing behind


def test_an_index_without_a_level_stores_features_as_given(store):
    records = series(biased())
    store.add(records)
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    np.testing.assert_allclose(LEVEL.decode(snapshot.vectors(np.array([store.row(r.key) for r in records]))),
                               biased(), atol=0.5)  # fmt: skip
    assert store.series_levels is None
