"""Mount the handlers of :mod:`.routes` in Orthanc through its Python plugin.

Orthanc runs every Python callback under one interpreter lock, and its change
callbacks in order on one thread, so everything here stays short: a stored or
deleted instance becomes one entry of the ingest stream, and the worker
processes (``orthanc-cbir worker``) do the decoding, the model and the index.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

from ..answers.results_page import CONTENT_TYPE as results_page_type
from ..answers.results_page import results_page
from ..answers.thumbnail import thumbnail
from ..audit import ANONYMOUS, AuditLog, basic_user
from ..config import Settings, load_settings
from ..dicom import looks_like_uid
from ..dicom.metadata import use_patient_key_secret
from ..ingest.change_log import ChangeCursor
from ..ingest.enqueue_buffer import EnqueueBuffer
from ..ingest.queue import DELETE, STABLE_STUDY, STORE, IngestQueue
from ..redis_client import client_for
from . import routes
from .similar import LEVELS, SimilarityService, orthanc_query_string, parse_query, request_parameters


def settings_from_orthanc(orthanc: Any) -> Settings:
    """The settings of the ``Cbir`` section of Orthanc's configuration (and ``CBIR_*`` variables)."""
    return load_settings(orthanc_section=json.loads(orthanc.GetConfiguration()).get("Cbir", {}))


def register(orthanc: Any, settings: Settings) -> None:
    """Register the ingest callback and every ``/cbir/...`` route with Orthanc."""
    use_patient_key_secret(settings.patient_key_secret)
    queue = IngestQueue.for_settings(client_for(settings, socket_timeout=2, socket_connect_timeout=2), settings)
    buffer = EnqueueBuffer(queue, maxlen=settings.enqueue_buffer_size, log=orthanc.LogWarning)
    cursor = ChangeCursor(lambda path: json.loads(orthanc.RestApiGet(path)), queue.client, buffer.enqueue,
                          lambda: len(buffer), settings.similar_series_on_stable_study,
                          key=f"{queue.keys.prefix}:orthanc-changes-seq", log=orthanc.LogWarning)  # fmt: skip
    orthanc.RegisterOnChangeCallback(_on_change(orthanc, buffer, cursor, settings.similar_series_on_stable_study))
    orthanc.RegisterIncomingHttpRequestFilter(_body_caps(orthanc, {"/cbir/query": settings.max_query_bytes,
                                                                   "/cbir/votes": routes.MAX_VOTE_BYTES}))
    _get(orthanc, "/cbir/status", lambda request: routes.status(settings))
    service: list[SimilarityService] = []  # made on first use: Redis may come up after Orthanc
    audit = AuditLog(client_for(settings, socket_timeout=5, socket_connect_timeout=2), settings.audit_retention_days)

    def similarity() -> SimilarityService:
        if not service:
            service.append(SimilarityService(settings, resolve_uid=lambda level, oid: _dicom_uid(orthanc, level, oid),
                                             audit=audit))  # fmt: skip
        return service[0]

    _get(orthanc, "/cbir/rejected", lambda request: similarity().rejected())
    _get(orthanc, "/cbir/jobs/([^/]+)", lambda request: similarity().job(request["groups"][0]))
    _get(orthanc, "/cbir/audit", lambda request: routes.audit_trail(audit, _parameters(request), _user(request),
                                                                    settings.audit_readers))  # fmt: skip
    _route(orthanc, "/cbir/votes", ("POST",),
           lambda request: routes.vote(audit, request.get("body") or b"", _user(request)))
    _get(orthanc, "/cbir/ui/instances/([^/]+)",
         lambda request: routes.Response(200, results_page(settings, request["groups"][0],
                                                           _instance_id(orthanc, request["groups"][0])),
                                         results_page_type))  # fmt: skip
    # a hit's thumbnail from the pixel step (Orthanc 1.10's /preview cannot decode JPEG 2000)
    _get(orthanc, "/cbir/instances/([^/]+)/thumbnail",
         lambda request: routes.thumbnail_answer(lambda: thumbnail(
             request["groups"][0], lambda oid: _file_size(orthanc, oid), lambda oid: _instance_file(orthanc, oid),
             settings)))  # fmt: skip
    _get(orthanc, "/cbir/(instances|series|studies)/([^/]+)/similar",
         lambda request: similarity().similar(request["groups"][0], request["groups"][1], _parameters(request),
                                              user=_user(request)))  # fmt: skip
    _get(orthanc, "/cbir/instances/([^/]+)/similar-regions",
         lambda request: similarity().similar_regions(request["groups"][0], _parameters(request),
                                                      user=_user(request)))  # fmt: skip
    # GET: the same answer as a QIDO-RS endpoint, a DICOMweb client searches {...}/similar/{studies|series|instances};
    # POST .../instances/{id}/similar/series: store the answer as a "Similar cases" series in the query's study
    def qido_or_series(request: dict[str, Any]) -> routes.Response:
        resource, identifier, answer_level = request["groups"]
        if request.get("method") == "POST":
            if (resource, answer_level) != ("instances", "series"):
                return routes.Response(405, b"", headers={"Allow": "GET"})
            return similarity().similar_series(identifier, _parameters(request), user=_user(request),
                                               respond_async=_prefers_async(request))  # fmt: skip
        return similarity().similar(resource, identifier,
                                    {**_parameters(request), "format": "dicom+json", "level": LEVELS[answer_level]},
                                    user=_user(request))  # fmt: skip

    _route(orthanc, "/cbir/(instances|series|studies)/([^/]+)/similar/(studies|series|instances)", ("GET", "POST"),
           qido_or_series)
    _route(orthanc, "/cbir/query", ("POST",),
           lambda request: similarity().query_file(request.get("body") or b"", _parameters(request),
                                                   user=_user(request)))  # fmt: skip


def _body_caps(orthanc: Any, limits: dict[str, int]) -> Callable[..., bool]:
    """Orthanc reads a request's whole body before a route sees it; its incoming-request filter
    runs before the body is read. This one refuses a ``POST`` to one of ``limits``' routes that
    declares more than its limit in bytes, or no length (chunked): Orthanc answers 403 without
    reading the body. (Orthanc 1.12.11's ``MaximumRequestBodySizeMB`` caps every route, uploads included.)"""
    post = orthanc.HttpMethod.POST

    def allowed(uri: str, **request: Any) -> bool:
        limit = limits.get(uri.rstrip("/"))
        if request.get("method") != post or limit is None:
            return True
        declared = str((request.get("headers") or {}).get("content-length", ""))
        return declared.isdigit() and int(declared) <= limit

    return allowed


_UID_TAG = {"instance": ("instances", "SOPInstanceUID"), "series": ("series", "SeriesInstanceUID"),
            "study": ("studies", "StudyInstanceUID")}  # fmt: skip


def _dicom_uid(orthanc: Any, level: str, orthanc_id: str) -> str | None:
    """The DICOM UID of an Orthanc resource (``None`` if Orthanc does not know the id)."""
    resource, tag = _UID_TAG[level]
    try:
        answer = json.loads(orthanc.RestApiGet(f"/{resource}/{orthanc_id}"))
    except Exception:  # noqa: BLE001 - Orthanc answers an unknown id with an error
        return None
    return answer.get("MainDicomTags", {}).get(tag)


def _file_size(orthanc: Any, orthanc_id: str) -> int | None:
    """The size of an instance's stored file (``None`` if Orthanc does not know the id)."""
    try:
        return int(json.loads(orthanc.RestApiGet(f"/instances/{orthanc_id}"))["FileSize"])
    except Exception:  # noqa: BLE001 - Orthanc answers an unknown id with an error
        return None


def _instance_file(orthanc: Any, orthanc_id: str) -> bytes | None:
    """An instance's stored file (``None`` if Orthanc no longer has it)."""
    try:
        return bytes(orthanc.RestApiGet(f"/instances/{orthanc_id}/file"))
    except Exception:  # noqa: BLE001 - deleted since its size was read
        return None


def _instance_id(orthanc: Any, identifier: str) -> str | None:
    """The Orthanc id of an instance given by Orthanc id or SOPInstanceUID (``None`` if Orthanc lacks it)."""
    try:
        if looks_like_uid(identifier):
            matches = json.loads(orthanc.RestApiPost("/tools/lookup", identifier))
            return next((m["ID"] for m in matches if m.get("Type") == "Instance"), None)
        orthanc.RestApiGet(f"/instances/{identifier}")
        return identifier
    except Exception:  # noqa: BLE001 - Orthanc answers an unknown id with an error
        return None


def _parameters(request: dict[str, Any]) -> dict[str, str]:
    """The query string read by the standard rules (as the standalone server reads it), then ``X-Cbir-*`` headers."""
    query = parse_query(orthanc_query_string(request.get("get") or {}))
    return request_parameters(query, request.get("headers") or {})


def _prefers_async(request: dict[str, Any]) -> bool:
    """``Prefer: respond-async`` (RFC 7240): answer 202 with a job at once, no Orthanc thread waits."""
    return "respond-async" in str((request.get("headers") or {}).get("prefer", "")).lower()


def _user(request: dict[str, Any]) -> str:
    """Who sent the request, for the audit trail: the HTTP Basic user Orthanc authenticated
    (Orthanc checked the password before the plugin was called), else ``anonymous``."""
    return basic_user((request.get("headers") or {}).get("authorization")) or ANONYMOUS


def _on_change(orthanc: Any, buffer: EnqueueBuffer, cursor: ChangeCursor,
               series_on_stable_study: bool) -> Callable[[Any, Any, str], None]:  # fmt: skip
    """Orthanc runs change callbacks in order on one thread: this one only enqueues (one XADD, or,
    while Redis does not answer, an append to the bounded in-memory buffer that a thread flushes).
    Orthanc drops the callbacks still queued when it stops: ``cursor`` replays them when it starts."""

    def on_change(change_type: Any, level: Any, resource_id: str) -> None:
        action = None
        if change_type == orthanc.ChangeType.NEW_INSTANCE:
            action = STORE
        elif change_type == orthanc.ChangeType.DELETED and level == orthanc.ResourceType.INSTANCE:
            action = DELETE
        elif change_type == orthanc.ChangeType.STABLE_STUDY and series_on_stable_study:
            action = STABLE_STUDY
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            cursor.start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            cursor.stop()
            buffer.close()
        if action is not None:
            buffer.enqueue(resource_id, action)
            cursor.handled(resource_id, action)

    return on_change


def _get(orthanc: Any, uri: str, handler: Callable[[dict[str, Any]], routes.Response]) -> None:
    _route(orthanc, uri, ("GET",), handler)


def _route(orthanc: Any, uri: str, methods: tuple[str, ...],
           handler: Callable[[dict[str, Any]], routes.Response]) -> None:  # fmt: skip
    def callback(output: Any, uri: str, **request: Any) -> None:
        if request.get("method") not in methods:
            output.SendMethodNotAllowed(",".join(methods))
            return
        try:
            response = handler(request)
        except Exception as exc:  # noqa: BLE001 - the client gets a message, the log gets the trace
            orthanc.LogError(f"cbir: {uri} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            response = routes.Response.error(500, f"internal error ({type(exc).__name__}); see the Orthanc log")
        _send(output, response)

    orthanc.RegisterRestCallback(uri, callback)


def _send(output: Any, response: routes.Response) -> None:
    # Orthanc 1.10 cannot send 429 (it drops the connection): 503 + Retry-After says the same
    if response.status == 429:
        response = routes.Response(503, routes.Response.error(503, json.loads(response.body)["error"]).body,
                                   headers=response.headers)  # fmt: skip
    for name, value in response.headers.items():
        if name != "Allow":
            output.SetHttpHeader(name, value)
    output.SetHttpHeader("X-Content-Type-Options", "nosniff")  # a browser never sniffs an answer into HTML
    if response.status == 200:
        output.AnswerBuffer(response.body, response.content_type)
    elif response.status == 405:  # Orthanc drops the connection on SendHttpStatus(405)
        output.SendMethodNotAllowed(response.headers.get("Allow", "GET"))
    else:
        # SendHttpStatus sends no Content-Type of its own: an error is JSON, and says so
        output.SetHttpHeader("Content-Type", response.content_type)
        text = response.body.decode()  # plugin 4.0 wants (int, str, length)
        output.SendHttpStatus(response.status, text, len(text.encode()))
