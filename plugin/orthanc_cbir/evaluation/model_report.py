"""Validation figures of an exported model, measured through onnxruntime.

``orthanc-cbir validate-model`` runs :func:`validate_model` and writes the figures
into the model card. Everything here runs on held-out data only:

- MedNIST: gallery = the training file-number blocks, queries = the held-out
  blocks without byte-identical duplicates. Class accuracy; coarse-to-fine recall
  against the exact embedding top-10 for several Hamming pool sizes; code statistics.
- Copy detection: gallery images re-encoded as JPEG quality 70, shifted by up to
  4 px and changed +-10 % in intensity must find their original at rank 1 (a
  byte-identical duplicate of the original counts as the original).
- Pathology: PneumoniaMNIST val against train, relevance = same label, mAP@10.
- Real series: each slice of a real CT series, against that series plus all
  MedNIST images, must have a slice within +-2 positions (not itself) as top hit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..model.embedder import Embedder
from ..training.data import (
    ImageSet,
    block_split,
    drop_duplicates,
    image_digests,
    read_dicom_series,
    read_mednist,
    read_pneumonia,
)
from .metrics import all_heads_correct, code_statistics, exact_top_k, map_at_k, recall_vs_exact

POOL_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1)


@dataclass(frozen=True)
class ValidationData:
    """Where the held-out data lives; a source left ``None`` is not measured."""

    mednist: Path
    pneumonia: Path | None = None
    series: Path | None = None
    cache_dir: Path | None = None


def validate_model(embedder: Embedder, data: ValidationData, seed: int = 0, copies: int = 1000) -> dict:
    """Every figure above, as a JSON-ready dict."""
    mednist = read_mednist(data.mednist, data.cache_dir)
    train_index, validation_index = block_split(mednist)
    queries = drop_duplicates(validation_index, mednist)
    embedded = embedder.embed(mednist.as_float())
    gallery_features, gallery_codes = embedded.features[train_index], embedded.codes[train_index]
    query_features, query_codes = embedded.features[queries], embedded.codes[queries]

    layout = embedder.card.code_layout
    appearance = next(s for s in layout.sub_codes if s.name == "appearance")
    appearance_only = layout.bit_weights({s.name: 0.0 for s in layout.sub_codes if s.name != "appearance"})
    figures: dict = {
        "mednist": {
            "gallery": int(len(train_index)),
            "queries": int(len(queries)),
            "class_accuracy": _class_accuracy(embedded.probabilities, mednist, validation_index),
            "recall10_vs_exact": {
                "full_code": _curve(query_features, query_codes, gallery_features, gallery_codes),
                "appearance_bits": _curve(query_features, query_codes, gallery_features, gallery_codes, appearance_only),
            },
            "map10_class_exact": _map_exact(query_features, mednist.fine_class[queries], gallery_features,
                                            mednist.fine_class[train_index]),  # fmt: skip
            "code_statistics": {"bits": layout.bits, "appearance_bits": appearance.length,
                                **code_statistics(gallery_codes)},  # fmt: skip
        },
        "copy_detection": _copy_detection(embedder, mednist, train_index, gallery_features, seed, copies),
    }
    if data.pneumonia is not None:
        figures["pneumonia"] = _pathology(embedder, data.pneumonia)
    if data.series is not None:
        figures["real_series"] = _series(embedder, data.series, embedded.features)
    return figures


def _curve(qf, qc, gf, gc, weights=None) -> dict[str, float]:
    curve = recall_vs_exact(qf, qc, gf, gc, POOL_FRACTIONS, k=10, bit_weights=weights)
    return {f"{fraction:.3f}": round(recall, 4) for fraction, recall in curve.items()}


def _class_accuracy(probabilities: dict[str, np.ndarray], image_set: ImageSet, index: np.ndarray) -> float:
    scores = {head: probabilities[head][index] for head in ("modality", "region")}
    return round(float(all_heads_correct(scores, {h: image_set.labels[h][index] for h in scores}).mean()), 5)


def _map_exact(query_features, query_labels, gallery_features, gallery_labels, k: int = 10) -> float:
    top = exact_top_k(query_features, gallery_features, k)
    return round(map_at_k(query_labels, gallery_labels[top], gallery_labels, k), 4)


def perturb_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 image -> JPEG quality 70, shifted by up to 4 px (zero fill), intensity x U(0.9, 1.1)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=70)
    copy = np.asarray(Image.open(buffer), dtype=np.float32)
    dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
    shifted = np.zeros_like(copy)
    rows, columns = copy.shape
    shifted[max(dy, 0) : rows + min(dy, 0), max(dx, 0) : columns + min(dx, 0)] = copy[
        max(-dy, 0) : rows + min(-dy, 0), max(-dx, 0) : columns + min(-dx, 0)
    ]
    return np.clip(shifted * rng.uniform(0.9, 1.1), 0, 255) / 255.0


def _copy_detection(embedder, mednist: ImageSet, train_index, gallery_features, seed: int, copies: int) -> dict:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train_index), size=min(copies, len(train_index)), replace=False)
    queries = np.stack([perturb_copy(mednist.images[train_index[i]], rng) for i in chosen]).astype(np.float32)
    features = embedder.embed(queries).features
    top = exact_top_k(features, gallery_features, 1)[:, 0]
    digests = image_digests(mednist.images[train_index])
    found = [digests[t] == digests[c] for t, c in zip(top, chosen)]
    return {"queries": int(len(chosen)), "rank1": round(float(np.mean(found)), 4),
            "perturbation": "JPEG q70, shift <= 4 px, intensity x U(0.9, 1.1)"}  # fmt: skip


def _pathology(embedder, root: Path) -> dict:
    train, validation = read_pneumonia(root, "train"), read_pneumonia(root, "val")
    gallery, queries = embedder.embed(train.as_float()), embedder.embed(validation.as_float())
    labels = train.labels["pathology"]
    accuracy = float((queries.probabilities["pathology"].argmax(axis=1) == validation.labels["pathology"]).mean())
    return {
        "gallery": len(train), "queries": len(validation),
        "map10": _map_exact(queries.features, validation.labels["pathology"], gallery.features, labels),
        "accuracy": round(accuracy, 4),
    }  # fmt: skip


def _series(embedder, folder: Path, mednist_features: np.ndarray) -> dict:
    series = read_dicom_series(folder)
    features = embedder.embed(series.as_float()).features
    index = np.concatenate([features, mednist_features])
    top = exact_top_k(features, index, 2)
    hits = []
    for q, ranked in enumerate(top):
        best = ranked[1] if ranked[0] == q else ranked[0]
        hits.append(best < len(series) and abs(int(best) - q) <= 2)
    return {"series": folder.name, "slices": len(series), "index": int(len(index)),
            "top_hit_within_2_slices": round(float(np.mean(hits)), 4)}  # fmt: skip
