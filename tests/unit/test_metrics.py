"""Retrieval measures, checked on rankings small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_cbir.evaluation.metrics import (
    average_precision_at_k,
    code_statistics,
    exact_top_k,
    map_at_k,
    recall_vs_exact,
)
from orthanc_cbir.model.heads import all_heads_correct


def test_average_precision_at_k_by_hand():
    # relevant at ranks 1 and 3 of 5, three relevant in the gallery: (1/1 + 2/3) / 3
    assert average_precision_at_k(np.array([1, 0, 1, 0, 0]), 3, 5) == pytest.approx((1 + 2 / 3) / 3)
    # more relevant items than k: divide by k
    assert average_precision_at_k(np.array([1, 1, 0]), 10, 3) == pytest.approx(2 / 3)
    assert average_precision_at_k(np.array([0, 0, 0]), 4, 3) == 0.0


def test_map_at_k_averages_queries():
    gallery_labels = np.array([0, 0, 1, 1])
    ranked = np.array([[0, 1, 0], [0, 1, 1]])
    # query 0 (label 0): hits at 1 and 3 of 2 relevant -> (1 + 2/3) / 2;
    # query 1 (label 1): hits at 2, 3 -> (1/2 + 2/3) / 2
    expected = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert map_at_k(np.array([0, 1]), ranked, gallery_labels, 3) == pytest.approx(expected)


def test_exact_top_k_is_ordered_by_similarity():
    gallery = np.eye(4, dtype=np.float32)
    query = np.array([[0.1, 0.7, 0.2, 0.69]], dtype=np.float32)
    assert exact_top_k(query, gallery, 3).tolist() == [[1, 3, 2]]


def test_recall_against_exact_is_one_when_the_pool_is_the_whole_gallery():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((200, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    codes = np.packbits(rng.random((200, 32)) > 0.5, axis=1)
    curve = recall_vs_exact(features[:20], codes[:20], features, codes, pool_fractions=(0.05, 1.0), k=10)
    assert curve[1.0] == 1.0 and curve[0.05] < 1.0


def test_code_statistics_of_a_known_set():
    codes = np.packbits(np.array([[1] * 8, [1] * 8, [0] * 8, [1, 0] * 4], dtype=bool), axis=1)
    stats = code_statistics(codes)
    assert stats["distinct_codes"] == 3
    assert stats["mean_bucket_size"] == pytest.approx((2 + 2 + 1 + 1) / 4)


def test_an_image_counts_as_classified_only_when_every_head_is_right():
    scores = {"modality": np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]),
              "region": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])}  # fmt: skip
    labels = {"modality": np.array([0, 0, 0]), "region": np.array([1, 1, 1])}
    assert all_heads_correct(scores, labels).tolist() == [True, False, False]
