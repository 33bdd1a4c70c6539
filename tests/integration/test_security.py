"""Security: every ``/cbir`` route in Orthanc needs Orthanc's credentials; no patient identifier
reaches any log (Orthanc, worker, ``serve``, ``backfill`` at DEBUG); Redis with a password
(``requirepass``, the password in the URL) works, also over TLS (``rediss://``), and a wrong
password is reported without the password; query parameters are bounded (400 JSON) in Orthanc
and in the standalone server.

Real redis-server (with ``--requirepass``), Orthanc with the plugin, ``orthanc-cbir worker``,
``orthanc-cbir serve`` and ``orthanc-cbir backfill`` processes, storescu and STOW-RS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from orthanc_cbir.api.routes import redis_health
from orthanc_cbir.config import load_settings
from orthanc_cbir.local_services import (
    OrthancServer,
    RedisServer,
    StandaloneServer,
    WorkerProcess,
    free_port,
)
from tests import dicom_factory as factory
from tests.integration.pushing import storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REDIS_PASSWORD = "s3cret-Redis-pw-7Hq"
WRONG_REDIS_PASSWORD = "wrong-Redis-pw-K2x"
PATIENT = {
    "PatientName": "Quaxwellian^Zorbanette",
    "PatientID": "PID7Q3XSECRET",
    "PatientBirthDate": "19370417",
    "AccessionNumber": "ACC88Z31K",
    "OtherPatientIDs": "OTHERID55KQ",
}
ONE_NAME = {"PatientName": "Zorquaxtrin", "PatientID": "PIDLONE9Q"}
"""A patient whose name has one component, which highdicom quotes in a warning."""
IDENTIFIERS = ["Quaxwellian", "Zorbanette", *list(PATIENT.values())[1:], *ONE_NAME.values()]
"""What no log may contain (the name's parts on their own too)."""
DEBUG = {"CBIR_LOG_LEVEL": "DEBUG"}
PATIENT_KEY_SECRET = "hmac-Key-of-this-site-4Rw"
SECRET_KEY = {"CBIR_PATIENT_KEY_SECRET": PATIENT_KEY_SECRET}


def identified_series(folder: Path, slices: int, texture: int) -> list[Path]:
    return synthetic_series(folder, slices=slices, texture=texture, **PATIENT)


def identified_report(path: Path, study_uid: str) -> Path:
    """An SR of the same patient and study: the worker rejects it (not an image)."""
    report = factory.structured_report()
    for keyword, value in {**PATIENT, "StudyInstanceUID": study_uid}.items():
        setattr(report, keyword, value)
    report.save_as(path, enforce_file_format=True)
    return path


def sop_uids(paths) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


@dataclass
class Pipeline:
    redis: RedisServer
    orthanc: OrthancServer
    worker: WorkerProcess
    uids: list[str]
    state: Path
    one_name_uids: list[str]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Redis with a password, Orthanc whose RedisUrl carries it, an `orthanc-cbir worker` at DEBUG;
    a series and an SR of one identified patient, and a series of another, pushed with storescu
    and indexed / rejected."""
    state = tmp_path_factory.mktemp("secure")
    with RedisServer(state / "redis", password=REDIS_PASSWORD) as redis_server, \
         OrthancServer(state / "orthanc", redis_url=redis_server.url) as orthanc:  # fmt: skip
        worker = WorkerProcess(state / "worker", redis_url=redis_server.url, orthanc=orthanc, batch_size=8)
        worker.environment.update({**DEBUG, **SECRET_KEY})
        with worker:
            paths = identified_series(state / "series", slices=8, texture=5)
            study = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            others = synthetic_series(state / "others", slices=8, texture=11)  # another patient: similar/series hits
            one_name = synthetic_series(state / "one-name", slices=4, texture=13, **ONE_NAME)
            storescu(orthanc, [*paths, identified_report(state / "report.dcm", study), *others, *one_name])
            wait_until(lambda: _counts(orthanc) == (20, 1), 120, "20 slices indexed and the SR rejected")
            yield Pipeline(redis_server, orthanc, worker, sop_uids(paths), state, sop_uids(one_name))


def _counts(orthanc) -> tuple[int, int]:
    status = orthanc.get_json("/cbir/status")
    return status.get("indexed", 0), status.get("rejected", 0)


@pytest.fixture(scope="module")
def standalone(pipeline):
    """`orthanc-cbir serve` at DEBUG, its index in database 3 of the same password-protected Redis."""
    url = pipeline.redis.url.rsplit("/", 1)[0] + "/3"
    server = StandaloneServer(pipeline.state / "serve", redis_url=url)
    server.environment.update({**DEBUG, **SECRET_KEY})
    with server:
        yield server


def bearer(server: StandaloneServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"}


# -- a. authentication in Orthanc ---------------------------------------------------------------

ROUTES = [
    ("GET", "/cbir/status"),
    ("GET", "/cbir/rejected"),
    ("GET", "/cbir/instances/{instance}/similar"),
    ("GET", "/cbir/series/{series}/similar"),
    ("GET", "/cbir/studies/{study}/similar"),
    *(("GET", f"/cbir/instances/{{instance}}/similar/{level}") for level in ("studies", "series", "instances")),
    ("GET", "/cbir/series/{series}/similar/instances"),
    ("GET", "/cbir/studies/{study}/similar/studies"),
    ("POST", "/cbir/query"),
    ("POST", "/cbir/instances/{instance}/similar/series"),
    ("GET", "/cbir/ui/instances/{instance}"),
    ("GET", "/cbir/audit"),
    ("GET", "/cbir/jobs/" + "0" * 32),
]


@pytest.fixture(scope="module")
def identifiers(pipeline) -> dict[str, str]:
    orthanc_id = json.loads(pipeline.orthanc.request("POST", "/tools/lookup", pipeline.uids[0].encode())[1])[0]["ID"]
    instance = pipeline.orthanc.get_json(f"/instances/{orthanc_id}")
    series = pipeline.orthanc.get_json(f"/series/{instance['ParentSeries']}")
    return {"instance": orthanc_id, "series": series["ID"], "study": series["ParentStudy"]}


@pytest.mark.parametrize(("method", "template"), ROUTES)
def test_every_cbir_route_in_orthanc_needs_credentials(pipeline, identifiers, method, template):
    orthanc = pipeline.orthanc
    url = orthanc.url + template.format(**identifiers)
    # a POST with credentials is sent a mistake (an empty query file, an unknown parameter), so that
    # it answers at once with a 400 and makes nothing; the point is that it is let in
    headers = {"X-Cbir-Colour": "red"} if url.endswith("/similar/series") else {}
    for auth in (None, (orthanc.username, "not-the-password"), ("intruder", orthanc.password)):
        answer = requests.request(method, url, auth=auth, data=b"", headers=headers, timeout=30)
        assert answer.status_code == 401, (auth, answer.status_code, answer.text[:200])
        assert "Quaxwellian" not in answer.text
    answer = requests.request(method, url, auth=orthanc.auth, data=b"", headers=headers, timeout=60)
    assert answer.status_code != 401 and answer.status_code < 500, (answer.status_code, answer.text[:300])


# -- the index's patient key --------------------------------------------------------------------


def test_the_index_keys_patients_with_the_sites_secret_not_a_bare_hash(pipeline):
    """A bare SHA-256 of issuer and PatientID in Redis gives a 7-digit MRN back in seconds; the
    worker keys it with the secret of its environment (``CBIR_PATIENT_KEY_SECRET``), which Redis never holds."""
    import hashlib
    import hmac

    import redis

    from orthanc_cbir.index import IndexInfo, IndexStore

    client = redis.Redis.from_url(pipeline.redis.url)
    try:
        store = IndexStore(client, IndexInfo.for_model(load_settings(env={}).model))
        keys = {entry.metadata.patient_key for entry in store.describe(pipeline.uids)}
        dump = b"".join(client.dump(key) or b"" for key in client.scan_iter(count=1000))
    finally:
        client.close()
    message = f"\x00{PATIENT['PatientID']}".encode()
    assert keys == {hmac.new(PATIENT_KEY_SECRET.encode(), message, hashlib.sha256).hexdigest()[:16]}
    assert hashlib.sha256(message).hexdigest()[:16] not in keys
    assert PATIENT_KEY_SECRET.encode() not in dump
    # the same key for a query file the worker embeds: exclude=same-patient leaves this patient out
    probe = identified_series(pipeline.state / "key-probe", slices=1, texture=5)[0]
    code, body, _ = pipeline.orthanc.request("POST", "/cbir/query", probe.read_bytes(),
                                             content_type="application/dicom",
                                             headers={"X-Cbir-K": "8", "X-Cbir-Exclude": "same-patient"})  # fmt: skip
    assert code == 200 and not set(pipeline.uids) & {hit["SOPInstanceUID"] for hit in json.loads(body)["hits"]}


# -- c. Redis with a password -------------------------------------------------------------------


def test_redis_with_a_password_in_the_url_serves_the_worker_and_the_plugin(pipeline):
    assert pipeline.redis.url.startswith(f"redis://:{REDIS_PASSWORD}@127.0.0.1:")
    status = pipeline.orthanc.get_json("/cbir/status")
    assert status["redis"]["ok"] is True and status["indexed"] >= 16 and status["rejected"] == 1
    answer = pipeline.orthanc.get_json(f"/cbir/instances/{pipeline.uids[3]}/similar?k=3&strategy=exact")
    assert len(answer["hits"]) == 3
    assert REDIS_PASSWORD not in json.dumps(status)
    without = redis_health(pipeline.redis.url.replace(f":{REDIS_PASSWORD}@", ""))
    assert without["ok"] is False and "Authentication" in without["error"]


def test_a_wrong_redis_password_is_reported_without_the_password(pipeline, tmp_path):
    wrong_url = pipeline.redis.url.replace(REDIS_PASSWORD, WRONG_REDIS_PASSWORD)
    health = redis_health(wrong_url)
    assert health["ok"] is False and health["error"] and WRONG_REDIS_PASSWORD not in health["error"]
    with OrthancServer(tmp_path / "orthanc", redis_url=wrong_url) as orthanc:
        code, body, _ = orthanc.request("GET", "/cbir/status")
        assert code == 200
        status = json.loads(body)
        assert status["redis"]["ok"] is False and status["redis"]["error"], status
        code, body, _ = orthanc.request("GET", f"/cbir/instances/{pipeline.uids[0]}/similar")
        assert code >= 500 and json.loads(body)["error"], (code, body[:500])
    for text in (json.dumps(status), body.decode(), orthanc.log_path.read_text(errors="replace")):
        assert WRONG_REDIS_PASSWORD not in text and REDIS_PASSWORD not in text


def test_redis_over_tls_with_a_rediss_url(tmp_path):
    """TLS: redis-server on a TLS port with a self-signed certificate and a password; the plugin
    reaches it with ``rediss://:PASSWORD@host:port/0?ssl_ca_certs=CA.pem``."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
                               "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                               str(cert), "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD,
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        wait_until(lambda: redis_health(url)["ok"], 20, "redis-server to answer over TLS")
        assert redis_health(url.replace("rediss://", "redis://").split("?")[0])["ok"] is False  # no TLS: refused
        with OrthancServer(tmp_path / "orthanc", redis_url=url) as orthanc:
            status = orthanc.get_json("/cbir/status")
        assert status["redis"]["ok"] is True and status["indexed"] == 0, status
        assert REDIS_PASSWORD not in json.dumps(status)
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- d. bounded query parameters ----------------------------------------------------------------

BAD_PARAMETERS = [
    "k=101",  # MaxResults is 100
    "k=1000000000000000000000000",
    "offset=99999999999999999999999999999999",
    "offset=-1",
    "limit=-5",
    "k=ten",
    "date=garbage",
    "date=2024-13-45..yesterday",
    "age=old",
    "age=40-seventy",
    "modality=" + "CT," * 3400,  # 10 kB of valid values
    "body_part=" + "X" * 10_000,
    "exclude=" + "same-patient," * 800,
    "weights=" + "modality=1," * 1000,
]


def _assert_json_400(code: int, body: bytes, case: str) -> None:
    assert code == 400, (case[:60], code, body[:300])
    answer = json.loads(body)
    assert answer["status"] == 400 and answer["error"], answer


@pytest.mark.parametrize("case", BAD_PARAMETERS, ids=lambda c: c[:24])
def test_orthanc_bounds_every_query_parameter(pipeline, case):
    code, body, _ = pipeline.orthanc.request("GET", f"/cbir/instances/{pipeline.uids[0]}/similar?{case}")
    _assert_json_400(code, body, case)


@pytest.mark.parametrize("case", BAD_PARAMETERS, ids=lambda c: c[:24])
def test_the_standalone_server_bounds_every_query_parameter(standalone, pipeline, case):
    answer = requests.get(f"{standalone.url}/cbir/instances/{pipeline.uids[0]}/similar?{case}",
                          headers=bearer(standalone), timeout=30)  # fmt: skip
    _assert_json_400(answer.status_code, answer.content, case)


# -- b. no patient identifiers in any log -------------------------------------------------------


def test_no_patient_identifier_reaches_any_log(pipeline, standalone, identifiers, tmp_path):
    orthanc = pipeline.orthanc
    # Orthanc: a query file upload and a "Similar cases" series made by the worker
    probe = identified_series(tmp_path / "probe", slices=1, texture=3)[0]
    code, body, _ = orthanc.request("POST", "/cbir/query", probe.read_bytes(), content_type="application/dicom",
                                    headers={"X-Cbir-K": "3", "X-Cbir-Strategy": "exact"})  # fmt: skip
    assert code == 200 and len(json.loads(body)["hits"]) == 3, body[:300]
    code, body, _ = orthanc.request("POST", f"/cbir/instances/{identifiers['instance']}/similar/series",
                                    headers={"X-Cbir-K": "3"}, timeout_s=150)  # fmt: skip
    assert code == 200, body[:300]
    # the same for a patient whose name has one component, which highdicom's checks quote
    code, body, _ = orthanc.request("POST", f"/cbir/instances/{pipeline.one_name_uids[1]}/similar/series",
                                    headers={"X-Cbir-K": "2"}, timeout_s=150)  # fmt: skip
    assert code == 200, body[:300]

    # the standalone server: storescu and STOW-RS of identified files, and an SR it rejects
    pushed = identified_series(tmp_path / "scp", slices=4, texture=7)
    storescu(standalone, [*pushed, identified_report(tmp_path / "scp-report.dcm", "1.2.3.4.5")])
    stowed = identified_series(tmp_path / "stow", slices=3, texture=9)
    session = requests.Session()
    session.headers.update(bearer(standalone))
    DICOMwebClient(url=standalone.url + "/dicom-web", session=session).store_instances([dcmread(p) for p in stowed])

    def standalone_status() -> dict:
        return requests.get(standalone.url + "/cbir/status", headers=bearer(standalone), timeout=10).json()

    wait_until(lambda: (standalone_status().get("indexed"), standalone_status().get("rejected")) == (7, 1), 120,
               "the standalone server to index 7 and reject the SR")  # fmt: skip
    answer = requests.get(f"{standalone.url}/cbir/instances/{sop_uids(pushed)[0]}/similar?k=2",
                          headers=bearer(standalone), timeout=30)  # fmt: skip
    assert answer.status_code == 200
    # `serve` records it in the audit trail under its token's name, with UIDs and no identifier
    trail = requests.get(f"{standalone.url}/cbir/audit?count=1", headers=bearer(standalone), timeout=30).json()
    assert [(e["user"], e["query"], e["hits"]) for e in trail["entries"]] == [("token", sop_uids(pushed)[0], 2)]
    assert trail["entries"][0]["studies"] == list(dict.fromkeys(h["StudyInstanceUID"] for h in answer.json()["hits"]))
    assert not any(secret.lower() in json.dumps(trail).lower() for secret in IDENTIFIERS)

    # backfill from Orthanc's DICOMweb into database 5, at DEBUG
    target = pipeline.redis.url.rsplit("/", 1)[0] + "/5"
    environment = {**os.environ, **DEBUG, "CBIR_DICOMWEB_PASSWORD": orthanc.password}
    done = subprocess.run([sys.executable, "-m", "orthanc_cbir.cli", "backfill", "--dicomweb",
                           orthanc.url + "/dicom-web", "--username", orthanc.username, "--redis-url", target],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    backfill_log = tmp_path / "backfill.log"
    backfill_log.write_text(done.stdout + done.stderr)
    assert "DEBUG" in done.stderr, "backfill did not log at DEBUG"

    logs = [backfill_log, *sorted(pipeline.state.rglob("*.log"))]
    names = {log.name for log in logs}
    assert {"orthanc.log", "worker.log", "serve.log", "redis.log", "backfill.log"} <= names, names
    for at_debug in ("worker/worker.log", "serve/serve.log"):
        assert "DEBUG" in (pipeline.state / at_debug).read_text(errors="replace"), at_debug
    leaks = []
    for log in logs:
        text = log.read_text(errors="replace")
        leaks += [f"{log}: {secret!r}" for secret in [*IDENTIFIERS, REDIS_PASSWORD, PATIENT_KEY_SECRET]
                  if secret.lower() in text.lower()]  # fmt: skip
    assert not leaks, "\n".join(leaks)
