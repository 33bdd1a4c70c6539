"""The end-to-end demo behind ``make demo``: the product's main job.

It starts a private Redis, Orthanc (with this project's plugin) and one
``orthanc-cbir worker`` on loopback ports, pushes real DICOM with DCMTK's dcmsend
as a PACS would, waits until the worker has indexed (or rejected, with the
reason) every stored instance, draws the pixel step's contact sheet, asks the
plugin for the images most similar to the middle slice of the CT series, prints
the ranked answer, stores it as a "Similar cases" series in the CT's study, and
serves OHIF in front of that Orthanc (``orthanc-cbir viewer``). It prints the
OHIF URL of the CT study, where "Similar cases" sits beside the CT, and the
results page; run from a terminal it keeps everything up until Ctrl-C, else it
stops what it started. SIGTERM and SIGHUP (a closed terminal) stop everything as Ctrl-C does.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TypeVar

from .dicom import Rejection, decode_instance
from .local_services import (
    REPO_ROOT,
    OrthancServer,
    RedisServer,
    ServiceError,
    ViewerServer,
    WorkerProcess,
    dcmtk_environment,
)
from .preview import PreviewEntry, render_sheet

SHARED_DICOM = REPO_ROOT.parent / "shared" / "data" / "dicom"
# A real CT series and one file of each kind the pixel step must handle.
_SHARED_PICKS = (
    "series/lung_pet_ct_dx/Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl",
    "series/qin_prostate_adc_mr_20sl",
    "single/nema_wg04/JPLY/RG3_JPLY",
    "single/nema_wg04/J2KR/US1_J2KR",
    "single/nema_wg04/RLE/XA1_RLE",
    "single/nema_wg04/JLSL/MG1_JLSL",
    "single/pydicom_data_wheel/OT-PAL-8-face.dcm",
    "single/pydicom_wheel/examples_ybr_color.dcm",
    "single/pydicom_data_wheel/emri_small_jpeg_2k_lossless.dcm",
    "single/pydicom_wheel/test-SR.dcm",
)
_PYDICOM_PICKS = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "rtplan.dcm")


class _Stopped(Exception):
    """The demo got SIGTERM or SIGHUP: unwinding stops what it started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on(signum: int, frame: FrameType | None) -> None:
    # Without this, SIGTERM or SIGHUP ends Python at once and no with-block stops Redis, Orthanc,
    # the worker or the viewer (Orthanc even takes a terminal's SIGHUP as "restart"). Later
    # signals are ignored so that they cannot interrupt the stopping itself.
    for other in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise _Stopped(signum)


def run_demo(state_dir: Path, data_dir: Path | None = None) -> int:
    """Run the demo; returns the process exit status (0 when every stored instance was
    indexed or rejected with a reason, and the query answered; 128 + the signal's number
    when SIGTERM or SIGHUP stopped it)."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _stop_on)
    signal.signal(signal.SIGHUP, _stop_on)
    try:
        return _run_demo(state_dir, data_dir)
    except _Stopped as stopped:
        print(f"demo: stopped by {stopped}; everything it started is stopped.", flush=True)
        return 128 + stopped.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_demo(state_dir: Path, data_dir: Path | None) -> int:
    files = _demo_files(data_dir)
    state_dir = state_dir.resolve()
    # a fresh archive each run: Orthanc announces only new instances
    for previous in ("orthanc", "redis", "worker", "viewer"):
        shutil.rmtree(state_dir / previous, ignore_errors=True)
    print(f"demo: {len(files)} DICOM files, state in {state_dir}")
    with ExitStack() as services:
        redis_server = _started(services, RedisServer(state_dir / "redis"))
        orthanc = _started(services, OrthancServer(state_dir / "orthanc", redis_url=redis_server.url))
        _started(services, WorkerProcess(state_dir / "worker", redis_url=redis_server.url, orthanc=orthanc,
                                                regions=True))
        print(f"demo: redis on {redis_server.url}, Orthanc on {orthanc.url} (DICOM port {orthanc.dicom_port}), "
              f"one worker (log: {state_dir / 'worker' / 'worker.log'})")  # fmt: skip
        started = time.monotonic()
        push_with_dcmtk(files, orthanc)
        pushed = time.monotonic()
        stored = len(orthanc.get_json("/instances"))
        print(f"demo: pushed {len(files)} files with dcmsend in {pushed - started:.1f} s; Orthanc stored {stored}")
        status = wait_until_indexed(orthanc, stored, timeout_s=300)
        print(f"demo: {status['indexed']} indexed, {status['rejected']} rejected, "
              f"{time.monotonic() - pushed:.1f} s after the push ended ({status['model']})")  # fmt: skip
        for entry in orthanc.get_json("/cbir/rejected")["rejected"]:
            print(f"  rejected {entry['orthanc_id']}: {entry['reason']}: {entry['detail']}")
        draw_contact_sheet(orthanc, state_dir / "preview.png")
        query = similar_images_of_a_ct_slice(orthanc)
        if query is None:
            return 1
        if not store_similar_cases(orthanc, query):
            return 1
        return show_in_ohif(orthanc, query, state_dir / "viewer")


_Service = TypeVar("_Service", RedisServer, OrthancServer, WorkerProcess)


def _started(services: ExitStack, service: _Service) -> _Service:
    """``service`` started, its stop registered first: a signal while it starts stops it too."""
    services.callback(service.stop)
    return service.start()


def wait_until_indexed(orthanc: OrthancServer, stored: int, timeout_s: float) -> dict:
    """Poll ``/cbir/status`` until every stored instance is indexed or rejected."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = orthanc.get_json("/cbir/status")
        if status.get("indexed", 0) + status.get("rejected", 0) >= stored or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def similar_images_of_a_ct_slice(orthanc: OrthancServer) -> str | None:
    """Ask the plugin for the images most similar to the middle slice of the largest series;
    returns that slice's Orthanc id (``None`` when the query failed)."""
    series = max(orthanc.get_json("/series?expand"), key=lambda s: len(s["Instances"]))
    instances = sorted(orthanc.get_json(f"/series/{series['ID']}/instances"),
                       key=lambda i: int(i["MainDicomTags"].get("InstanceNumber", 0) or 0))  # fmt: skip
    middle = instances[len(instances) // 2]
    number = middle["MainDicomTags"].get("InstanceNumber")
    path = f"/cbir/instances/{middle['ID']}/similar?k=5&strategy=hamming"
    status, body, _ = orthanc.request("GET", path)
    if status != 200:
        print(f"demo: GET {path} answered HTTP {status}: {body[:300]!r}")
        return None
    answer = json.loads(body)
    print(f"demo: GET {path}  ({answer['strategy']} over {answer['index_size']} instances, {answer['elapsed_ms']} ms)")
    print(f"  query: {series['MainDicomTags'].get('SeriesDescription', '')} instance {number}  "
          f"{orthanc.url}/instances/{middle['ID']}/preview")  # fmt: skip
    for hit in answer["hits"]:
        tags = orthanc.get_json(f"/instances/{hit['orthanc']['instance']}")["MainDicomTags"]
        print(f"  {hit['rank']}. distance {hit['distance']:.4f}  {hit['Modality']} {hit['SeriesDescription'] or ''} "
              f"instance {tags.get('InstanceNumber')}  {orthanc.url}{hit['thumbnail']}")  # fmt: skip
    return middle["ID"]


def store_similar_cases(orthanc: OrthancServer, query: str) -> bool:
    """``POST /cbir/instances/{query}/similar/series``: the answer as a series in the query's study."""
    path = f"/cbir/instances/{query}/similar/series"
    started = time.monotonic()
    status, body, _ = orthanc.request("POST", path, b"", headers={"X-Cbir-K": "8"}, timeout_s=150)
    if status != 200:
        print(f"demo: POST {path} answered HTTP {status}: {body[:300]!r}")
        return False
    made = json.loads(body)
    print(f"demo: POST {path}: a \"{made['series']['SeriesDescription']}\" series of {made['series']['instances']} "
          f"images in the query's study in {time.monotonic() - started:.1f} s"
          f"{', with a key object selection' if made['kos'] else ''}")  # fmt: skip
    return True


def show_in_ohif(orthanc: OrthancServer, query: str, viewer_state: Path) -> int:
    """Serve OHIF in front of this Orthanc and print where to look; from a terminal, wait for Ctrl-C."""
    study = orthanc.get_json(f"/instances/{query}/study")["MainDicomTags"]["StudyInstanceUID"]
    viewer = ViewerServer(viewer_state, orthanc=orthanc, demo=True)  # loopback: anonymous callers use Orthanc's user
    try:
        try:
            viewer.start()
        except ServiceError as exc:
            print(f"demo: no OHIF viewer ({exc})")
            print(f"demo: results page {orthanc.url}/cbir/ui/instances/{query} (user {orthanc.username}, "
                  f"password {orthanc.password})")  # fmt: skip
            return 0
        print(f"demo: OHIF, the CT study with its \"Similar cases\" series: "
              f"{viewer.url}/viewer?StudyInstanceUIDs={study}")  # fmt: skip
        print(f"demo: OHIF with the Similar panel (click a hit, draw a region): "
              f"{viewer.url}/similar?StudyInstanceUIDs={study}")  # fmt: skip
        print(f"demo: results page of the query slice: {viewer.url}/cbir/ui/instances/{query}")
        if sys.stdin.isatty():
            print("demo: press Ctrl-C to stop everything")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        viewer.stop()
    print("demo: done; everything it started is stopped.")
    return 0


def draw_contact_sheet(orthanc: OrthancServer, out: Path) -> None:
    """Every stored instance through the pixel step, read back over REST, on one PNG."""
    entries = []
    for instance_id in orthanc.get_json("/instances"):
        code, body, _ = orthanc.request("GET", f"/instances/{instance_id}/file")
        if code == 200:
            entries.append(PreviewEntry(label=instance_id, outcome=decode_instance(body)))
    outcomes = Counter("rejected" if isinstance(e.outcome, Rejection) else "image" for e in entries)
    print(f"demo: pixel step: {outcomes['image']} images, {outcomes['rejected']} rejected; "
          f"sheet at {render_sheet(entries, out, columns=8)}")  # fmt: skip


def push_with_dcmtk(files: list[Path], orthanc: OrthancServer) -> None:
    """C-STORE files to Orthanc as a PACS would, with DCMTK's dcmsend (it proposes
    each file's own transfer syntax, compressed ones included)."""
    command = ["dcmsend", "-aet", "CBIR_DEMO", "-aec", orthanc.aet, "--no-halt", "127.0.0.1", str(orthanc.dicom_port)]
    done = subprocess.run(command + [str(f) for f in files], capture_output=True, text=True, timeout=600,
                          env=dcmtk_environment())  # fmt: skip
    if done.returncode not in (0, 22):  # 22: some files were not DICOM or refused (SR of unknown class...)
        raise RuntimeError(f"dcmsend failed ({done.returncode}): {done.stderr[-2000:]}")


def _demo_files(data_dir: Path | None) -> list[Path]:
    if data_dir is not None:
        return sorted(p for p in data_dir.rglob("*") if p.is_file())
    if SHARED_DICOM.is_dir():
        picks = []
        for name in _SHARED_PICKS:
            path = SHARED_DICOM / name
            picks.extend(sorted(path.glob("*.dcm")) if path.is_dir() else [path])
        return [p for p in picks if p.exists()]
    from pydicom.data import get_testdata_file

    # get_testdata_file(name) is a path (str) without read=True; pydicom annotates it str | Dataset | None
    return [Path(get_testdata_file(name)) for name in _PYDICOM_PICKS]  # type: ignore[arg-type]
