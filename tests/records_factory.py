"""Synthetic index records whose features, codes and metadata are known: what the index and
strategy tests rank, with a real redis-server (tests/index) or without one (tests/unit)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np

from orthanc_cbir.dicom.metadata import InstanceMetadata
from orthanc_cbir.index import IndexInfo, IndexRecord
from orthanc_cbir.model.codes import CodeLayout, pack_codes

LAYOUT = CodeLayout.from_lengths({"modality": 8, "region": 8, "pathology": 8, "appearance": 104})
LABELS = {"modality": ("CT", "MR", "XR"), "region": ("abdomen", "breast", "chest", "hand", "head"),
          "pathology": ("normal", "pneumonia")}  # fmt: skip
DIM = 32
BASE = InstanceMetadata(
    sop_instance_uid=None, series_instance_uid=None, study_instance_uid=None, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    modality=None, body_part_examined=None, study_description=None, series_description=None, patient_sex=None,
    patient_age_years=None, study_date=None, manufacturer=None, rows=64, columns=64, number_of_frames=1,
    pixel_spacing_mm=None, slice_location=None, image_position_patient=None, patient_key=None,
)  # fmt: skip


def make_info(version: str = "test-model@000000000000", dim: int = DIM) -> IndexInfo:
    return IndexInfo(version, dim, LAYOUT, LABELS)


def make_records(n: int, seed: int = 0, dim: int = DIM, prefix: str = "1.2.826.0.1.3680043.8.498") -> list[IndexRecord]:
    """``n`` records in 4 classes: features near a class centre, codes = class bits + sign bits of
    a random projection of the features, metadata spread over modalities, sexes, ages, dates,
    patients (one per 10 records), studies and series."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim))
    projection = rng.normal(size=(dim, 104))
    records = []
    for i in range(n):
        klass = i % 4
        features = centres[klass] + 0.7 * rng.normal(size=dim)
        features = (features / np.linalg.norm(features)).astype(np.float32)
        label_bits = np.array([klass % 3, klass, klass % 2])[:, None] == np.arange(8)[None]  # one-hot per head
        bits = np.concatenate([label_bits.ravel(), features @ projection > 0]).astype(np.float32) - 0.5
        metadata = dataclasses.replace(
            BASE, sop_instance_uid=f"{prefix}.{seed}.{i}", series_instance_uid=f"{prefix}.{seed}.s{i // 5}",
            study_instance_uid=f"{prefix}.{seed}.t{i // 10}", modality=("CT", "MR", "XR", "CT")[klass],
            body_part_examined=("CHEST", "HEAD", "HAND", "ABDOMEN")[klass], patient_sex="MF"[i % 2],
            patient_age_years=float(20 + i % 60), study_date=dt.date(2020, 1, 1) + dt.timedelta(days=i),
            patient_key=f"{i // 10 + 1:016x}",
        )  # fmt: skip
        # the model's heads agree with the file (CHEST, HEAD, HAND, ABDOMEN -> chest, head, hand, abdomen)
        probabilities = {"modality": np.eye(3, dtype=np.float32)[klass % 3],
                         "region": np.eye(5, dtype=np.float32)[(2, 4, 3, 0)[klass]],
                         "pathology": np.eye(2, dtype=np.float32)[klass % 2]}  # fmt: skip
        records.append(IndexRecord(metadata, features, pack_codes(bits[None])[0], probabilities))
    return records


def lung_profile(positions: np.ndarray, apex: float, base: float, widest_mm2: float = 25_000.0) -> np.ndarray:
    """A series' aerated lung per slice (mm²): none outside apex..base, widest two thirds of the way down."""
    widest = apex - 2 * (apex - base) / 3
    share = np.where(positions >= widest, (apex - positions) / (apex - widest), (positions - base) / (widest - base))
    return np.where((positions >= base) & (positions <= apex), 1_000.0 + widest_mm2 * share, 0.0)
