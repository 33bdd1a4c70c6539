"""Splits and pairs of the training data: block split, duplicates, neighbours, ITQ."""

from __future__ import annotations

import numpy as np
import pytest

from orthanc_cbir.training.data import LABELS, ImageSet, block_split, drop_duplicates
from orthanc_cbir.training.itq import fit_itq


def image_set(classes: list[int], positions: list[int], images: np.ndarray | None = None, group=None) -> ImageSet:
    n = len(classes)
    images = images if images is not None else np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2)
    return ImageSet(images, {h: np.full(n, -1) for h in LABELS}, np.array(group if group is not None else classes),
                    np.array(positions), [str(i) for i in range(n)], fine_class=np.array(classes))  # fmt: skip


def test_block_split_holds_out_whole_contiguous_blocks_per_class():
    classes = [0] * 100 + [1] * 100
    positions = list(range(100, 0, -1)) + list(range(100))  # class 0 stored in reverse order
    train, validation = block_split(image_set(classes, positions), block=10, every=5)
    assert len(train) + len(validation) == 200 and not set(train) & set(validation)
    for cls in (0, 1):
        held = np.sort(np.array(positions)[[i for i in validation if classes[i] == cls]])
        # blocks 2 and 7 of each class (file-number order): two runs of 10 consecutive numbers
        assert len(held) == 20 and np.all(np.diff(held[:10]) == 1) and np.all(np.diff(held[10:]) == 1)


def test_drop_duplicates_removes_byte_identical_queries():
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    images[1] = 7
    images[2] = 9  # only 0 and 3 are identical
    kept = drop_duplicates(np.array([0, 1, 2, 3]), image_set([0, 0, 0, 0], [0, 1, 2, 3], images))
    assert kept.tolist() == [1, 2]


def test_neighbour_index_pairs_adjacent_slices_of_one_stack_only():
    torch = pytest.importorskip("torch")  # noqa: F841 - train.py imports torch
    from orthanc_cbir.training.train import neighbour_index

    data = image_set([0, 0, 0, 1, 1], [5, 6, 9, 1, 2], group=[0, 0, 0, -1, -1])
    assert neighbour_index(data).tolist() == [1, 0, -1, -1, -1]


def test_itq_lowers_the_quantisation_loss_of_its_start():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2000, 32)) @ rng.standard_normal((32, 32))
    mean, projection = fit_itq(features, bits=16, iterations=0)
    mean_fit, projection_fit = fit_itq(features, bits=16, iterations=50)

    def loss(m, p):  # ITQ's objective: ||sign(VR) - VR||^2 (same PCA V, so same scale)
        v = (features - m) @ p
        return float(np.square(np.sign(v) - v).sum())

    assert projection_fit.shape == (32, 16)
    assert loss(mean_fit, projection_fit) < loss(mean, projection)


def test_itq_refuses_more_bits_than_dimensions():
    with pytest.raises(ValueError):
        fit_itq(np.zeros((10, 4)), bits=8)
