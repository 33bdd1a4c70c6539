"""Make a "Similar cases" series (and its key object selection) and store it in the query's study.

The worker runs this, for ``POST /cbir/instances/{id}/similar/series`` and, when
``similar_series_on_stable_study`` is on, for each study Orthanc calls stable. The
hits are those ``GET /cbir/instances/{id}/similar`` answers with the same
parameters (the same similarity core, :class:`~orthanc_cbir.search.service.SimilaritySearch`);
the objects are built by :mod:`.similar_cases`.
"""

from __future__ import annotations

import io
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import redis
from pydicom.dataset import Dataset

from ..config import Settings
from ..dicom import Rejection, decode_dataset, looks_like_uid, read_dataset
from ..dicom.own_output import SERIES_DESCRIPTION, made_here
from ..errors import BadParameters, NotFound
from ..index import IndexInfo, IndexStore
from ..ingest.orthanc_client import OrthancClient
from ..ingest.queue import IngestQueue, Marks, QueueKeys
from ..redis_client import SEARCH_COMMAND_TIMEOUT_S, RedisClient, client_for
from ..search.service import SEARCH_PARAMETERS, SimilaritySearch
from ..search.strategies import Hit
from . import similar_cases
from .similar_cases import SimilarCase, key_object_selection, secondary_capture_series

log = logging.getLogger(__name__)


NOT_SERIES_PARAMETERS = ("format", "includefield")
"""Parameters of ``GET .../similar`` that choose how hits are listed: a series is stored, not listed."""
IGNORED_PARAMETERS = ("fuzzymatching",)
"""QIDO-RS parameters a similarity route accepts and ignores."""

PARTIAL_STALE_S = 600.0
"""A series still marked as being written after this long was left by a worker that died."""


class SimilarSeriesMaker:
    """Searches, fetches the hits' pixels from Orthanc, builds the objects and stores them."""

    def __init__(self, settings: Settings, orthanc: OrthancClient, client: RedisClient, keys: QueueKeys | None = None):
        keys = keys or QueueKeys()
        self.settings = settings
        self.orthanc = orthanc
        self.client = client
        self.keys = keys
        self.queue = IngestQueue(client, keys=keys)
        self.marks = Marks(client)
        self._core: SimilaritySearch | None = None  # the snapshot is loaded on the first series, not at worker start

    @classmethod
    def factory(cls, settings: Settings, client: RedisClient
                ) -> Callable[[OrthancClient, QueueKeys], SimilarSeriesMaker]:  # fmt: skip
        """What :meth:`orthanc_cbir.ingest.worker.Worker.from_settings` builds a worker's maker with."""
        return lambda orthanc, keys: cls(settings, orthanc, client, keys)

    def for_instance(self, instance: str, parameters: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Make the series for one stored instance (an Orthanc id or a SOPInstanceUID).

        ``parameters`` are those of ``GET .../similar`` and override ``similar_series_parameters``;
        the level is always ``instance`` (one image per hit). Returns what was stored:
        ``{"query": ..., "series": {...}, "kos": {...} | None, "hits": n}``.

        Raises:
            BadParameters: a parameter is wrong.
            NotFound: the instance is unknown (:class:`~orthanc_cbir.errors.NotIndexed`: not indexed),
                or the search found nothing.
        """
        refused = sorted(set(parameters or {}) & set(NOT_SERIES_PARAMETERS))
        if refused:
            raise BadParameters(f"{', '.join(refused)}: not a parameter of a similar cases series "
                                "(it is stored in the study, not listed)")  # fmt: skip
        asked = {**dict(urllib.parse.parse_qsl(self.settings.similar_series_parameters)), **(parameters or {}),
                 "level": "instance"}  # fmt: skip
        for name in (*NOT_SERIES_PARAMETERS, *IGNORED_PARAMETERS):  # the setting may name how hits are listed
            asked.pop(name, None)
        if set(asked) - set(SEARCH_PARAMETERS):
            raise BadParameters(f"unknown parameter: the parameters are {', '.join(SEARCH_PARAMETERS)}")
        core = self._similarity()
        page = core.page_for(asked, default_level="instance", default_strategy=self.settings.default_strategy,
                             max_results=self.settings.max_results)  # fmt: skip
        orthanc_id = self.orthanc.lookup(instance) if looks_like_uid(instance) else instance
        data = self.orthanc.instance_file(orthanc_id) if orthanc_id else None
        if data is None:
            raise NotFound(f"Orthanc has no instance {instance}")
        query = read_dataset(data)
        answer = core.similar_to_stored("instance", str(query.SOPInstanceUID), page)
        cases = [self._case(query, hit, answer.result.strategy) for hit in answer.hits]
        if not cases:
            raise NotFound("the search found no similar instance with these parameters")
        images = secondary_capture_series(query, cases)
        kos = key_object_selection(query, cases)
        self._remove_partial_series()
        partial = str(images[0].SeriesInstanceUID)
        self._mark_partial(partial, str(kos.SeriesInstanceUID) if kos is not None else None)
        try:
            stored = [self.orthanc.store(_to_bytes(image)) for image in images]
            answer_kos = self.orthanc.store(_to_bytes(kos)) if kos is not None else None
        except BaseException:  # Orthanc went away mid-series: the next series deletes what was stored
            self._mark_partial(partial, str(kos.SeriesInstanceUID) if kos is not None else None, failed=True)
            raise
        self.marks.remove_entry(self._partial_key, partial)
        made: dict[str, Any] = {
            "query": {"orthanc": orthanc_id, "SOPInstanceUID": str(query.SOPInstanceUID),
                      "StudyInstanceUID": str(query.StudyInstanceUID)},
            "series": {"SeriesInstanceUID": str(images[0].SeriesInstanceUID), "orthanc": stored[0]["ParentSeries"],
                       "instances": len(images), "SeriesDescription": SERIES_DESCRIPTION},
            "kos": None, "hits": len(cases), "strategy": answer.result.strategy,
        }  # fmt: skip
        if kos is not None and answer_kos is not None:
            made["kos"] = {"SeriesInstanceUID": str(kos.SeriesInstanceUID), "SOPInstanceUID": str(kos.SOPInstanceUID),
                           "orthanc": answer_kos["ID"],
                           "references": sum(c.reference is not None for c in cases)}  # fmt: skip
        log.info("similar cases series for instance %s: %d image(s), key objects %s", orthanc_id, len(images),
                 "yes" if kos is not None else "none")  # fmt: skip
        return made

    def for_stable_study(self, study: str) -> dict[str, Any] | None:
        """Make the series of a study Orthanc calls stable, unless it has one already (adding it
        makes the study stable again) or none of its images is indexed (yet). The query is the
        middle indexed image of the series with the most indexed images."""
        self._remove_partial_series()  # a half-written series is not the study's series
        series_list = self.orthanc.get_json(f"/studies/{study}/series")
        if any(_is_own_series(series) for series in series_list):
            return None
        best: list[str] = []
        for series in series_list:
            instances = sorted(self.orthanc.get_json(f"/series/{series['ID']}/instances"), key=_instance_order)
            ids = [instance["ID"] for instance in instances]
            indexed = [i for i, uid in zip(ids, self.queue.indexed_uids(ids), strict=True) if uid]
            if len(indexed) > len(best):
                best = indexed
        if not best:
            log.info("stable study %s: no indexed image, no similar cases series", study)
            return None
        return self.for_instance(best[len(best) // 2])

    # -- helpers ----------------------------------------------------------------------------

    @property
    def _partial_key(self) -> str:
        """Hash SeriesInstanceUID -> JSON {kos, at, failed}: series being written, or left half-written."""
        return f"{self.keys.prefix}:similar-series:partial"

    def _mark_partial(self, series_uid: str, kos_series_uid: str | None, failed: bool = False) -> None:
        try:
            self.marks.set_entry(self._partial_key, series_uid,
                                 {"kos": kos_series_uid, "at": time.time(), "failed": failed})  # fmt: skip
        except redis.RedisError:
            if not failed:  # not marked: not begun
                raise
            # marking a failure (Redis away too): the mark of the start stays and goes stale

    def _remove_partial_series(self) -> None:
        """Delete from Orthanc the series a failed (or dead, after ``PARTIAL_STALE_S``) attempt left
        half-written, so that a retry leaves one complete series, not a complete one and a part."""
        for series_uid, mark in self.marks.entries(self._partial_key).items():
            if not mark.get("failed") and time.time() - float(mark.get("at", 0)) < PARTIAL_STALE_S:
                continue  # another worker may be writing it now
            removed = 0
            for uid in filter(None, (series_uid, mark.get("kos"))):
                orthanc_id = self.orthanc.lookup(uid, "Series")
                if orthanc_id is not None:
                    status, _, _ = self.orthanc.request("DELETE", f"/series/{orthanc_id}")
                    if status not in (200, 404):
                        raise OSError(f"DELETE /series/{orthanc_id}: HTTP {status}")
                    removed += 1
            self.marks.remove_entry(self._partial_key, series_uid)
            log.info("a half-written similar cases series deleted (%d series)", removed)

    def _similarity(self) -> SimilaritySearch:
        if self._core is None:
            info = IndexInfo.for_model(self.settings.model)
            # the routes' timeout, not the worker's client's: the process's cores share one searcher
            client = client_for(self.settings, socket_timeout=SEARCH_COMMAND_TIMEOUT_S)
            store = IndexStore(client, info, shards=self.settings.index_shards)
            self._core = SimilaritySearch(store, graph_dir=self.settings.graph_path)
        return self._core

    def _case(self, query: Dataset, hit: Hit, strategy: str) -> SimilarCase:
        """A hit with its pixels, or with the reason they are not shown."""
        hit_id = hit.entry.orthanc.get("instance") if hit.entry is not None else None
        data = self.orthanc.instance_file(hit_id) if hit_id else None
        header = read_dataset(data) if data is not None else None
        same_patient = header is not None and similar_cases.same_patient(query, header)
        pixels, withheld = None, None
        if header is None:
            withheld = "not stored in this archive"
        elif (reason := similar_cases.withheld_reason(query, header,
                                                      other_patients=self.settings.similar_series_other_patients)):
            withheld = reason
        else:
            decoded = decode_dataset(header, max_frames=1, max_pixels_per_frame=self.settings.max_pixels_per_frame)
            if isinstance(decoded, Rejection):
                withheld = f"cannot be drawn: {decoded.reason.value}"
            else:
                pixels = decoded.images[0].pixels
        in_study = header is not None and header.get("StudyInstanceUID") == query.StudyInstanceUID
        meta = hit.entry.metadata if hit.entry is not None else None
        return SimilarCase(rank=hit.rank, distance=hit.distance, strategy=strategy,
                           modality=meta.modality if meta else None,
                           body_part=meta.body_part_examined if meta else None,
                           same_patient=same_patient, pixels=pixels, withheld=withheld,
                           reference=header if in_study and same_patient else None)  # fmt: skip


def _is_own_series(series: Mapping[str, Any]) -> bool:
    tags = series.get("MainDicomTags", {})
    return made_here(tags.get("Manufacturer"), tags.get("SeriesDescription"))


def _instance_order(instance: Mapping[str, Any]) -> tuple[int, str]:
    number = instance.get("MainDicomTags", {}).get("InstanceNumber", "")
    return (int(number) if str(number).strip().lstrip("-").isdigit() else 0, instance["ID"])


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
