"""Hash codes: packing, Hamming distances, and the structured sub-code layout."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_cbir.model.codes import (
    CodeLayout,
    hamming_distances,
    pack_codes,
    unpack_codes,
    weighted_hamming_distances,
)


def test_bits_are_the_sign_of_the_logits_packed_most_significant_first():
    logits = np.array([[1.0, -1, -1, -1, -1, -1, -1, 0.5, -2, 3, -1, -1, -1, -1, -1, -1]])
    packed = pack_codes(logits)
    assert packed.dtype == np.uint8 and packed.tolist() == [[0b10000001, 0b01000000]]
    np.testing.assert_array_equal(unpack_codes(packed), logits > 0)


def test_pack_refuses_bit_counts_that_are_not_whole_bytes():
    with pytest.raises(ValueError):
        pack_codes(np.zeros((1, 12)))


def test_hamming_distance_counts_differing_bits():
    rng = np.random.default_rng(1)
    bits = rng.random((50, 64)) > 0.5
    packed = np.packbits(bits, axis=1)
    expected = (bits != bits[7]).sum(axis=1)
    np.testing.assert_array_equal(hamming_distances(packed[7], packed), expected)


def test_weighted_hamming_charges_each_sub_code_its_weight():
    layout = CodeLayout.from_lengths({"modality": 8, "region": 8, "appearance": 16})
    query = np.zeros(32, dtype=bool)
    other = query.copy()
    other[[0, 1, 8, 20]] = True  # 2 modality bits, 1 region bit, 1 appearance bit
    weights = layout.bit_weights({"modality": 2.0, "region": 0.0})
    distance = weighted_hamming_distances(np.packbits(query), np.packbits(other)[None], weights)
    assert distance.tolist() == [2 * 2.0 + 0.0 + 1.0]


def test_layout_round_trips_through_json_and_rejects_gaps():
    layout = CodeLayout.from_lengths({"modality": 8, "appearance": 56})
    assert CodeLayout.from_json(layout.to_json()) == layout and layout.bits == 64
    with pytest.raises(ValueError):
        CodeLayout.from_json([{"name": "a", "start": 0, "length": 8}, {"name": "b", "start": 9, "length": 8}])


def test_unknown_sub_code_weight_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="known"):
        CodeLayout.from_lengths({"modality": 8}).bit_weights({"organ": 1.0})
