"""The "Similar cases" series and key object selection, made by a worker and stored in the
query's study, read back through Orthanc's REST API and its DICOMweb plugin. Real Orthanc,
Redis, storescu, dicomweb-client; dciodvfy (dicom3tools) validates where it is installed."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import redis
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from orthanc_cbir.answers.similar_cases import CAPTION_HEIGHT, IMAGE_SIZE, SimilarCase, render_case
from orthanc_cbir.answers.similar_series import SimilarSeriesMaker
from orthanc_cbir.dicom.own_output import MANUFACTURER, SERIES_DESCRIPTION
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.orthanc_client import OrthancClient
from orthanc_cbir.local_services import OrthancServer, RedisServer
from tests import dicom_factory as factory
from tests.integration.pushing import storescu, synthetic_series, wait_until
from tests.integration.workers import make_settings, start_worker

pytestmark = pytest.mark.integration

QUERY_PATIENT = {"PatientName": "Query^Anna", "PatientID": "PID-A-0001", "PatientBirthDate": "19600101",
                 "AccessionNumber": "ACC-A-1", "StudyID": "SID-A"}  # fmt: skip
OTHER_PATIENT = {"PatientName": "Other^Bertha^Secret", "PatientID": "PID-B-SECRET-77", "PatientBirthDate": "19551224",
                 "AccessionNumber": "ACC-B-SECRET", "StudyID": "SID-B-9", "InstitutionName": "Hospital of Bertha",
                 "ReferringPhysicianName": "Doctor^Bertha", "StudyDescription": "BERTHA FOLLOW-UP"}  # fmt: skip


@pytest.fixture(scope="module")
def pushed(orthanc, redis_server, embedder, tmp_path_factory):
    """Two series of the query patient's study and one of another patient, alike slice by slice (the
    other patient's at another size: the search gives one hit per picture, and a copy is one picture).
    The other patient's files declare ``BurnedInAnnotation`` NO, so their pixels are drawn."""
    running = start_worker(orthanc, redis_server.url, embedder)
    folder = tmp_path_factory.mktemp("similar-series")
    study_a, study_b = factory.generate_uid(), factory.generate_uid()
    a1 = synthetic_series(folder / "a1", StudyInstanceUID=study_a, **QUERY_PATIENT)
    a2 = synthetic_series(folder / "a2", StudyInstanceUID=study_a, **QUERY_PATIENT)
    # the other patient's files say they carry no burned-in text: their pixels may be drawn
    b1 = synthetic_series(folder / "b1", size=48, StudyInstanceUID=study_b, BurnedInAnnotation="NO", **OTHER_PATIENT)
    storescu(orthanc, a1 + a2 + b1)
    store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(embedder.card))
    wait_until(lambda: store.count() >= 36, 120, "36 indexed slices")
    query = dcmread(a1[6])
    query_id = orthanc.client.lookup(str(query.SOPInstanceUID))
    yield {"query": query, "query_id": query_id, "a2": [dcmread(p, stop_before_pixels=True) for p in a2],
           "b1": [dcmread(p, stop_before_pixels=True) for p in b1]}  # fmt: skip
    running.stop()


HEADERS = {"X-Cbir-K": "6", "X-Cbir-Strategy": "exact", "X-Cbir-Exclude": "same-series"}


@pytest.fixture(scope="module")
def made(orthanc, pushed):
    status, body, _ = orthanc.request("POST", f"/cbir/instances/{pushed['query_id']}/similar/series", b"",
                                      headers=HEADERS, timeout_s=150)  # fmt: skip
    assert status == 200, body
    return json.loads(body)


def read_series(orthanc, series_id: str) -> list[Dataset]:
    instances = sorted(orthanc.get_json(f"/series/{series_id}/instances"),
                       key=lambda i: int(i["MainDicomTags"]["InstanceNumber"]))  # fmt: skip
    return [dcmread(io.BytesIO(orthanc.client.instance_file(i["ID"]))) for i in instances]


def every_value(ds: Dataset) -> list[str]:
    """The text of every element, nested sequences included (pixel data aside)."""
    values = []
    for element in ds.iterall():
        if element.keyword != "PixelData":
            values.append(str(element.value))
    return values


def test_posting_similar_series_stores_one_image_per_hit_in_the_query_study(orthanc, pushed, made):
    query = pushed["query"]
    assert made["hits"] == 6 and made["series"]["instances"] == 6
    images = read_series(orthanc, made["series"]["orthanc"])
    answer = orthanc.get_json(f"/cbir/instances/{pushed['query_id']}/similar?k=6&strategy=exact&exclude=same-series")
    assert [ds.InstanceNumber for ds in images] == [1, 2, 3, 4, 5, 6]
    for ds, hit in zip(images, answer["hits"], strict=False):  # the same hits as the JSON answer, in rank order
        assert ds.ImageComments.startswith(f"rank {hit['rank']}, distance ")
    for ds in images:
        assert ds.StudyInstanceUID == query.StudyInstanceUID and ds.PatientID == query.PatientID
        assert ds.SeriesDescription == SERIES_DESCRIPTION and ds.Manufacturer == MANUFACTURER
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.Modality == "OT"
        assert ds.pixel_array.shape == (IMAGE_SIZE + CAPTION_HEIGHT, IMAGE_SIZE)
    hit_patients = {hit["StudyInstanceUID"] for hit in answer["hits"]}
    assert hit_patients == {query.StudyInstanceUID, pushed["b1"][0].StudyInstanceUID}, "both patients among the hits"


def test_similar_cases_images_carry_no_identifier_of_the_other_patient(orthanc, pushed, made):
    other = pushed["b1"]
    secrets = {*OTHER_PATIENT.values(), "Other", "Bertha", other[0].StudyInstanceUID, other[0].SeriesInstanceUID,
               *(str(ds.SOPInstanceUID) for ds in other)}  # fmt: skip
    images = read_series(orthanc, made["series"]["orthanc"])
    drawn = 0
    for ds in images:
        for value in every_value(ds):
            assert not any(secret in value for secret in secrets), f"{value!r} names the other patient"
        picture = ds.pixel_array[:IMAGE_SIZE]
        drawn += picture.std() > 20  # the hit's pixels, not a grey "not shown" panel
    assert drawn == 6


def test_the_key_object_selection_references_the_hits_of_the_query_study(orthanc, pushed, made):
    kos_file = orthanc.client.instance_file(made["kos"]["orthanc"])
    kos = dcmread(io.BytesIO(kos_file))
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and kos.Modality == "KO"
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    assert kos.StudyInstanceUID == pushed["query"].StudyInstanceUID and kos.PatientID == pushed["query"].PatientID
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in kos.ContentSequence if item.ValueType == "IMAGE"]  # fmt: skip
    same_study = {str(ds.SOPInstanceUID) for ds in pushed["a2"]}
    assert referenced and set(referenced) <= same_study
    assert made["kos"]["references"] == len(referenced)
    assert not any(secret in value for value in every_value(kos) for secret in OTHER_PATIENT.values())


def test_the_series_reads_back_through_dicomweb(orthanc, pushed, made):
    session = requests.Session()
    session.auth = orthanc.auth
    web = DICOMwebClient(url=orthanc.url + "/dicom-web", session=session)
    study = str(pushed["query"].StudyInstanceUID)
    series = {item["0020000E"]["Value"][0]: item.get("0008103E", {}).get("Value", [""])[0]
              for item in web.search_for_series(study_instance_uid=study)}  # fmt: skip
    assert series[made["series"]["SeriesInstanceUID"]] == SERIES_DESCRIPTION
    assert made["kos"]["SeriesInstanceUID"] in series
    retrieved = web.retrieve_series(study, made["series"]["SeriesInstanceUID"])
    assert len(retrieved) == 6 and all(ds.SeriesDescription == SERIES_DESCRIPTION for ds in retrieved)


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy (dicom3tools) is not installed")
def test_the_series_and_the_key_objects_validate_with_dciodvfy(orthanc, made, tmp_path):
    for name, orthanc_id in [("sc", orthanc.get_json(f"/series/{made['series']['orthanc']}")["Instances"][0]),
                             ("ko", made["kos"]["orthanc"])]:  # fmt: skip
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(orthanc.client.instance_file(orthanc_id))
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_the_service_never_indexes_its_own_similar_cases_images(orthanc, made):
    instances = orthanc.get_json(f"/series/{made['series']['orthanc']}")["Instances"]
    wait_until(lambda: set(instances) <= {e["orthanc_id"] for e in orthanc.get_json("/cbir/rejected")["rejected"]},
               60, "the Similar cases images listed as not indexed")  # fmt: skip
    reasons = {e["reason"] for e in orthanc.get_json("/cbir/rejected")["rejected"] if e["orthanc_id"] in instances}
    assert reasons == {"orthanc-cbir output"}


NAMESAKE = {"PatientName": "Namesake^Carl", "PatientID": QUERY_PATIENT["PatientID"], "PatientBirthDate": "19771107",
            "AccessionNumber": "ACC-C-7", "StudyID": "SID-C"}  # fmt: skip
"""Another person whose PatientID (no issuer, like the query's) is the query patient's: another site's MRN."""
UNDECLARED = {"PatientName": "Undeclared^Dora", "PatientID": "PID-D-0004", "PatientBirthDate": "19440404",
              "AccessionNumber": "ACC-D-4", "StudyID": "SID-D"}  # fmt: skip
"""Another patient whose files do not say whether their pixels carry burned-in text."""


@pytest.fixture(scope="module")
def strangers(embedder, tmp_path_factory):
    """An Orthanc whose only hits for the query patient are a namesake's series (same PatientID
    without issuer, another birth date and name; declared free of burned-in text) and a series of
    another patient that does not declare ``BurnedInAnnotation``; each at its own size (one hit
    per picture). A worker with the default settings makes series for the Orthanc route."""
    folder = tmp_path_factory.mktemp("strangers")
    with RedisServer(folder / "redis") as redis_server, \
         OrthancServer(folder / "orthanc", redis_url=redis_server.url) as orthanc:  # fmt: skip
        running = start_worker(orthanc, redis_server.url, embedder)
        try:
            query = synthetic_series(folder / "a", slices=6, **QUERY_PATIENT)
            namesake = synthetic_series(folder / "c", slices=6, size=48, BurnedInAnnotation="NO", **NAMESAKE)
            undeclared = synthetic_series(folder / "d", slices=6, size=56, **UNDECLARED)
            storescu(orthanc, query + namesake + undeclared)
            store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(embedder.card))
            wait_until(lambda: store.count() >= 18, 120, "18 indexed slices")
            yield {"orthanc": orthanc, "redis": redis_server, "query": dcmread(query[3]),
                   "namesake": str(dcmread(namesake[0]).StudyInstanceUID),
                   "undeclared": str(dcmread(undeclared[0]).StudyInstanceUID)}  # fmt: skip
        finally:
            running.stop()


STRANGER_PARAMETERS = {"k": "12", "strategy": "exact", "exclude": "same-series"}


def drawn_series(orthanc, query: Dataset, made: dict) -> list[tuple[dict, Dataset]]:
    """Each hit of the JSON answer with the stored image made of it, in rank order."""
    query_id = orthanc.client.lookup(str(query.SOPInstanceUID))
    parameters = "&".join(f"{k}={v}" for k, v in STRANGER_PARAMETERS.items())
    answer = orthanc.get_json(f"/cbir/instances/{query_id}/similar?" + parameters)
    images = read_series(orthanc, made["series"]["orthanc"])
    assert len(images) == len(answer["hits"]) == made["hits"]
    return list(zip(answer["hits"], images, strict=True))


def is_grey_panel(ds: Dataset) -> bool:
    return bool(np.mean(ds.pixel_array[:IMAGE_SIZE] == 48) > 0.9)  # the grey of the "image not shown" panel


def caption(hit: dict, same_patient: bool) -> np.ndarray:
    """The caption band the series draws under a hit, for this patient or another one."""
    case = SimilarCase(rank=int(hit["rank"]), distance=float(hit["distance"]), strategy=str(hit["strategy"]),
                       modality=hit.get("Modality"), body_part=hit.get("BodyPartExamined"), same_patient=same_patient,
                       pixels=None, withheld="")  # fmt: skip
    return render_case(case)[IMAGE_SIZE:]


@pytest.fixture(scope="module")
def made_for_strangers(strangers):
    orthanc, query = strangers["orthanc"], strangers["query"]
    query_id = orthanc.client.lookup(str(query.SOPInstanceUID))
    headers = {f"X-Cbir-{name.capitalize()}": value for name, value in STRANGER_PARAMETERS.items()}
    status, body, _ = orthanc.request("POST", f"/cbir/instances/{query_id}/similar/series", b"", headers=headers,
                                      timeout_s=150)  # fmt: skip
    assert status == 200, body
    return drawn_series(orthanc, query, json.loads(body))


def test_another_patients_file_without_burned_in_annotation_is_a_withheld_panel_by_default(strangers,
                                                                                           made_for_strangers):
    undeclared = [(hit, ds) for hit, ds in made_for_strangers if hit["StudyInstanceUID"] == strangers["undeclared"]]
    assert undeclared, "the undeclared patient's images are among the hits"
    for hit, ds in undeclared:
        assert is_grey_panel(ds), f"hit {hit['rank']}: another patient's pixels drawn without BurnedInAnnotation NO"
        assert np.array_equal(ds.pixel_array[IMAGE_SIZE:], caption(hit, same_patient=False))


def test_a_namesake_sharing_the_patient_id_without_issuer_is_captioned_another_patient(strangers, made_for_strangers):
    namesake = [(hit, ds) for hit, ds in made_for_strangers if hit["StudyInstanceUID"] == strangers["namesake"]]
    assert namesake, "the namesake's images are among the hits"
    for hit, ds in namesake:
        assert not np.array_equal(caption(hit, same_patient=False), caption(hit, same_patient=True))
        assert np.array_equal(ds.pixel_array[IMAGE_SIZE:], caption(hit, same_patient=False)), \
            f"hit {hit['rank']}: a namesake captioned as the query's own patient"  # fmt: skip
        assert not is_grey_panel(ds)  # the file says BurnedInAnnotation NO: drawn, as another patient's
    assert all(ds.PatientName == QUERY_PATIENT["PatientName"] for _, ds in made_for_strangers)


def test_with_the_setting_turned_on_another_patients_undeclared_file_is_drawn(strangers):
    orthanc, query = strangers["orthanc"], strangers["query"]
    settings = make_settings(strangers["redis"].url, orthanc, similar_series_other_patients=True)
    client = redis.Redis.from_url(strangers["redis"].url)
    made = SimilarSeriesMaker(settings, orthanc.client, client).for_instance(str(query.SOPInstanceUID),
                                                                             dict(STRANGER_PARAMETERS))  # fmt: skip
    pairs = drawn_series(orthanc, query, made)
    assert {hit["StudyInstanceUID"] for hit, _ in pairs} == {strangers["namesake"], strangers["undeclared"]}
    assert not any(is_grey_panel(ds) for _, ds in pairs)


def test_a_hit_over_the_configured_frame_limit_is_a_withheld_panel(strangers):
    # the "Similar cases" maker decoded hits under the built-in limits, not the deployment's (a live bug)
    orthanc, query = strangers["orthanc"], strangers["query"]
    settings = make_settings(strangers["redis"].url, orthanc, similar_series_other_patients=True,
                             max_pixels_per_frame=32 * 32)  # every hit is 48 or 56 px square
    client = redis.Redis.from_url(strangers["redis"].url)
    made = SimilarSeriesMaker(settings, orthanc.client, client).for_instance(str(query.SOPInstanceUID),
                                                                             dict(STRANGER_PARAMETERS))  # fmt: skip
    pairs = drawn_series(orthanc, query, made)
    assert pairs and all(is_grey_panel(ds) for _, ds in pairs)


@pytest.mark.parametrize("path, headers, code, message", [
    ("/cbir/instances/0123abcd-nope/similar/series", {}, 404, "no instance"),
    ("/cbir/instances/{query}/similar/series", {"X-Cbir-K": "0"}, 400, "k must be"),
    ("/cbir/instances/{query}/similar/series", {"X-Cbir-Strategy": "magic"}, 400, "strategy"),
])  # fmt: skip
def test_similar_series_mistakes_get_a_message(orthanc, pushed, path, headers, code, message):
    status, body, _ = orthanc.request("POST", path.format(query=pushed["query_id"]), b"", headers=headers)
    assert status == code and message in json.loads(body)["error"], body


def test_only_an_instance_makes_a_similar_series(orthanc, pushed):
    series = orthanc.get_json(f"/instances/{pushed['query_id']}")["ParentSeries"]
    status, _, _ = orthanc.request("POST", f"/cbir/series/{series}/similar/series", b"")
    assert status == 405


def test_the_results_page_is_served_with_the_query_and_escapes_what_it_is_given(orthanc, pushed):
    status, body, content_type = orthanc.request("GET", f"/cbir/ui/instances/{pushed['query_id']}")
    assert status == 200 and content_type.startswith("text/html")
    page = body.decode()
    assert f'"orthancId": "{pushed["query_id"]}"' in page and "<script" in page
    status, body, _ = orthanc.request("GET", "/cbir/ui/instances/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert status == 200 and "<img src=x" not in body.decode() and "\\u003cimg src=x" in body.decode()


def test_a_stable_study_gets_its_similar_cases_series_once(embedder, tmp_path):
    with RedisServer(tmp_path / "redis") as redis_server, \
         OrthancServer(tmp_path / "orthanc", redis_url=redis_server.url, stable_age_s=2,
                       cbir={"SimilarSeriesOnStableStudy": True}) as orthanc:  # fmt: skip
        running = start_worker(orthanc, redis_server.url, embedder, similar_series_on_stable_study=True)
        try:
            first = synthetic_series(tmp_path / "first", slices=6, **OTHER_PATIENT)
            storescu(orthanc, first)
            second = synthetic_series(tmp_path / "second", slices=6, **QUERY_PATIENT)
            storescu(orthanc, second)

            def similar_series(study_uid: str) -> list[dict]:
                study = orthanc.client.lookup(study_uid, "Study")
                return [s for s in orthanc.get_json(f"/studies/{study}/series")
                        if s["MainDicomTags"].get("SeriesDescription") == SERIES_DESCRIPTION]  # fmt: skip

            studies = [str(dcmread(paths[0]).StudyInstanceUID) for paths in (first, second)]
            wait_until(lambda: all(similar_series(uid) for uid in studies), 90, "a Similar cases series in each study")
            # adding the series made each study stable again: that must not make a second one
            wait_until(lambda: orthanc.get_json("/cbir/status")["queued"] == 0, 30, "an empty queue", every_s=1)
            time.sleep(4)
            assert [len(similar_series(uid)) for uid in studies] == [1, 1]
        finally:
            running.stop()



class OrthancDyingMidSeries(OrthancClient):
    """A client of ``orthanc`` that kills it (SIGKILL) before the ``after``-th store: Orthanc dies
    with part of a series stored."""

    def __init__(self, orthanc: OrthancServer, after: int):
        super().__init__(orthanc.url, *orthanc.auth)
        self.orthanc, self.after, self.stores = orthanc, after, 0

    def store(self, data: bytes) -> dict:
        self.stores += 1
        if self.stores == self.after:
            self.orthanc.process.kill()
            self.orthanc.process.wait(timeout=10)
        return super().store(data)


@pytest.mark.parametrize("retry", ["request", "stable study"])
def test_a_series_half_written_when_orthanc_died_is_replaced_by_one_complete_series(embedder, tmp_path, retry):
    with RedisServer(tmp_path / "redis") as redis_server, \
         OrthancServer(tmp_path / "orthanc", redis_url=redis_server.url) as orthanc:  # fmt: skip
        running = start_worker(orthanc, redis_server.url, embedder)
        try:
            study = factory.generate_uid()
            paths = synthetic_series(tmp_path / "a", slices=8, StudyInstanceUID=study, **QUERY_PATIENT)
            storescu(orthanc, paths
                     + synthetic_series(tmp_path / "a2", slices=8, StudyInstanceUID=study, **QUERY_PATIENT)
                     + synthetic_series(tmp_path / "b", slices=8, **OTHER_PATIENT))  # fmt: skip
            store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(embedder.card))
            wait_until(lambda: store.count() >= 24, 120, "24 indexed slices")
            settings = make_settings(redis_server.url, orthanc)
            client = redis.Redis.from_url(redis_server.url)
            query, asked = str(dcmread(paths[4]).SOPInstanceUID), {"k": "10", "exclude": "same-series"}
            with pytest.raises(OSError):
                SimilarSeriesMaker(settings, OrthancDyingMidSeries(orthanc, after=5), client).for_instance(query, asked)
            orthanc.start()  # the same storage: the 4 images stored before it died are there

            def own_series() -> list[dict]:
                return [s for s in orthanc.get_json(f"/studies/{orthanc.client.lookup(study, 'Study')}/series")
                        if s["MainDicomTags"].get("SeriesDescription") == SERIES_DESCRIPTION]  # fmt: skip

            assert [len(s["Instances"]) for s in own_series()] == [4]
            maker = SimilarSeriesMaker(settings, orthanc.client, client)
            if retry == "request":  # the reader asks again
                made = maker.for_instance(query, asked)
            else:  # the study became stable again: a half-written series is not its series
                made = maker.for_stable_study(orthanc.client.lookup(study, "Study"))
            assert made["series"]["instances"] == made["hits"] >= 8  # one image per hit: complete
            assert [(s["ID"], len(s["Instances"])) for s in own_series()] == [(made["series"]["orthanc"], made["hits"])]
        finally:
            running.stop()


def test_a_hung_redis_fails_a_search_within_the_routes_timeout_when_a_maker_made_the_shared_searcher(
        tmp_path, monkeypatch):  # fmt: skip
    """The cores of a process share one searcher, which reads through the client of the first core
    made. A worker hands its maker its own client, which need not have a command timeout (redis-py
    before 6 had none by default): had the maker's core come first, a route's search would have waited
    on a hung Redis for ever instead of answering 503."""
    from orthanc_cbir.answers import similar_series
    from orthanc_cbir.config import load_settings
    from orthanc_cbir.search import SearchOptions
    from orthanc_cbir.search.service import Page, SimilaritySearch

    monkeypatch.setattr(similar_series, "SEARCH_COMMAND_TIMEOUT_S", 1)
    with RedisServer(tmp_path / "redis") as server:
        settings = load_settings(env={}, redis_url=server.url)
        worker_client = redis.Redis.from_url(server.url, socket_timeout=None)  # a worker's: it may wait
        maker = SimilarSeriesMaker(settings, OrthancClient("http://127.0.0.1:1"), worker_client)
        maker_core = maker._similarity()  # a "Similar cases" request came first
        routes = SimilaritySearch(IndexStore(redis.Redis.from_url(server.url, socket_timeout=1),
                                             IndexInfo.for_model(settings.model)))  # fmt: skip
        assert routes.searcher is maker_core.searcher
        outcome: list[BaseException] = []

        def search() -> None:
            try:
                routes.similar_to_stored("instance", "1.2.3.4", Page(SearchOptions()))
            except BaseException as exc:  # noqa: BLE001 - what the route would map to a status
                outcome.append(exc)

        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # hung: the socket open, nothing answered
        try:
            thread = threading.Thread(target=search, daemon=True)
            thread.start()
            thread.join(10)
            assert not thread.is_alive(), "the search still waits on the hung Redis"
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert outcome and isinstance(outcome[0], redis.TimeoutError)
