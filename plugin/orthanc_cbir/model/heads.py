"""The model's classifier heads (modality, region, pathology): how often they are right.

Here, below both the training and the evaluation that measure it, so that the accuracy a training
run reports and the one ``orthanc-cbir validate-model`` reports of its export are one measure.
"""

from __future__ import annotations

import numpy as np


def all_heads_correct(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) bool: for each image, whether every head in ``scores`` (N, classes) ranks
    its label first. A MedNIST class is right when modality and region both are."""
    correct = np.ones(len(next(iter(labels.values()))), dtype=bool)
    for head, values in scores.items():
        correct &= np.asarray(values).argmax(axis=1) == labels[head]
    return correct
