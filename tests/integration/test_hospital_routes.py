"""The HTTP routes as a hospital's security officer would check them, on real processes: Orthanc
with the plugin and ``orthanc-cbir serve``'s HTTP app over one redis-server and one index.

- query strings are read by the standard library's rules in both servers, which answer the same;
- every similarity answer and "Similar cases" request is in the audit trail (who, what, whose
  studies), readable at ``GET /cbir/audit`` by the allowed users, with no patient name or ID;
- requests that wait for a worker are bounded: beyond ``MaxWorkerWaits`` they are refused at
  once and Orthanc keeps answering everything else;
- Orthanc refuses a ``POST /cbir/query`` body over ``MaxQueryBytes`` before reading it;
- Orthanc's error answers are JSON with a Content-Type and never repeat the client's input.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread

from orthanc_cbir.api.http_server import HttpServerThread, create_app
from orthanc_cbir.audit import STREAM, AuditLog
from orthanc_cbir.config import load_settings
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.ingest.spool import Spool
from orthanc_cbir.local_services import OrthancServer, free_port
from tests.integration.pushing import storescu, synthetic_series, wait_until
from tests.integration.workers import start_worker

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(16)
TOKEN_NAME = "ward-7-workstation"
READER, READER_PASSWORD = "security-officer", secrets.token_urlsafe(12)
QUERY_CAP = 2**20
PATIENT = {"PatientName": "Xylophant^Quenby", "PatientID": "MRN4471902Z"}


class TwoUserOrthanc(OrthancServer):
    """Orthanc with a second user, the only one allowed to read the audit trail."""

    def configuration(self) -> dict[str, Any]:
        config = super().configuration()
        config["RegisteredUsers"] = {**config["RegisteredUsers"], READER: READER_PASSWORD}
        return config


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, redis_server):
    cbir = {"MaxQueryBytes": QUERY_CAP, "MaxWorkerWaits": 2, "AuditReaders": READER}
    with TwoUserOrthanc(tmp_path_factory.mktemp("orthanc"), redis_url=redis_server.url, cbir=cbir) as server:
        yield server


@pytest.fixture(scope="module")
def worker(orthanc, redis_server, embedder):
    running = start_worker(orthanc, redis_server.url, embedder, regions=True)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def indexed(orthanc, worker, tmp_path_factory) -> dict[str, list[str]]:
    """A CT and an MR series of one identified patient, pushed with storescu and indexed."""
    folder = tmp_path_factory.mktemp("series")
    ct = synthetic_series(folder / "ct", slices=6, texture=3, **PATIENT)
    mr = synthetic_series(folder / "mr", slices=6, texture=7, Modality="MR", **PATIENT)
    storescu(orthanc, [*ct, *mr])
    wait_until(lambda: orthanc.get_json("/cbir/status").get("indexed") == 12, 120, "12 slices indexed")
    return {name: [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
            for name, paths in (("ct", ct), ("mr", mr))}  # fmt: skip


@pytest.fixture(scope="module")
def standalone(redis_server, client, tmp_path_factory):
    """The standalone server's HTTP app on the same Redis, so the same index."""
    spool_dir = tmp_path_factory.mktemp("spool")
    settings = load_settings(env={}, redis_url=redis_server.url, http_token=TOKEN, http_token_name=TOKEN_NAME,
                             spool_dir=str(spool_dir))  # fmt: skip
    app = create_app(settings, Spool(Path(spool_dir), IngestQueue(client)))
    with HttpServerThread(app, "127.0.0.1", free_port()) as running:
        yield running


def raw_get(url: str, **kwargs: Any) -> requests.Response:
    """GET ``url`` exactly as written: requests would otherwise decode escapes of unreserved
    characters (``%32`` -> ``2``) before sending, hiding what a server does with them."""
    prepared = requests.Request("GET", url, **kwargs).prepare()
    prepared.url = url
    with requests.Session() as session:
        return session.send(prepared, timeout=30)


def from_orthanc(orthanc: OrthancServer, path: str) -> requests.Response:
    return raw_get(orthanc.url + path, auth=orthanc.auth)


def from_standalone(standalone: HttpServerThread, path: str) -> requests.Response:
    return raw_get(standalone.url + path, headers={"Authorization": f"Bearer {TOKEN}"})


def comparable(answer: requests.Response) -> Any:
    """What both servers must agree on: the status and the hits (not the timings)."""
    body = answer.json()
    if isinstance(body, dict) and "hits" in body:
        body = [(h["SOPInstanceUID"], round(h["distance"], 4), h["Modality"]) for h in body["hits"]]
    return answer.status_code, answer.headers.get("Content-Type", "").split(";")[0], body


# -- query strings ------------------------------------------------------------------------------

SAME_ANSWERS = [
    ("modality=CT%2CMR&k=12&strategy=exact", "modality=CT,MR&k=12&strategy=exact"),
    ("format=dicom%2Bjson&k=3&strategy=exact", "format=dicom+json&k=3&strategy=exact"),
    ("k=%32&strategy=exact", "k=2&strategy=exact"),
    ("body%5Fpart=CHEST&k=3&strategy=ex%61ct", "body_part=CHEST&k=3&strategy=exact"),
    ("format=dicom%2Bjson&includefield=00180015&k=2&strategy=exact",
     "format=dicom%2Bjson&includefield=BodyPartExamined&k=2&strategy=exact"),
]  # fmt: skip


@pytest.mark.parametrize(("encoded", "plain"), SAME_ANSWERS, ids=[e for e, _ in SAME_ANSWERS])
def test_both_servers_read_a_query_string_by_the_standard_rules_and_answer_the_same(
        orthanc, standalone, indexed, encoded, plain):  # fmt: skip
    path = f"/cbir/instances/{indexed['ct'][2]}/similar"
    answers = [from_orthanc(orthanc, f"{path}?{encoded}"), from_standalone(standalone, f"{path}?{encoded}"),
               from_orthanc(orthanc, f"{path}?{plain}"), from_standalone(standalone, f"{path}?{plain}")]  # fmt: skip
    assert answers[0].status_code == 200, answers[0].text[:300]
    assert len({json.dumps(comparable(a)) for a in answers}) == 1, [a.text[:300] for a in answers]


def test_a_filter_list_with_an_encoded_comma_finds_both_modalities(orthanc, indexed):
    answer = from_orthanc(orthanc, f"/cbir/instances/{indexed['ct'][2]}/similar?modality=CT%2CMR&k=12&strategy=exact")
    assert {hit["Modality"] for hit in answer.json()["hits"]} == {"CT", "MR"}, answer.text[:300]


def test_a_tag_number_and_a_repeated_includefield_add_their_attributes(orthanc, standalone, indexed):
    path = f"/cbir/instances/{indexed['ct'][2]}/similar/instances?limit=2&strategy=exact"
    by_number = from_orthanc(orthanc, f"{path}&includefield=00180015").json()
    assert all(hit["00180015"]["Value"] == ["CHEST"] for hit in by_number), by_number
    # Orthanc's Python plugin keeps only the last of a repeated name, so the repeated form is the standalone server's
    repeated = from_standalone(standalone, f"{path}&includefield=00180015&includefield=SeriesDescription").json()
    assert all("00180015" in hit and "0008103E" in hit for hit in repeated), repeated


# -- the audit trail ----------------------------------------------------------------------------


def audit_entries(orthanc: OrthancServer, count: int = 50) -> list[dict]:
    answer = requests.get(f"{orthanc.url}/cbir/audit?count={count}", auth=(READER, READER_PASSWORD), timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()["entries"]


def test_every_answer_and_series_request_is_in_the_audit_trail(orthanc, standalone, indexed, client, tmp_path):
    query = indexed["ct"][1]
    seen = from_orthanc(orthanc, f"/cbir/instances/{query}/similar?k=4&strategy=exact")
    qido = from_orthanc(orthanc, f"/cbir/instances/{query}/similar/studies?strategy=exact")
    standalone_answer = from_standalone(standalone, f"/cbir/instances/{indexed['mr'][0]}/similar?k=3")
    probe = synthetic_series(tmp_path / "probe", slices=1, texture=5, **PATIENT)[0]
    code, uploaded, _ = orthanc.request("POST", "/cbir/query", probe.read_bytes(), content_type="application/dicom",
                                        headers={"X-Cbir-K": "2"})  # fmt: skip
    series, made, _ = orthanc.request("POST", f"/cbir/instances/{indexed['mr'][3]}/similar/series",
                                      headers={"X-Cbir-K": "2", "X-Cbir-Exclude": "same-series"},
                                      timeout_s=150)  # fmt: skip
    assert [seen.status_code, qido.status_code, standalone_answer.status_code, code, series] == [200] * 5, made[:300]

    entries = audit_entries(orthanc)[:5][::-1]  # newest first: the last five, in the order they were made
    assert [(e["user"], e["route"]) for e in entries] == [
        (orthanc.username, "similar"), (orthanc.username, "similar"), (TOKEN_NAME, "similar"),
        (orthanc.username, "query"), (orthanc.username, "similar-series")]  # fmt: skip
    assert [e["query"] for e in entries] == [query, query, indexed["mr"][0],
                                             str(dcmread(probe).SOPInstanceUID), indexed["mr"][3]]  # fmt: skip
    assert entries[0]["studies"] == list(dict.fromkeys(h["StudyInstanceUID"] for h in seen.json()["hits"]))
    assert entries[0]["hits"] == 4 and entries[1]["level"] == "instance"
    assert entries[3]["studies"] == list(dict.fromkeys(h["StudyInstanceUID"] for h in json.loads(uploaded)["hits"]))
    assert entries[4]["hits"] == 2 and entries[4]["studies"]
    assert all(e["at"] > time.time() - 600 for e in entries)
    # the standalone server reads the same trail; no name or ID of the patient is in it
    assert from_standalone(standalone, "/cbir/audit?count=5").json()["entries"] == entries[::-1]
    stored = json.dumps([[k.decode(), {f.decode(): v.decode() for f, v in fields.items()}]
                         for k, fields in client.xrange(STREAM)])  # fmt: skip
    assert PATIENT["PatientID"] not in stored and "Xylophant" not in stored and "Quenby" not in stored


def test_only_the_audit_readers_may_read_the_trail_and_it_pages_back(orthanc, indexed):
    refused = from_orthanc(orthanc, "/cbir/audit")
    assert refused.status_code == 403 and refused.headers["Content-Type"].startswith("application/json")
    for uid in indexed["ct"][:3]:
        assert from_orthanc(orthanc, f"/cbir/instances/{uid}/similar?k=1").status_code == 200
    first = requests.get(f"{orthanc.url}/cbir/audit?count=2", auth=(READER, READER_PASSWORD), timeout=30).json()
    older = requests.get(f"{orthanc.url}/cbir/audit?count=1&before={first['next']}", auth=(READER, READER_PASSWORD),
                         timeout=30).json()  # fmt: skip
    assert [e["query"] for e in first["entries"] + older["entries"]] == indexed["ct"][:3][::-1]


def test_the_trail_drops_entries_past_the_retention(client):
    audit = AuditLog(client, retention_days=1, key="test:audit-retention")
    client.xadd(audit.key, {"user": "old"}, id="1000-0")  # 1970: far past any retention
    audit.record(user="alice", route="similar", level="instance", query_uid="1.2.3", studies=["1.2"], hits=1)
    assert [e["user"] for e in audit.read()] == ["alice"]
    kept = AuditLog(client, retention_days=0, key="test:audit-kept")
    client.xadd(kept.key, {"user": "old"}, id="1000-0")
    kept.record(user="alice", route="similar", level="instance", query_uid="1.2.3", studies=["1.2"], hits=1)
    assert [e["user"] for e in kept.read()] == ["alice", "old"]


# -- the readers' votes -------------------------------------------------------------------------


def vote_on(url: str, vote: dict, **kwargs: Any) -> requests.Response:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(f"{url}/cbir/votes", data=json.dumps(vote), timeout=30, headers=headers, **kwargs)


def test_votes_on_both_servers_land_in_the_audit_trail_and_in_evaluate_votes(orthanc, standalone, indexed,
                                                                            redis_server, capsys):  # fmt: skip
    from orthanc_cbir.cli import main

    query = indexed["ct"][2]
    answer = from_orthanc(orthanc, f"/cbir/instances/{query}/similar?k=3&strategy=exact").json()
    assert answer["query"] == query  # what a viewer sends back with its vote
    hits = [h["SOPInstanceUID"] for h in answer["hits"]]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    made = [
        vote_on(orthanc.url, {"query": query, "hit": hits[0], "vote": "up", "rank": 1, "strategy": "exact"},
                auth=orthanc.auth),
        vote_on(orthanc.url, {"query": query, "hit": hits[1], "vote": "up", "rank": 2, "strategy": "exact"},
                auth=orthanc.auth),
        vote_on(orthanc.url, {"query": query, "hit": hits[1], "vote": "down", "rank": 2, "strategy": "exact"},
                auth=orthanc.auth),  # the reader changed their mind
        vote_on(standalone.url, {"query": query, "hit": hits[2], "vote": "up", "rank": 3}, headers=bearer),
    ]  # fmt: skip
    assert [r.status_code for r in made] == [201] * 4, made[-1].text[:300]
    assert made[0].json()["recorded"] == {"query": query, "hit": hits[0], "vote": "up", "rank": 1,
                                          "strategy": "exact", "user": orthanc.username}  # fmt: skip
    entries = audit_entries(orthanc)[:4][::-1]
    assert [(e["route"], e["user"], e["query"], e["hit"], e["vote"], e["rank"]) for e in entries] == [
        ("vote", orthanc.username, query, hits[0], "up", 1), ("vote", orthanc.username, query, hits[1], "up", 2),
        ("vote", orthanc.username, query, hits[1], "down", 2), ("vote", TOKEN_NAME, query, hits[2], "up", 3)]
    assert all(e["at"] > time.time() - 600 for e in entries)

    capsys.readouterr()
    assert main(["evaluate", "--votes", "--redis-url", redis_server.url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["votes"], report["users"], report["queries"]) == (3, 2, 1)
    assert report["precision"] == 0.6667 and report["precision_at"]["1"] == 1.0
    assert report["by_strategy"]["exact"] == {"votes": 2, "precision": 0.5}


BAD_VOTES = [
    (b"not json", 400, "JSON object"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "maybe"}).encode(), 400, "up or down"),
    (json.dumps({"query": "PID-B-77", "hit": "1.2.4", "vote": "up"}).encode(), 400, "query must be"),
    (json.dumps({"query": "1.2.3", "hit": "1." + "2" * 80, "vote": "up"}).encode(), 400, "hit must be"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "up", "rank": 0}).encode(), 400, "rank"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "up", "rank": True}).encode(), 400, "rank"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "up", "strategy": "best"}).encode(), 400, "strategy"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "up", "strategy": None}).encode(), 400, "strategy"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "up", "note": "x"}).encode(), 400, "unknown field"),
    (json.dumps({"query": "1.2.3", "hit": "1.2.4", "vote": "up", "strategy": "x" * 5000}).encode(), 413, "4096"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "words"), BAD_VOTES, ids=[f"bad-vote-{i}" for i in range(len(BAD_VOTES))])
def test_a_bad_vote_is_refused_with_a_reason_and_nothing_is_recorded(orthanc, standalone, indexed, client, body,
                                                                      status, words):  # fmt: skip
    before = client.xlen(STREAM)
    standalone_answer = requests.post(f"{standalone.url}/cbir/votes", data=body, timeout=30,
                                      headers={"Authorization": f"Bearer {TOKEN}",
                                               "Content-Type": "application/json"})  # fmt: skip
    assert standalone_answer.status_code == status and words in standalone_answer.json()["error"]
    orthanc_answer = requests.post(f"{orthanc.url}/cbir/votes", data=body, auth=orthanc.auth, timeout=30)
    if status == 413:  # Orthanc's request filter refuses a body over the cap before reading it
        assert orthanc_answer.status_code == 403
    else:
        assert orthanc_answer.status_code == status and words in orthanc_answer.json()["error"], orthanc_answer.text
    assert client.xlen(STREAM) == before


# -- region queries --------------------------------------------------------------------------


def test_both_servers_answer_a_region_query_alike_and_audit_it(orthanc, standalone, indexed):
    query = indexed["ct"][2]
    path = f"/cbir/instances/{query}/similar-regions?box=10,12,40,50&k=4&exclude=same-patient"
    answers = [from_orthanc(orthanc, path), from_standalone(standalone, path)]
    assert comparable(answers[0]) == comparable(answers[1])
    body = answers[0].json()
    assert body["query"] == query and body["strategy"] == "regions" and len(body["query_region"]["box"]) == 4
    assert body["hits"] == []  # one patient's CT and MR: nothing left once the patient is left out
    body = from_orthanc(orthanc, f"/cbir/instances/{query}/similar-regions?box=10,12,40,50&k=4").json()
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4]
    assert query not in {h["SOPInstanceUID"] for h in body["hits"]}
    assert all(len(h["region"]["box"]) == 4 and h["patient"] == "this patient" for h in body["hits"])
    entry = audit_entries(orthanc)[0]
    assert (entry["route"], entry["query"], entry["user"]) == ("similar-regions", query, orthanc.username)


BAD_REGION_QUERIES = [
    ("box=1,2,3", 400, "box"), ("box=5,5,5,9", 400, "box"), ("box=a,b,c,d", 400, "box"),
    ("box=900,900,990,990", 400, "outside the image"),
    ("k=3", 400, "box"), ("box=1,2,30,40&strategy=exact", 400, "unknown parameter"),
    ("box=1,2,30,40&k=0", 400, "k"),
]  # fmt: skip


@pytest.mark.parametrize(("query_string", "status", "words"), BAD_REGION_QUERIES,
                         ids=[f"bad-region-{i}" for i in range(len(BAD_REGION_QUERIES))])  # fmt: skip
def test_a_bad_region_query_is_refused_with_a_reason_on_both_servers(orthanc, standalone, indexed, query_string,
                                                                     status, words):  # fmt: skip
    path = f"/cbir/instances/{indexed['ct'][2]}/similar-regions?{query_string}"
    for answer in (from_orthanc(orthanc, path), from_standalone(standalone, path)):
        assert answer.status_code == status and words in answer.json()["error"], answer.text
    missing = "/cbir/instances/1.2.3.4.5.6/similar-regions?box=1,2,30,40"
    assert from_orthanc(orthanc, missing).status_code == from_standalone(standalone, missing).status_code == 404


# -- requests waiting for a worker are bounded --------------------------------------------------


def test_series_requests_beyond_the_bound_are_refused_at_once_and_orthanc_keeps_answering(orthanc, worker, indexed):
    """No worker answers (it is stopped): the old routes each held one of Orthanc's HTTP threads
    for two minutes, and sixty of them froze Orthanc's whole API."""
    worker.stop()
    try:
        def ask(_: int) -> tuple[int, str, float]:
            started = time.monotonic()
            answer = requests.post(f"{orthanc.url}/cbir/instances/{indexed['ct'][0]}/similar/series",
                                   headers={"X-Cbir-K": "1"}, auth=orthanc.auth, timeout=200)  # fmt: skip
            return answer.status_code, answer.headers.get("Retry-After", ""), time.monotonic() - started

        with ThreadPoolExecutor(10) as pool:
            waiting = [pool.submit(ask, i) for i in range(10)]
            time.sleep(3)
            started = time.monotonic()
            assert from_orthanc(orthanc, "/system").status_code == 200
            assert time.monotonic() - started < 2
            refused = [f.result() for f in waiting if f.done()]
            assert len(refused) == 8 and all(code == 503 and retry == "5" and took < 3
                                             for code, retry, took in refused), refused  # fmt: skip
            worker.start()  # the two that wait are served
            served = [f.result() for f in waiting if (f.result()[0] != 503)]
        assert [code for code, _, _ in served] == [200, 200], served
    finally:
        if not worker.is_alive():
            worker.start()


def test_an_asynchronous_series_request_answers_at_once_and_its_job_tells_the_outcome(orthanc, worker, indexed):
    """``Prefer: respond-async``: a 202 and a job, whatever the workers do; no Orthanc thread waits."""
    url = f"{orthanc.url}/cbir/instances/{indexed['mr'][2]}/similar/series"
    worker.stop()
    try:
        jobs, refused = [], []
        for _ in range(9):  # MaxWorkerWaits 2: eight jobs may wait for a worker, the ninth is refused
            started = time.monotonic()
            answer = requests.post(url, headers={"X-Cbir-K": "1", "Prefer": "respond-async"}, auth=orthanc.auth,
                                   timeout=10)  # fmt: skip
            assert time.monotonic() - started < 3
            (jobs if answer.status_code == 202 else refused).append(answer)
        assert len(jobs) == 8 and [a.status_code for a in refused] == [503], [a.text[:200] for a in refused]
        first = jobs[0].json()
        assert jobs[0].headers["Location"] == first["status"] == f"/cbir/jobs/{first['job']}"
        assert from_orthanc(orthanc, first["status"]).json()["state"] == "queued"
    finally:
        worker.start()

    def state() -> dict:
        return from_orthanc(orthanc, first["status"]).json()

    wait_until(lambda: state()["state"] == "done", 120, "the first job done")
    made = state()["result"]
    assert made["hits"] == 1 and made["series"]["instances"] == 1
    assert made["query"]["SOPInstanceUID"] == indexed["mr"][2]
    wait_until(lambda: all(from_orthanc(orthanc, a.json()["status"]).json()["state"] == "done" for a in jobs), 180,
               "every job done")  # fmt: skip
    for unknown in ("0" * 32, "not-a-job"):
        answer = from_orthanc(orthanc, f"/cbir/jobs/{unknown}")
        assert answer.status_code == 404 and answer.headers["Content-Type"].startswith("application/json")


# -- Orthanc refuses a large query body before reading it ---------------------------------------


def _raw_post(orthanc: OrthancServer, headers: str) -> str:
    """Send a POST's headers and none of its body; the status line Orthanc answers within 10 s."""
    with socket.create_connection(("127.0.0.1", orthanc.http_port), timeout=10) as sock:
        sock.sendall(headers.encode())
        return sock.recv(4096).decode(errors="replace").split("\r\n", 1)[0]


def test_orthanc_refuses_a_query_body_over_the_cap_before_reading_it(orthanc, indexed):
    auth = "Basic " + base64.b64encode(":".join(orthanc.auth).encode()).decode()
    declared = (f"POST /cbir/query HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
                f"Content-Type: application/dicom\r\nContent-Length: {200 * 2**20}\r\n\r\n")  # fmt: skip
    assert _raw_post(orthanc, declared).startswith("HTTP/1.1 403"), "Orthanc waited for a 200 MiB body"
    chunked = (f"POST /cbir/query HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
               "Content-Type: application/dicom\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    assert _raw_post(orthanc, chunked).startswith("HTTP/1.1 4")
    assert from_orthanc(orthanc, "/system").status_code == 200


# -- Orthanc's error answers --------------------------------------------------------------------

HOSTILE = "<b onmouseover=alert(1)>x"
MISTAKES = [
    f"/cbir/instances/{HOSTILE}/similar",
    f"/cbir/instances/1.2.3/similar?{HOSTILE}=1",
    f"/cbir/instances/1.2.3/similar?date={HOSTILE}",
    f"/cbir/instances/1.2.3/similar?age={HOSTILE}",
    f"/cbir/instances/1.2.3/similar?weights={HOSTILE}",
    f"/cbir/instances/1.2.3/similar?strategy={HOSTILE}",
    f"/cbir/instances/1.2.3/similar?level={HOSTILE}",
    f"/cbir/instances/1.2.3/similar?exclude={HOSTILE}",
]


@pytest.mark.parametrize("path", MISTAKES)
def test_orthanc_errors_are_json_with_a_content_type_and_never_repeat_the_input(orthanc, indexed, path):
    answer = from_orthanc(orthanc, path.replace("<", "%3C").replace(">", "%3E"))
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.headers
    assert answer.headers.get("X-Content-Type-Options") == "nosniff"
    assert answer.json()["status"] == answer.status_code
    assert "onmouseover" not in answer.text and "alert" not in answer.text, answer.text
