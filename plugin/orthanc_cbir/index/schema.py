"""What the index stores in Redis, and under which keys.

One model version = one key space ``cbir:{<version>}:...``. The braces are a
Redis Cluster hash tag: every key inside them lands in one slot, so a pipeline,
MULTI or WATCH over them works the same on a single server, on Cluster and on
managed Redis. Two model versions never share a key, so an answer can never mix
their vectors.

An index of ``S`` shards (``S`` > 1) keeps shard ``s``'s keys under
``cbir:{<version>#s.n}:...``: one hash tag, so one slot and one master, per shard.
``n`` is the smallest number that puts the tag's slot in the ``s``-th of ``S``
equal ranges of the 16384 slots (:func:`shard_tag`): a cluster whose masters hold
equal contiguous ranges (as ``redis-cli --cluster create`` makes them) gets the
shards spread evenly over its masters when ``S`` is a multiple of their number,
where plain ``#s`` tags would often put two shards on one master. With ``S`` = 1
the names are the unsharded ``cbir:{<version>}:...``. An instance
belongs to shard :func:`shard_of` (blake2b of its SOPInstanceUID, modulo ``S``).
Each shard has its own rows, blocks, generations, row map and instance keys; a
shard's local row ``r`` is the *global* row ``r * S + s`` that searches and
answers use. The ``info`` hash (layout, shard count, centroids) is always
``cbir:{<version>}:info``, whatever ``S``.

Per shard:

- ``uid:<SOPInstanceUID>``: one string per instance (:func:`encode_entry`): its
  local row, frame, metadata record (no patient name or ID), class probabilities
  and Orthanc ids, as compact JSON compressed with raw deflate;
- ``rows:<n>``: a hash of local row ``% ROWS_PER_MAP`` -> SOPInstanceUID for the
  local rows ``n * ROWS_PER_MAP ...``: small enough for Redis's compact listpack
  encoding (``hash-max-listpack-entries`` is 128 by default);
- ``count`` (live instances), ``next_row`` (rows ever allocated), ``generations``
  (hash block -> write count: a searcher re-reads a block when it moved);
- column blocks ``block:<column>:<n>``, strings of :data:`BLOCK_ROWS` rows, which
  hold what a query scans: ``features`` (int8, D per row), ``scales`` (float32,
  one per span of dims: a span's features are ``features * scale``, :class:`FeatureQuantizer`),
  ``codes`` (B/8 bytes per row) and
  ``attributes`` (:data:`ATTRIBUTES`, the filterable metadata and the predicted
  classes). A block is created at its full size (``SET NX`` of zeros) and then
  written with ``SETRANGE``: a string grown by ``SETRANGE`` keeps up to 1 MB of
  slack per block.

:data:`LAYOUT` numbers this arrangement; the ``info`` hash records it, and a store
refuses an index written with another one.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..dicom.metadata import InstanceMetadata
from ..model.regions import SliceRegions

LAYOUT = 3
"""The key and value layout of :mod:`orthanc_cbir.index` a new index is written with (1: float16
features, a hash per instance, one ``rows`` hash, multi-index buckets in Redis; 2: one scale per
row; 3: this module's, a scale per span of each row's features, :class:`FeatureQuantizer`)."""
READABLE_LAYOUTS = (2, 3)
"""Layouts read and written as they are: layout 2 differs only in its one scale per row, which an
index keeps for as long as it lives (a release that writes layout 3 refuses no index it made)."""

BLOCK_ROWS = 4095
"""Rows per column block: big enough that a million rows are 245 keys, small
enough that one insert rewrites nothing (writes are SETRANGE into the block).
4095, not 4096: a block of 4096 rows of 2^k bytes is a power of two, and with
Redis's string header (10 bytes) jemalloc would give it the next size class, a
quarter more (a 2 MiB features block at D = 512 would take 2.5 MiB)."""

ROWS_PER_MAP = 128
"""Rows per ``rows:<n>`` hash (Redis keeps a hash of up to 128 short entries as a listpack)."""

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


MAX_SHARDS = 1024
CLUSTER_SLOTS = 16384


def key_slot(tag: str) -> int:
    """The Redis Cluster slot of a hash tag (CRC16/XMODEM modulo 16384)."""
    return binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


def shard_tag(version: str, shard: int, shards: int) -> str:
    """The hash tag of one shard of ``shards``: ``<version>#<shard>.<n>`` with the smallest
    ``n`` whose slot lies in the shard's ``shards``-th of the slot space; ``<version>``
    for an index of one shard."""
    if shards == 1:
        return version
    if not 0 <= shard < shards <= MAX_SHARDS:
        raise ValueError(f"shard {shard} of {shards}: an index has 1 to {MAX_SHARDS} shards")
    n = 0
    while key_slot(f"{version}#{shard}.{n}") * shards // CLUSTER_SLOTS != shard:
        n += 1
    return f"{version}#{shard}.{n}"


def shard_of(sop_instance_uid: str, shards: int) -> int:
    """The shard an instance belongs to: blake2b of its SOPInstanceUID modulo ``shards``."""
    if shards == 1:
        return 0
    return int.from_bytes(hashlib.blake2b(sop_instance_uid.encode(), digest_size=8).digest(), "little") % shards


@dataclass(frozen=True)
class KeySpace:
    """Redis key names of one model version, or of one shard of it (:meth:`of_shard`)."""

    version: str
    prefix: str = "cbir"
    tag: str = ""
    """The hash tag (default: the version): the unsharded names, those of an index of one
    shard and every index's ``info``."""

    @classmethod
    def of_shard(cls, version: str, prefix: str, shard: int, shards: int) -> KeySpace:
        return cls(version, prefix, shard_tag(version, shard, shards))

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.tag or self.version}}}"

    def instance(self, sop_instance_uid: str) -> str:
        """String: the instance's :func:`encode_entry`."""
        return f"{self.base}:uid:{sop_instance_uid}"

    def block(self, column: str, number: int) -> str:
        return f"{self.base}:block:{column}:{number}"

    def rows(self, number: int) -> str:
        """Hash local row % :data:`ROWS_PER_MAP` -> SOPInstanceUID of local rows ``number * ROWS_PER_MAP ...``
        (live rows only)."""
        return f"{self.base}:rows:{number}"

    @property
    def count(self) -> str:
        """Instances indexed now (in this shard)."""
        return f"{self.base}:count"

    @property
    def next_row(self) -> str:
        """Local rows ever allocated (in this shard)."""
        return f"{self.base}:next_row"

    @property
    def generations(self) -> str:
        """Hash block number -> write count; a searcher re-reads a block when it moved."""
        return f"{self.base}:generations"

    @property
    def writes(self) -> str:
        """Counter of the writes that moved any generation: a searcher reads the generations
        only when it moved, one GET a query instead of a hash of every block."""
        return f"{self.base}:writes"

    @property
    def info(self) -> str:
        """Hash: ``schema`` (JSON: layout, shards, model version, feature dimension, code layout,
        label names) and ``centroids``. Only the unsharded key space's is used."""
        return f"{self.base}:info"


@dataclass(frozen=True)
class IndexRecord:
    """One instance as the index stores it."""

    metadata: InstanceMetadata
    features: np.ndarray
    """float32 (D,), L2-normalised (stored as int8 with a per-row scale: :func:`quantize`)."""
    code: np.ndarray
    """uint8 (B/8,), packed."""
    probabilities: dict[str, np.ndarray]
    """Per label head, float32 (classes,)."""
    orthanc: dict[str, str] = field(default_factory=dict)
    """Orthanc ids where known: ``instance``, ``series``, ``study``, ``patient``."""
    frame: int = 0
    """The frame whose code and probabilities the record holds (0 for single-frame images)."""
    lung_mm2: float | None = None
    """An axial CT slice's aerated lung (:func:`~orthanc_cbir.model.lung_extent.aerated_lung_mm2`),
    from which its series finds the lung landmarks (:mod:`.series_levels`); ``None`` for any other image."""
    regions: SliceRegions | None = None
    """The image's region entries (:mod:`.regions`), where the ``regions`` setting asks for them."""

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


def quantize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float -> int8 (N, D) and float32 scales (N,): ``q = round(f / max|f| * 127)``
    and ``scale = |f| / |q|`` (for a unit vector within quantisation error of ``max|f| / 127``),
    so that ``q * scale`` points within quantisation error of ``f`` *and* keeps its length:
    unit vectors stay unit vectors, distances stay in 0..2 and a row's distance to itself is
    the angle quantisation turned it by (about 0.01 at D = 512). An all-zero row has scale 0."""
    features = np.atleast_2d(np.asarray(features, np.float32))
    peak = np.abs(features).max(axis=1) if features.shape[1] else np.zeros(len(features), np.float32)
    step = np.where(peak > 0, peak / 127, 1).astype(np.float32)
    quantized = np.clip(np.rint(features / step[:, None]), -127, 127).astype(np.int8)
    length = np.linalg.norm(quantized.astype(np.float32), axis=1)
    scales = np.where(length > 0, np.linalg.norm(features, axis=1) / np.maximum(length, 1e-30), 0)
    return quantized, scales.astype(np.float32)


@dataclass(frozen=True)
class FeatureQuantizer:
    """How an index stores features: int8, each span of dims of a row quantized (:func:`quantize`) with a
    scale of its own (the ``scales`` column holds one float32 per span per row).

    Why spans: a row's largest value sets the step of every dim it shares a scale with. In the
    shipped model's features the level block (8 of 520 dims, half the squared length) peaks at
    0.35, the 512 appearance dims at 0.10 (medians), so one scale gave the appearance dims, which
    tell neighbours apart, a step 3.5 times coarser than their own; on the rows of
    ``benchmarks/query_scale.py``, an exact
    scan of the stored rows found 0.966 of the float32 top 10 at 10^6 rows with one scale per row,
    0.988 with one for the level block and one for the rest (float16 rows: 0.995, twice the bytes)."""

    dim: int
    spans: tuple[tuple[int, int], ...]
    """[start, stop) of each span; together they cover ``0 .. dim`` once."""

    @classmethod
    def split(cls, dim: int, block: tuple[int, int] | None = None) -> FeatureQuantizer:
        """One span, or ``block`` (``[start, stop)``: the level block) and the dims either side of it."""
        cuts = sorted({0, dim, *(block or ())})
        return cls(dim, tuple((a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a))

    @property
    def scales_per_row(self) -> int:
        return len(self.spans)

    def quantize(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float -> int8 (N, D) and float32 scales (N, spans): each span keeps its length."""
        features = np.atleast_2d(np.asarray(features, np.float32))
        quantized = np.empty(features.shape, np.int8)
        scales = np.empty((len(features), len(self.spans)), np.float32)
        for s, (start, stop) in enumerate(self.spans):
            quantized[:, start:stop], scales[:, s] = quantize(features[:, start:stop])
        return quantized, scales

    def dequantize(self, quantized: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """int8 (N, D) and scales (N, spans) -> float32 (N, D)."""
        out = np.asarray(quantized).astype(np.float32)
        for s, (start, stop) in enumerate(self.spans):
            out[:, start:stop] *= scales[:, s, None]
        return out

    def dot(self, quantized: np.ndarray, scales: np.ndarray, query: np.ndarray) -> np.ndarray:
        """float32 (N,): ``query`` (D,) dotted with the dequantized rows, without dequantizing them:
        one product over every dim at the first span's scale, then each other span's difference
        (the level block is 8 dims: one full pass, not one per span)."""
        out = np.einsum("ij,j->i", quantized, query) * scales[:, 0]
        for s, (start, stop) in enumerate(self.spans[1:], 1):
            out += np.einsum("ij,j->i", quantized[:, start:stop], query[start:stop]) * (scales[:, s] - scales[:, 0])
        return out


# -- the instance entry --------------------------------------------------------------------

METADATA_FIELDS = tuple(f.name for f in dataclasses.fields(InstanceMetadata) if f.name != "sop_instance_uid")
"""The metadata record's fields in an entry, in this order (the SOPInstanceUID is the key's).
New fields go at the end: an entry written before them reads them as ``None``."""

ORTHANC_LEVELS = ("instance", "series", "study", "patient")

_ZDICT = (
    b'"1.2.840.113619.2."1.3.12.2.1107.5."1.2.392.200036."1.3.46.670589."1.2.826.0.1.3680043.'
    b'"2.25."1.3.6.1.4.1.,"1.2.840.10008.5.1.4.1.1.1","1.2.840.10008.5.1.4.1.1.2","CT","MR","CR","DX",'
    b'null,null,"M","F",1,[0.5,0.5],null,{"modality":[0.00,"region":[0.00,"pathology":[0.00'
)
"""A preset dictionary for deflate: what most entries have in common (UID roots of the
standard and of large vendors, JSON around the probabilities). Part of :data:`LAYOUT`:
changing it makes stored entries unreadable."""

_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
_ORTHANC_HEX = re.compile(r"[0-9a-f]{40}")


def encode_entry(record: IndexRecord, row: int) -> bytes:
    """An instance's stored entry: ``[row, frame, metadata values, probabilities, Orthanc ids]``
    as compact JSON (metadata in :data:`METADATA_FIELDS` order without trailing nulls,
    probabilities to 3 significant digits, Orthanc ids without their dashes), raw-deflated
    with :data:`_ZDICT`. About 330 bytes for a CT slice (720 as the JSON of layout 1)."""
    meta = record.metadata.to_json()
    values = [meta[name] for name in METADATA_FIELDS]
    while values and values[-1] is None:
        values.pop()
    probabilities = {head: [float(f"{x:.3g}") for x in np.asarray(p, np.float64).ravel()]
                     for head, p in record.probabilities.items()}  # fmt: skip
    ids = {k: _compact_id(v) for k, v in record.orthanc.items()}
    # all four levels: a list, without their names
    orthanc: list[str] | dict[str, str] = [ids[level] for level in ORTHANC_LEVELS] if set(ids) == set(ORTHANC_LEVELS) \
        else ids
    text = json.dumps([int(row), int(record.frame), values, probabilities, orthanc], separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")  # fmt: skip
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=_ZDICT)
    return packer.compress(text) + packer.flush()


@dataclass(frozen=True)
class StoredEntry:
    """What the index keeps about one instance besides its columns: read back with
    :meth:`~.store.IndexStore.describe` (decoded in :func:`decode_entry`, nowhere else)."""

    row: int
    """The instance's row: global as the store reads it (:func:`decode_entry`'s ``shards`` and ``shard``)."""
    frame: int
    """The frame whose code and probabilities the index holds."""
    metadata: InstanceMetadata
    probabilities: dict[str, np.ndarray]
    """Per label head, float32 (classes,), to 3 significant digits."""
    orthanc: dict[str, str] = field(default_factory=dict)
    """Orthanc ids where known: ``instance``, ``series``, ``study``, ``patient``."""

    @property
    def sop_instance_uid(self) -> str:
        return self.metadata.sop_instance_uid or ""


def decode_entry(sop_instance_uid: str, raw: bytes, shards: int = 1, shard: int = 0) -> StoredEntry:
    """:func:`encode_entry` back; its row the global row of local row ``row`` of ``shard`` among
    ``shards`` (``row * shards + shard``: the local row itself by default)."""
    unpacker = zlib.decompressobj(-15, zdict=_ZDICT)
    row, frame, values, probabilities, orthanc = json.loads(
        (unpacker.decompress(raw) + unpacker.flush()).decode("utf-8", "surrogatepass"))
    if isinstance(orthanc, list):
        orthanc = dict(zip(ORTHANC_LEVELS, orthanc, strict=True))
    # the entry's values are the metadata's fields after the SOPInstanceUID, in order (METADATA_FIELDS)
    metadata = InstanceMetadata.from_values([sop_instance_uid, *values[: len(METADATA_FIELDS)]])
    return StoredEntry(int(row) * shards + shard, int(frame), metadata,
                       {head: np.asarray(p, np.float32) for head, p in probabilities.items()},
                       {k: _dashed_id(v) for k, v in orthanc.items()})  # fmt: skip


def entry_row(raw: bytes) -> int:
    """The local row of an encoded entry (the first JSON value)."""
    unpacker = zlib.decompressobj(-15, zdict=_ZDICT)
    head = unpacker.decompress(raw, 24)
    return int(head[1 : head.index(b",")])


def _compact_id(value: str) -> str:
    return value.replace("-", "") if isinstance(value, str) and _ORTHANC_ID.fullmatch(value) else value


def _dashed_id(value: str) -> str:
    compact = isinstance(value, str) and len(value) == 40 and _ORTHANC_HEX.fullmatch(value)
    return dashed_orthanc_id(value) if compact else value


def dashed_orthanc_id(hex_digits: str) -> str:
    """An Orthanc id as Orthanc writes it: its 40 hex digits (a SHA-1) in five groups of eight."""
    h = hex_digits
    return f"{h[:8]}-{h[8:16]}-{h[16:24]}-{h[24:32]}-{h[32:40]}"
