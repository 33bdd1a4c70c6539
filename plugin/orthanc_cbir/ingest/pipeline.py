"""From a decoded instance to index records: the steps every way in shares.

The Orthanc worker (:mod:`.worker`), ``orthanc-cbir backfill`` (:mod:`.backfill`) and
``orthanc-cbir index`` each read instances their own way and decode them under the
limits of the settings (:meth:`~orthanc_cbir.config.Settings.decode_limits`). Then:

1. :func:`admit` refuses what must never be indexed, whatever the way in: the service's
   own "Similar cases" images (:data:`~orthanc_cbir.dicom.RejectionReason.OWN_OUTPUT`)
   and an instance without a valid SOPInstanceUID, the index's key
   (:data:`~orthanc_cbir.dicom.RejectionReason.NO_UID`);
2. :class:`EmbeddingBatch` holds admitted instances until they make a batch (a number of
   instances, or :data:`HELD_PIXELS` of pictures, whichever comes first), embeds them in one
   onnxruntime pass and hands back one record per instance;
3. the caller adds the records (:meth:`~orthanc_cbir.index.IndexStore.add`) and keeps its own
   books: acknowledgements, checkpoints, counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..dicom import DecodedInstance, Rejection, RejectionReason, looks_like_uid
from ..dicom.own_output import reject_own_output
from ..index.records import embed_instances
from ..index.schema import IndexRecord
from ..model.embedder import Embedder

HELD_PIXELS = 16 * 2**20
"""Decoded pixels a batch holds before it is embedded (16 Mi: a batch of 32 512 x 512 instances is
embedded in one pass); a larger instance is embedded alone, so a batch's peak memory is about one
instance's decode (README, "Bad input")."""
MAX_UID_CHARS = 64
"""A DICOM UID has at most 64 characters."""

Tag = TypeVar("Tag")
"""What the caller knows an instance by (a stream entry, a SOPInstanceUID, a path)."""


def admit(outcome: DecodedInstance | Rejection) -> DecodedInstance | Rejection:
    """The decoded instance if it may be indexed, else the reason it may not."""
    outcome = reject_own_output(outcome)
    if isinstance(outcome, Rejection):
        return outcome
    uid = outcome.metadata.sop_instance_uid or ""
    if not looks_like_uid(uid) or len(uid) > MAX_UID_CHARS:
        return Rejection(RejectionReason.NO_UID, "the file has no valid SOPInstanceUID")  # nothing to key it by
    return outcome


@dataclass
class _Held(Generic[Tag]):
    tag: Tag
    instance: DecodedInstance
    orthanc_ids: dict[str, str]


class EmbeddingBatch(Generic[Tag]):
    """Admitted instances waiting for one onnxruntime pass, each with its caller's tag."""

    def __init__(self, embedder: Embedder, max_instances: int, max_pixels: int = HELD_PIXELS, *,
                 regions: bool = False):  # fmt: skip
        """``regions``: embed the region entries of CT and MR slices too (the ``regions`` setting)."""
        self.embedder = embedder
        self.regions = regions
        self.max_instances = max(1, max_instances)
        self.max_pixels = max_pixels
        self._held: list[_Held[Tag]] = []
        self._pixels = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, tag: Tag, instance: DecodedInstance, orthanc_ids: dict[str, str] | None = None) -> None:
        """Hold one admitted instance (``orthanc_ids``: its Orthanc ids, kept in its record)."""
        self._held.append(_Held(tag, instance, orthanc_ids or {}))
        self._pixels += sum(image.model_pixels.size for image in instance.images)  # not pixels: made when read

    @property
    def full(self) -> bool:
        """Whether the batch should be embedded now."""
        return len(self._held) >= self.max_instances or self._pixels > self.max_pixels

    def embed(self, one_at_a_time: Callable[[Tag, Callable[[], IndexRecord]], IndexRecord | None] | None = None,
              passes_through: tuple[type[BaseException], ...] = ()) -> list[tuple[Tag, IndexRecord]]:  # fmt: skip
        """Embed what is held in one pass and empty the batch, so that its pictures can go.

        If that pass raises and ``one_at_a_time`` is given, each instance is embedded alone through
        it (``one_at_a_time(tag, make_record)``: the worker's guard, for which an instance the model
        cannot take is a dead letter, not the batch's failure); a ``None`` it returns drops that
        instance. Without it, or for the exceptions ``passes_through`` names, the exception propagates."""
        held, self._held, self._pixels = self._held, [], 0
        if not held:
            return []
        try:
            records = embed_instances(self.embedder, [h.instance for h in held], [h.orthanc_ids for h in held],
                                      regions=self.regions)  # fmt: skip
            return [(h.tag, record) for h, record in zip(held, records, strict=True)]
        except passes_through:
            raise
        except Exception:
            if one_at_a_time is None:
                raise
        out = []
        for h in held:
            record = one_at_a_time(h.tag, functools.partial(self._embed_one, h))
            if record is not None:
                out.append((h.tag, record))
        return out

    def _embed_one(self, held: _Held[Tag]) -> IndexRecord:
        return embed_instances(self.embedder, [held.instance], [held.orthanc_ids], regions=self.regions)[0]
