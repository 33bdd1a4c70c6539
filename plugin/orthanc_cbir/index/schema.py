"""What the index stores in Redis, and under which keys.

One model version = one key space ``cbir:{<version>}:...``. The braces are a
Redis Cluster hash tag: every key of a version lands in one slot, so pipelines,
MULTI and Lua work the same on a single server, on Cluster and on managed Redis.
Two model versions never share a key, so an answer can never mix their vectors.

Per instance (SOPInstanceUID):

- ``uid:<SOPInstanceUID>``: a hash with the instance's row number, its metadata
  record (JSON, no patient name or ID), class probabilities, Orthanc ids;
- a *row*: a dense integer, the instance's place in fixed-width column blocks.

Column blocks (``block:<column>:<n>``, strings of :data:`BLOCK_ROWS` rows) hold
what a query scans: ``features`` (float16, D per row), ``codes`` (B/8 bytes per
row) and ``attributes`` (:data:`ATTRIBUTES`, the filterable metadata and the
predicted classes). A searcher caches the blocks and re-reads only those whose
generation (``generations`` hash) moved since it last looked.

Hash-code buckets for multi-index hashing (:mod:`.hamming`): ``mih:<j>:<value>``
strings of little-endian uint32 rows, appended on insert.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..dicom.metadata import InstanceMetadata

BLOCK_ROWS = 4096
"""Rows per column block: big enough that a million rows are 245 keys, small
enough that one insert rewrites nothing (writes are SETRANGE into the block)."""

NO_CLASS = 255
NO_CLUSTER = -1

ATTRIBUTES = np.dtype(
    [
        ("live", "u1"),  # 1 while the instance is indexed; 0 after removal
        ("modality", "<u4"),  # category_hash of Modality; 0 = unknown
        ("body_part", "<u4"),  # category_hash of BodyPartExamined (upper case)
        ("sex", "<u4"),  # category_hash of M / F / O
        ("age", "<f4"),  # years; NaN = unknown
        ("study_date", "<i4"),  # YYYYMMDD; 0 = unknown
        ("patient", "<u8"),  # the metadata record's one-way patient_key; 0 = unknown
        ("study", "<u8"),  # uid_hash of StudyInstanceUID
        ("series", "<u8"),  # uid_hash of SeriesInstanceUID
        ("predicted_modality", "u1"),  # argmax of each label head; NO_CLASS if the model has no such head
        ("predicted_region", "u1"),
        ("predicted_pathology", "u1"),
        ("cluster", "<i4"),  # cluster of the last `orthanc-cbir recluster`; NO_CLUSTER before
    ]
)
"""The filterable facts of a row, fixed width so that a block is one numpy array."""


def category_hash(value: str | None) -> int:
    """A short text value (modality, body part, sex) as a non-zero uint32; ``None`` -> 0."""
    if not value:
        return 0
    return int.from_bytes(hashlib.blake2b(value.strip().upper().encode(), digest_size=4).digest(), "little") or 1


def uid_hash(uid: str | None) -> int:
    """A UID as a non-zero uint64 (for equality tests); ``None`` -> 0."""
    if not uid:
        return 0
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "little") or 1


@dataclass(frozen=True)
class KeySpace:
    """Redis key names of one model version."""

    version: str
    prefix: str = "cbir"

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.version}}}"

    def instance(self, sop_instance_uid: str) -> str:
        return f"{self.base}:uid:{sop_instance_uid}"

    def block(self, column: str, number: int) -> str:
        return f"{self.base}:block:{column}:{number}"

    def bucket(self, substring: int, value: int) -> str:
        return f"{self.base}:mih:{substring}:{value}"

    @property
    def rows(self) -> str:
        """Hash row -> SOPInstanceUID (live rows only)."""
        return f"{self.base}:rows"

    @property
    def next_row(self) -> str:
        return f"{self.base}:next_row"

    @property
    def generations(self) -> str:
        """Hash block number -> write count; a searcher re-reads a block when it moved."""
        return f"{self.base}:generations"

    @property
    def info(self) -> str:
        """Hash: model version, feature dimension, code bits, label names; cluster centroids."""
        return f"{self.base}:info"


@dataclass(frozen=True)
class IndexRecord:
    """One instance as the index stores it."""

    metadata: InstanceMetadata
    features: np.ndarray
    """float32 (D,), L2-normalised (stored as float16)."""
    code: np.ndarray
    """uint8 (B/8,), packed."""
    probabilities: dict[str, np.ndarray]
    """Per label head, float32 (classes,)."""
    orthanc: dict[str, str] = field(default_factory=dict)
    """Orthanc ids where known: ``instance``, ``series``, ``study``, ``patient``."""
    frame: int = 0
    """The frame whose code and probabilities the record holds (0 for single-frame images)."""

    @property
    def key(self) -> str:
        if not self.metadata.sop_instance_uid:
            raise ValueError("an index record needs a SOPInstanceUID")
        return self.metadata.sop_instance_uid

    def attributes(self, heads: tuple[str, ...] = ("modality", "region", "pathology")) -> np.ndarray:
        """The record's :data:`ATTRIBUTES` row."""
        meta = self.metadata
        row = np.zeros((), dtype=ATTRIBUTES)
        row["live"] = 1
        row["modality"] = category_hash(meta.modality)
        row["body_part"] = category_hash(meta.body_part_examined)
        row["sex"] = category_hash(meta.patient_sex)
        row["age"] = np.nan if meta.patient_age_years is None else meta.patient_age_years
        row["study_date"] = int(meta.study_date.strftime("%Y%m%d")) if meta.study_date else 0
        row["patient"] = int(meta.patient_key, 16) if meta.patient_key else 0
        row["study"] = uid_hash(meta.study_instance_uid)
        row["series"] = uid_hash(meta.series_instance_uid)
        for head in heads:
            probabilities = self.probabilities.get(head)
            row[f"predicted_{head}"] = NO_CLASS if probabilities is None else int(np.argmax(probabilities))
        row["cluster"] = NO_CLUSTER
        return row
