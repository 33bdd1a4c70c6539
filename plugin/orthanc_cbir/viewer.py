"""The OHIF viewer and Orthanc on one loopback origin, for the demo and the browser tests.

``orthanc-cbir viewer`` serves the unmodified prebuilt OHIF v3 viewer (the ``dist/``
folder of the npm package ``@ohif/app``, fetched once by :func:`ensure_ohif`) with a
generated ``app-config.js`` whose one DICOMweb data source is ``/dicom-web`` on the
same origin, and forwards Orthanc's paths (:data:`PROXIED_PREFIXES`) to Orthanc.

Why one origin: Orthanc 1.10 sends no CORS headers, so a viewer on another port could
not read its answers. The proxy adds Orthanc's Basic credentials itself, so the browser
needs none: anyone who reaches the viewer's port reads (and writes) the archive. It is
for loopback and demos; put a real reverse proxy with its own authentication in front
of Orthanc anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import mimetypes
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import BinaryIO

log = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
"""``npm view @ohif/app@3.13.2 dist.integrity``: the tarball is refused unless its SHA-512 is this."""

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "build" / "ohif"
"""Where :func:`ensure_ohif` keeps the viewer: ``build/ohif`` of the checkout (git-ignored)."""

PROXIED_PREFIXES = frozenset(
    {
        "dicom-web", "wado",  # DICOMweb (QIDO, WADO-RS, STOW) and WADO-URI: what OHIF reads
        "cbir",  # this project's routes
        "app", "ui",  # Orthanc Explorer, Orthanc Explorer 2 (when installed)
        # Orthanc's REST API, what Orthanc Explorer calls
        "patients", "studies", "series", "instances", "system", "statistics", "changes", "exports", "tools",
        "plugins", "modalities", "peers", "jobs", "queries",
    }
)  # fmt: skip
"""First path segments forwarded to Orthanc; any other path is a file of OHIF or its ``index.html``."""

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


class OhifError(RuntimeError):
    """The OHIF viewer could not be fetched, or is not the pinned one."""


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


def app_config_js() -> str:
    """The ``app-config.js`` served instead of the package's: one DICOMweb source, ``/dicom-web``
    on this origin, with the options OHIF's own Orthanc configurations use."""
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
        "extensions": [],
        "modes": [],
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
    return f"/** Generated by orthanc-cbir viewer for OHIF {OHIF_VERSION}. */\nwindow.config = {json.dumps(config, indent=2)};\n"


class ViewerHTTPServer(ThreadingHTTPServer):
    """Serves one OHIF ``dist`` folder and forwards :data:`PROXIED_PREFIXES` to one Orthanc."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], dist: Path, orthanc_url: str, username: str = "", password: str = ""):
        self.dist = Path(dist).resolve()
        target = urllib.parse.urlsplit(orthanc_url.rstrip("/"))
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"not an http(s) URL: {orthanc_url!r}")
        self.orthanc = target
        self.authorization = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username else None
        )
        self.app_config = app_config_js().encode()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """``http://host:port`` where the viewer answers."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length or is chunked
    server: ViewerHTTPServer

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

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        first = path.lstrip("/").split("/", 1)[0]
        try:
            if first in PROXIED_PREFIXES:
                self._proxy()
            elif self.command not in ("GET", "HEAD"):
                self.close_connection = True  # its body, unread, must not be taken for the next request
                self._send_bytes(405, b"method not allowed here\n", "text/plain", {"Allow": "GET, HEAD"})
            elif path == "/app-config.js":
                self._send_bytes(200, self.server.app_config, "text/javascript", {"Cache-Control": "no-cache"})
            else:
                self._static(urllib.parse.unquote(path))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away (a cancelled request): nothing to answer

    def _static(self, path: str) -> None:
        dist = self.server.dist
        relative = PurePosixPath(path.lstrip("/"))
        target = dist.joinpath(*relative.parts).resolve() if relative.parts and ".." not in relative.parts else dist
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
        if file.name == "index.html":
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

    def _proxy(self) -> None:
        """Forward the request to Orthanc and stream the answer back, status and headers as they are."""
        target = self.server.orthanc
        request = urllib.parse.urlsplit(self.path)  # an absolute URI too: only its path and query go on
        path = request.path + (f"?{request.query}" if request.query else "")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send_bytes(411, b"a request body needs a Content-Length\n", "text/plain")
            return
        length = int(self.headers.get("Content-Length") or 0)
        # Expect: 100-continue was answered here already (BaseHTTPRequestHandler does it).
        replaced = {"host", "expect", "authorization"} if self.server.authorization else {"host", "expect"}
        headers = [(n, v) for n, v in self.headers.items() if n.lower() not in _HOP_BY_HOP | replaced]
        # Host stays the browser's: the DICOMweb plugin builds its BulkDataURIs from it.
        headers.append(("Host", self.headers.get("Host") or target.netloc))
        if self.server.authorization:
            headers.append(("Authorization", self.server.authorization))
        connection_class = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(target.hostname, target.port, timeout=300)
        try:
            try:
                connection.putrequest(self.command, target.path + path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                connection.endheaders()
                _copy(self.rfile, connection, length)
                response = connection.getresponse()
            except OSError as error:
                log.warning("proxy %s %s: Orthanc at %s: %s", self.command, self.path, target.geturl(), error)
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

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _copy(source: BinaryIO, connection: http.client.HTTPConnection, length: int) -> None:
    """Send exactly ``length`` bytes of the request body to Orthanc without holding it all."""
    while length > 0:
        block = source.read(min(_CHUNK, length))
        if not block:
            raise ConnectionResetError("the request body ended early")
        connection.send(block)
        length -= len(block)


def serve(dist: Path, orthanc_url: str, *, host: str = "127.0.0.1", port: int = 3000, username: str = "",
          password: str = "") -> None:  # fmt: skip
    """Serve the viewer until the process is interrupted or terminated."""
    server = ViewerHTTPServer((host, port), dist, orthanc_url, username, password)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the viewer listens on %s: anyone who reaches it uses Orthanc with its credentials", host)
    print(f"OHIF {OHIF_VERSION} on {server.url}/ (Orthanc {orthanc_url} behind it); open "
          f"{server.url}/viewer?StudyInstanceUIDs=<uid>", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
