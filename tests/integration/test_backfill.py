"""``orthanc-cbir backfill`` against a real Orthanc's DICOMweb: QIDO-RS lists, WADO-RS
retrieves, the index fills; reruns, filters, resuming and refused credentials.

No worker runs in this module: Orthanc's plugin enqueues what storescu stores into
the ``cbir:ingest`` stream of Redis database 0, where nothing reads it. Each test
writes its index into a fresh Redis database of its own, so only backfill fills it.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.backfill import BackfillError, BackfillSummary, backfill, checkpoint_key
from orthanc_cbir.ingest.queue import IngestQueue
from orthanc_cbir.local_services import free_port
from tests import dicom_factory as factory
from tests.integration.pushing import storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_databases = itertools.count(1)


@dataclass
class Archive:
    """What the module stored in Orthanc: three studies of images and one SR."""

    studies: dict[str, list[str]]
    """Name (ct2024, mr2025, ct2023) -> SOPInstanceUIDs of its images."""
    study_uids: dict[str, str]
    report: str
    """The SR's SOPInstanceUID (in study ct2024)."""

    @property
    def images(self) -> list[str]:
        return [uid for uids in self.studies.values() for uid in uids]


@pytest.fixture(scope="module")
def archive(orthanc, tmp_path_factory) -> Archive:
    folder = tmp_path_factory.mktemp("archive")
    series = {
        "ct2024": synthetic_series(folder / "ct2024", slices=14, texture=0, StudyDate="20240131"),
        "mr2025": synthetic_series(folder / "mr2025", slices=12, texture=5, modality="MR", sop_class=factory.MR_IMAGE,
                                   StudyDate="20250601"),  # fmt: skip
        "ct2023": synthetic_series(folder / "ct2023", slices=12, texture=9, StudyDate="20230301"),
    }
    study_uids = {name: dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID for name, paths in series.items()}
    report = factory.structured_report()
    report.StudyInstanceUID = study_uids["ct2024"]
    report.StudyDate = "20240131"
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    storescu(orthanc, [p for paths in series.values() for p in paths] + [folder / "report.dcm"])
    studies = {name: [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
               for name, paths in series.items()}  # fmt: skip
    return Archive(studies, study_uids, report.SOPInstanceUID)


@dataclass
class Target:
    """A fresh Redis database to backfill into."""

    url: str
    client: redis.Redis
    store: IndexStore
    queue: IngestQueue


@pytest.fixture
def target(redis_server, embedder):
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_databases)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield Target(url, client, IndexStore(client, IndexInfo.from_card(embedder.card)), IngestQueue(client))
    client.close()


def dicomweb(orthanc, auth=None) -> DICOMwebClient:
    session = requests.Session()
    session.auth = auth or orthanc.auth
    return DICOMwebClient(orthanc.url + "/dicom-web", session=session)


def run(orthanc, target: Target, embedder, **options) -> BackfillSummary:
    return backfill(dicomweb(orthanc), target.store, target.queue, embedder, progress=False, **options)


def cli(orthanc, target: Target, *arguments: str, password: str | None = None, wait: bool = True):
    """``orthanc-cbir backfill`` in a subprocess (the password through the environment)."""
    environment = {**os.environ, "CBIR_DICOMWEB_PASSWORD": password or orthanc.password}
    argv = [sys.executable, "-m", "orthanc_cbir.cli", "backfill", "--dicomweb", orthanc.url + "/dicom-web",
            "--username", orthanc.username, "--redis-url", target.url, *arguments]  # fmt: skip
    if not wait:
        return subprocess.Popen(argv, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    return subprocess.run(argv, cwd=REPO, env=environment, capture_output=True, text=True, timeout=240)


def orthanc_images(orthanc) -> int:
    """Instances Orthanc holds, less the non-images (the SR)."""
    modalities = [orthanc.get_json(f"/instances/{i}/tags?simplify")["Modality"] for i in orthanc.get_json("/instances")]
    return sum(m != "SR" for m in modalities)


def test_backfill_indexes_every_image_and_rejects_the_report(orthanc, archive, target, embedder, caplog):
    caplog.set_level(logging.DEBUG)
    summary = run(orthanc, target, embedder, batch_size=16)
    images = orthanc_images(orthanc)
    assert images == len(archive.images)
    assert (summary.studies, summary.instances, summary.indexed, summary.rejected) == (3, images + 1, images, 1)
    assert summary.complete and target.store.count() == images
    assert all(target.store.contains(uid) for uid in archive.images)
    rejected = target.queue.rejected()[archive.report]  # keyed by SOPInstanceUID, the source a field
    assert rejected["reason"] == "not an image"
    assert (rejected["source"], rejected["source_id"]) == ("dicomweb", archive.report)
    described = target.store.describe([archive.studies["mr2025"][0]])[0].metadata
    assert described.study_instance_uid == archive.study_uids["mr2025"] and described.modality == "MR"
    assert factory.PATIENT_NAME.split("^")[0] not in caplog.text and factory.PATIENT_ID not in caplog.text
    assert summary.line().startswith(f"backfill: 3 studies, indexed {images}, already indexed 0, rejected 1 (model ")

    again = run(orthanc, target, embedder)  # the checkpoint: every study is done, none is listed
    assert (again.indexed, again.rejected, again.studies_done_earlier, again.instances) == (0, 0, 3, 0)
    restarted = run(orthanc, target, embedder, restart=True)  # without it: listed again, nothing retrieved
    assert (restarted.indexed, restarted.already_indexed, restarted.rejected, restarted.rejected_earlier) == (
        0, images, 0, 1)  # fmt: skip
    assert target.store.count() == images and len(target.queue.rejected()) == 1


def test_the_command_line_indexes_then_finds_nothing_new(orthanc, archive, target):
    images = len(archive.images)
    first = cli(orthanc, target, "--batch", "8")
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"backfill: 3 studies, indexed {images}, already indexed 0, rejected 1 (model " in first.stdout
    assert target.store.count() == images
    second = cli(orthanc, target, "--restart")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"backfill: 3 studies, indexed 0, already indexed {images}, rejected 0 (model " in second.stdout
    assert "1 rejected earlier" in second.stdout
    for output in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert factory.PATIENT_ID not in output and factory.PATIENT_NAME.split("^")[0] not in output


def test_backfill_decodes_under_the_configured_limits(orthanc, archive, target, embedder, monkeypatch):
    # backfill used the pixel step's built-in limits, not the deployment's (a live bug)
    images = len(archive.images)
    framed = run(orthanc, target, embedder, max_pixels_per_frame=100)  # the synthetic slices are larger
    assert (framed.indexed, framed.rejected) == (0, images + 1) and target.store.count() == 0
    reasons = {entry["reason"] for entry in target.queue.rejected().values()}
    assert reasons == {"too large", "not an image"}
    target.client.flushdb()  # forget those rejections: the command line decides afresh
    monkeypatch.setenv("CBIR_MAX_FILE_BYTES", "1000")
    command = cli(orthanc, target)
    assert command.returncode == 0, command.stderr[-2000:]
    assert f"backfill: 3 studies, indexed 0, already indexed 0, rejected {images + 1} (model " in command.stdout
    assert target.store.count() == 0


def test_since_and_modality_limit_what_is_walked(orthanc, archive, target, embedder):
    recent = run(orthanc, target, embedder, since="2024-01-01")
    assert recent.studies == 2 and recent.indexed == len(archive.studies["ct2024"]) + len(archive.studies["mr2025"])
    assert not any(target.store.contains(uid) for uid in archive.studies["ct2023"])
    target.client.flushdb()

    mr = run(orthanc, target, embedder, modalities=["MR"])
    assert (mr.studies, mr.indexed, mr.rejected) == (1, len(archive.studies["mr2025"]), 0)
    assert target.store.count() == len(archive.studies["mr2025"])
    ct = run(orthanc, target, embedder, modalities=["ct"], since="20240101")  # CT instances only: the SR is left out
    assert (ct.studies, ct.indexed, ct.rejected) == (1, len(archive.studies["ct2024"]), 0)
    assert run(orthanc, target, embedder, modalities=["CT"], since="2025-01-01").studies == 0

    everything = run(orthanc, target, embedder)  # the studies walked for one modality are walked again for all
    assert (everything.studies_done_earlier, everything.indexed, everything.rejected) == (
        0, len(archive.studies["ct2023"]), 1)  # fmt: skip
    assert everything.already_indexed == len(archive.studies["mr2025"]) + len(archive.studies["ct2024"])
    assert target.store.count() == len(archive.images)
    with pytest.raises(ValueError):
        run(orthanc, target, embedder, since="last week")


def test_an_interrupted_run_resumes_without_duplicates(orthanc, archive, target, embedder):
    images = len(archive.images)
    cut = run(orthanc, target, embedder, batch_size=4, max_instances=10)
    assert cut.interrupted and cut.indexed + cut.rejected == 10 and not cut.complete
    assert target.store.count() == cut.indexed
    rest = run(orthanc, target, embedder, batch_size=4)
    assert rest.complete and rest.indexed + rest.rejected == images + 1 - 10
    assert rest.already_indexed == cut.indexed
    done = target.client.hkeys(checkpoint_key(orthanc.url + "/dicom-web", target.store, target.queue))
    assert sorted(d.decode() for d in done) == sorted(archive.study_uids.values())
    assert target.store.count() == images and target.store.stats()["rows_allocated"] == images


class GoesDown(DICOMwebClient):
    """A client whose server stops answering after ``answers`` retrievals."""

    def __init__(self, url: str, session: requests.Session, answers: int):
        super().__init__(url, session=session)
        self.answers = answers

    def retrieve_instance(self, *args, **kwargs):
        if self.answers == 0:
            raise requests.ConnectionError("connection refused")
        self.answers -= 1
        return super().retrieve_instance(*args, **kwargs)


def test_the_server_going_down_mid_walk_stops_the_run_and_the_next_one_finishes(orthanc, archive, target, embedder):
    session = requests.Session()
    session.auth = orthanc.auth
    with pytest.raises(BackfillError, match="cannot reach the DICOMweb server") as stopped:
        backfill(GoesDown(orthanc.url + "/dicom-web", session, answers=7), target.store, target.queue, embedder,
                 batch_size=4, progress=False)  # fmt: skip
    partial = stopped.value.summary
    assert partial.indexed + partial.rejected == 7 and target.store.count() == partial.indexed  # the batch was kept
    rest = run(orthanc, target, embedder)
    assert rest.complete and rest.already_indexed == partial.indexed and target.store.count() == len(archive.images)


def test_a_stopped_or_killed_command_is_resumed_by_the_next_run(orthanc, archive, target):
    images = len(archive.images)

    def start_and_wait(more_than: int) -> subprocess.Popen:
        process = cli(orthanc, target, "--batch", "2", wait=False)
        wait_until(lambda: target.store.count() >= more_than + 2 or process.poll() is not None, 120,
                   "a batch to be indexed", every_s=0.01)  # fmt: skip
        assert process.poll() is None, f"the run ended before it was stopped: {process.communicate()}"
        return process

    stopped = start_and_wait(0)
    stopped.send_signal(signal.SIGTERM)  # stops after the instance in hand, writes its batch
    output, _ = stopped.communicate(timeout=60)
    assert stopped.returncode == 130 and "INTERRUPTED" in output
    killed = start_and_wait(target.store.count())
    killed.send_signal(signal.SIGKILL)  # loses its batch in hand: the next run retrieves it again
    killed.communicate(timeout=30)
    before = target.store.count()
    assert before < images
    last = cli(orthanc, target, "--batch", "8")
    assert last.returncode == 0, last.stderr[-2000:]
    assert f"indexed {images - before}, already indexed " in last.stdout
    assert target.store.count() == images  # (rows_allocated may exceed it: a kill can land inside a write)


def test_refused_credentials_or_no_server_stop_with_a_clear_message(orthanc, archive, target, embedder):
    wrong = cli(orthanc, target, password="not-the-password")
    assert wrong.returncode == 1
    assert "refused the credentials (HTTP 401)" in wrong.stderr and "not-the-password" not in wrong.stderr
    argv = [sys.executable, "-m", "orthanc_cbir.cli", "backfill", "--dicomweb", orthanc.url + "/dicom-web", "--token",
            "no-such-token", "--redis-url", target.url]  # fmt: skip
    token = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert token.returncode == 1 and "refused the credentials (HTTP 401)" in token.stderr
    with pytest.raises(BackfillError, match="refused the credentials"):
        backfill(dicomweb(orthanc, ("cbir", "wrong")), target.store, target.queue, embedder, progress=False)
    nowhere = DICOMwebClient(f"http://127.0.0.1:{free_port()}/dicom-web")
    nowhere.set_http_retry_params(retry=False)  # dicomweb-client retries a refused connection for 30 s otherwise
    with pytest.raises(BackfillError, match="cannot reach the DICOMweb server"):
        backfill(nowhere, target.store, target.queue, embedder, progress=False)
    assert target.store.count() == 0 and not target.queue.rejected()


def test_a_study_that_grew_is_walked_again(orthanc, archive, target, embedder, tmp_path):
    """Last in the module: it adds an instance to Orthanc."""
    first = run(orthanc, target, embedder)
    assert first.complete and target.store.count() == len(archive.images)
    extra = synthetic_series(tmp_path / "extra", slices=1, texture=3, StudyInstanceUID=archive.study_uids["ct2023"],
                             StudyDate="20230301")  # fmt: skip
    storescu(orthanc, extra)
    grown = run(orthanc, target, embedder)
    assert (grown.indexed, grown.studies_done_earlier) == (1, 2)
    assert grown.already_indexed == len(archive.studies["ct2023"])
    assert target.store.count() == len(archive.images) + 1
