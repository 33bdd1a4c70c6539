"""The similarity routes, transport-free: ``GET /cbir/{instances,series,studies}/{id}/similar``,
``POST /cbir/query`` and ``GET /cbir/rejected``.

An adapter builds one :class:`SimilarityService` and passes each request's path
parts, query parameters and body. Parameters (all optional): ``k`` (10, at most
the ``MaxResults`` setting), ``strategy`` (the ``DefaultStrategy`` setting), ``level`` (instance for an instance, else the level of
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
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..audit import AuditLog
from ..config import Settings
from ..dicom import looks_like_uid
from ..index import IndexInfo, IndexStore
from ..index.schema import uid_hash
from ..ingest.queue import QUERY, SIMILAR_SERIES, IngestQueue
from ..redis_client import UNREACHABLE, client_for
from ..search import LEVELS as SEARCH_LEVELS
from ..search import STRATEGIES, Filters, Query, QueryContext, Searcher, SearchOptions
from ..search.filters import parse_weights
from ..search.labels import upload_header
from .dicom_json import hit_dataset, included_fields
from .routes import Response

LEVELS = {"instances": "instance", "series": "series", "studies": "study"}
FILTER_PARAMETERS = ("modality", "body_part", "sex", "age", "date", "exclude")
PARAMETERS = ("k", "limit", "strategy", "level", "offset", "weights", "format", "includefield", "fuzzymatching",
              *FILTER_PARAMETERS)  # fmt: skip
"""Every parameter a similarity route takes."""
MAX_QUERY_BYTES = 256 * 2**20
"""Hard ceiling of a ``POST /cbir/query`` body; the ``max_query_bytes`` setting (64 MiB) is lower."""
QUERY_WAIT_S = 20
"""How long ``POST /cbir/query`` waits for a worker to embed the file."""
SERIES_WAIT_S = 120
"""How long ``POST .../similar/series`` waits for a worker to fetch, draw and store the hits."""
REDIS_COMMAND_TIMEOUT_S = 10
"""How long a route's Redis command may take before the route answers 503: a hung Redis must not
hold a server thread for the worker waits above. Snapshot refreshes read in bounded blocks."""
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


class BadRequest(ValueError):
    """A client's mistake: answered with 400 and the message (fixed text: it never repeats what
    the client sent, which a browser could otherwise be made to render)."""


class Busy(Exception):
    """Too many requests wait for a worker in this server: answered 429."""


_FILTER_GRAMMAR = {
    "modality": "comma-separated modalities (CT,MR)", "body_part": "comma-separated body parts (CHEST)",
    "sex": "comma-separated M, F or O", "age": "MIN-MAX in years (40-70, 40-, -70)",
    "date": "YYYY-MM-DD..YYYY-MM-DD (either end may be left out)",
    "exclude": "comma-separated same-patient, same-study, same-series",
}  # fmt: skip


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
    """What the similarity routes share: one Redis client and one searcher. It never runs the
    model: a stored resource is searched with its stored vector."""

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
        self.client = client_for(settings, socket_timeout=REDIS_COMMAND_TIMEOUT_S)
        # Only the wait for a worker's reply blocks that long; on the client every command uses, a
        # hung Redis would hold the route (an Orthanc HTTP thread) as long before its 503.
        self._replies = client_for(settings, socket_timeout=SERIES_WAIT_S + 10)
        self.queue = IngestQueue.for_settings(self.client, settings)
        self.store = IndexStore(self.client, IndexInfo.for_model(settings.model), shards=settings.index_shards)
        self.searcher = Searcher(self.store)
        self.resolve_uid = resolve_uid
        self._lock = threading.Lock()  # one query at a time touches the searcher's snapshot

    # -- routes -----------------------------------------------------------------------------

    @_answers_503_without_redis
    def similar(self, resource: str, identifier: str, parameters: Mapping[str, str], *, user: str | None = None,
                route: str = "similar") -> Response:  # fmt: skip
        """``GET /cbir/{resource}/{identifier}/similar``; ``user`` is who asks, for the audit trail."""
        try:
            level = LEVELS.get(resource)
            if level is None:
                return Response.error(404, "unknown resource: use instances, series or studies")
            options, offset = self._options(parameters, default_level=level)
            with self._lock:
                uid, query = self._stored_query(level, identifier)
                if query is None:
                    return Response.error(404, f"not in the index: no {level} with this identifier is stored and "
                                               "indexed (not stored, not yet indexed, or rejected)")  # fmt: skip
                if level != "instance":  # a series (study) never answers with itself
                    exclude = {"series": "exclude_same_series", "study": "exclude_same_study"}[level]
                    options = dataclasses.replace(options, filters=dataclasses.replace(options.filters, **{exclude: True}))
                return self._answer(query, options, offset, parameters, (user, route, level, uid))
        except BadRequest as exc:
            return Response.error(400, str(exc))

    @_answers_503_without_redis
    def query_file(self, body: bytes, parameters: Mapping[str, str], *, user: str | None = None) -> Response:
        """``POST /cbir/query``: a DICOM file, PNG or JPEG that need not be stored. A worker
        embeds it (the model never runs in Orthanc's process); the answer waits for it."""
        try:
            options, offset = self._options(parameters, default_level="instance")
        except BadRequest as exc:
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
        with self._lock:
            return self._answer(query, options, offset, parameters,
                                (user, "query", "instance", embedded.get("sop_instance_uid")))  # fmt: skip

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
            self._options(parameters, default_level="instance")
        except BadRequest as exc:
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
            return Response.error(int(made.get("status", 400)), made["error"])
        return Response.json(made)

    @_answers_503_without_redis
    def job(self, job_id: str) -> Response:
        """``GET /cbir/jobs/{id}``: ``queued`` (no worker took it yet), ``running``, ``done`` (with
        the ``result`` the synchronous route answers), ``failed`` (with its ``status`` and
        ``error``), or ``lost`` (no worker took it in time, or its worker died)."""
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):
            return Response.error(404, "no such job: a job id is 32 hexadecimal digits")
        keys = self.queue.keys
        raw = self.client.get(self._job_key(job_id))
        if raw is None:
            return Response.error(404, f"no such job (unknown, or finished more than {JOB_TTL_S // 60} minutes ago)")
        record = json.loads(raw)
        if "result" not in record:
            reply = self.client.lindex(keys.query_reply(job_id), 0)  # the worker keeps its reply a minute only
            if reply is not None:
                record["result"] = json.loads(reply)
                self.client.set(self._job_key(job_id), json.dumps(record), keepttl=True)
                self.client.zrem(self._jobs_key, job_id)
        answer: dict[str, Any] = {"job": job_id, "instance": record["instance"], "created": record["created"]}
        result = record.get("result")
        if result is not None and "error" in result:
            answer.update(state="failed", status=int(result.get("status", 400)), error=result["error"])
        elif result is not None:
            answer.update(state="done", result=result)
        elif self.client.exists(keys.query_body(job_id)):
            answer["state"] = "queued"
        else:  # taken by a worker; one that died, or a body that expired unread, never replies
            late = time.time() - record["created"] > JOB_QUEUE_S + SERIES_WAIT_S
            answer["state"] = "lost" if late else "running"
        return Response.json(answer)

    @_answers_503_without_redis
    def rejected(self) -> Response:
        """``GET /cbir/rejected``: instances that could not be indexed, with the reason."""
        entries = self.queue.rejected()
        return Response.json({"rejected": [{"orthanc_id": key, **value} for key, value in sorted(entries.items())]})

    # -- helpers ----------------------------------------------------------------------------

    def _options(self, parameters: Mapping[str, str], default_level: str) -> tuple[SearchOptions, int]:
        """The search a request asks for. Every message is fixed text: none repeats the client's input."""
        if set(parameters) - set(PARAMETERS):
            raise BadRequest(f"unknown parameter: the parameters are {', '.join(PARAMETERS)}")
        too_long = sorted(name for name, value in parameters.items() if len(value) > MAX_PARAMETER_CHARS)
        if too_long:
            raise BadRequest(f"parameter(s) {', '.join(too_long)} longer than {MAX_PARAMETER_CHARS} characters")
        if _format(parameters) not in ("json", "dicom+json"):
            raise BadRequest("format is json or dicom+json")
        try:
            k, offset = int(parameters.get("limit", parameters.get("k", 10))), int(parameters.get("offset", 0))
        except ValueError:
            raise BadRequest("k and offset must be whole numbers") from None
        if not 1 <= k <= self.settings.max_results or not 0 <= offset <= 1000 - k:
            raise BadRequest(f"k must be 1..{self.settings.max_results} and offset 0..{1000 - k}")
        strategy, level = parameters.get("strategy", self.settings.default_strategy), parameters.get("level", default_level)
        if strategy not in STRATEGIES:
            raise BadRequest(f"strategy is one of {', '.join(STRATEGIES)}")
        if level not in SEARCH_LEVELS:
            raise BadRequest(f"level is one of {', '.join(SEARCH_LEVELS)}")
        clauses = []
        for name in FILTER_PARAMETERS:
            if name in parameters:
                try:
                    Filters.parse([f"{name}={parameters[name]}"])
                except ValueError:
                    raise BadRequest(f"{name} is {_FILTER_GRAMMAR[name]}") from None
                clauses.append(f"{name}={parameters[name]}")
        sub_codes = ", ".join(sub.name for sub in self.store.info.layout.sub_codes)
        try:
            weights = parse_weights(parameters.get("weights"))
            self.store.info.layout.bit_weights(weights)  # names a sub-code the model has
        except ValueError:
            raise BadRequest(f"weights is SUB=WEIGHT,... with SUB one of {sub_codes} and WEIGHT a number >= 0") from None
        try:
            options = SearchOptions(strategy, k=k + offset, filters=Filters.parse(clauses), level=level, weights=weights)
        except ValueError as exc:  # the checks above cover the client's part: what is left is ours
            raise BadRequest(f"these parameters cannot be searched ({type(exc).__name__})") from None
        return options, offset

    def _ask_worker(self, action: str, body: bytes, wait_s: float) -> dict[str, Any] | None:
        """Leave ``body`` beside the stream, enqueue ``action`` and wait for the worker's JSON
        reply; ``None`` when no worker answered in ``wait_s``. Raises :class:`Busy` when
        ``max_worker_waits`` requests of this server wait already (nothing is enqueued then)."""
        if not self._worker_waits.acquire(blocking=False):
            raise Busy()
        try:
            return self._wait_for_worker(action, body, wait_s)
        finally:
            self._worker_waits.release()

    @property
    def _jobs_key(self) -> str:
        """Sorted set of the asynchronous jobs not yet seen finished (score: when submitted)."""
        return f"{self.queue.keys.prefix}:jobs"

    def _job_key(self, job_id: str) -> str:
        return f"{self.queue.keys.prefix}:job:{job_id}"

    def _submit_job(self, request: bytes, identifier: str) -> Response:
        """Enqueue a series request without waiting: 202 with the job's id and status route, or
        the busy answer when this deployment's queued jobs reach their bound (a job leaves the
        count once a worker takes it)."""
        keys = self.queue.keys
        waiting = [job.decode() if isinstance(job, bytes) else job for job in self.client.zrange(self._jobs_key, 0, -1)]
        if waiting:
            pipe = self.client.pipeline(transaction=False)
            for job in waiting:
                pipe.exists(keys.query_body(job))
            taken = [job for job, queued in zip(waiting, pipe.execute()) if not queued]
            if taken:
                self.client.zrem(self._jobs_key, *taken)
            waiting = [job for job in waiting if job not in taken]
        if len(waiting) >= QUEUED_JOBS_PER_WAIT * max(1, self.settings.max_worker_waits):
            return _busy()
        job = uuid.uuid4().hex
        now = time.time()
        self.client.set(self._job_key(job), json.dumps({"instance": identifier, "created": now}), ex=JOB_TTL_S)
        self.client.set(keys.query_body(job), request, ex=JOB_QUEUE_S)
        self.client.zadd(self._jobs_key, {job: now})
        self.queue.enqueue(job, SIMILAR_SERIES)
        answer = Response.json({"job": job, "state": "queued", "status": f"/cbir/jobs/{job}"}, status=202)
        return dataclasses.replace(answer, headers={"Location": f"/cbir/jobs/{job}"})

    def _wait_for_worker(self, action: str, body: bytes, wait_s: float) -> dict[str, Any] | None:
        request = uuid.uuid4().hex
        keys = self.queue.keys
        self.client.set(keys.query_body(request), body, ex=int(wait_s * 2))
        self.queue.enqueue(request, action)
        reply = self._replies.blpop([keys.query_reply(request)], timeout=wait_s)
        if reply is None:
            self.client.delete(keys.query_body(request))  # a worker that comes later finds nothing to do
            return None
        return json.loads(reply[1])

    def _stored_query(self, level: str, identifier: str) -> tuple[str | None, Query | None]:
        """The DICOM UID and the query of a stored instance, series or study (query ``None`` if it is not indexed)."""
        uid = identifier if looks_like_uid(identifier) else (self.resolve_uid(level, identifier)
                                                              if self.resolve_uid else None)  # fmt: skip
        if uid is None:
            return None, None
        self.searcher.snapshot.refresh()
        if level == "instance":
            row = self.store.row(uid)
            rows = np.array([] if row is None else [row], dtype=np.int64)
        else:
            column = self.searcher.snapshot.attributes["series" if level == "series" else "study"]
            rows = np.flatnonzero((column == uid_hash(uid)) & self.searcher.snapshot.live)
        return uid, (self.searcher.stored_query(rows) if len(rows) else None)

    def _answer(self, query: Query, options: SearchOptions, offset: int, parameters: Mapping[str, str],
                audited: tuple[str | None, str, str, str | None]) -> Response:  # fmt: skip
        """The hits as the request asks; ``audited`` is (user, route, query level, query UID): with
        a user and an audit log, the answer is recorded first (no record, no answer)."""
        result = self.searcher.search(query, options)
        hits = result.hits[offset:]  # the search asked for k + offset
        user, route, level, query_uid = audited
        if self.audit is not None and user is not None:
            self.audit.record(user=user, route=route, level=level, query_uid=query_uid, hits=len(hits),
                              studies=[h.record.get("metadata", {}).get("study_instance_uid") for h in hits])  # fmt: skip
        if _format(parameters) == "dicom+json":
            extra = included_fields(parameters.get("includefield"))
            objects = [hit_dataset(result.level, h.rank, h.distance, result.strategy, h.record.get("metadata", {}), extra)
                       for h in hits]  # fmt: skip
            return Response(200, json.dumps(objects).encode(), "application/dicom+json")
        return Response.json({
            "strategy": result.strategy, "level": result.level, "model": self.store.info.version,
            "index_size": result.index_size, "candidate_fraction": round(result.candidate_fraction, 6),
            "elapsed_ms": round(result.elapsed_ms, 2),
            "hits": [hit_json(h.rank, h.distance, h.instances, result.strategy, h.record) for h in hits],
        })  # fmt: skip


def _format(parameters: Mapping[str, str]) -> str:
    """The asked format; ``dicom json`` is ``dicom+json`` sent with a bare ``+`` (which the
    query string rules read as a space)."""
    asked = parameters.get("format", "json")
    return "dicom+json" if asked == "dicom json" else asked


def _busy() -> Response:
    answer = Response.error(429, "too many requests wait for a worker now; try again in a few seconds")
    return dataclasses.replace(answer, headers={**answer.headers, "Retry-After": "5"})


def hit_json(rank: int, distance: float, instances: int, strategy: str, record: dict) -> dict[str, Any]:
    """One hit as the HTTP answer shows it (DESIGN: UIDs, Orthanc ids, distance, key metadata, thumbnail)."""
    meta = record.get("metadata", {})
    orthanc = record.get("orthanc", {})
    return {
        "rank": rank, "distance": distance, "strategy": strategy, "instances": instances,
        "StudyInstanceUID": meta.get("study_instance_uid"), "SeriesInstanceUID": meta.get("series_instance_uid"),
        "SOPInstanceUID": meta.get("sop_instance_uid"), "orthanc": orthanc,
        "Modality": meta.get("modality"), "BodyPartExamined": meta.get("body_part_examined"),
        "StudyDate": meta.get("study_date"), "StudyDescription": meta.get("study_description"),
        "SeriesDescription": meta.get("series_description"), "PatientSex": meta.get("patient_sex"),
        "PatientAgeYears": meta.get("patient_age_years"),
        "labels": record.get("labels"), "copies": record.get("copies", []),  # set by the search (Hit.record)
        "thumbnail": f"/cbir/instances/{orthanc['instance']}/thumbnail" if orthanc.get("instance") else None,
    }  # fmt: skip
