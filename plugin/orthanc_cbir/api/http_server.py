"""The standalone server's HTTP API (``orthanc-cbir serve``): the routes Orthanc serves through
the plugin, without Orthanc, plus STOW-RS into the spool. FastAPI over Starlette and uvicorn.

A thin adapter: each route turns its request into the arguments of the same transport-free
handlers the Orthanc plugin mounts (:func:`.routes.status`, :class:`.similar.SimilarityService`)
and sends their :class:`.routes.Response` back. Identifiers are DICOM UIDs (there is no Orthanc
to resolve its ids). Routes:

- ``GET /cbir/status``, ``GET /cbir/rejected``, ``GET /cbir/audit`` (the audit trail, :mod:`..audit`);
- ``GET /cbir/{instances|series|studies}/{uid}/similar`` and, QIDO-RS style (``application/dicom+json``),
  ``GET /cbir/{instances|series|studies}/{uid}/similar/{studies|series|instances}``;
- ``POST /cbir/query``: a DICOM file, PNG or JPEG as the body, parameters in the query string
  or as ``X-Cbir-*`` headers (as in Orthanc);
- ``POST /dicom-web/studies[/{study}]``: STOW-RS (PS3.18 10.5): this module streams the body and
  answers; :mod:`orthanc_cbir.ingest.stow` writes each part to a file in the spool as it arrives
  and hands it to the spool before the answer names it; a worker indexes it later
  (``GET /cbir/status``: ``spooled``).

Every error is JSON ``{"error": message, "status": code}`` (unknown routes, 405, validation
errors as 400, 500 without a trace, which goes to the log). With ``http_token`` every request
(``/openapi.json`` and ``/docs`` included) needs ``Authorization: Bearer <token>``; else with
``http_username`` HTTP Basic; with neither, no authentication, which is allowed on a loopback
address only. The OpenAPI document (``/openapi.json``; Swagger UI at ``/docs``, which loads its
scripts from a CDN) declares the parameters with their bounds and the security scheme.

Run it::

    app = create_app(settings, Spool(Path(settings.spool_dir), IngestQueue(client)))
    with HttpServerThread(app, "127.0.0.1", port) as server: ...   # uvicorn in a thread
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, some of
# which name values made inside create_app.
import base64
import binascii
import inspect
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import redis
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response as HttpResponse

from .. import __version__
from ..answers.thumbnail import thumbnail
from ..audit import ANONYMOUS, VOTES, AuditLog, basic_user
from ..config import Settings
from ..dicom.metadata import use_patient_key_secret
from ..index import IndexInfo
from ..ingest.orthanc_client import OrthancClient
from ..ingest.spool import Spool
from ..ingest.stow import PartFiles, spool_parts
from ..redis_client import client_for
from ..search import LEVELS as SEARCH_LEVELS
from ..search import STRATEGIES
from ..search.service import FILTER_PARAMETERS
from . import routes
from .similar import (
    BOX_PATTERN,
    LEVELS,
    MAX_PARAMETER_CHARS,
    SimilarityService,
    parse_query,
    request_parameters,
)

log = logging.getLogger(__name__)

MAX_STOW_BYTES = 2 * 2**30
"""Largest STOW-RS request body (2 GiB): a client sends a larger study in several requests."""
DRAIN_BYTES = 32 * 2**20
"""After a 413, up to this much of the rest of the body is read and dropped, so that the client
reads the answer rather than a reset connection; past it the connection is closed."""


DICOM_JSON = "application/dicom+json"
UID_PATTERN = r"^[0-9]+(\.[0-9]+)+$"
_UID_SCHEMA = {"type": "string", "pattern": UID_PATTERN, "maxLength": 64}
_REALM = "orthanc-cbir"


# -- running it ---------------------------------------------------------------------------------


class HttpServerThread:
    """``app`` served by uvicorn in a daemon thread (``orthanc-cbir serve``, the tests).

    :meth:`start` returns once the port listens; :meth:`stop` waits for open requests."""

    def __init__(self, app: FastAPI, host: str, port: int, *, log_level: str = "warning"):
        _refuse_open_exposure(host, app.state.authentication)
        self.host, self.port = host, port
        self.server = uvicorn.Server(_config(app, host, port, log_level))
        self._thread = threading.Thread(target=self.server.run, name=f"http-{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "HttpServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port} (port in use?)")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def __enter__(self) -> "HttpServerThread":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                          proxy_headers=False, timeout_graceful_shutdown=5)  # fmt: skip


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _refuse_open_exposure(host: str, authentication: str | None) -> None:
    if authentication is None and not is_loopback(host):
        raise ValueError(f"the HTTP API would listen on {host!r} without authentication: set http_token "
                         "(CBIR_HTTP_TOKEN) or http_username and http_password, or listen on 127.0.0.1")  # fmt: skip


# -- the app ------------------------------------------------------------------------------------


def create_app(settings: Settings, spool: Spool, *, max_stow_bytes: int = MAX_STOW_BYTES,
               max_query_bytes: int | None = None, similarity: SimilarityService | None = None,
               receiving: Callable[[], dict[str, int]] | None = None) -> FastAPI:  # fmt: skip
    """The ASGI app of the standalone server's HTTP API.

    ``spool`` receives STOW-RS instances; ``similarity`` defaults to one made on first use (Redis
    may come up after the server); ``receiving``: what ``/cbir/status`` says of the receiving
    processes (:meth:`~orthanc_cbir.ingest.receivers.ReceivingProcesses.status`), if there are any.
    Raises ``ValueError`` for ``settings.http_host`` off loopback without authentication, or a Basic
    user without a password."""
    authentication = _authentication_scheme(settings)
    _refuse_open_exposure(settings.http_host, authentication)
    use_patient_key_secret(settings.patient_key_secret)  # the spool's workers key patients with it too
    max_query_bytes = settings.max_query_bytes if max_query_bytes is None else max_query_bytes
    app = FastAPI(title="orthanc-cbir", version=__version__, description=_DESCRIPTION, redoc_url=None)
    app.state.authentication = authentication
    services = _Services(settings, similarity)

    app.add_middleware(_Authentication, settings=settings, scheme=authentication)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/cbir/status", tags=["cbir"], operation_id="status",
             summary="Version, model, Redis health and the queue counts", responses={200: _json_content("Status")})
    def status() -> HttpResponse:
        def answer() -> routes.Response:
            response = routes.status(settings)
            body = json.loads(response.body)
            body["spooled"] = spool.pending()  # received by this server, not yet indexed
            if receiving is not None:
                body["receiving_processes"] = receiving()
            return routes.Response.json(body, response.status)

        return _call(answer)

    @app.get("/cbir/rejected", tags=["cbir"], operation_id="rejected",
             summary="Instances that could not be indexed, with the reason",
             responses={200: _json_content("Rejected"), 503: _error_content("Redis is unavailable")})  # fmt: skip
    def rejected() -> HttpResponse:
        return _call(lambda: services.similarity().rejected())

    @app.get("/cbir/audit", tags=["cbir"], operation_id="audit",
             summary="The audit trail: who asked for similar images of which query, and the hits' studies",
             responses={200: _json_content("Audit"), 503: _error_content("Redis is unavailable")})  # fmt: skip
    def audit(request: Request, count: Annotated[int, Query(ge=1, le=1000)] = 100,
              before: Annotated[str | None, Query(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")] = None,
              ) -> HttpResponse:  # fmt: skip
        """Newest first; ``before`` (an entry's id) pages back. Whoever holds the token may read it."""
        parameters = parse_query(request.url.query)
        return _call(lambda: routes.audit_trail(services.audit(), parameters, _user(request, settings), ""))

    @app.post("/cbir/votes", tags=["cbir"], operation_id="vote", status_code=201,
              summary="A reader's thumbs up or down on one hit, recorded in the audit trail",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["query", "hit", "vote"], "additionalProperties": False,
                  "properties": {"query": {**_UID_SCHEMA, "description": "the query's SOPInstanceUID"},
                                 "hit": {**_UID_SCHEMA, "description": "the hit's SOPInstanceUID"},
                                 "vote": {"type": "string", "enum": list(VOTES)},
                                 "rank": {"type": "integer", "minimum": 1, "maximum": 1000},
                                 "strategy": {"type": "string", "enum": list(STRATEGIES)}}}}}}},
              responses={201: _json_content("Vote"), 400: _error_content("not a vote"),
                         413: _error_content(f"the body is larger than {routes.MAX_VOTE_BYTES} bytes"),
                         503: _error_content("Redis is unavailable")})  # fmt: skip
    async def vote(request: Request) -> HttpResponse:
        """``orthanc-cbir evaluate --votes`` reports the share of hits voted up."""
        body = await _read_body(request, routes.MAX_VOTE_BYTES, "a vote")
        if isinstance(body, HttpResponse):
            return body
        user = _user(request, settings)
        return await run_in_threadpool(_call, lambda: routes.vote(services.audit(), body, user))

    @app.get("/cbir/instances/{orthanc_id}/thumbnail", tags=["cbir"], operation_id="thumbnail",
             summary="A hit's thumbnail (PNG), drawn by the pixel step from its file in the Orthanc of "
                     "CBIR_ORTHANC_URL",
             responses={200: {"content": {"image/png": {}}, "description": "the thumbnail"},
                        404: _error_content("no such instance"), 413: _error_content("the file is too large"),
                        422: _error_content("the image cannot be drawn"),
                        502: _error_content("Orthanc did not answer")})  # fmt: skip
    def instance_thumbnail(orthanc_id: str) -> HttpResponse:
        """``orthanc_id`` is a hit's ``orthanc.instance``; a hit without one has no thumbnail."""
        orthanc = OrthancClient(settings.orthanc_url, settings.orthanc_username, settings.orthanc_password)
        try:
            answer = routes.thumbnail_answer(lambda: thumbnail(
                orthanc_id, lambda oid: _orthanc_file_size(orthanc, oid), orthanc.instance_file, settings))
        except OSError:
            return _error(502, "the Orthanc of the CBIR_ORTHANC_URL setting did not answer")
        return _http(answer)

    sub_codes = _sub_codes(settings)
    similar_parameters = _search_parameters(settings.max_results, sub_codes, qido=False)
    qido_parameters = _search_parameters(settings.max_results, sub_codes, qido=True)
    uid_parameter = Annotated[str, PathParameter(pattern=UID_PATTERN, max_length=64, description="a DICOM UID")]
    for resource, level in LEVELS.items():
        app.add_api_route(
            f"/cbir/{resource}/{{uid}}/similar", _similar_route(services, resource, similar_parameters, uid_parameter),
            methods=["GET"], tags=["similarity"], operation_id=f"similar_{resource}",
            summary=f"The {level}s most similar to a stored {level}",
            responses={200: _similar_content(), 404: _error_content(f"the {level} is not in the index"),
                       503: _error_content("Redis is unavailable")},
        )  # fmt: skip
        for answer_level in LEVELS:
            app.add_api_route(
                f"/cbir/{resource}/{{uid}}/similar/{answer_level}",
                _qido_route(services, resource, answer_level, qido_parameters, uid_parameter),
                methods=["GET"], tags=["similarity"], operation_id=f"similar_{resource}_{answer_level}",
                summary=f"QIDO-RS: the {answer_level} most similar to a stored {level}",
                responses={200: {"description": "the hits as QIDO-RS answers them",
                                 "content": {DICOM_JSON: {"schema": {"type": "array", "items": _ref("DicomDataset")}}}},
                           404: _error_content(f"the {level} is not in the index"),
                           503: _error_content("Redis is unavailable")},
            )  # fmt: skip

    @app.get(
        "/cbir/instances/{uid}/similar-regions", tags=["similarity"], operation_id="similar_regions",
        summary="The regions of other images most like a rectangle of a stored CT or MR slice",
        responses={200: {"description": "the hits, each with its matching region (region.box)"},
                   400: _error_content("a malformed box or parameter"),
                   404: _error_content("the instance is not indexed or has no region entries"),
                   503: _error_content("Redis is unavailable")},
    )  # fmt: skip
    def similar_regions(request: Request, uid: uid_parameter, box: Annotated[str, Query(
            pattern=BOX_PATTERN, max_length=40,
            description="x0,y0,x1,y1: two opposite corners in the image's pixels")]) -> HttpResponse:  # fmt: skip
        """``k``, ``offset`` and the filters (``exclude=same-series``...) as for ``/similar``."""
        parameters = dict(request.query_params)
        user = _user(request, settings)
        return _call(lambda: services.similarity().similar_regions(uid, parameters, user=user))

    @app.post(
        "/cbir/query", tags=["similarity"], operation_id="query", summary="Search with a file that need not be stored",
        openapi_extra={"requestBody": {"required": True, "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in ("application/dicom", "image/png", "image/jpeg", "application/octet-stream")}}},
        responses={200: _similar_content(), 413: _error_content(f"the body is larger than {_size(max_query_bytes)}"),
                   503: _error_content("no worker embedded the file in time, or Redis is unavailable")},
    )  # fmt: skip
    async def query(request: Request, parameters: Annotated[dict[str, str], similar_parameters]) -> HttpResponse:
        """The body is a DICOM file, PNG or JPEG; a worker embeds it. Parameters as for
        ``/similar``, in the query string or as ``X-Cbir-*`` headers (``X-Cbir-Body-Part: CHEST``)."""
        body = await _read_body(request, max_query_bytes, "the query file")
        if isinstance(body, HttpResponse):
            return body
        merged = request_parameters(parameters, request.headers)
        user = _user(request, settings)
        return await run_in_threadpool(_call, lambda: services.similarity().query_file(body, merged, user=user))

    stow_openapi = {"requestBody": {"required": True, "content": {
        'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}}
    stored = {"schema": _ref("StoreAnswer")}
    stow_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "every instance was received", "content": {DICOM_JSON: stored}},
        202: {"description": "some instances failed (FailedSOPSequence)", "content": {DICOM_JSON: stored}},
        409: {"description": "no instance was received", "content": {DICOM_JSON: stored}},
        400: _error_content("not a multipart body"),
        413: _error_content(f"the body is larger than {_size(max_stow_bytes)}"),
        415: _error_content('not multipart/related; type="application/dicom"'),
        503: _error_content("the spool directory cannot take the request (a full disk)"),
    }

    @app.post("/dicom-web/studies", tags=["dicomweb"], operation_id="stow",
              summary="STOW-RS: store instances (PS3.18 10.5)",
              response_class=_DicomJsonResponse, openapi_extra=stow_openapi, responses=stow_responses)  # fmt: skip
    async def store(request: Request) -> HttpResponse:
        """Each part an ``application/dicom`` file (PS3.10); each is spooled, then indexed by a worker."""
        return await _stow(request, spool, None, max_stow_bytes)

    study_parameter = Annotated[str, PathParameter(pattern=UID_PATTERN, max_length=64,
                                                   description="the StudyInstanceUID every instance must have")]

    @app.post("/dicom-web/studies/{study}", tags=["dicomweb"], operation_id="stow_study",
              summary="STOW-RS: store instances of one study",
              response_class=_DicomJsonResponse, openapi_extra=stow_openapi, responses=stow_responses)  # fmt: skip
    async def store_in_study(request: Request, study: study_parameter) -> HttpResponse:
        """An instance of another study fails (FailureReason 0xA900); the others are stored."""
        return await _stow(request, spool, study, max_stow_bytes)

    app.openapi = lambda: _openapi(app, authentication)  # type: ignore[method-assign]
    return app


_DESCRIPTION = """Content-based image retrieval beside a DICOM archive, without Orthanc: the
`/cbir/...` routes of the Orthanc plugin (identifiers are DICOM UIDs) and STOW-RS. Every error is
JSON `{"error": message, "status": code}`."""


class _Services:
    """The similarity service, made on first use (Redis and the model card are read then)."""

    def __init__(self, settings: Settings, similarity: SimilarityService | None):
        self.settings, self._similarity, self._lock = settings, similarity, threading.RLock()
        self._audit: AuditLog | None = None

    def similarity(self) -> SimilarityService:
        with self._lock:
            if self._similarity is None:  # UIDs only: no resolve_uid
                self._similarity = SimilarityService(self.settings, audit=self.audit())
            elif self._similarity.audit is None:  # one given to create_app records too
                self._similarity.audit = self.audit()
            return self._similarity

    def audit(self) -> AuditLog:
        if self._audit is None:
            self._audit = AuditLog(client_for(self.settings, socket_timeout=5, socket_connect_timeout=2),
                                   self.settings.audit_retention_days)  # fmt: skip
        return self._audit


def _user(request: Request, settings: Settings) -> str:
    """Who sent the request, for the audit trail (the middleware checked the credentials): the
    token's name (``http_token_name``), the Basic user, or ``anonymous`` (no authentication)."""
    scheme = request.app.state.authentication
    if scheme == "bearer":
        return settings.http_token_name
    if scheme == "basic":
        return basic_user(request.headers.get("authorization")) or ANONYMOUS
    return ANONYMOUS


def _similar_route(services: _Services, resource: str, depends: Any, uid_type: Any) -> Callable[..., HttpResponse]:
    def similar(request: Request, uid: uid_type, parameters: Annotated[dict[str, str], depends]) -> HttpResponse:
        user = _user(request, services.settings)
        return _call(lambda: services.similarity().similar(resource, uid, parameters, user=user))

    similar.__name__ = f"similar_{resource}"
    return similar


def _qido_route(services: _Services, resource: str, answer_level: str, depends: Any,
               uid_type: Any) -> Callable[..., HttpResponse]:  # fmt: skip
    def qido(request: Request, uid: uid_type, parameters: Annotated[dict[str, str], depends]) -> HttpResponse:
        asked = {**parameters, "format": "dicom+json", "level": LEVELS[answer_level]}
        user = _user(request, services.settings)
        return _call(lambda: services.similarity().similar(resource, uid, asked, user=user))

    qido.__name__ = f"similar_{resource}_{answer_level}"
    return qido


def _sub_codes(settings: Settings) -> tuple[str, ...]:
    """The model's sub-code names (what ``weights`` may name); none when its card cannot be read
    (``GET /cbir/status`` then says why)."""
    try:
        return tuple(sub.name for sub in IndexInfo.for_model(settings.model).layout.sub_codes)
    except Exception:  # noqa: BLE001 - an unreadable model card must not stop the server; /cbir/status says why
        return ()


def _grammar(pattern: str) -> Any:
    return Annotated[str, Query(min_length=1, max_length=MAX_PARAMETER_CHARS, pattern=pattern)]


_LIST = r"^{item}( *, *{item})*$"
_DAY = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_YEARS = r"[0-9]{1,3}(\.[0-9]{1,2})?"
_FILTER_GRAMMAR = {
    "modality": _LIST.format(item="[A-Za-z0-9_]+"),
    "body_part": _LIST.format(item="[A-Za-z0-9_ ]*[A-Za-z0-9_]"),
    "sex": _LIST.format(item="[MFOmfo]"),
    "age": rf"^({_YEARS})?(-({_YEARS})?)?$",
    "date": rf"^({_DAY})?(\.\.({_DAY})?)?$",
    "exclude": _LIST.format(item="same-(patient|study|series)"),
}
"""The filters' grammar (:meth:`..search.Filters.parse`), as patterns the OpenAPI document shows
and FastAPI checks: CS values, ``age=40-70``, ``date=2020-01-01..2021-12-31``."""


def _search_parameters(max_results: int, sub_codes: tuple[str, ...], *, qido: bool) -> Any:
    """A dependency that declares the search parameters (typed, with bounds and grammar, in the
    OpenAPI document; FastAPI checks them) and hands the handler the query string as it came, a
    dict of strings: the handler reads them as in Orthanc (an unknown parameter is a 400)."""
    def optional(name: str, annotation: Any, description: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[annotation, Query(description=description)])  # fmt: skip

    weight = f"({'|'.join(sub_codes) or '[a-z_]+'})=[0-9]{{1,6}}(\\.[0-9]{{1,6}})?"

    count = Annotated[int, Query(ge=1, le=max_results)]
    declared = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        optional("k", count, f"how many hits (default 10, at most {max_results})"),
        optional("limit", count, "QIDO-RS name of k"),
        optional("offset", Annotated[int, Query(ge=0, le=999)], "hits to skip (offset + k at most 1000)"),
        optional("strategy", Literal[STRATEGIES], "the retrieval strategy (default: the DefaultStrategy setting)"),
    ]
    if not qido:  # a QIDO route's path names its level and answers DICOM JSON
        declared += [
            optional("level", Literal[SEARCH_LEVELS], "the level of the hits (default: the resource's)"),
            optional("format", Literal["json", "dicom+json", "dicom json"],
                     "json (default) or QIDO-RS dicom+json (`dicom json` is how a bare + in `dicom+json` reads)"),
        ]
    declared += [
        optional("weights", _grammar(_LIST.format(item=weight)),
                 f"multilateral weights of the sub-codes ({', '.join(sub_codes)}), as modality=1,region=0.5"),
        optional("includefield", list[str], "dicom+json: optional attributes, comma-separated or repeated, or all"),
        optional("fuzzymatching", bool, "QIDO-RS; accepted and ignored"),
        *(optional(name, _grammar(_FILTER_GRAMMAR[name]), f"filter, as `orthanc-cbir query --filter {name}=...`")
          for name in FILTER_PARAMETERS),
    ]

    def parameters(request: Request, **_: Any) -> dict[str, str]:
        return parse_query(request.url.query)  # the same rules as the Orthanc plugin's

    signature = inspect.Signature(declared, return_annotation=dict[str, str])
    parameters.__signature__ = signature  # type: ignore[attr-defined]
    return Depends(parameters)


def _orthanc_file_size(orthanc: OrthancClient, orthanc_id: str) -> int | None:
    """The size of an instance's file as Orthanc reports it (``None``: Orthanc has no such instance)."""
    status, body, _ = orthanc.request("GET", f"/instances/{orthanc_id}")
    if status == 404:
        return None
    if status != 200:
        raise OSError(f"Orthanc answered HTTP {status}")
    return int(json.loads(body)["FileSize"])


def _call(handler: Callable[[], routes.Response]) -> HttpResponse:
    """Run a transport-free handler; a failure is a JSON 503 (Redis) or 500, its trace in the log."""
    try:
        answer = handler()
    except redis.RedisError as exc:
        log.warning("cbir http: Redis: %s: %s", type(exc).__name__, exc)
        answer = routes.Response.error(503, f"Redis is unavailable ({type(exc).__name__}: {exc})")
    except Exception as exc:  # the client gets a message, the log gets the trace
        log.exception("cbir http: handler failed")
        answer = routes.Response.error(500, f"internal error ({type(exc).__name__}); see the server log")
    return _http(answer)


def _http(answer: routes.Response) -> HttpResponse:
    return HttpResponse(answer.body, answer.status, headers=answer.headers, media_type=answer.content_type)


class _DicomJsonResponse(HttpResponse):
    media_type = DICOM_JSON


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> HttpResponse:
    answer = routes.Response.error(status, message)
    return HttpResponse(answer.body, status, headers=headers, media_type=answer.content_type)


def _size(count: int) -> str:
    return f"{count // 2**20} MiB" if count >= 2**20 else f"{count} bytes"


# -- errors -------------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> HttpResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> HttpResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = [str(part) for part in error.get("loc", ()) if part not in ("query", "path", "header", "body")]
        problems.append(f"{'.'.join(where) or 'request'}: {error.get('msg', 'invalid')}")
    return _error(400, "; ".join(problems))


async def _internal_error(request: Request, exc: Exception) -> HttpResponse:
    """What escaped :func:`_call` (a bug here): Starlette raises it again after this answer, and
    uvicorn logs it with its trace; the client sees none."""
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


# -- authentication -----------------------------------------------------------------------------


def _authentication_scheme(settings: Settings) -> str | None:
    """``bearer``, ``basic`` or ``None``."""
    if settings.http_token:
        return "bearer"
    if settings.http_username:
        if not settings.http_password:
            raise ValueError("http_username is set without http_password (CBIR_HTTP_PASSWORD)")
        return "basic"
    return None


class _Authentication:
    """ASGI middleware: every HTTP request (the OpenAPI document and unknown routes included)
    carries the token or the Basic credentials, compared in constant time; else 401."""

    def __init__(self, app: Any, settings: Settings, scheme: str | None):
        self.app, self.scheme = app, scheme
        self.token = settings.http_token.encode()
        self.username, self.password = settings.http_username.encode(), settings.http_password.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.scheme is None:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "")
        if self._allows(given):
            await self.app(scope, receive, send)
            return
        if self.scheme == "bearer":
            challenge = f'Bearer realm="{_REALM}"' + (', error="invalid_token"' if given else "")
            message = "send Authorization: Bearer <token>" + (" (the token is wrong)" if given else "")
        else:
            challenge = f'Basic realm="{_REALM}", charset="UTF-8"'
            message = "send HTTP Basic credentials" + (" (user or password is wrong)" if given else "")
        await _error(401, f"authentication required: {message}", {"WWW-Authenticate": challenge})(scope, receive, send)

    def _allows(self, header: str) -> bool:
        scheme, _, credentials = header.strip().partition(" ")
        credentials = credentials.strip()
        if self.scheme == "bearer":
            return scheme.lower() == "bearer" and secrets.compare_digest(credentials.encode(), self.token)
        if scheme.lower() != "basic":
            return False
        try:
            user, colon, password = base64.b64decode(credentials, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        same_user = secrets.compare_digest(user, self.username)
        same_password = secrets.compare_digest(password, self.password)
        return bool(colon) and same_user and same_password


# -- request bodies -----------------------------------------------------------------------------


async def _read_body(request: Request, limit: int, what: str) -> bytes | HttpResponse:
    """The whole body, or a 413 once it passes ``limit`` bytes."""
    stream = request.stream()
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        return await _refuse(stream, limit, what, declared)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            return await _refuse(stream, limit, what, None if declared is None else declared - size)
        chunks.append(chunk)
    return b"".join(chunks)


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


async def _refuse(stream: AsyncIterator[bytes], limit: int, what: str, remaining: int | None) -> HttpResponse:
    """413. What is left of the body is read and dropped when it is at most :data:`DRAIN_BYTES`
    (a server that closes on an unread body makes many clients see a reset instead of the answer);
    past that the connection is closed."""
    message = f"{what} is larger than {_size(limit)}"
    if remaining is not None and remaining > DRAIN_BYTES:
        return _error(413, message, {"Connection": "close"})
    drained = 0
    try:
        async for chunk in stream:
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                return _error(413, message, {"Connection": "close"})
    except ClientDisconnect:
        pass
    return _error(413, message)


# -- STOW-RS ------------------------------------------------------------------------------------


async def _stow(request: Request, spool: Spool, study: str | None, limit: int) -> HttpResponse:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    part_type = options.get(b"type", b"application/dicom").decode("latin-1").strip('"').lower()
    if kind != b"multipart/related" or part_type != "application/dicom":
        return _error(415, 'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; boundary=...')
    boundary = options.get(b"boundary")
    if not boundary:
        return _error(400, "the multipart/related Content-Type has no boundary")
    what = "a STOW-RS request"
    stream = request.stream()
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        return await _refuse(stream, limit, what, declared)
    parts = PartFiles(spool.directory)
    try:
        try:
            parser = MultipartParser(boundary, parts.callbacks())
            size = 0
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    parts.discard()
                    return await _refuse(stream, limit, what, None if declared is None else declared - size)
                parser.write(chunk)
        except (MultipartParseError, FormParserError) as exc:
            return _error(400, f"not a multipart body with boundary {boundary.decode('latin-1')!r}: {exc}")
        except ClientDisconnect:
            return _error(400, "the client closed the connection before the end of the body")
        except OSError as exc:  # writing a part file: the spool's disk is full, or gone
            log.error("STOW-RS cannot write to %s: %s: %s", spool.directory, type(exc).__name__, exc)
            return _error(503, f"the spool directory cannot take the request ({type(exc).__name__})")
        if not parts.ended:
            return _error(400, "the multipart body ends before its closing boundary")
        if not parts.files:
            return _error(400, "the multipart body holds no part")
        referenced, failed = await run_in_threadpool(spool_parts, spool, parts.files, study)
    finally:
        parts.discard()
    answer = Dataset()
    if referenced:
        answer.ReferencedSOPSequence = referenced
    if failed:
        answer.FailedSOPSequence = failed
    status = 200 if not failed else 202 if referenced else 409
    return _DicomJsonResponse(json.dumps(answer.to_json_dict()), status)


# -- the OpenAPI document -----------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: str, description: str = "the answer") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _error_content(description: str) -> dict[str, Any]:
    return _json_content("Error", description)


def _similar_content() -> dict[str, Any]:
    return {"description": "the hits: JSON, or with format=dicom+json QIDO-RS objects",
            "content": {"application/json": {"schema": _ref("SimilarAnswer")},
                        DICOM_JSON: {"schema": {"type": "array", "items": _ref("DicomDataset")}}}}  # fmt: skip


_NULLABLE_STRING = {"type": ["string", "null"]}
_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "status"],
              "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
    "Status": {"type": "object", "required": ["version", "redis", "model", "spooled"], "properties": {
        "version": {"type": "string"},
        "redis": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
        "model": _NULLABLE_STRING, "model_error": {"type": "string"},
        "indexed": {"type": "integer"}, "queued": {"type": "integer"}, "pending": {"type": "integer"},
        "rejected": {"type": "integer"}, "spooled": {"type": "integer", "description": "received, not yet indexed"},
        "receiving_processes": {
            "type": "object", "description": "with CBIR_SCP_PROCESSES > 1: the processes receiving on the DICOM port",
            "required": ["processes", "running", "restarts"],
            "properties": {"processes": {"type": "integer", "description": "the server's own included"},
                           "running": {"type": "integer",
                                       "description": "how many of the others ran at the last look (every second)"},
                           "restarts": {"type": "integer", "description": "started again after one ended"}}}}},
    "Rejected": {"type": "object", "required": ["rejected"], "properties": {"rejected": {"type": "array", "items": {
        "type": "object", "required": ["orthanc_id", "reason"],
        "properties": {"orthanc_id": {"type": "string",
                                      "description": "the source's id: the Orthanc id, the spool file, the "
                                                     "SOPInstanceUID in a DICOMweb archive"},
                       "source": {"type": "string", "enum": ["orthanc", "spool", "dicomweb"]},
                       "source_id": {"type": "string"},
                       "reason": {"type": "string"}, "detail": {"type": "string"},
                       "sop_instance_uid": _NULLABLE_STRING, "at": {"type": "number"}}}}}},
    "Hit": {"type": "object", "required": ["rank", "distance", "strategy", "instances"], "properties": {
        "rank": {"type": "integer"}, "distance": {"type": "number"}, "strategy": {"type": "string"},
        "instances": {"type": "integer"}, "orthanc": {"type": "object"}, "thumbnail": _NULLABLE_STRING,
        **{name: _NULLABLE_STRING for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
                                               "BodyPartExamined", "StudyDate", "StudyDescription",
                                               "SeriesDescription", "PatientSex")},
        "PatientAgeYears": {"type": ["number", "null"]}}},
    "SimilarAnswer": {"type": "object", "required": ["strategy", "level", "hits"], "properties": {
        "query": {**_NULLABLE_STRING, "description": "the query's DICOM UID (none for a file sent to /cbir/query)"},
        "strategy": {"type": "string"}, "level": {"type": "string"}, "model": {"type": "string"},
        "index_size": {"type": "integer"}, "candidate_fraction": {"type": "number"}, "elapsed_ms": {"type": "number"},
        "hits": {"type": "array", "items": _ref("Hit")}}},
    "Audit": {"type": "object", "required": ["entries", "next"], "properties": {
        "next": {**_NULLABLE_STRING, "description": "pass as before for older entries"},
        "entries": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "at": {"type": "number", "description": "Unix time"},
            "user": {"type": "string"}, "route": {"type": "string"}, "level": {"type": "string"},
            "query": {**_NULLABLE_STRING, "description": "the query's DICOM UID"}, "hits": {"type": "integer"},
            "studies": {"type": "array", "items": {"type": "string"},
                        "description": "the hits' StudyInstanceUIDs"},
            "hit": {"type": "string", "description": "a vote's hit (route vote)"},
            "vote": {"type": "string", "enum": ["up", "down"]}, "rank": {"type": ["integer", "null"]},
            "strategy": _NULLABLE_STRING}}}}},
    "Vote": {"type": "object", "required": ["recorded"], "properties": {"recorded": {"type": "object", "properties": {
        "query": {"type": "string"}, "hit": {"type": "string"}, "vote": {"type": "string"},
        "rank": {"type": ["integer", "null"]}, "strategy": _NULLABLE_STRING, "user": {"type": "string"}}}}},
    "DicomDataset": {"type": "object", "description": "DICOM JSON (PS3.18 F.2)", "additionalProperties": {
        "type": "object", "required": ["vr"], "properties": {"vr": {"type": "string"}, "Value": {"type": "array"}}}},
    "StoreAnswer": {"allOf": [_ref("DicomDataset")], "description": "ReferencedSOPSequence (00081199) and "
                    "FailedSOPSequence (00081198) items, each with FailureReason (00081197): 0xC000 not DICOM, "
                    "0xA900 another study, 0xA700 out of resources, 0x0110 processing failure"},
}  # fmt: skip


def _openapi(app: FastAPI, authentication: str | None) -> dict[str, Any]:
    """FastAPI's document, with the 400 this app answers instead of 422, the 401 and the security scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_SCHEMAS)
    if authentication:
        components["securitySchemes"] = {authentication: {"type": "http", "scheme": authentication}}
        document["security"] = [{authentication: []}]
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for response in responses.values():  # FastAPI adds "type": "string" beside a $ref of a non-JSON class
                for content in response.get("content", {}).values():
                    if "$ref" in content.get("schema", {}):
                        content["schema"] = {"$ref": content["schema"]["$ref"]}
            if "422" in responses or any(p.get("in") in ("query", "path") for p in operation.get("parameters", [])):
                responses.pop("422", None)
                responses.setdefault("400", _error_content("a parameter is missing, malformed or out of bounds"))
            if authentication:
                responses["401"] = {**_error_content("missing or wrong credentials"),
                                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}  # fmt: skip
    app.openapi_schema = document
    return document
