"""Metadata pre-filters (seed 000): which indexed instances a query may return.

Every strategy applies the same :class:`Filters` to the same attribute columns
before ranking, so no strategy can return a record that does not match.

>>> Filters.parse(["modality=CT,MR", "age=40-70", "exclude=same-patient"]).modality
('CT', 'MR')
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..index.schema import category_hash, uid_hash


@dataclass(frozen=True)
class QueryContext:
    """Who the query image belongs to, for the ``exclude`` filters (never the patient's ID),
    and what its file says it is (for the ``class`` and ``multilateral`` labels, :mod:`.labels`)."""

    patient_key: str | None = None
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    modality: str | None = None
    """The query file's DICOM Modality (``None``: not DICOM, or not said)."""
    body_part: str | None = None
    """The query file's BodyPartExamined."""


@dataclass(frozen=True)
class Filters:
    """Conditions on the indexed instances; an unset field does not filter."""

    modality: tuple[str, ...] | None = None
    """DICOM Modality values, e.g. ``("CT", "MR")``."""
    body_part: tuple[str, ...] | None = None
    """BodyPartExamined values (case-insensitive)."""
    sex: tuple[str, ...] | None = None
    """``M``, ``F``, ``O``."""
    age_min: float | None = None
    age_max: float | None = None
    """Patient age in years, inclusive; instances of unknown age are excluded once a bound is set."""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    """Study date, inclusive; instances without a study date are excluded once a bound is set."""
    exclude_same_patient: bool = False
    exclude_same_study: bool = False
    exclude_same_series: bool = False
    exclude_self: bool = True
    """Leave the query instance itself out when it is indexed."""

    _FIELDS = ("modality", "body_part", "sex", "age", "date", "exclude")

    @classmethod
    def parse(cls, items: Iterable[str]) -> Filters:
        """From ``NAME=VALUE`` strings: ``modality=CT,MR``, ``body_part=CHEST``, ``sex=F``,
        ``age=40-70`` (either side may be empty), ``date=2020-01-01..2021-12-31``,
        ``exclude=same-patient,same-study,same-series``.

        Raises:
            ValueError: an unknown name or a value that cannot be read.
        """
        values: dict = {}
        for item in items:
            name, _, value = item.partition("=")
            name, value = name.strip().lower().replace("-", "_"), value.strip()
            if name not in cls._FIELDS or not value:
                raise ValueError(f"filter {item!r}: expected NAME=VALUE with NAME one of {', '.join(cls._FIELDS)}")
            if name in ("modality", "body_part", "sex"):
                values[name] = tuple(v.strip().upper() for v in value.split(",") if v.strip())
            elif name == "age":
                low, _, high = value.partition("-")
                try:
                    values["age_min"], values["age_max"] = (float(v) if v else None for v in (low, high))
                except ValueError:
                    raise ValueError(f"filter {item!r}: age is MIN-MAX in years") from None
            elif name == "date":
                low, _, high = value.partition("..")
                try:
                    values["date_from"], values["date_to"] = (dt.date.fromisoformat(v) if v else None
                                                              for v in (low, high))  # fmt: skip
                except ValueError:
                    raise ValueError(f"filter {item!r}: date is YYYY-MM-DD..YYYY-MM-DD") from None
            else:
                for what in value.split(","):
                    if what.strip() not in ("same-patient", "same-study", "same-series"):
                        raise ValueError(f"filter {item!r}: exclude takes same-patient, same-study, same-series")
                    values["exclude_same_" + what.strip().split("-")[1]] = True
        return cls(**values)

    def mask(self, attributes: Mapping[str, np.ndarray], context: QueryContext | None = None) -> np.ndarray:
        """Boolean mask over attribute columns (:data:`~orthanc_cbir.index.schema.ATTRIBUTES`
        names, one array each, as an :class:`~orthanc_cbir.index.IndexSnapshot` holds them):
        the live rows that pass."""
        keep = attributes["live"] == 1
        for name in ("modality", "body_part", "sex"):
            wanted = getattr(self, name)
            if wanted is not None:
                keep &= np.isin(attributes[name], [category_hash(v) for v in wanted])
        if self.age_min is not None:
            keep &= attributes["age"] >= self.age_min  # NaN compares false: unknown ages drop out
        if self.age_max is not None:
            keep &= attributes["age"] <= self.age_max
        if self.date_from is not None:
            keep &= attributes["study_date"] >= int(self.date_from.strftime("%Y%m%d"))
        if self.date_to is not None:
            keep &= (attributes["study_date"] <= int(self.date_to.strftime("%Y%m%d"))) & (attributes["study_date"] > 0)
        context = context or QueryContext()
        if self.exclude_same_patient and context.patient_key:
            keep &= attributes["patient"] != int(context.patient_key, 16)
        if self.exclude_same_study and context.study_instance_uid:
            keep &= attributes["study"] != uid_hash(context.study_instance_uid)
        if self.exclude_same_series and context.series_instance_uid:
            keep &= attributes["series"] != uid_hash(context.series_instance_uid)
        return keep

    def is_empty(self) -> bool:
        return self == Filters(exclude_self=self.exclude_self)


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``modality=1,region=1,pathology=0`` -> per-sub-code weights for ``multilateral``.

    Raises:
        ValueError: an item is not ``NAME=NUMBER`` with a finite, non-negative number.
    """
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"weights: {item!r} is not SUB=NUMBER") from None
        if not math.isfinite(weight) or weight < 0:  # a NaN or negative weight makes distances meaningless
            raise ValueError(f"weights: {item!r}: a weight is a finite number >= 0")
        weights[name.strip()] = weight
    return weights
