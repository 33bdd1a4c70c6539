"""The OHIF viewer and Orthanc on one origin, for the demo, the browser tests and small sites.

``orthanc-cbir viewer`` serves the unmodified prebuilt OHIF v3 viewer (the ``dist/``
folder of the npm package ``@ohif/app``, fetched once by :func:`ensure_ohif`) with a
generated ``app-config.js`` whose one DICOMweb data source is ``/dicom-web`` on the
same origin, and forwards to Orthanc only what OHIF and the results page need
(:func:`passed_to_orthanc`).

Why one origin: Orthanc 1.10 sends no CORS headers, so a viewer on another port could
not read its answers. Because the origin speaks to the archive, it refuses a foreign
``Host`` (DNS rebinding) and unsafe methods from another origin (cross-site requests),
and lets in only callers whose own credentials Orthanc accepts; it adds Orthanc's
credentials for anonymous callers only in the loopback demo mode (``--demo``). It
speaks plain HTTP: anywhere but loopback put a real reverse proxy with TLS in front.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import mimetypes
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

from .errors import OhifError

log = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
"""``npm view @ohif/app@3.13.2 dist.integrity``: the tarball is refused unless its SHA-512 is this."""

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "build" / "ohif"
"""Where :func:`ensure_ohif` keeps the viewer: ``build/ohif`` of the checkout (git-ignored)."""

EXTENSION_SOURCE = Path(__file__).resolve().parents[2] / "ohif_extension"
"""The sources of this project's OHIF extension and mode (``ohif_extension/`` of the checkout)."""
EXTENSION_URL = "/orthanc-cbir-ohif"
"""Where the viewer serves the built extension (``extension.js``) and mode (``mode.js``)."""
EXTENSION_FILES = ("extension.js", "mode.js")

ORTHANC_PREFIXES = frozenset(
    {
        "dicom-web", "wado", "cbir", "app", "ui", "patients", "studies", "series", "instances", "system",
        "statistics", "changes", "exports", "tools", "plugins", "modalities", "peers", "jobs", "queries", "lua",
        "storage-commitment", "transfers", "auth",
    }
)  # fmt: skip
"""First path segments that are Orthanc's (not a file of OHIF): refused 403 unless :func:`passed_to_orthanc`."""

READ_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
REALM = 'Basic realm="Orthanc Secure Area"'
"""Orthanc's own realm: a browser then keeps one set of credentials for the viewer's answers and Orthanc's."""
_VERIFIED_TTL_S = 60.0  # a password changed or removed in Orthanc stops opening OHIF's files within a minute


def passed_to_orthanc(method: str, segments: list[str]) -> bool:
    """Whether the viewer forwards this request to Orthanc: what OHIF and the results page need, no more.

    ``segments`` are the decoded path's, without the leading empty one. Passed: DICOMweb reads
    (QIDO-RS, WADO-RS and its bulk data, under ``/dicom-web/{studies,series,instances}``),
    WADO-URI reads (``/wado``), ``GET /instances/{id}/preview`` (the results page's thumbnails)
    and this project's ``/cbir`` routes. Never STOW-RS, ``/tools``, ``/instances`` uploads,
    DELETE, Lua, Orthanc Explorer or the rest of Orthanc's REST API: a page that reaches the
    viewer must not be able to write to, or administer, the archive.
    """
    if segments[0] == "cbir":
        return True  # Orthanc checks each /cbir route's method and the caller's credentials itself
    if method not in READ_METHODS:
        return False
    if segments[0] == "dicom-web":
        return len(segments) > 1 and segments[1] in ("studies", "series", "instances")
    if segments[0] == "wado":
        return len(segments) == 1
    return len(segments) == 3 and segments[0] == "instances" and segments[2] == "preview"


def orthanc_request_target(target: str) -> str:
    """The request target sent to Orthanc for ``target`` (path and query string as received).

    OHIF's study list asks ``/dicom-web/studies?...&includefield=00081030%2C00080060%2C...``:
    dicomweb-client percent-encodes the commas, and Orthanc's DICOMweb plugin (1.7, Debian 12)
    splits ``includefield`` on literal commas only, so it returned none of the asked attributes
    and every study read "No Description" (StudyDescription is not among the plugin's default
    study attributes). Commas are restored in the ``includefield`` values of DICOMweb requests;
    nothing else is changed (a comma elsewhere, in a name, stays encoded).

    >>> orthanc_request_target("/dicom-web/studies?limit=101&includefield=00081030%2C00080060")
    '/dicom-web/studies?limit=101&includefield=00081030,00080060'
    """
    path, question, query = target.partition("?")
    if not question or not path.startswith("/dicom-web/"):
        return target
    items = []
    for item in query.split("&"):
        name, equals, value = item.partition("=")
        if equals and urllib.parse.unquote_plus(name).lower() == "includefield":
            value = re.sub("%2[cC]", ",", value)
        items.append(name + equals + value)
    return path + question + "&".join(items)


def default_allowed_hosts(host: str, port: int) -> list[str]:
    """The ``Host`` values a browser sends for the viewer at ``host:port``: the loopback names and
    addresses, and ``host`` itself when it is a specific address."""
    names = [*LOOPBACK_HOSTS, *([host] if host not in ("", "0.0.0.0", "::", *LOOPBACK_HOSTS) else [])]
    return [f"[{name}]:{port}" if ":" in name else f"{name}:{port}" for name in names]


def _split_host(value: str) -> tuple[str, str] | None:
    """``(name, port)`` of a ``Host`` value (port ``""`` when absent), lower-case; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()) or any(c in name for c in "/@ \t"):
        return None
    return name, port


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "proxy-connection"}
)  # fmt: skip
_OWN_HEADERS = frozenset({"server", "date"})  # send_response writes its own
_CHUNK = 256 * 1024
# A request for a missing file with one of these suffixes is a 404, not the app's index.html.
_FILE_SUFFIXES = frozenset({".js", ".mjs", ".css", ".map", ".wasm", ".json", ".png", ".svg", ".ico", ".woff",
                            ".woff2", ".ttf", ".html", ".txt", ".xml", ".jpg", ".gif"})  # fmt: skip
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
          ".map": "application/json", ".css": "text/css", ".svg": "image/svg+xml", ".woff2": "font/woff2"}  # fmt: skip
# The headers OHIF's own dev server sends: cross-origin isolation lets it use SharedArrayBuffer.
_ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def ohif_dist(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The ``dist`` folder :func:`ensure_ohif` makes under ``cache_dir`` (it may not exist yet)."""
    return Path(cache_dir) / f"ohif-app-{OHIF_VERSION}" / "dist"


def ohif_present(cache_dir: Path = DEFAULT_CACHE_DIR) -> bool:
    """Whether :func:`ensure_ohif` has completed under ``cache_dir`` (so it would do nothing)."""
    dist = ohif_dist(cache_dir)
    return (dist.parent / ".complete").is_file() and (dist / "index.html").is_file()


def ensure_ohif(cache_dir: Path = DEFAULT_CACHE_DIR, *, npm: str = "npm") -> Path:
    """The ``dist`` folder of ``@ohif/app`` :data:`OHIF_VERSION`, fetched when missing.

    Runs ``npm pack`` (npm's registry and cache) into a scratch folder of ``cache_dir``,
    checks the tarball against :data:`OHIF_INTEGRITY`, extracts only ``package/dist/``
    and moves it into place in one rename; a second call returns at once.

    Raises:
        OhifError: npm is missing or failed, the tarball's hash is not the pinned one,
            or the tarball holds something other than plain files and folders.
    """
    cache_dir = Path(cache_dir)
    dist = ohif_dist(cache_dir)
    if ohif_present(cache_dir):
        return dist
    if shutil.which(npm) is None:
        raise OhifError(f"{npm!r} not found: install Node.js and npm to fetch {OHIF_PACKAGE}@{OHIF_VERSION}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache_dir) as scratch:
        scratch_dir = Path(scratch)
        done = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--json", "--pack-destination", str(scratch_dir)],
            check=False, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        tarballs = sorted(scratch_dir.glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise OhifError(f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed ({done.returncode}): {done.stderr[-2000:]}")
        integrity = sri_sha512(tarballs[0])
        if integrity != OHIF_INTEGRITY:
            raise OhifError(f"{tarballs[0].name}: sha512 is {integrity}, expected the pinned {OHIF_INTEGRITY}; refused")
        staging = scratch_dir / "staging"
        count = _extract_dist(tarballs[0], staging / "dist")
        (staging / ".complete").write_text(
            json.dumps({"package": OHIF_PACKAGE, "version": OHIF_VERSION, "integrity": integrity, "files": count})
            + "\n"
        )
        shutil.rmtree(dist.parent, ignore_errors=True)  # an earlier, interrupted attempt
        staging.rename(dist.parent)
    log.info(
        "fetched %s@%s: %d files in %s (%.1f s)", OHIF_PACKAGE, OHIF_VERSION, count, dist, time.monotonic() - started
    )
    return dist


def sri_sha512(path: Path) -> str:
    """The file's Subresource Integrity string, ``sha512-<base64>``, as npm's ``dist.integrity`` writes it."""
    digest = hashlib.sha512()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _extract_dist(tarball: Path, destination: Path) -> int:
    """Write the ``package/dist/`` members of ``tarball`` under ``destination``; returns the file count.

    Written by hand rather than with ``extractall(filter='data')``, which Debian 12's Python
    3.11.2 lacks: only plain files and folders, relative paths without ``..``, modes 644/755.
    """
    prefix = "package/dist/"
    count = 0
    destination.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            if not member.name.startswith(prefix) or member.name == prefix:
                continue
            relative = PurePosixPath(member.name[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise OhifError(f"unsafe path in {tarball.name}: {member.name!r}")
            target = destination.joinpath(*relative.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # a regular file always has a body
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                target.chmod(0o644)
                count += 1
            else:
                raise OhifError(f"{tarball.name}: {member.name!r} is not a plain file or folder; refused")
    if not (destination / "index.html").is_file():
        raise OhifError(f"{tarball.name} has no package/dist/index.html")
    return count


def extension_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Where :func:`ensure_extension` puts the built extension and mode (it may not exist yet)."""
    return Path(cache_dir) / "orthanc-cbir-ohif"


def _extension_sources_hash(source: Path) -> str:
    """SHA-256 over the files the build reads: a change to any of them means a rebuild."""
    digest = hashlib.sha256()
    files = [source / "package.json", source / "package-lock.json", source / "build.mjs",
             *sorted((source / "src").glob("*.js"))]  # fmt: skip
    for file in files:
        digest.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def extension_present(cache_dir: Path = DEFAULT_CACHE_DIR, source: Path = EXTENSION_SOURCE) -> bool:
    """Whether the built extension in ``cache_dir`` is there and was built from ``source`` as it is now."""
    built = extension_dir(cache_dir)
    stamp = built / ".source-sha256"
    return (
        all((built / name).is_file() for name in EXTENSION_FILES)
        and stamp.is_file()
        and (not source.is_dir() or stamp.read_text().strip() == _extension_sources_hash(source))
    )


def ensure_extension(cache_dir: Path = DEFAULT_CACHE_DIR, *, source: Path = EXTENSION_SOURCE, npm: str = "npm",
                     node: str = "node") -> Path:  # fmt: skip
    """The folder of the built OHIF extension and mode, built from ``source`` when missing or stale.

    ``npm ci --ignore-scripts`` installs the pinned build tools (``package-lock.json``: esbuild
    and React, each checked against its integrity hash by npm), then ``node build.mjs`` bundles
    the two ES modules into a scratch folder that replaces the old build in one rename.

    Raises:
        OhifError: the sources are missing, or npm or the build failed.
    """
    built = extension_dir(cache_dir)
    if extension_present(cache_dir, source):
        return built
    if not (source / "package-lock.json").is_file():
        raise OhifError(f"no OHIF extension sources in {source} (a checkout of orthanc-cbir has them)")
    for tool in (npm, node):
        if shutil.which(tool) is None:
            raise OhifError(f"{tool!r} not found: install Node.js and npm to build the OHIF extension")
    started = time.monotonic()
    steps = [[npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"]]
    built.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=built.parent) as scratch:
        staging = Path(scratch) / "out"
        steps.append([node, "build.mjs", str(staging)])
        for step in steps:
            done = subprocess.run(step, cwd=source, check=False, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise OhifError(f"{' '.join(step[:2])} in {source} failed ({done.returncode}): {done.stderr[-2000:]}")
        (staging / ".source-sha256").write_text(_extension_sources_hash(source) + "\n")
        shutil.rmtree(built, ignore_errors=True)
        staging.rename(built)
    log.info("built the OHIF extension into %s (%.1f s)", built, time.monotonic() - started)
    return built


def app_config_js(extension: bool = False) -> str:
    """The ``app-config.js`` served instead of the package's: one DICOMweb source, ``/dicom-web``
    on this origin, with the options OHIF's own Orthanc configurations use; with ``extension``,
    this project's extension and mode (``/orthanc-cbir-ohif/``), loaded by OHIF at run time."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc (orthanc-cbir)",
            "name": "orthanc",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "wadoUriRoot": "/dicom-web",
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "dicomUploadEnabled": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [f"{EXTENSION_URL}/extension.js"] if extension else [],
        "modes": [f"{EXTENSION_URL}/mode.js"] if extension else [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    header = f"/** Generated by orthanc-cbir viewer for OHIF {OHIF_VERSION}. */\n"
    return f"{header}window.config = {json.dumps(config, indent=2)};\n"


class ViewerHTTPServer(ThreadingHTTPServer):
    """Serves one OHIF ``dist`` folder and forwards what :func:`passed_to_orthanc` allows to one Orthanc.

    Every request must name an allowed ``Host`` (``allowed_hosts``; default
    :func:`default_allowed_hosts`), which defeats DNS rebinding, and a request of any method but
    GET and HEAD must come from the viewer's own origin (``Origin``, else ``Referer``), which
    defeats cross-site requests; another site's ``<img>`` or ``no-cors`` fetch of Orthanc's
    answers is refused too (``Sec-Fetch-Site``). Who may read:

    - by default every request must carry the caller's own ``Authorization``, which goes on to
      Orthanc unchanged: Orthanc's ``RegisteredUsers`` decide, and Orthanc knows the real user
      (the viewer's own files need credentials that Orthanc accepts too);
    - with ``demo=True`` (loopback only) anonymous callers are let in and the viewer adds
      Orthanc's credentials (``username``/``password``) itself.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], dist: Path, orthanc_url: str, username: str = "", password: str = "",
                 *, demo: bool = False, allowed_hosts: list[str] | None = None,
                 extension: Path | None = None):  # fmt: skip
        self.dist = Path(dist).resolve()
        self.extension = Path(extension).resolve() if extension else None
        target = urllib.parse.urlsplit(orthanc_url.rstrip("/"))
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"not an http(s) URL: {orthanc_url!r}")
        if demo and address[0] not in LOOPBACK_HOSTS:
            raise ValueError(f"the demo mode logs anyone in to Orthanc: loopback only, not {address[0]!r}")
        self.orthanc = target
        self.demo = demo
        self.authorization = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if demo and username else None
        )
        self.app_config = app_config_js(extension=self.extension is not None).encode()
        super().__init__(address, _Handler)
        listening_port = self.server_address[1]
        entries = allowed_hosts or default_allowed_hosts(address[0], listening_port)
        self.allowed_hosts = {parsed for entry in entries if (parsed := _split_host(entry))}
        self._verified: dict[str, float] = {}  # sha256 of an Authorization Orthanc accepted -> until when
        self._verified_lock = threading.Lock()

    @property
    def url(self) -> str:
        """``http://host:port`` where the viewer answers."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def host_allowed(self, value: str | None) -> bool:
        """Whether a ``Host`` header names this viewer: an entry without a port allows any port."""
        parsed = _split_host(value or "")
        return parsed is not None and (parsed in self.allowed_hosts or (parsed[0], "") in self.allowed_hosts)

    def orthanc_connection(self, timeout_s: float = 300) -> http.client.HTTPConnection:
        connection_class = http.client.HTTPSConnection if self.orthanc.scheme == "https" else http.client.HTTPConnection
        host = self.orthanc.hostname
        assert host is not None  # __init__ refuses a URL without one
        return connection_class(host, self.orthanc.port, timeout=timeout_s)

    def orthanc_accepts(self, authorization: str) -> bool:
        """Whether Orthanc answers ``GET /system`` to these credentials (remembered for a minute).

        Raises:
            OSError: Orthanc did not answer.
        """
        key = hashlib.sha256(authorization.encode()).hexdigest()
        with self._verified_lock:
            if self._verified.get(key, 0.0) > time.monotonic():
                return True
        connection = self.orthanc_connection(timeout_s=10)
        try:
            connection.request("GET", self.orthanc.path + "/system", headers={"Authorization": authorization})
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        if response.status != 200:
            return False
        with self._verified_lock:
            if len(self._verified) > 10_000:  # bounded: a flood of distinct credentials cannot grow it
                self._verified.clear()
            self._verified[key] = time.monotonic() + _VERIFIED_TTL_S
        return True

    def orthanc_answers_anonymously(self) -> bool | None:
        """Whether Orthanc answers ``GET /system`` without credentials (None: it did not answer)."""
        connection = self.orthanc_connection(timeout_s=10)
        try:
            connection.request("GET", self.orthanc.path + "/system")
            response = connection.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return None
        finally:
            connection.close()


class _Refused(Exception):
    """A request the viewer answers itself with an error, before anything is read or forwarded."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length or is chunked
    server: ViewerHTTPServer
    _answered = False

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._answered = True
        super().send_response(code, message)

    def _dispatch(self) -> None:
        self._answered = False
        try:
            segments, length = self._checked()
            if length and segments[0] not in ORTHANC_PREFIXES:
                self.close_connection = True  # a body nothing here reads must not be taken for the next request
            if segments[0] in ORTHANC_PREFIXES:
                if not passed_to_orthanc(self.command, segments):
                    raise _Refused(403, "the viewer does not pass this request to Orthanc")
                self._proxy(length)
            elif self.command not in READ_METHODS:
                raise _Refused(405, "method not allowed here", {"Allow": "GET, HEAD"})
            elif segments == ["app-config.js"]:
                self._send_bytes(200, self.server.app_config, "text/javascript", {"Cache-Control": "no-cache"})
            else:
                self._static(segments)
        except _Refused as refused:
            self.close_connection = True  # a body, unread, must not be taken for the next request
            self._send_bytes(refused.status, f"{refused.message}\n".encode(), "text/plain", refused.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away (a cancelled request): nothing to answer
        except Exception as error:  # noqa: BLE001 - a bug: a log line (no query string), a 500, the server goes on
            log.error("%s %s: %s", self.command, self._path_only(), type(error).__name__)
            self.close_connection = True
            if not self._answered:
                self._send_bytes(500, b"internal error\n", "text/plain")

    def _checked(self) -> tuple[list[str], int]:
        """The decoded path's segments and the body's length, once the request passed every check
        that does not depend on its route.

        Raises:
            _Refused: a malformed request (400, 411), a Host not allowed (421), an unsafe method
                from another origin (403), no or refused credentials (401).
        """
        if not self.path.startswith("/"):
            raise _Refused(400, "only origin-form request targets (a path) are served")
        lengths = self.headers.get_all("Content-Length") or []
        # ASCII digits only: str.isdigit also takes '²', which int() refuses
        if len(lengths) > 1 or (lengths and not re.fullmatch(r"[0-9]+", lengths[0].strip())):
            raise _Refused(400, "Content-Length must be one decimal number")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _Refused(411, "a request body needs a Content-Length")
        try:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path, errors="strict")
        except UnicodeDecodeError:
            raise _Refused(400, "malformed path") from None
        segments = path.split("/")[1:]
        # Orthanc's web server decodes the path and removes dot segments before routing, so
        # /cbir/%2e%2e/tools would reach /tools: such paths are refused, never normalized here.
        if any(ord(c) < 0x20 or c in "\x7f\\" for c in path) or {".", ".."} & set(segments):
            raise _Refused(400, "malformed path")
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not self.server.host_allowed(hosts[0]):
            raise _Refused(421, "this viewer does not answer to that host name (allowed: CBIR_VIEWER_ALLOWED_HOSTS)")
        if self.command not in READ_METHODS and not self._same_origin(hosts[0]):
            raise _Refused(403, "a request that changes something must come from the viewer's own pages")
        if segments[0] in ORTHANC_PREFIXES and self._embedded_elsewhere():
            raise _Refused(403, "the archive's answers are not for other sites' pages")
        self._authenticate(forwarded=segments[0] in ORTHANC_PREFIXES)
        return segments, int(lengths[0]) if lengths else 0

    def _same_origin(self, host: str) -> bool:
        """Whether ``Origin`` (else ``Referer``) is this viewer's origin, as the browser named it."""
        origin = self.headers.get("Origin")
        if origin is None:
            referer = urllib.parse.urlsplit(self.headers.get("Referer", ""))
            origin = f"{referer.scheme}://{referer.netloc}" if referer.scheme else ""
        return origin.strip().lower() in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}")

    def _embedded_elsewhere(self) -> bool:
        """Whether a browser says another site's page asked for this (an ``<img>``, a script, a
        ``no-cors`` fetch: it cannot read the answer, but the request still runs a query and is
        audited in the viewer user's name). A link followed to the results page is let through."""
        site = self.headers.get("Sec-Fetch-Site", "same-origin")  # browsers before 2020 send none
        navigation = self.command == "GET" and self.headers.get("Sec-Fetch-Mode") == "navigate"
        return site not in ("same-origin", "none") and not navigation

    def _authenticate(self, forwarded: bool) -> None:
        """Outside the demo, the caller's own credentials are needed: Orthanc checks those of a
        forwarded request itself, and the viewer asks it about those of its own files.

        Raises:
            _Refused: 401 without credentials or with credentials Orthanc refuses, 502 when
                Orthanc does not answer.
        """
        if self.server.demo:
            return
        authorization = self.headers.get("Authorization", "")
        if not authorization:
            raise _Refused(401, "log in with your Orthanc user", {"WWW-Authenticate": REALM})
        if forwarded:
            return
        try:
            accepted = self.server.orthanc_accepts(authorization)
        except OSError as error:
            log.warning("could not check credentials with Orthanc at %s: %s", self.server.orthanc.geturl(), error)
            raise _Refused(502, "Orthanc did not answer") from None
        if not accepted:
            raise _Refused(401, "Orthanc refused these credentials", {"WWW-Authenticate": REALM})

    def _path_only(self) -> str:
        """The request's path without its query string, which can hold patient names and IDs (QIDO)."""
        # getattr: a request line too malformed to parse leaves no path (and no command) behind
        return urllib.parse.urlsplit(getattr(self, "path", "") or "").path[:200]

    def _static(self, segments: list[str]) -> None:
        if f"/{segments[0]}" == EXTENSION_URL:
            name = "/".join(segments[1:])
            if self.server.extension is None or name not in EXTENSION_FILES:
                raise _Refused(404, "not found")
            self._send_file(self.server.extension / name)
            return
        dist = self.server.dist
        relative = PurePosixPath(*[s for s in segments if s])
        target = dist.joinpath(*relative.parts).resolve() if relative.parts else dist
        if target.is_file() and target.is_relative_to(dist):
            self._send_file(target)
        elif relative.suffix.lower() in _FILE_SUFFIXES:
            self._send_bytes(404, b"not found\n", "text/plain")
        else:  # a route of the single-page app (/viewer?StudyInstanceUIDs=...)
            self._send_file(dist / "index.html")

    def _send_file(self, file: Path) -> None:
        content_type = (
            _TYPES.get(file.suffix.lower()) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        )
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        if file.name == "index.html" or file.parent == self.server.extension:  # rebuilt in place: always revalidated
            self.send_header("Cache-Control", "no-cache")
        for name, value in _ISOLATION.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            with open(file, "rb") as source:
                shutil.copyfileobj(source, self.wfile, _CHUNK)

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_ISOLATION, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self, length: int) -> None:
        """Forward the request to Orthanc and stream the answer back, status and headers as they are."""
        target = self.server.orthanc
        # Expect: 100-continue was answered here already (BaseHTTPRequestHandler does it).
        replaced = {"host", "expect", "authorization"} if self.server.authorization else {"host", "expect"}
        headers = [(n, v) for n, v in self.headers.items() if n.lower() not in _HOP_BY_HOP | replaced]
        # Host stays the browser's (it is an allowed one): the DICOMweb plugin builds its BulkDataURIs from it.
        headers.append(("Host", self.headers["Host"]))
        if self.server.authorization:
            headers.append(("Authorization", self.server.authorization))
        connection = self.server.orthanc_connection()
        try:
            try:
                connection.putrequest(self.command, target.path + orthanc_request_target(self.path), skip_host=True,
                                      skip_accept_encoding=True)  # fmt: skip
                for name, value in headers:
                    connection.putheader(name, value)
                connection.endheaders()
                _copy(self.rfile, connection, length)
                response = connection.getresponse()
            except OSError as error:
                log.warning("proxy %s %s: Orthanc at %s: %s", self.command, self._path_only(), target.geturl(), error)
                self.close_connection = True
                self._send_bytes(502, f"Orthanc did not answer: {error}\n".encode(), "text/plain")
                return
            self.send_response(response.status, response.reason)
            kept = [(n, v) for n, v in response.getheaders() if n.lower() not in _HOP_BY_HOP | _OWN_HEADERS]
            for name, value in kept:
                self.send_header(name, value)
            no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
            chunked = not no_body and not any(n.lower() == "content-length" for n, _ in kept)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                return
            while block := response.read(_CHUNK):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            connection.close()

    # http.server's own log lines quote the request line, query string included: QIDO queries
    # carry patient names, IDs, accession numbers and birth dates, so only paths are logged.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s %s", self.address_string(), getattr(self, "command", None), self._path_only(), code)

    def log_error(self, format: str, *args: object) -> None:
        code = args[0] if args and isinstance(args[0], int) else "?"
        log.info("%s: a malformed request refused (%s)", self.address_string(), code)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format)


def _copy(source: io.BufferedIOBase, connection: http.client.HTTPConnection, length: int) -> None:
    """Send exactly ``length`` bytes of the request body to Orthanc without holding it all."""
    while length > 0:
        block = source.read(min(_CHUNK, length))
        if not block:
            raise ConnectionResetError("the request body ended early")
        connection.send(block)
        length -= len(block)


def serve(dist: Path, orthanc_url: str, *, host: str = "127.0.0.1", port: int = 3000, username: str = "",
          password: str = "", demo: bool = False, allowed_hosts: list[str] | None = None,
          extension: Path | None = None) -> None:  # fmt: skip
    """Serve the viewer until the process is interrupted or terminated.

    Raises:
        ValueError: ``demo`` off loopback, or (outside the demo) an Orthanc that answers without
            credentials, behind which the viewer would authenticate no one.
    """
    server = ViewerHTTPServer((host, port), dist, orthanc_url, username, password, demo=demo,
                              allowed_hosts=allowed_hosts, extension=extension)  # fmt: skip
    try:
        if not demo and server.orthanc_answers_anonymously():
            raise ValueError(f"Orthanc at {orthanc_url} answers without credentials: the viewer would let anyone "
                             "in (enable Orthanc's AuthenticationEnabled, or use --demo on loopback)")  # fmt: skip
        who = "anyone on this machine, as Orthanc's user" if demo else "Orthanc's users, with their own credentials"
        print(f"OHIF {OHIF_VERSION} on {server.url}/ (Orthanc {orthanc_url} behind it, for {who}); open "
              f"{server.url}/viewer?StudyInstanceUIDs=<uid>", flush=True)  # fmt: skip
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
