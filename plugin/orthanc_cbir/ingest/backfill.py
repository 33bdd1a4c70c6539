"""``orthanc-cbir backfill``: index what a DICOMweb server holds and the index lacks.

Works against any DICOMweb server (Orthanc, dcm4chee, a cloud archive) through the
``dicomweb-client`` package, without the Orthanc plugin or the workers:

1. QIDO-RS lists the studies, page by page (``limit`` / ``offset``), filtered by
   ``StudyDate`` (``since``, a ``YYYYMMDD-`` range) and ``ModalitiesInStudy`` (one
   search per modality, merged);
2. QIDO-RS lists each study's instances (paged too); an instance already in the
   index of the current model, or rejected before, is skipped;
3. WADO-RS retrieves each missing instance, which is decoded as every other entry
   point decodes (:func:`orthanc_cbir.dicom.decode_dataset`), embedded in batches and
   added to the index. An instance that cannot be used is recorded in the rejected
   hash (key ``dicomweb:<SOPInstanceUID>``) with its reason, and the walk goes on.

Resuming: the index itself says what is done, so a rerun retrieves only what is
missing. Besides, a Redis hash (:func:`checkpoint_key`) remembers each study whose
instances were all indexed or rejected, with its ``NumberOfStudyRelatedInstances``
at the time, so a rerun does not list those again; a study whose instance count has
changed since is walked again. ``restart=True`` clears the hash first.

The server unreachable, the credentials refused, or failing repeatedly stop the run
with a :class:`BackfillError` (what was indexed stays). Logs carry UIDs and counts,
never patient names or IDs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_auth
from tqdm import tqdm

from ..dicom import Rejection, RejectionReason, decode_dataset
from ..dicom.pixels import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS_PER_FRAME, DecodedInstance
from ..errors import BackfillError
from ..index import IndexStore
from .pipeline import EmbeddingBatch, admit
from .queue import DICOMWEB, IngestQueue, Marks

if TYPE_CHECKING:
    from ..model.embedder import Embedder

log = logging.getLogger(__name__)

PAGE = 100
"""QIDO-RS results asked for per request (studies, and instances of a study)."""
MAX_SEARCH_BYTES = 16 * 2**20
"""Largest QIDO-RS answer read (a page of PAGE entries is a few hundred kB). Parsed, a page takes
about ten times its size (Python objects): 256 MiB cost 2.6 GiB of RSS, 16 MiB costs about 170 MiB
(``benchmarks/backfill_memory.py``)."""
MAX_LISTED = 2_000_000
"""Most entries one QIDO-RS search may list (the studies of the archive, or one study's instances):
past it the server is taken to be looping and the run stops with a message."""
MAX_CONSECUTIVE_FAILURES = 10
"""Retrievals failing in a row (HTTP 5xx) before the run stops: the server is in trouble."""

_STUDY_UID, _SERIES_UID, _SOP_UID, _MODALITY = "0020000D", "0020000E", "00080018", "00080060"
_STUDY_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances


@dataclass
class BackfillSummary:
    """What one run did."""

    model: str
    """The model version, i.e. the index written to."""
    studies: int = 0
    """Studies the search returned (after the filters)."""
    studies_done_earlier: int = 0
    """Of those, studies the checkpoint said were complete: not listed again."""
    instances: int = 0
    """Instances listed in the studies walked (after the modality filter)."""
    indexed: int = 0
    """Instances retrieved, embedded and added by this run."""
    already_indexed: int = 0
    """Instances found in the index already (not retrieved)."""
    rejected: int = 0
    """Instances this run retrieved and recorded as rejected (see the rejected hash)."""
    rejected_earlier: int = 0
    """Instances skipped because an earlier run (or a worker) rejected them."""
    failed: int = 0
    """Instances whose retrieval failed (gone, or an HTTP error on that instance): not
    recorded, so the next run tries them again."""
    mismatched: int = 0
    """Instances whose retrieved file holds another SOPInstanceUID than the search listed: not
    indexed, and their study is not marked done (the archive's listing and its files disagree)."""
    interrupted: bool = False
    """The run stopped early (``stop`` set or ``max_instances`` reached); rerun to finish."""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every listed instance ended indexed or rejected."""
        return not self.interrupted and not self.failed and not self.mismatched

    @property
    def instances_per_s(self) -> float:
        """Instances retrieved (indexed or rejected) per second of the run."""
        return (self.indexed + self.rejected) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        text = (f"backfill: {self.studies} studies, indexed {self.indexed}, already indexed {self.already_indexed}, "
                f"rejected {self.rejected} (model {self.model})")  # fmt: skip
        extra = [f"{n} {what}" for n, what in ((self.rejected_earlier, "rejected earlier"),
                                               (self.studies_done_earlier, "studies done earlier (checkpoint)"),
                                               (self.failed, "failed, retried next run"),
                                               (self.mismatched, "another SOPInstanceUID in the file than "
                                                                 "listed (not indexed)")) if n]  # fmt: skip
        if extra:
            text += "; skipped " + ", ".join(extra)
        text += f"; {self.seconds:.1f} s, {self.instances_per_s:.1f} instances/s"
        return text + ("; INTERRUPTED: run again to resume" if self.interrupted else "")


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every request."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


TOO_LARGE_STATUS = 413
"""The status :class:`BoundedAnswers` gives an answer over its size: dicomweb-client raises it at once
(it retries an exception, or a 429 / 503, five times with backoff)."""


class BoundedAnswers(requests.adapters.HTTPAdapter):
    """Reads every answer of the DICOMweb server within ``deadline_s`` from the request's start
    to the answer's last byte (:class:`requests.Timeout` past it) and within a size
    (checked against Content-Length first, then as it arrives; past it the body is dropped and the
    answer becomes a local :data:`TOO_LARGE_STATUS`, its reason saying the size):
    ``max_bytes`` for an instance (a ``multipart/related`` WADO-RS answer), ``max_search_bytes``
    for anything else (a QIDO-RS page). A dripping or endless answer neither hangs the run nor
    fills the memory."""

    def __init__(self, deadline_s: float, max_bytes: int, max_search_bytes: int = MAX_SEARCH_BYTES):
        super().__init__()
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.max_search_bytes = max_search_bytes

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: float | tuple[float | None, float | None] | None = None, verify: bool | str = True,
             cert: str | tuple[str, str] | None = None, proxies: dict[str, str] | None = None,
             ) -> requests.Response:  # fmt: skip
        started = time.monotonic()
        response = super().send(request, stream=True, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
        try:
            instance = response.headers.get("Content-Type", "").lower().startswith("multipart/related")
            limit = self.max_bytes if instance else self.max_search_bytes
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > limit:
                return _too_large(response, f"the answer declares {declared} bytes, more than {limit}")
            body = bytearray()
            while True:
                # read1: what has arrived (up to 64 KiB), not a full block: a dripping answer
                # meets the deadline check between every few bytes
                chunk = response.raw.read1(1 << 16, decode_content=True)
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    return _too_large(response, f"the answer passed {limit} bytes")
                if time.monotonic() - started > self.deadline_s:
                    raise requests.Timeout(f"the answer took more than {self.deadline_s:.0f} s")
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as exc:  # as requests reports them
            response.close()
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        except BaseException:
            response.close()
            raise
        response._content = bytes(body)  # read: what requests keeps for .content, .json(), iter_content()
        response._content_consumed = True
        return response


def _too_large(response: requests.Response, reason: str) -> requests.Response:
    response.close()  # the rest is never read
    response.status_code, response.reason = TOO_LARGE_STATUS, reason
    response._content, response._content_consumed = b"", True
    return response


def dicomweb_session(username: str | None = None, password: str | None = None, token: str | None = None, *,
                     deadline_s: float = 300.0, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                     ) -> requests.Session:  # fmt: skip
    """A session for :class:`DICOMwebClient` (``session=``): HTTP basic with ``username`` /
    ``password``, a bearer ``token``, or no authentication; every answer within ``deadline_s``
    and ``max_bytes`` (:class:`BoundedAnswers`)."""
    if token and username:
        raise ValueError("give a username and password, or a token, not both")
    if token:
        session = create_session_from_auth(BearerAuth(token))
    elif username:
        session = create_session_from_auth(requests.auth.HTTPBasicAuth(username, password or ""))
    else:
        session = requests.Session()
    bounded = BoundedAnswers(deadline_s, max_bytes)
    session.mount("http://", bounded)
    session.mount("https://", bounded)
    return session


def study_date_range(since: date | str | None) -> str | None:
    """``since`` (a date, ``YYYY-MM-DD`` or ``YYYYMMDD``) as the open DICOM range ``YYYYMMDD-``."""
    if since is None or since == "":
        return None
    if isinstance(since, date):
        return since.strftime("%Y%m%d") + "-"
    digits = since.replace("-", "")
    try:
        if not re.fullmatch(r"\d{8}", digits):
            raise ValueError("not 8 digits")
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))  # a real day
    except ValueError as exc:
        raise ValueError(f"since {since!r}: give a date as YYYY-MM-DD or YYYYMMDD ({exc})") from None
    return digits + "-"


def public_url(url: str) -> str:
    """``url`` without credentials (``user:password@``), as logs and Redis keys hold it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def checkpoint_key(url: str, store: IndexStore, queue: IngestQueue) -> str:
    """The checkpoint hash of one server and one model version: StudyInstanceUID -> JSON
    ``{"instances": NumberOfStudyRelatedInstances or null, "modalities": [...] or null (all), "at": time}``."""
    return f"{queue.keys.prefix}:backfill:{store.info.version}:{public_url(url)}"


def backfill(
    client: DICOMwebClient,
    store: IndexStore,
    queue: IngestQueue,
    embedder: Embedder,
    *,
    since: date | str | None = None,
    modalities: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    frames_per_instance: int = 1,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME,
    restart: bool = False,
    max_instances: int | None = None,
    stop: threading.Event | None = None,
) -> BackfillSummary:
    """Index every instance the DICOMweb server behind ``client`` holds and ``store`` lacks.

    ``since``: only studies with a StudyDate on or after it; ``modalities``: only studies
    whose ModalitiesInStudy holds one of them, and of those only the instances of these
    modalities. ``batch_size`` instances are embedded and written together; ``restart``
    forgets the checkpoint; ``max_instances`` (trials, tests) and ``stop`` (a signal
    handler) end the run early, after writing what was decoded (``interrupted`` is set).

    Returns the counts of the run. Instances that cannot be used are recorded in
    ``queue``'s rejected hash and counted, never raised.

    Raises:
        BackfillError: the server is unreachable, refuses the credentials, or fails
            :data:`MAX_CONSECUTIVE_FAILURES` retrievals in a row.
        ValueError: ``since`` is not a date.
    """
    started = time.monotonic()
    url = public_url(client.base_url)
    date_range = study_date_range(since)
    wanted = {m.strip().upper() for m in modalities or () if m.strip()} or None
    summary = BackfillSummary(model=store.info.version)
    checkpoint = _Checkpoint(Marks(queue.client), checkpoint_key(client.base_url, store, queue))
    if restart:
        checkpoint.clear()
    done = checkpoint.load()
    rejected_before = queue.rejected_uids()
    try:
        studies = _list_studies(client, url, date_range, sorted(wanted) if wanted else None, summary, stop)
    except _Interrupted:  # SIGINT / SIGTERM while listing: nothing was taken yet
        summary.seconds = time.monotonic() - started
        return summary
    except BackfillError:
        summary.seconds = time.monotonic() - started
        raise
    summary.studies = len(studies)
    log.info("backfill from %s: %d studies (since %s, modalities %s), model %s", url, len(studies),
             date_range or "any date", ",".join(sorted(wanted)) if wanted else "all", store.info.version)  # fmt: skip
    known_total = sum(count or 0 for _, count in studies)
    bar = tqdm(total=known_total or None, desc="backfill", unit="instance", disable=not progress, dynamic_ncols=True)
    batch: EmbeddingBatch[str] = EmbeddingBatch(embedder, max_instances=batch_size)
    completed: list[tuple[str, int | None]] = []  # studies walked: their instances are in ``batch`` or stored
    retrieved = consecutive_failures = 0

    def flush() -> None:
        if len(batch):
            added = store.add([record for _, record in batch.embed()])
            summary.indexed += added.added
            summary.already_indexed += added.duplicates
        for study_uid, count in completed:
            checkpoint.done(study_uid, count, wanted, done.get(study_uid))
        completed.clear()
        bar.set_postfix(indexed=summary.indexed, rejected=summary.rejected, refresh=False)

    def take(instance: _Listed) -> bool:
        """Retrieve, decode and batch (or reject) one instance; False when its retrieval failed."""
        nonlocal retrieved, consecutive_failures
        if (stop is not None and stop.is_set()) or (max_instances is not None and retrieved >= max_instances):
            summary.interrupted = True
            raise _Interrupted
        retrieved += 1
        outcome = _retrieve(client, url, instance, frames_per_instance, summary, max_file_bytes, max_pixels_per_frame)
        if outcome is None:
            summary.failed += 1
            consecutive_failures += 1
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise BackfillError(f"{url}: {consecutive_failures} retrievals failed in a row; stopped "
                                    "(rerun to resume)", summary)  # fmt: skip
            return False
        consecutive_failures = 0
        held = outcome.metadata.sop_instance_uid if outcome.metadata is not None else None
        if held is not None and held != instance.sop:  # indexed under held, the listed one would stay missing
            log.warning("study %s: the file retrieved for an instance holds another SOPInstanceUID; not indexed",
                        instance.study)  # fmt: skip
            summary.mismatched += 1
            return False
        outcome = admit(outcome)
        if not isinstance(outcome, Rejection):
            batch.add(instance.sop, outcome)
            if batch.full:
                flush()
            return True
        queue.reject(DICOMWEB, instance.sop, outcome.reason.value, outcome.detail, instance.sop)
        rejected_before.add(instance.sop)
        summary.rejected += 1
        return True

    def walk() -> None:
        for study_uid, count in studies:
            if checkpoint.covers(done.get(study_uid), count, wanted):
                summary.studies_done_earlier += 1
                bar.update(count or 0)
                continue
            complete = True
            for page in _instance_pages(client, url, study_uid, summary, stop):
                listed = [i for i in page if wanted is None or i.modality is None or i.modality in wanted]
                summary.instances += len(listed)
                if not known_total:
                    bar.total = (bar.total or 0) + len(listed)
                for instance, is_indexed in zip(listed, store.indexed([i.sop for i in listed]), strict=True):
                    if is_indexed:
                        summary.already_indexed += 1
                    elif instance.sop in rejected_before:
                        summary.rejected_earlier += 1
                    else:
                        complete = take(instance) and complete
                    bar.update(1)
            if complete:
                completed.append((study_uid, count))
        flush()

    try:
        try:
            walk()
        except _Interrupted:
            flush()
        except BackfillError:
            flush()  # keep what was decoded: the server failed, not Redis
            raise
    finally:
        bar.close()
        summary.seconds = time.monotonic() - started
    log.debug("%s", summary.line())
    return summary


class _Interrupted(Exception):
    pass


@dataclass(frozen=True)
class _Listed:
    study: str
    series: str
    sop: str
    modality: str | None


class _Checkpoint:
    """The studies a run over this server walked completely (see :func:`checkpoint_key`)."""

    def __init__(self, marks: Marks, key: str):
        self.marks = marks
        self.key = key

    def load(self) -> dict[str, dict]:
        return self.marks.entries(self.key)

    def clear(self) -> None:
        self.marks.clear(self.key)

    @staticmethod
    def covers(entry: dict | None, count: int | None, wanted: set[str] | None) -> bool:
        """Whether a study done earlier needs no new walk: same instance count, and the
        modalities walked then include those asked now."""
        if entry is None or entry.get("instances") != count:
            return False
        walked = entry.get("modalities")
        return walked is None or (wanted is not None and wanted <= set(walked))

    def done(self, study: str, count: int | None, wanted: set[str] | None, before: dict | None) -> None:
        modalities = None if wanted is None else set(wanted)
        if modalities is not None and before and before.get("instances") == count:  # add to what was walked
            modalities = None if before.get("modalities") is None else modalities | set(before["modalities"])
        walked = None if modalities is None else sorted(modalities)
        self.marks.set_entry(self.key, study, {"instances": count, "modalities": walked, "at": time.time()})


def _list_studies(client: DICOMwebClient, url: str, date_range: str | None, modalities: list[str] | None,
                  summary: BackfillSummary, stop: threading.Event | None) -> list[tuple[str, int | None]]:  # fmt: skip
    """(StudyInstanceUID, NumberOfStudyRelatedInstances or None) of every matching study."""
    filters = {"StudyDate": date_range} if date_range else {}
    studies: dict[str, int | None] = {}
    for modality in modalities or [None]:  # type: ignore[list-item]  # None: every modality
        query = {**filters, **({"ModalitiesInStudy": modality} if modality else {})}
        search = functools.partial(_search_studies, client, query)
        for page in _pages(search, url, "the study search", summary, stop):
            for study in page:
                uid = _value(study, _STUDY_UID)
                if uid:
                    count = _value(study, _STUDY_INSTANCES)
                    studies[uid] = int(count) if count is not None else None
    return list(studies.items())


def _search_studies(client: DICOMwebClient, query: dict[str, str], limit: int, offset: int) -> list[dict]:
    return client.search_for_studies(limit=limit, offset=offset, fields=["NumberOfStudyRelatedInstances"],
                                     search_filters=query or None)  # fmt: skip


def _instance_pages(client: DICOMwebClient, url: str, study: str, summary: BackfillSummary,
                    stop: threading.Event | None) -> Iterator[list[_Listed]]:  # fmt: skip
    for page in _pages(lambda limit, offset: client.search_for_instances(
            study_instance_uid=study, limit=limit, offset=offset, fields=["SeriesInstanceUID", "Modality"]),
            url, f"the instance search of study {study}", summary, stop):  # fmt: skip
        listed = []
        for item in page:
            sop, series = _value(item, _SOP_UID), _value(item, _SERIES_UID)
            if sop and series:
                modality = _value(item, _MODALITY)
                listed.append(_Listed(study, series, sop, str(modality).upper() if modality else None))
        yield listed


def _pages(search: Callable[[int, int], list[dict]], url: str, what: str, summary: BackfillSummary,
           stop: threading.Event | None = None) -> Iterable[list[dict]]:  # fmt: skip
    """QIDO-RS results page by page until an empty page (a server may cap a page below
    the ``limit`` asked, so a short page does not mean the end). Ends the run when ``stop`` is
    set (:class:`_Interrupted`), and with :class:`BackfillError` when the server answers a page
    it answered before (it ignores ``offset``: the walk would never end) or lists more than
    :data:`MAX_LISTED` entries for one search."""
    offset = 0
    seen: set[str] = set()
    while True:
        if stop is not None and stop.is_set():
            summary.interrupted = True
            raise _Interrupted
        try:
            page = search(PAGE, offset)
        except requests.RequestException as exc:
            raise BackfillError(_describe(exc, url, what), summary) from None
        if not page:
            return
        digest = hashlib.blake2b(json.dumps(page, sort_keys=True).encode(), digest_size=16).hexdigest()
        if digest in seen:
            raise BackfillError(f"{url} answered {what} at offset {offset} with a page it had sent before: it ignores "
                                "the offset parameter, so the listing would never end; stopped", summary)
        seen.add(digest)
        offset += len(page)
        if offset > MAX_LISTED:
            raise BackfillError(f"{url} listed more than {MAX_LISTED} entries for {what}; stopped (narrow the "
                                "run with --since or --modality)", summary)  # fmt: skip
        yield page


def _retrieve(client: DICOMwebClient, url: str, instance: _Listed, frames: int, summary: BackfillSummary,
              max_file_bytes: int, max_pixels_per_frame: int) -> DecodedInstance | Rejection | None:  # fmt: skip
    """WADO-RS and decode under the worker's limits: the decoded instance, a rejection, or
    ``None`` when this instance could not be retrieved (gone, or an HTTP error on it alone).
    dicomweb-client hands over the whole dataset, so ``max_file_bytes`` bounds its pixel data."""
    try:
        ds = client.retrieve_instance(instance.study, instance.series, instance.sop)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == TOO_LARGE_STATUS and exc.response is not None:  # this instance alone: the walk goes on
            return Rejection(RejectionReason.TOO_LARGE, f"WADO-RS answer too large ({exc.response.reason})")
        if status in (401, 403):
            raise BackfillError(_describe(exc, url, "a retrieval"), summary) from None
        log.warning("instance %s: retrieval failed (HTTP %s); the next run retries it", instance.sop, status)
        return None
    except requests.RequestException as exc:
        raise BackfillError(_describe(exc, url, "a retrieval"), summary) from None
    except Exception as exc:  # noqa: BLE001 - the answer is not a DICOM file: the instance cannot be used
        return Rejection(RejectionReason.NOT_DICOM, f"WADO-RS answer unreadable ({type(exc).__name__})")
    pixel_bytes = len(ds.get("PixelData") or b"")
    if pixel_bytes > max_file_bytes:
        return Rejection(RejectionReason.TOO_LARGE,
                         f"the pixel data has {pixel_bytes} bytes, more than the {max_file_bytes} allowed")  # fmt: skip
    with warnings.catch_warnings():  # pydicom's warnings quote values, names included
        warnings.simplefilter("ignore")
        try:
            return decode_dataset(ds, max_frames=frames, max_pixels_per_frame=max_pixels_per_frame)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not end the walk
            return Rejection(RejectionReason.CORRUPT_PIXEL_DATA, f"decoding failed ({type(exc).__name__})")


def _describe(exc: requests.RequestException, url: str, what: str) -> str:
    """A message for an operator: no credentials, no response bodies."""
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return (f"{url} refused the credentials (HTTP {status}) on {what}: check --username/--password "
                    "or --token")  # fmt: skip
        if status == TOO_LARGE_STATUS and exc.response is not None:
            return f"{url} answered {what} with more than a run reads ({exc.response.reason}); stopped"
        return f"{url} answered HTTP {status} to {what}; stopped (rerun to resume)"
    if isinstance(exc, requests.Timeout):
        return f"{url} did not answer {what} in time; stopped (rerun to resume)"
    if isinstance(exc, requests.JSONDecodeError):
        return f"{url} answered {what} with a body that is not JSON (QIDO-RS answers DICOM JSON); stopped"
    return f"cannot reach the DICOMweb server {url} ({type(exc).__name__}); stopped (rerun to resume)"


def _value(item: dict, tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object (``None`` when absent or empty)."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None
