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
- Pathology, our own test: PneumoniaMNIST's held-back train blocks against the rest
  of train (the official val split flatters).
- Organs across patients: OrganAMNIST test (unseen patients) against its train split,
  relevance = same organ, mAP@10.
- Cross-patient level: each slice of one real chest CT, against the slices of another
  patient's chest CT, must find as nearest a slice within 20 mm of its own level, after
  aligning the two series on two landmarks annotated once per series (landmarks.json).
- Plane and region across patients: axial slices and coronal / sagittal reformats of the
  real volumes; the top 5 hits from other patients share the query's plane and region.
  In both, each volume's axial slices are at their series' level, as the index holds them
  (:mod:`orthanc_cbir.model.level`); the real-series figure keeps each slice's own prediction.
- Window invariance: real CT slices saved with a lung window, a soft-tissue window and no
  window give embeddings whose distance is below a tenth of the distance to the
  neighbouring slice.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from ..dicom import DecodedInstance, decode_dataset
from ..model.embedder import Embedder
from ..model.heads import all_heads_correct
from ..training.anatomy import HELD_OUT_PATIENTS, VolumeSource, read_organamnist, read_volume
from ..training.data import (
    AUX_LABELS,
    ImageSet,
    block_split,
    drop_duplicates,
    image_digests,
    pneumonia_holdback,
    read_dicom_series,
    read_mednist,
    read_pneumonia,
)
from .metrics import code_statistics, exact_top_k, map_at_k, recall_vs_exact

POOL_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1)


LANDMARKS = Path(__file__).with_name("landmarks.json")
LEVEL_TOLERANCE_MM = 20.0
VALIDATION_REFORMATS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""Reformat positions for the plane measure: more, and mostly other, cuts than training's."""


@dataclass(frozen=True)
class ValidationData:
    """Where the held-out data lives; a source left ``None`` is not measured."""

    mednist: Path
    pneumonia: Path | None = None
    series: Path | None = None
    cache_dir: Path | None = None
    organamnist: Path | None = None
    """OrganAMNIST's ``organamnist.npz``."""
    level_pair: tuple[Path, Path] | None = None
    """Two chest CT series of two patients, both in :data:`LANDMARKS`."""
    volumes: list[VolumeSource] | None = None
    """Real volumes for the plane and region measure."""


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
                "appearance_bits": _curve(
                    query_features, query_codes, gallery_features, gallery_codes, appearance_only
                ),
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
        figures["window_invariance"] = window_invariance(embedder, data.series)
    if data.organamnist is not None:
        figures["organs"] = _organs(embedder, data.organamnist)
    if data.level_pair is not None:
        figures["cross_patient_level"] = cross_patient_level(embedder, *data.level_pair)
    if data.volumes:
        figures["plane_region"] = plane_region(embedder, data.volumes)
    return figures


def _curve(qf: np.ndarray, qc: np.ndarray, gf: np.ndarray, gc: np.ndarray,
           weights: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
    curve = recall_vs_exact(qf, qc, gf, gc, POOL_FRACTIONS, k=10, bit_weights=weights)
    return {f"{fraction:.3f}": round(recall, 4) for fraction, recall in curve.items()}


def _class_accuracy(probabilities: dict[str, np.ndarray], image_set: ImageSet, index: np.ndarray) -> float:
    scores = {head: probabilities[head][index] for head in ("modality", "region")}
    return round(float(all_heads_correct(scores, {h: image_set.labels[h][index] for h in scores}).mean()), 5)


def _map_exact(query_features: np.ndarray, query_labels: np.ndarray, gallery_features: np.ndarray,
               gallery_labels: np.ndarray, k: int = 10) -> float:  # fmt: skip
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


def _copy_detection(embedder: Embedder, mednist: ImageSet, train_index: np.ndarray, gallery_features: np.ndarray,
                    seed: int, copies: int) -> dict:  # fmt: skip
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train_index), size=min(copies, len(train_index)), replace=False)
    queries = np.stack([perturb_copy(mednist.images[train_index[i]], rng) for i in chosen]).astype(np.float32)
    features = embedder.embed(queries).features
    top = exact_top_k(features, gallery_features, 1)[:, 0]
    digests = image_digests(mednist.images[train_index])
    found = [digests[t] == digests[c] for t, c in zip(top, chosen, strict=True)]
    return {"queries": int(len(chosen)), "rank1": round(float(np.mean(found)), 4),
            "perturbation": "JPEG q70, shift <= 4 px, intensity x U(0.9, 1.1)"}  # fmt: skip


def _pathology(embedder: Embedder, root: Path) -> dict:
    train, validation = read_pneumonia(root, "train"), read_pneumonia(root, "val")
    kept, held_back = pneumonia_holdback(train)
    gallery, answers = embedder.embed(train.as_float()), embedder.embed(validation.as_float())
    truth = train.labels["pathology"]

    def figures(features: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> dict:
        return {
            "gallery": int(len(kept)), "queries": len(labels),
            "map10": _map_exact(features, labels, gallery.features[kept], truth[kept]),
            "accuracy": round(float((probabilities.argmax(axis=1) == labels).mean()), 4),
        }  # fmt: skip

    return {
        "val": figures(answers.features, answers.probabilities["pathology"], validation.labels["pathology"]),
        # the held-back part is in train's embedding already: its rows are the queries
        "held_back_test": figures(gallery.features[held_back], gallery.probabilities["pathology"][held_back],
                                  truth[held_back]),
    }  # fmt: skip


def _organs(embedder: Embedder, npz: Path) -> dict:
    train, test = read_organamnist(npz, "train"), read_organamnist(npz, "test")
    gallery, queries = embedder.embed(train.as_float()), embedder.embed(test.as_float())
    return {
        "gallery": len(train), "queries": len(test), "relevance": "same organ (11 organs)",
        "map10": _map_exact(queries.features, test.aux["organ"], gallery.features, train.aux["organ"]),
    }  # fmt: skip


def cross_patient_level(embedder: Embedder, first: Path, second: Path,
                        tolerance_mm: float = LEVEL_TOLERANCE_MM) -> dict:  # fmt: skip
    """Both ways: the share of slices (within the range both series cover once aligned) whose
    nearest slice of the other patient lies within ``tolerance_mm`` of the same level."""
    import json

    landmarks = json.loads(LANDMARKS.read_text())["series"]
    (za, fa), (zb, fb) = (_series_levels(embedder, folder) for folder in (first, second))
    # Align the second series on the first: apex to apex, base to base, linear in between.
    a, b = _landmark_pair(first, landmarks), _landmark_pair(second, landmarks)
    zb_aligned = a[0] + (zb - b[0]) * (a[1] - a[0]) / (b[1] - b[0])
    low, high = max(za.min(), zb_aligned.min()), min(za.max(), zb_aligned.max())
    distances = ((fa[:, None, :] - fb[None, :, :]) ** 2).sum(axis=2)
    in_a = np.flatnonzero((za >= low) & (za <= high))
    in_b = np.flatnonzero((zb_aligned >= low) & (zb_aligned <= high))
    a_to_b = [abs(zb_aligned[distances[i].argmin()] - za[i]) for i in in_a]
    b_to_a = [abs(za[distances[:, j].argmin()] - zb_aligned[j]) for j in in_b]
    return {
        "series": [first.name, second.name], "tolerance_mm": tolerance_mm,
        "landmarks": "lung apex and lung base, evaluation/landmarks.json",
        "first_to_second": round(float(np.mean(np.array(a_to_b) <= tolerance_mm)), 4),
        "second_to_first": round(float(np.mean(np.array(b_to_a) <= tolerance_mm)), 4),
        "median_error_mm": round(float(np.median(a_to_b + b_to_a)), 1),
        "slices": [int(len(in_a)), int(len(in_b))],
    }  # fmt: skip


def _landmark_pair(folder: Path, landmarks: dict) -> tuple[float, float]:
    import pydicom

    first_file = next(p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix == ".dcm")
    uid = str(pydicom.dcmread(first_file, stop_before_pixels=True).SeriesInstanceUID)
    entry = landmarks[uid]
    return float(entry["lung_apex_mm"]), float(entry["lung_base_mm"])


def _series_levels(embedder: Embedder, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    axial = read_volume(VolumeSource(folder, "CT", "chest", folder.name), group=0, reformats=())
    positions = axial.aux["level"].astype(np.float64)
    return positions, _as_indexed(embedder, embedder.embed(axial.as_float()).features, positions,
                                  axial.aux["lung_mm2"])  # fmt: skip


def _as_indexed(embedder: Embedder, features: np.ndarray, positions: np.ndarray, lung_mm2: np.ndarray) -> np.ndarray:
    """One series' axial slices as the index holds them: at the series' level (:mod:`..model.level`)."""
    level = embedder.card.level
    return features if level is None else level.refine_series(features, positions, lung_mm2)


def plane_region(
    embedder: Embedder, sources: list[VolumeSource], k: int = 5, held_out: tuple[str, ...] = HELD_OUT_PATIENTS
) -> dict:
    """Precision@k of same plane and same region among hits from other patients (queries: images
    of a region at least two patients show; volumes without a region label left out), over all
    queries and over those of ``held_out`` patients (never in training).

    The region of an axial slice is its anatomy: chest at or above the volume's lung base, abdomen
    below it (:data:`LANDMARKS`, ``lung_base``, annotated by eye), not the name of its study: a CT
    called abdomen that begins at the heart shows the chest there. Coronal and sagittal images keep
    the volume's region. ``by_volume_label`` gives the same measure with every image at its volume's
    region, as it was measured before."""
    import json

    # A volume without one region label (a pelvic MR, a neck-to-kidney CT) has no right answer here.
    sources = [source for source in sources if source.region is not None]
    images = ImageSet.concatenate([read_volume(source, group=i, reformats=VALIDATION_REFORMATS)
                                   for i, source in enumerate(sources)])  # fmt: skip
    features = embedder.embed(images.as_float()).features
    for group in np.unique(images.group):  # each volume's axial slices, one series each
        axial = np.flatnonzero((images.group == group) & ~np.isnan(images.aux["level"]))
        features[axial] = _as_indexed(embedder, features[axial], images.aux["level"][axial].astype(np.float64),
                                      images.aux["lung_mm2"][axial])  # fmt: skip
    volume_region = np.array([sources[g].region for g in images.group])
    bases = json.loads(LANDMARKS.read_text())["lung_base"]["volumes"]
    slice_region = anatomical_regions(volume_region, images.aux["level"],
                                      [bases.get(sources[g].path.name) for g in images.group])  # fmt: skip
    patient = np.array([sources[g].patient for g in images.group])
    return {
        "images": int(len(images)), "k": k, "region": "axial slices: their anatomy (lung base, landmarks.json)",
        **_plane_region_precision(features, images.aux["plane"], slice_region, patient, k, held_out),
        "by_volume_label": _plane_region_precision(features, images.aux["plane"], volume_region, patient, k,
                                                   held_out),
        "volumes": [f"{s.patient}: {s.path.name} ({s.modality} {s.region or ''})".strip() for s in sources],
    }  # fmt: skip


def anatomical_regions(volume_region: np.ndarray, z_mm: np.ndarray, lung_base: list[float | str | None]) -> np.ndarray:
    """Each image's region: an axial slice (``z_mm`` known) of a chest or abdomen volume is chest at or
    above its volume's ``lung_base`` (mm; ``"below"``: the volume ends inside the lungs, ``"above"``:
    it shows none), abdomen below it; any other image (a reformat, a volume without a base) keeps
    its volume's region."""
    regions = np.array(volume_region, dtype=object)
    for i, (z, base) in enumerate(zip(z_mm, lung_base, strict=True)):
        if np.isnan(z) or base is None or regions[i] not in ("chest", "abdomen"):
            continue
        regions[i] = "chest" if base == "below" or (base != "above" and z >= float(base)) else "abdomen"
    return regions


def _plane_region_precision(features: np.ndarray, plane: np.ndarray, region: np.ndarray, patient: np.ndarray,
                            k: int, held_out: tuple[str, ...]) -> dict:  # fmt: skip
    per_region = {r: len(set(patient[region == r])) for r in set(region)}
    queries = np.flatnonzero([per_region[r] >= 2 for r in region])
    distances = ((features[queries, None, :] - features[None, :, :]) ** 2).sum(axis=2)
    precision: list[float] = []
    per_plane: dict[str, list[float]] = {name: [] for name in AUX_LABELS["plane"]}
    unseen: dict[str, list[float]] = {name: [] for name in AUX_LABELS["plane"]}
    for row, q in enumerate(queries):
        others = np.flatnonzero(patient != patient[q])
        top = others[np.argsort(distances[row, others], kind="stable")[:k]]
        share = float(np.mean((plane[top] == plane[q]) & (region[top] == region[q])))
        precision.append(share)
        per_plane[AUX_LABELS["plane"][plane[q]]].append(share)
        if patient[q] in held_out:
            unseen[AUX_LABELS["plane"][plane[q]]].append(share)
    return {
        "queries": int(len(queries)),
        "precision_at_5": round(float(np.mean(precision)), 4),
        "per_plane": {name: round(float(np.mean(v)), 4) for name, v in per_plane.items() if v},
        "held_out_patients": list(held_out),
        "held_out_precision_at_5": round(float(np.mean([x for v in unseen.values() for x in v])), 4)
        if any(unseen.values()) else None,
        "held_out_per_plane": {name: round(float(np.mean(v)), 4) for name, v in unseen.items() if v},
    }  # fmt: skip


def window_invariance(embedder: Embedder, folder: Path, slices: int = 8) -> dict:
    """Slices of a real CT saved with a lung window, a soft-tissue window and none: the largest
    distance between those versions, against the distance to the neighbouring slice."""
    import pydicom

    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    chosen = np.linspace(1, len(datasets) - 2, slices).astype(int)
    ratios = []
    for i in chosen:
        versions = [_embed_with_window(embedder, datasets[i], window) for window in ((-600, 1600), (40, 350), None)]
        neighbour = _embed_with_window(embedder, datasets[i + 1], None)
        spread = max(float(np.linalg.norm(x - y)) for x in versions for y in versions)
        ratios.append(spread / max(float(np.linalg.norm(versions[2] - neighbour)), 1e-12))
    return {"slices": len(chosen), "windows": "lung -600/1600, soft tissue 40/350, none",
            "max_ratio_to_neighbour": round(float(max(ratios)), 6),
            "share_below_a_tenth": round(float(np.mean(np.array(ratios) < 0.1)), 4)}  # fmt: skip


def _embed_with_window(embedder: Embedder, dataset: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    ds = dataset.copy()
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    outcome = decode_dataset(ds)
    if not isinstance(outcome, DecodedInstance):
        raise ValueError(f"a real CT slice did not decode: {outcome}")
    return embedder.embed_pixels([outcome.images[0].model_pixels]).features[0]


def _series(embedder: Embedder, folder: Path, mednist_features: np.ndarray) -> dict:
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
