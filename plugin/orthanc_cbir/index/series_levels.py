"""Each axial slice indexed at its series' level, as the series fills up.

:mod:`orthanc_cbir.model.level` says why: one slice predicts its level with a bias of its
patient, a series of parallel slices corrects it (its position along the body axis plus
one offset per series). Slices arrive one batch at a time, so the offset is an estimate
that improves as they come. For each series this module keeps, per indexed slice, the
level the model predicted, its position and the offset its row was written with. A batch
is written at the offset of everything known so far (:meth:`SeriesLevels.place`); then
(:meth:`SeriesLevels.settle`) the rows whose offset has since moved by more than
:data:`TOLERANCE_MM` are named for the store to rewrite (:meth:`~.store.IndexStore.add`
does both). Two workers adding slices of one series at once both settle after writing,
so the later one sees every slice and leaves the series consistent.

Key (this module is its only user): ``<index base>:series-level:<SeriesInstanceUID>``, a hash
SOPInstanceUID -> :data:`ENTRY` (12 bytes), in the index's own key space, so deleting an index's
keys deletes it. About 80 bytes of Redis per axial slice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..model.level import LevelEncoding, series_levels
from ..redis_client import RedisClient, as_bytes
from .schema import IndexRecord, KeySpace

TOLERANCE_MM = 5.0
"""A row is rewritten once its level has moved by more than this (a quarter of the 20 mm
within which two slices count as one level). A series placed by its offset alone, sent from the
head down in batches of 32, whose predicted levels run at 0.8 of the true distances, has each
row rewritten 1.7 times over 300 slices and 2.3 times over 1,000 (3.8 and 5.7 at 2 mm); a chest
CT sent the same way is placed by its lung apex once 100 mm of lung has arrived and scaled to
the lung frame when its base does: 1.0 rewrite a row over 300 slices, 1.1 over 1,000."""
ENTRY = np.dtype([("predicted", "<f4"), ("position", "<f4"), ("lung", "<f4"), ("level", "<f4")])
"""Per slice: the model's level, the slice's position (mm), its aerated lung (mm², NaN where not
measured) and the level its row holds."""
_ENTRY_WITHOUT_LUNG = np.dtype([("predicted", "<f4"), ("position", "<f4"), ("offset", "<f4")])


@dataclass(frozen=True)
class Placed:
    """A slice placed at its series' level."""

    series: str
    sop_instance_uid: str
    predicted_mm: float
    position_mm: float
    lung_mm2: float
    level_mm: float

    def entry(self) -> bytes:
        return np.array((self.predicted_mm, self.position_mm, self.lung_mm2, self.level_mm), ENTRY).tobytes()


class SeriesLevels:
    """The per-series levels of one index (``keys``: its unsharded key space)."""

    def __init__(self, client: RedisClient, keys: KeySpace, level: LevelEncoding):
        self.client = client
        self.keys = keys
        self.level = level

    def key(self, series_instance_uid: str) -> str:
        return f"{self.keys.base}:series-level:{series_instance_uid}"

    def place(self, records: Sequence[IndexRecord]) -> tuple[list[IndexRecord], list[Placed]]:
        """The records with every axial slice of a series at that series' level (from the slices
        already indexed and those of the batch); other records unchanged."""
        by_series: dict[str, list[int]] = defaultdict(list)
        positions: dict[int, float] = {}
        for i, record in enumerate(records):
            position = record.metadata.axial_position_mm
            if position is not None and record.metadata.series_instance_uid:
                by_series[record.metadata.series_instance_uid].append(i)
                positions[i] = position
        if not by_series:
            return list(records), []
        stored = self._read(list(by_series))
        out, placed = list(records), []
        for series, rows in by_series.items():
            features = np.stack([records[i].features for i in rows])
            predicted = self.level.decode(features)
            here = np.array([positions[i] for i in rows])
            lung = np.array([np.nan if records[i].lung_mm2 is None else records[i].lung_mm2 for i in rows])
            known = stored[series]
            levels = series_levels(np.concatenate([known["predicted"], predicted]),
                                   np.concatenate([known["position"], here]),
                                   np.concatenate([known["lung"], lung]))[len(known):]  # fmt: skip
            moved = self.level.with_levels(features, levels)
            for n, i in enumerate(rows):
                out[i] = replace(records[i], features=moved[n])
                placed.append(Placed(series, records[i].key, float(predicted[n]), float(here[n]), float(lung[n]),
                                     float(levels[n])))  # fmt: skip
        return out, placed

    def settle(self, placed: Sequence[Placed]) -> list[Placed]:
        """Record the placed slices (a slice indexed before keeps its entry: its row is the one
        indexed) and name every row of their series whose level is more than
        :data:`TOLERANCE_MM` from the series' level for it now, placed at that level: the rows to
        rewrite, then to confirm with :meth:`moved`."""
        if not placed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for slice_ in placed:
            pipe.hsetnx(self.key(slice_.series), slice_.sop_instance_uid, slice_.entry())
        pipe.execute()
        moves = []
        for series, (uids, values) in self._read_with_uids(sorted({p.series for p in placed})).items():
            levels = series_levels(values["predicted"], values["position"], values["lung"])
            for uid, value, level in zip(uids, values, levels, strict=True):
                if abs(float(value["level"]) - level) > TOLERANCE_MM:
                    moves.append(Placed(series, uid, float(value["predicted"]), float(value["position"]),
                                        float(value["lung"]), float(level)))  # fmt: skip
        return moves

    def moved(self, rewritten: Sequence[Placed], gone: Sequence[Placed] = ()) -> None:
        """Record the levels of the ``rewritten`` rows, and forget ``gone`` slices (no longer indexed)."""
        if not rewritten and not gone:
            return
        pipe = self.client.pipeline(transaction=False)
        for slice_ in rewritten:
            pipe.hset(self.key(slice_.series), slice_.sop_instance_uid, slice_.entry())
        for slice_ in gone:
            pipe.hdel(self.key(slice_.series), slice_.sop_instance_uid)
        pipe.execute()

    def forget(self, series_instance_uid: str, sop_instance_uid: str) -> None:
        """Take a removed instance's slice out of its series (an entry left by a process stopped in
        between counts in its series' levels until a rewrite finds its row gone)."""
        self.client.hdel(self.key(series_instance_uid), sop_instance_uid)

    def _read(self, series: list[str]) -> dict[str, np.ndarray]:
        return {name: values for name, (_, values) in self._read_with_uids(series).items()}

    def _read_with_uids(self, series: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
        pipe = self.client.pipeline(transaction=False)
        for name in series:
            pipe.hgetall(self.key(name))
        out = {}
        for name, raw in zip(series, pipe.execute(), strict=True):
            uids = [as_bytes(uid).decode() for uid in raw]
            out[name] = (uids, _entries([as_bytes(raw[uid]) for uid in raw]))
        return out


def _entries(raw: list[bytes]) -> np.ndarray:
    """Stored entries as :data:`ENTRY` rows; one without the lung (12 bytes) reads as not measured."""
    if all(len(value) == ENTRY.itemsize for value in raw):  # one copy for the whole series, as written now
        return np.frombuffer(b"".join(raw), ENTRY)
    values = np.zeros(len(raw), ENTRY)
    for i, value in enumerate(raw):
        if len(value) == _ENTRY_WITHOUT_LUNG.itemsize:
            old = np.frombuffer(value, _ENTRY_WITHOUT_LUNG)[0]
            values[i] = (old["predicted"], old["position"], np.nan, old["position"] + old["offset"])
        else:
            values[i] = np.frombuffer(value, ENTRY)[0]
    return values
