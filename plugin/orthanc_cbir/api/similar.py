"""The similarity routes, transport-free: ``GET /cbir/{instances,series,studies}/{id}/similar``,
``POST /cbir/query`` and ``GET /cbir/rejected``.

An adapter builds one :class:`SimilarityService` and passes each request's path
parts, query parameters and body. The searching is the similarity core's
(:class:`~orthanc_cbir.search.service.SimilaritySearch`); this module turns
parameters into its options and its typed hits into JSON, DICOM JSON and statuses.

Parameters (all optional): ``k`` (10, at most the ``MaxResults`` setting), ``strategy``
(the ``DefaultStrategy`` setting), ``level`` (instance for an instance, else the level of
the resource), ``offset`` (0), ``weights`` (``modality=1,region=1,pathology=0``),
and the filters ``modality``, ``body_part``, ``sex``, ``age``, ``date``,
``exclude`` as in ``orthanc-cbir query --filter``. A client's mistake gets a 4xx
with a message.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import errors
from ..answers.dicom_json import hit_dataset, included_fields
from ..answers.hits import hit_json
from ..audit import AuditLog
from ..config import Settings
from ..errors import BadParameters, Busy, NotIndexed
from ..index import IndexInfo, IndexStore
from ..ingest.queue import QUERY, SIMILAR_SERIES, IngestQueue, WorkerRequests
from ..redis_client import SEARCH_COMMAND_TIMEOUT_S, UNREACHABLE, client_for
from ..search import Query, QueryContext
from ..search.labels import upload_header
from ..search.service import FILTER_PARAMETERS, SEARCH_PARAMETERS, Answer, Page, SimilaritySearch
from .routes import Response, status_for

LEVELS = {"instances": "instance", "series": "series", "studies": "study"}
PARAMETERS = (*SEARCH_PARAMETERS, "format", "includefield", "fuzzymatching")
"""Every parameter a similarity route takes."""
REGION_PARAMETERS = ("box", "k", "limit", "offset", *FILTER_PARAMETERS)
"""Every parameter ``GET /cbir/instances/{id}/similar-regions`` takes."""
BOX_PATTERN = r"^[0-9]{1,5}(\.[0-9]{1,3})?(,[0-9]{1,5}(\.[0-9]{1,3})?){3}$"
"""``box``: four numbers (pixels; up to 5 digits, 3 decimals) separated by commas."""
MAX_QUERY_BYTES = 256 * 2**20
"""Hard ceiling of a ``POST /cbir/query`` body; the ``max_query_bytes`` setting (64 MiB) is lower."""
QUERY_WAIT_S = 20
"""How long ``POST /cbir/query`` waits for a worker to embed the file."""
SERIES_WAIT_S = 120
"""How long ``POST .../similar/series`` waits for a worker to fetch, draw and store the hits."""
JOB_QUEUE_S = 600
"""How long an asynchronous series request (``Prefer: respond-async``) may wait for a worker to take it."""
JOB_TTL_S = 3600
"""How long ``GET /cbir/jobs/{id}`` knows a job."""
QUEUED_JOBS_PER_WAIT = 4
"""Asynchronous series requests one server lets wait for a worker: this many per ``max_worker_waits``."""
MAX_PARAMETER_CHARS = 1024
"""Longest value of one parameter: a longer one (a 10 kB filter list) is a 400, not a search."""


PARAMETER_HEADER = "x-cbir-"
"""Orthanc gives a plugin the query string of GET requests only: a POST may pass its parameters
as headers, ``X-Cbir-K: 5``, ``X-Cbir-Strategy: exact``, ``X-Cbir-Body-Part: CHEST``."""


def parse_query(query_string: str) -> dict[str, str]:
    """A query string as both servers read it: the standard library's rules (``parse_qsl``:
    percent-escapes decoded, ``+`` is a space, blank values kept); a repeated ``includefield``
    is one comma-separated list (QIDO-RS allows either), any other repeated name keeps its last.

    >>> parse_query("modality=CT%2CMR&k=%32&includefield=StudyDate&includefield=00081030")
    {'modality': 'CT,MR', 'k': '2', 'includefield': 'StudyDate,00081030'}
    """
    parameters: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query_string, keep_blank_values=True):
        if name == "includefield" and parameters.get(name):
            value = f"{parameters[name]},{value}"
        parameters[name] = value
    return parameters


def orthanc_query_string(get: Mapping[str, Any]) -> str:
    """The query string Orthanc's Python plugin received, rebuilt from its ``get`` dict: Orthanc
    splits it at ``&`` and the first ``=`` and hands names and values over still percent-encoded
    (``CT%2CMR``), so joining them again gives back what the client sent, for :func:`parse_query`.
    (The plugin keeps only the last of a repeated name: Orthanc's own limit.)

    >>> parse_query(orthanc_query_string({"modality": "CT%2CMR", "format": "dicom%2Bjson", "k": "%32"}))
    {'modality': 'CT,MR', 'format': 'dicom+json', 'k': '2'}
    """
    return "&".join(f"{name}={value}" for name, value in get.items())


def request_parameters(query: Mapping[str, Any], headers: Mapping[str, Any]) -> dict[str, str]:
    """A request's parameters as the routes take them: the query string, then ``X-Cbir-*`` headers.

    >>> request_parameters({"k": "5"}, {"X-Cbir-Body-Part": "CHEST", "Accept": "*/*"})
    {'k': '5', 'body_part': 'CHEST'}
    """
    parameters = {str(k): str(v) for k, v in query.items()}
    for name, value in headers.items():
        if name.lower().startswith(PARAMETER_HEADER):
            parameters[name.lower()[len(PARAMETER_HEADER):].replace("-", "_")] = str(value)
    return parameters


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` (two opposite corners, in pixels of the query image, in either order) as
    ``(left, top, right, bottom)``.

    Raises:
        BadParameters: anything else, or a box of no area (the message does not repeat the input).
    """
    if not re.fullmatch(BOX_PATTERN, text):
        raise BadParameters("box is x0,y0,x1,y1: four numbers (pixels of the image) separated by commas")
    x0, y0, x1, y1 = (float(part) for part in text.split(","))
    if x0 == x1 or y0 == y1:
        raise BadParameters("box is x0,y0,x1,y1: a rectangle of some width and height")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def redis_unreachable(redis_url: str, exc: BaseException) -> Response:
    """The 503 of a route while Redis does not answer: where (host and port, never a password) and why."""
    parts = urllib.parse.urlsplit(redis_url)
    where = f"{parts.hostname or parts.path}" + (f":{parts.port}" if parts.port else "")
    return Response.error(503, f"Redis at {where} is unreachable: {type(exc).__name__}: {exc}; "
                               "the index cannot answer now")  # fmt: skip


def _answers_503_without_redis(route: Callable[..., Response]) -> Callable[..., Response]:
    @functools.wraps(route)
    def wrapped(self: SimilarityService, *args: Any, **kwargs: Any) -> Response:
        try:
            return route(self, *args, **kwargs)
        except UNREACHABLE as exc:  # a Redis (or Redis Cluster) down, restarting or too slow: 503
            return redis_unreachable(self.settings.redis_url, exc)

    return wrapped


class SimilarityService:
    """What the similarity routes share: one Redis client and one similarity core. It never runs
    the model: a stored resource is searched with its stored vector, an upload by a worker."""

    def __init__(self, settings: Settings, resolve_uid: Callable[[str, str], str | None] | None = None,
                 audit: AuditLog | None = None):  # fmt: skip
        """``resolve_uid(level, orthanc_id)`` turns an Orthanc id into the DICOM UID of that
        level (the adapter asks Orthanc); without it only DICOM UIDs are accepted. With ``audit``
        every answer a route gives (``user`` passed) is recorded there before it leaves."""
        self.settings = settings
        self.audit = audit
        # A route waiting for a worker holds one of the server's threads (in Orthanc, one the
        # worker itself may need for its REST calls): at most max_worker_waits wait, more get 429.
        self._worker_waits = threading.BoundedSemaphore(max(1, settings.max_worker_waits))
        self.client = client_for(settings, socket_timeout=SEARCH_COMMAND_TIMEOUT_S)
        # Only the wait for a worker's reply blocks that long; on the client every command uses, a
        # hung Redis would hold the route (an Orthanc HTTP thread) as long before its 503.
        self.queue = IngestQueue.for_settings(self.client, settings)
        self.requests = WorkerRequests(self.queue, replies=client_for(settings, socket_timeout=SERIES_WAIT_S + 10))
        self.store = IndexStore(self.client, IndexInfo.for_model(settings.model), shards=settings.index_shards)
        self.core = SimilaritySearch(self.store, resolve_uid, graph_dir=settings.graph_path)

    # -- routes -----------------------------------------------------------------------------

    @_answers_503_without_redis
    def similar(self, resource: str, identifier: str, parameters: Mapping[str, str], *, user: str | None = None,
                route: str = "similar") -> Response:  # fmt: skip
        """``GET /cbir/{resource}/{identifier}/similar``; ``user`` is who asks, for the audit trail."""
        level = LEVELS.get(resource)
        if level is None:
            return Response.error(404, "unknown resource: use instances, series or studies")
        try:
            answer = self.core.similar_to_stored(level, identifier, self._page(parameters, default_level=level))
        except BadParameters as exc:
            return Response.error(400, str(exc))
        except NotIndexed as exc:
            return Response.error(404, str(exc))
        return self._respond(answer, parameters, (user, route, level))

    @_answers_503_without_redis
    def similar_regions(self, identifier: str, parameters: Mapping[str, str], *, user: str | None = None) -> Response:
        """``GET /cbir/instances/{identifier}/similar-regions?box=x0,y0,x1,y1``: the regions of other
        images most like the rectangle ``box`` (pixels of the instance) and, per hit, its matching
        region (``region.box``); ``k``, ``offset`` and the filters as for ``similar``."""
        try:
            if set(parameters) - set(REGION_PARAMETERS):
                raise BadParameters(f"unknown parameter: the parameters are {', '.join(REGION_PARAMETERS)}")
            box = parse_box(parameters.get("box", ""))
            page = self._page({k: v for k, v in parameters.items() if k != "box"}, default_level="instance")
            answer = self.core.similar_regions(identifier, box, page)
        except BadParameters as exc:
            return Response.error(400, str(exc))
        except NotIndexed as exc:
            return Response.error(404, str(exc))
        result = answer.result
        self._audit(answer, (user, "similar-regions", "instance"))
        return Response.json({
            "query": answer.query_uid, "query_region": {"box": list(answer.query_region or ())},
            "strategy": result.strategy, "level": result.level, "model": self.store.info.version,
            "index_size": result.index_size, "elapsed_ms": round(result.elapsed_ms, 2),
            "hits": [hit_json(h, result.strategy, answer.query_patient_key) for h in answer.hits],
        })  # fmt: skip

    @_answers_503_without_redis
    def query_file(self, body: bytes, parameters: Mapping[str, str], *, user: str | None = None) -> Response:
        """``POST /cbir/query``: a DICOM file, PNG or JPEG that need not be stored. A worker
        embeds it (the model never runs in Orthanc's process); the answer waits for it."""
        try:
            page = self._page(parameters, default_level="instance")
        except BadParameters as exc:
            return Response.error(400, str(exc))
        if not body:
            return Response.error(400, "send a DICOM file, PNG or JPEG as the request body")
        limit = min(self.settings.max_query_bytes, MAX_QUERY_BYTES)
        if len(body) > limit:
            return Response.error(413, f"the query file is larger than {limit} bytes")
        try:
            embedded = self._ask_worker(QUERY, body, QUERY_WAIT_S)
        except Busy:
            return _busy()
        if embedded is None:
            return Response.error(503, f"no worker embedded the query within {QUERY_WAIT_S} s: "
                                       "is `orthanc-cbir worker` running?")  # fmt: skip
        if "error" in embedded:
            return Response.error(400, f"cannot search with this file: {embedded['error']}")
        query = Query(np.frombuffer(base64.b64decode(embedded["features"]), "<f4"),
                      np.frombuffer(bytes.fromhex(embedded["code"]), np.uint8),
                      {h: np.asarray(p, np.float32) for h, p in embedded["probabilities"].items()},
                      QueryContext(embedded["patient_key"], embedded["study_instance_uid"],
                                   embedded["sop_instance_uid"], embedded["series_instance_uid"],
                                   *upload_header(body)))  # fmt: skip
        return self._respond(self.core.similar_to(query, page), parameters, (user, "query", "instance"))

    @_answers_503_without_redis
    def similar_series(self, identifier: str, parameters: Mapping[str, str], *, user: str | None = None,
                       respond_async: bool = False) -> Response:  # fmt: skip
        """``POST /cbir/instances/{identifier}/similar/series``: a worker stores a "Similar cases"
        Secondary Capture series (and a key object selection when hits are in the query's study)
        in the query's study; the answer names what was stored. With ``respond_async`` (the
        request says ``Prefer: respond-async``) the answer is at once a 202 naming a job, whose
        outcome ``GET /cbir/jobs/{id}`` tells (:meth:`job`): no server thread waits for the worker.

        The route first runs the search the worker will run (the ``similar_series_parameters``
        setting, then the request's; one image per hit): an instance that is not indexed is a
        404 at once, and the audit trail records the hits' studies before a worker draws them."""
        if "format" in parameters:  # a series is stored, not listed: a worker must never read a QIDO answer
            return Response.error(400, "format is not a parameter of a similar cases series (it is stored, not listed)")
        try:
            self._page(parameters, default_level="instance")
        except BadParameters as exc:
            return Response.error(400, str(exc))
        asked = {**parse_query(self.settings.similar_series_parameters), **parameters, "level": "instance"}
        searched = self.similar("instances", identifier, asked, user=user, route="similar-series")
        if searched.status != 200:
            return searched
        request = json.dumps({"instance": identifier, "parameters": dict(parameters)}).encode()
        if respond_async:
            return self._submit_job(request, identifier)
        try:
            made = self._ask_worker(SIMILAR_SERIES, request, SERIES_WAIT_S)
        except Busy:
            return _busy()
        if made is None:
            return Response.error(503, f"no worker made the series within {SERIES_WAIT_S} s: "
                                       "is `orthanc-cbir worker` running?")  # fmt: skip
        if "error" in made:
            return Response.error(status_of(made), made["error"])
        return Response.json(made)

    @_answers_503_without_redis
    def job(self, job_id: str) -> Response:
        """``GET /cbir/jobs/{id}``: ``queued`` (no worker took it yet), ``running``, ``done`` (with
        the ``result`` the synchronous route answers), ``failed`` (with its ``status`` and
        ``error``), or ``lost`` (no worker took it in time, or its worker died)."""
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):
            return Response.error(404, "no such job: a job id is 32 hexadecimal digits")
        job = self.requests.job(job_id)
        if job is None:
            return Response.error(404, f"no such job (unknown, or finished more than {JOB_TTL_S // 60} minutes ago)")
        answer: dict[str, Any] = {"job": job_id, "instance": job.instance, "created": job.created}
        result = job.result
        if result is not None and "error" in result:
            answer.update(state="failed", status=status_of(result), error=result["error"])
        elif result is not None:
            answer.update(state="done", result=result)
        elif job.queued:
            answer["state"] = "queued"
        else:  # taken by a worker; one that died, or a body that expired unread, never replies
            late = time.time() - job.created > JOB_QUEUE_S + SERIES_WAIT_S
            answer["state"] = "lost" if late else "running"
        return Response.json(answer)

    @_answers_503_without_redis
    def rejected(self) -> Response:
        """``GET /cbir/rejected``: instances that could not be indexed, with the reason."""
        entries = self.queue.rejected()
        # orthanc_id: the source's own id (the Orthanc id, the spool file; a dead letter's entry id)
        return Response.json({"rejected": [{"orthanc_id": value.get("source_id", key), **value}
                                           for key, value in sorted(entries.items())]})  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------

    def _page(self, parameters: Mapping[str, str], default_level: str) -> Page:
        """The search a request asks for. Every message is fixed text: none repeats the client's input."""
        if set(parameters) - set(PARAMETERS):
            raise BadParameters(f"unknown parameter: the parameters are {', '.join(PARAMETERS)}")
        too_long = sorted(name for name, value in parameters.items() if len(value) > MAX_PARAMETER_CHARS)
        if too_long:
            raise BadParameters(f"parameter(s) {', '.join(too_long)} longer than {MAX_PARAMETER_CHARS} characters")
        if _format(parameters) not in ("json", "dicom+json"):
            raise BadParameters("format is json or dicom+json")
        return self.core.page_for(parameters, default_level=default_level,
                                  default_strategy=self.settings.default_strategy,
                                  max_results=self.settings.max_results)  # fmt: skip

    def _ask_worker(self, action: str, body: bytes, wait_s: float) -> dict[str, Any] | None:
        """Leave ``body`` beside the stream, enqueue ``action`` and wait for the worker's JSON
        reply; ``None`` when no worker answered in ``wait_s``. Raises :class:`Busy` when
        ``max_worker_waits`` requests of this server wait already (nothing is enqueued then)."""
        if not self._worker_waits.acquire(blocking=False):
            raise Busy()
        try:
            return self.requests.ask(action, body, wait_s)
        finally:
            self._worker_waits.release()

    def _submit_job(self, request: bytes, identifier: str) -> Response:
        """Enqueue a series request without waiting: 202 with the job's id and status route, or
        the busy answer when this deployment's queued jobs reach their bound."""
        job = self.requests.submit(SIMILAR_SERIES, request, identifier, queue_s=JOB_QUEUE_S, keep_s=JOB_TTL_S,
                                   limit=QUEUED_JOBS_PER_WAIT * max(1, self.settings.max_worker_waits))  # fmt: skip
        if job is None:
            return _busy()
        answer = Response.json({"job": job, "state": "queued", "status": f"/cbir/jobs/{job}"}, status=202)
        return dataclasses.replace(answer, headers={"Location": f"/cbir/jobs/{job}"})

    def _audit(self, answer: Answer, audited: tuple[str | None, str, str]) -> None:
        """Record the answer in the audit trail when there is a user and an audit log; ``audited`` is
        (user, route, query level). A failed record raises: no record, no answer."""
        user, route, level = audited
        if self.audit is not None and user is not None:
            studies = [h.entry.metadata.study_instance_uid if h.entry else None for h in answer.hits]
            self.audit.record(user=user, route=route, level=level, query_uid=answer.query_uid,
                              hits=len(answer.hits), studies=studies)  # fmt: skip

    def _respond(self, answer: Answer, parameters: Mapping[str, str], audited: tuple[str | None, str, str]) -> Response:
        """The hits as the request asks; ``audited`` is (user, route, query level): with a user and
        an audit log, the answer is recorded first (no record, no answer)."""
        result, hits = answer.result, answer.hits
        self._audit(answer, audited)
        if _format(parameters) == "dicom+json":
            extra = included_fields(parameters.get("includefield"))
            objects = [hit_dataset(result.level, h.rank, h.distance, result.strategy,
                                   h.entry.metadata.to_json() if h.entry else {}, extra) for h in hits]  # fmt: skip
            return Response(200, json.dumps(objects).encode(), "application/dicom+json")
        return Response.json({
            "query": answer.query_uid,
            "strategy": result.strategy, "level": result.level, "model": self.store.info.version,
            "index_size": result.index_size, "candidate_fraction": round(result.candidate_fraction, 6),
            "elapsed_ms": round(result.elapsed_ms, 2),
            "hits": [hit_json(h, result.strategy, answer.query_patient_key) for h in hits],
        })  # fmt: skip


def _format(parameters: Mapping[str, str]) -> str:
    """The asked format; ``dicom json`` is ``dicom+json`` sent with a bare ``+`` (which the
    query string rules read as a space)."""
    asked = parameters.get("format", "json")
    return "dicom+json" if asked == "dicom json" else asked


def status_of(reply: Mapping[str, Any]) -> int:
    """The status of a worker's error reply: by the error's kind (:mod:`orthanc_cbir.errors`), 400 when unknown.

    >>> status_of({"error": "...", "kind": "NotIndexed"}), status_of({"error": "...", "kind": "Exception"})
    (404, 400)
    """
    kind = getattr(errors, str(reply.get("kind")), None)
    return status_for(kind) if isinstance(kind, type) and issubclass(kind, errors.CbirError) else 400


def _busy() -> Response:
    answer = Response.error(429, "too many requests wait for a worker now; try again in a few seconds")
    return dataclasses.replace(answer, headers={**answer.headers, "Retry-After": "5"})
