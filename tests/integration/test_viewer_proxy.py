"""``orthanc-cbir viewer`` as an HTTP server, without a browser: it serves the files of an
OHIF dist folder (a stand-in here), answers app routes with index.html, and forwards to
Orthanc only what OHIF and the results page read (and ``/cbir``), statuses and content types
kept. It refuses foreign ``Host`` names (DNS rebinding), writes from other origins, Orthanc's
other routes, callers without their own Orthanc credentials outside the demo mode, and
malformed requests (a clean 400); its log holds no query string.

Real Orthanc (with the plugin) and Redis, real ``orthanc-cbir viewer`` processes, raw sockets."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from orthanc_cbir.local_services import ViewerServer, free_port
from tests import dicom_factory as factory

pytestmark = pytest.mark.integration

INDEX = b"<!doctype html><title>stand-in OHIF</title>"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    (folder / "index.html").write_bytes(INDEX)
    (folder / "app.bundle.js").write_text("console.log('ohif');\n")
    (folder / "codec.wasm").write_bytes(b"\0asm\1\0\0\0")
    return folder


EXTENSION_JS = b"export default { id: 'orthanc-cbir' };\n"


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """A stand-in for the built OHIF extension (``make ohif`` builds the real one)."""
    folder = tmp_path_factory.mktemp("extension")
    (folder / "extension.js").write_bytes(EXTENSION_JS)
    (folder / "mode.js").write_text("export default { id: 'orthanc-cbir' };\n")
    (folder / ".source-sha256").write_text("0\n")
    return folder


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, orthanc, dist, extension):
    """The loopback demo mode: anonymous callers, Orthanc's credentials added by the viewer."""
    with ViewerServer(tmp_path_factory.mktemp("viewer"), orthanc=orthanc, dist=dist, demo=True,
                      extension=extension) as server:  # fmt: skip
        yield server


def test_serves_the_orthanc_cbir_extension_and_lists_it_in_the_config(viewer):
    config = requests.get(f"{viewer.url}/app-config.js", timeout=10).text
    assert '"/orthanc-cbir-ohif/extension.js"' in config and '"/orthanc-cbir-ohif/mode.js"' in config
    answer = requests.get(f"{viewer.url}/orthanc-cbir-ohif/extension.js", timeout=10)
    assert answer.status_code == 200 and answer.content == EXTENSION_JS
    assert answer.headers["Content-Type"] == "text/javascript" and answer.headers["Cache-Control"] == "no-cache"
    assert answer.headers["Cross-Origin-Embedder-Policy"] == "require-corp"  # same origin: loadable under COEP
    # nothing else of that folder (nor, through it, of the machine) is served
    for path in ("/orthanc-cbir-ohif/.source-sha256", "/orthanc-cbir-ohif/", "/orthanc-cbir-ohif/..%2Findex.html",
                 "/orthanc-cbir-ohif/other.js"):  # fmt: skip
        assert requests.get(f"{viewer.url}{path}", timeout=10).status_code in (400, 404), path


@pytest.fixture(scope="module")
def instance(orthanc):
    """One CT instance stored in Orthanc (directly, not through the viewer)."""
    ds = factory.grey_image(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32), SeriesDescription="PROXY TEST")
    status, body, _ = orthanc.request("POST", "/instances", factory.to_bytes(ds), content_type="application/dicom")
    assert status == 200, body
    return ds


def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is on a new connection; everything the viewer answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while block := connection.recv(65536):
            answer += block
    return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), f"no HTTP answer (connection dropped?): {answer[:200]!r}"
    return int(answer.split(b" ", 2)[1])


def instance_count(orthanc) -> int:
    return len(orthanc.get_json("/instances"))


def test_serves_the_dist_the_generated_config_and_app_routes(viewer):
    assert requests.get(viewer.url + "/").content == INDEX
    spa = requests.get(viewer.url + "/viewer?StudyInstanceUIDs=1.2.3")
    assert spa.status_code == 200 and spa.content == INDEX
    assert spa.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    wasm = requests.get(viewer.url + "/codec.wasm")
    assert wasm.headers["Content-Type"] == "application/wasm" and wasm.content == b"\0asm\1\0\0\0"
    assert requests.get(viewer.url + "/missing.bundle.js").status_code == 404
    for escape in ("/../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd"):  # never a file outside dist
        connection = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
        connection.request("GET", escape)
        answer = connection.getresponse()
        assert answer.status == 400 and b"root:" not in answer.read()
        connection.close()
    head = requests.head(viewer.url + "/app.bundle.js")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len("console.log('ohif');\n"))
    config = requests.get(viewer.url + "/app-config.js").text
    source = json.loads(re.search(r"window\.config = (\{.*\});", config, re.DOTALL).group(1))["dataSources"][0]
    assert source["sourceName"] == "dicomweb" and source["namespace"].endswith("dataSourcesModule.dicomweb")
    assert {source["configuration"][key] for key in ("qidoRoot", "wadoRoot", "wadoUriRoot")} == {"/dicom-web"}
    assert requests.post(viewer.url + "/viewer", data=b"x", headers={"Origin": viewer.url}).status_code == 405


def test_forwards_dicomweb_with_orthancs_credentials(viewer, orthanc, instance):
    studies = requests.get(viewer.url + "/dicom-web/studies", params={"StudyInstanceUID": instance.StudyInstanceUID})
    assert studies.status_code == 200 and studies.headers["Content-Type"] == "application/dicom+json"
    assert studies.json()[0]["0020000D"]["Value"] == [instance.StudyInstanceUID]
    assert requests.get(viewer.url + "/dicom-web/studies/1.2.3/metadata").status_code == 404  # statuses kept
    frame_path = (f"/dicom-web/studies/{instance.StudyInstanceUID}/series/{instance.SeriesInstanceUID}"
                  f"/instances/{instance.SOPInstanceUID}/frames/1")  # fmt: skip
    accept = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    proxied = requests.get(viewer.url + frame_path, headers=accept)
    direct = requests.get(orthanc.url + frame_path, headers=accept, auth=orthanc.auth)
    assert proxied.status_code == direct.status_code == 200
    # The boundary differs per answer; everything else of the multipart/related type is Orthanc's own.
    boundary = re.compile(r"boundary=[^;]+")
    assert boundary.sub("", proxied.headers["Content-Type"]) == boundary.sub("", direct.headers["Content-Type"])
    assert proxied.headers["Content-Type"].startswith("multipart/related")
    assert instance.PixelData in proxied.content
    assert requests.get(viewer.url + "/cbir/status").status_code == 200
    orthanc_id = orthanc.client.lookup(instance.SOPInstanceUID, "Instance")
    preview = requests.get(f"{viewer.url}/instances/{orthanc_id}/preview")  # the results page's thumbnails
    assert preview.status_code == 200 and preview.headers["Content-Type"] == "image/png"


def test_bulk_data_uris_point_at_the_viewer(viewer, instance):
    metadata = requests.get(f"{viewer.url}/dicom-web/studies/{instance.StudyInstanceUID}/series/"
                            f"{instance.SeriesInstanceUID}/metadata").text  # fmt: skip
    uris = re.findall(r'"BulkDataURI"\s*:\s*"([^"]+)"', metadata)
    assert uris and all(uri.startswith(viewer.url + "/dicom-web/") for uri in uris), uris[:3]


def test_passes_no_orthanc_route_that_ohif_does_not_need(viewer, orthanc, instance):
    """Even from the viewer's own origin: no upload, no STOW-RS, no DELETE, no /tools, no Lua,
    no Orthanc Explorer or REST listing, and no dot segment that Orthanc would resolve."""
    own = {"Origin": viewer.url}
    before = instance_count(orthanc)
    upload = factory.grey_image(np.full((16, 16), 7, dtype=np.uint16))
    assert requests.post(viewer.url + "/instances", data=factory.to_bytes(upload),
                         headers={**own, "Content-Type": "application/dicom"}).status_code == 403  # fmt: skip
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + factory.to_bytes(upload)
            + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
    stow = requests.post(viewer.url + "/dicom-web/studies", data=body,
                         headers={**own, "Content-Type": f'multipart/related; type="application/dicom"; '
                                  f"boundary={boundary}"})  # fmt: skip
    assert stow.status_code == 403
    orthanc_id = orthanc.client.lookup(instance.SOPInstanceUID, "Instance")
    assert requests.delete(f"{viewer.url}/instances/{orthanc_id}", headers=own).status_code == 403
    assert requests.post(viewer.url + "/tools/execute-script", data=b"print(1)", headers=own).status_code == 403
    assert requests.post(viewer.url + "/tools/shutdown", headers=own).status_code == 403
    assert requests.post(viewer.url + "/lua", data=b"x", headers=own).status_code == 403
    for path in ("/patients", "/system", "/tools/find", "/app/explorer.html", "/ui/app/", "/dicom-web/servers",
                 f"/instances/{orthanc_id}/file", f"/instances/{orthanc_id}"):  # fmt: skip
        assert requests.get(viewer.url + path).status_code == 403, path
    for sneaky in ("/cbir/../patients", "/cbir/%2e%2e/patients", "/cbir%2f..%2fpatients",
                   "/dicom-web/studies/%2e%2e/%2e%2e/system"):
        assert status_of(raw(viewer.port, f"GET {sneaky} HTTP/1.1\r\nHost: 127.0.0.1:{viewer.port}\r\n"
                                          f"Connection: close\r\n\r\n".encode())) == 400, sneaky  # fmt: skip
    assert instance_count(orthanc) == before
    assert orthanc.get_json(f"/instances/{orthanc_id}")["ID"] == orthanc_id
    assert orthanc.get_json("/system")["Name"]  # Orthanc is still up


def test_refuses_writes_from_another_origin(viewer, orthanc):
    """A page elsewhere can make the browser send a POST to the viewer; the viewer sees whence."""
    path = viewer.url + "/cbir/studies/none/similar/series"  # Orthanc's plugin answers it at once: 405, Allow: GET
    refused = [
        {"Origin": EVIL},
        {"Origin": "null"},  # a sandboxed frame, or a page with no-referrer
        {"Referer": EVIL + "/page.html"},
        {"Origin": f"http://127.0.0.1:{viewer.port + 1}"},  # another port is another origin
        {},  # neither: not a browser page of the viewer's
    ]
    for headers in refused:
        answer = requests.post(path, data=b"x", headers=headers)
        assert answer.status_code == 403, headers
        assert answer.text.startswith("a request that changes something")
    for method in ("PUT", "DELETE", "PATCH"):
        assert requests.request(method, path, headers={"Origin": EVIL}).status_code == 403, method
    # The demo's own shutdown route, with the Origin of the attack that found this.
    assert requests.post(viewer.url + "/tools/shutdown", headers={"Origin": EVIL}).status_code == 403
    # The viewer's own pages (Origin, or a Referer of its own when a browser sends no Origin) reach Orthanc.
    for headers in ({"Origin": viewer.url}, {"Referer": viewer.url + "/cbir/ui/instances/x"},
                    {"Origin": f"http://localhost:{viewer.port}", "Host": f"localhost:{viewer.port}"}):  # fmt: skip
        answer = requests.post(path, data=b"", headers=headers)
        assert (answer.status_code, answer.headers.get("Allow")) == (405, "GET"), (headers, answer.status_code)
    assert orthanc.get_json("/system")["Name"]


def test_refuses_to_answer_other_sites_pages(viewer, instance):
    """A page elsewhere cannot read the answers (no CORS), but an <img> or a no-cors fetch still
    runs the query; browsers say whence with Sec-Fetch-Site, and the viewer refuses those."""
    qido = f"{viewer.url}/dicom-web/studies?StudyInstanceUID={instance.StudyInstanceUID}"
    for site in ("cross-site", "same-site"):
        for mode in ("no-cors", "cors"):
            assert requests.get(qido, headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode}).status_code == 403
        assert requests.get(f"{viewer.url}/cbir/status", headers={"Sec-Fetch-Site": site}).status_code == 403
    for site, mode in (("same-origin", "cors"), ("none", "navigate"), ("cross-site", "navigate")):  # a followed link
        assert requests.get(qido, headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode}).status_code == 200
    app = requests.get(viewer.url + "/viewer", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert app.status_code == 200 and app.content == INDEX


def test_refuses_a_host_name_it_was_not_given(viewer, instance):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 is same-origin
    with itself, so the browser lets it read the answers; the Host header still says evil.example."""
    qido = f"/dicom-web/studies?StudyInstanceUID={instance.StudyInstanceUID}"
    for host in (f"evil.example:{viewer.port}", "evil.example", f"127.0.0.1:{viewer.port + 1}",
                 f"127.0.0.2:{viewer.port}", f"127.0.0.1:{viewer.port}@evil.example"):  # fmt: skip
        answer = raw(viewer.port, f"GET {qido} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status_of(answer) == 421, host
        assert instance.StudyInstanceUID.encode() not in answer
    for request in (f"GET {qido} HTTP/1.1\r\nConnection: close\r\n\r\n",  # no Host at all
                    f"GET {qido} HTTP/1.1\r\nHost: 127.0.0.1:{viewer.port}\r\nHost: evil.example\r\n"
                    f"Connection: close\r\n\r\n"):  # fmt: skip
        assert status_of(raw(viewer.port, request.encode())) == 421
    assert status_of(raw(viewer.port, f"GET / HTTP/1.1\r\nHost: evil.example:{viewer.port}\r\n\r\n".encode())) == 421
    for host in (f"127.0.0.1:{viewer.port}", f"localhost:{viewer.port}", f"LOCALHOST:{viewer.port}"):
        answer = raw(viewer.port, f"GET {qido} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status_of(answer) == 200 and instance.StudyInstanceUID.encode() in answer, host


def test_allowed_hosts_are_a_setting(tmp_path, orthanc, dist, instance):
    environment = {"CBIR_VIEWER_ALLOWED_HOSTS": "viewer.hospital.example, 127.0.0.1"}
    with ViewerServer(tmp_path, orthanc=orthanc, dist=dist, demo=True, environment=environment) as server:
        def status(host: str) -> int:
            return status_of(raw(server.port, f"GET /dicom-web/studies HTTP/1.1\r\nHost: {host}\r\n"
                                              f"Connection: close\r\n\r\n".encode()))  # fmt: skip

        assert status("viewer.hospital.example") == status(f"127.0.0.1:{server.port}") == 200
        assert status(f"localhost:{server.port}") == status("evil.example") == 421  # the list replaces the default


def test_outside_the_demo_callers_log_in_with_their_own_orthanc_user(tmp_path, orthanc, dist, instance):
    with ViewerServer(tmp_path, orthanc=orthanc, dist=dist, demo=False) as server:
        qido = f"{server.url}/dicom-web/studies?StudyInstanceUID={instance.StudyInstanceUID}"
        for url in (server.url + "/", server.url + "/app-config.js", qido, server.url + "/cbir/status"):
            anonymous = requests.get(url)
            assert anonymous.status_code == 401, url
            assert anonymous.headers["WWW-Authenticate"].startswith("Basic"), url  # the browser asks for a login
            assert instance.StudyInstanceUID not in anonymous.text
            assert requests.get(url, auth=(orthanc.username, "wrong")).status_code == 401, url
            assert requests.get(url, auth=orthanc.auth).status_code == 200, url
        assert requests.get(qido, auth=orthanc.auth).json()[0]["0020000D"]["Value"] == [instance.StudyInstanceUID]
        # Credentials do not open what the viewer never passes, nor make a foreign origin's write pass.
        assert requests.get(server.url + "/patients", auth=orthanc.auth).status_code == 403
        assert requests.post(server.url + "/cbir/query", data=b"x", auth=orthanc.auth,
                             headers={"Origin": EVIL}).status_code == 403  # fmt: skip


def test_the_demo_mode_is_refused_off_loopback(dist):
    done = subprocess.run([sys.executable, "-m", "orthanc_cbir.cli", "viewer", "--demo", "--host", "0.0.0.0",
                           "--port", str(free_port()), "--dist", str(dist)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and "loopback only" in done.stderr, done.stderr


class _Anonymous(BaseHTTPRequestHandler):
    """An 'Orthanc' that answers everyone (AuthenticationEnabled off)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_refuses_to_start_in_front_of_an_orthanc_that_authenticates_no_one(dist):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Anonymous)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = subprocess.run([sys.executable, "-m", "orthanc_cbir.cli", "viewer", "--port", str(free_port()),
                               "--dist", str(dist), "--orthanc-url", f"http://127.0.0.1:{server.server_port}"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2 and "answers without credentials" in done.stderr, done.stderr


def test_malformed_requests_get_a_clean_400(viewer):
    host = f"Host: 127.0.0.1:{viewer.port}\r\nOrigin: {viewer.url}\r\nConnection: close\r\n"
    for request in (
        f"GET /%00 HTTP/1.1\r\n{host}\r\n",
        f"GET /viewer%00.js HTTP/1.1\r\n{host}\r\n",
        f"GET /dicom-web/studies%00 HTTP/1.1\r\n{host}\r\n",
        f"GET /%ff%fe HTTP/1.1\r\n{host}\r\n",
        f"POST /cbir/query HTTP/1.1\r\n{host}Content-Length: abc\r\n\r\nxyz",
        f"POST /cbir/query HTTP/1.1\r\n{host}Content-Length: -1\r\n\r\n",
        f"POST /cbir/query HTTP/1.1\r\n{host}Content-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
        f"GET /app-config.js HTTP/1.1\r\n{host}Content-Length: 1e3\r\n\r\n",
        f"POST /cbir/query HTTP/1.1\r\n{host}Content-Length: \xb2\r\n\r\nxy",  # '²': str.isdigit says yes
    ):
        answer = raw(viewer.port, request.encode("latin-1"))
        assert status_of(answer) == 400, request
        assert answer.split(b"\r\n\r\n", 1)[1] in (b"malformed path\n", b"Content-Length must be one decimal number\n")
    assert requests.get(viewer.url + "/app-config.js").status_code == 200
    assert "Traceback" not in viewer.log_path.read_text()


IDENTIFIERS = {"PatientName": "Quaxwellian^Zorbanette", "PatientID": "PID7Q3XSECRET", "PatientBirthDate": "19370417",
               "AccessionNumber": "ACC88Z31K"}  # fmt: skip


def _leak_attempts(server) -> None:
    """QIDO queries full of identifiers, answered or not, and malformed ones that quote themselves."""
    requests.get(server.url + "/dicom-web/studies", params=IDENTIFIERS)
    requests.get(server.url + "/dicom-web/studies/1.2.3/series", params={"PatientID": IDENTIFIERS["PatientID"]})
    requests.post(server.url + "/cbir/studies/none/similar/series", params=IDENTIFIERS, headers={"Origin": EVIL})
    query = "&".join(f"{k}={v}" for k, v in IDENTIFIERS.items())
    raw(server.port, f"GET /dicom-web/studies?{query} HTTP/1.1 junk\r\n\r\n".encode())  # a bad request line
    raw(server.port, f"GET /dicom-web/studies?{query} HTTP/9.9\r\n\r\n".encode())
    raw(server.port, f"GET /dicom-web/studies?{query}%00 HTTP/1.1\r\nHost: evil.example\r\n"
                     f"Connection: close\r\n\r\n".encode())  # fmt: skip


def test_logs_no_query_string_even_when_orthanc_is_down(tmp_path, orthanc, dist):
    down = SimpleNamespace(url=f"http://127.0.0.1:{free_port()}", username="cbir", password="unused")
    # At WARNING, the level of a production log, only "Orthanc did not answer" is written: it must not quote the query.
    with ViewerServer(tmp_path / "up", orthanc=orthanc, dist=dist, demo=True,
                      environment={"CBIR_LOG_LEVEL": "DEBUG"}) as up, \
         ViewerServer(tmp_path / "down", orthanc=down, dist=dist, demo=True,
                      environment={"CBIR_LOG_LEVEL": "WARNING"}) as unreachable:  # fmt: skip
        _leak_attempts(up)
        _leak_attempts(unreachable)
        assert requests.get(unreachable.url + "/dicom-web/studies", params=IDENTIFIERS).status_code == 502
    logs = {"down, at WARNING": unreachable.log_path.read_text(), "up, at DEBUG": up.log_path.read_text()}
    for name, text in logs.items():
        assert "/dicom-web/studies" in text, f"{name}: the requests are not logged at all: the scan proves nothing"
        assert "Traceback" not in text, name
        for value in ("Quaxwellian", "Zorbanette", *list(IDENTIFIERS.values())[1:]):
            assert value not in text, f"{name}: {value} in the viewer's log"
