"""Receiving and indexing speed: the standalone SCP (``orthanc-cbir serve``) beside Orthanc with
the plugin, the same files pushed with storescu to each, in one run; and the standalone
server's STOW-RS (dicomweb-client, 32 instances a request) with another copy of the files.
Beside them, in the same run, what each path is measured against: DCMTK's ``storescp`` writing
to a RAM disk (a null receiver: the push's own speed) and Orthanc without the plugin.

    .venv/bin/python benchmarks/scp.py [--copies 4] [--workers 1] [--associations 1] [--receiving-processes 2]

The files are the real 64-slice CT of ../shared/data, ``--copies`` times with new UIDs (so
every copy is a new instance). For each receiver it prints instances/s received (storescu's
push, from its start to its end: what the PACS sees) and instances/s indexed (from the
push's start to the last instance in the index), with ``--workers`` worker threads for the
standalone server (and, in another row, as many ``orthanc-cbir worker`` processes beside
``serve --workers 0``, and once more with ``--receiving-processes`` processes receiving on its port:
``CBIR_SCP_PROCESSES``) and as many ``orthanc-cbir worker`` processes for Orthanc, then each path's
indexing rate as a share of its reference's receiving rate. ``--associations``: storescu processes
pushing at once, each a share of the files, to every receiver alike (a PACS sending a study over
several associations; the kernel hands each to one of a server's receiving processes). DCMTK and Orthanc run with
``TCP_NODELAY=1`` (without it each message waits on Nagle's algorithm: a push ~30x slower).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from orthanc_cbir.local_services import (  # noqa: E402
    OrthancServer,
    RedisServer,
    StandaloneServer,
    WorkerProcess,
    dcmtk_environment,
    free_port,
)

SERIES = (
    ROOT.parent / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"
)


def copies_of_series(files: list[Path], copies: int, out: Path) -> list[Path]:
    """``copies`` studies of the series, each with its own study, series and instance UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for copy in range(copies):
        study, series = generate_uid(), generate_uid()
        for n, source in enumerate(files):
            ds = dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            paths.append(out / f"c{copy:02d}_{n:03d}.dcm")
            ds.save_as(paths[-1])
    return paths


def timed_push(files: list[Path], port: int, aet: str, indexed: Callable[[], int],
               associations: int = 1) -> tuple[float, float]:  # fmt: skip
    """(seconds the storescu pushes took, seconds from their start until ``indexed()`` reaches the file
    count): ``associations`` storescu at once, each sending every ``associations``-th file."""
    started = time.monotonic()
    pushes = [subprocess.Popen(["storescu", "-aet", "BENCH_PACS", "-aec", aet, "127.0.0.1", str(port),
                                *map(str, files[n::associations])], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=dcmtk_environment())  # fmt: skip
              for n in range(associations)]  # fmt: skip
    for push in pushes:
        _, errors = push.communicate(timeout=600)
        if push.returncode:
            sys.exit(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    pushed = time.monotonic()
    while indexed() < len(files):
        if time.monotonic() - pushed > 600:
            sys.exit("not indexed after 600 s")
        time.sleep(0.05)
    return pushed - started, time.monotonic() - started


def timed_stow(files: list[Path], url: str, token: str, indexed: Callable[[], int]) -> tuple[float, float]:
    """Like :func:`timed_push`, with STOW-RS requests of 32 instances each."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(url=url + "/dicom-web", session=session)
    datasets = [dcmread(path) for path in files]
    before = indexed()
    started = time.monotonic()
    for start in range(0, len(datasets), 32):
        client.store_instances(datasets[start:start + 32])
    pushed = time.monotonic()
    while indexed() < before + len(files):
        if time.monotonic() - pushed > 600:
            sys.exit("not indexed after 600 s")
        time.sleep(0.05)
    return pushed - started, time.monotonic() - started


@contextmanager
def null_receiver(out: Path) -> Iterator[int]:
    """DCMTK's ``storescp`` writing each file it receives to ``out`` and doing nothing else; yields its port."""
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "NULL", "-od", str(out), str(port)], env=dcmtk_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["echoscu", "-aec", "NULL", "127.0.0.1", str(port)], capture_output=True,
                             env=dcmtk_environment()).returncode:  # fmt: skip
            if time.monotonic() > deadline:
                sys.exit("storescp did not answer C-ECHO in 10 s")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def indexed_by(server: StandaloneServer) -> Callable[[], int]:
    """How many instances a standalone server has indexed, asked of its ``/cbir/status``."""
    auth = {"Authorization": f"Bearer {server.token}"}
    return lambda: get_json(server.url + "/cbir/status", auth).get("indexed", 0)


def get_json(url: str, headers: dict[str, str]) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--associations", type=int, default=1, help="storescu pushing at once to each receiver")
    parser.add_argument("--receiving-processes", type=int, default=2,
                        help="CBIR_SCP_PROCESSES of the standalone row that receives in several processes")
    args = parser.parse_args()
    together = args.associations
    series = sorted(SERIES.glob("*.dcm"))
    if not series:
        sys.exit(f"no series at {SERIES}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="cbir-scp-") as scratch:
        state = Path(scratch)
        files = copies_of_series(series, args.copies, state)
        (state / "stow").mkdir()
        stow_files = copies_of_series(series, args.copies, state / "stow")
        with ExitStack() as stack:
            redis_server = stack.enter_context(RedisServer(state / "redis-standalone"))
            server = stack.enter_context(StandaloneServer(state / "serve", redis_url=redis_server.url,
                                                          workers=args.workers))  # fmt: skip
            time.sleep(3)  # the workers load the model before the clock starts
            indexed = indexed_by(server)
            results["standalone SCP (orthanc-cbir serve), storescu"] = timed_push(
                files, server.dicom_port, server.aet, indexed, together)
            results["standalone STOW-RS (orthanc-cbir serve), dicomweb-client"] = timed_stow(
                stow_files, server.url, server.token, indexed)
        # the same, its workers as processes of their own: the receiver no longer shares a GIL with them;
        # then receiving in several processes too
        for name, receiving in ((STANDALONE_PROCESSES, 1), (RECEIVING_PROCESSES, args.receiving_processes)):
            with ExitStack() as stack:
                redis_server = stack.enter_context(RedisServer(state / f"redis-processes-{receiving}"))
                server = stack.enter_context(StandaloneServer(state / f"serve-processes-{receiving}", workers=0,
                                                              redis_url=redis_server.url, scp_processes=receiving))
                for n in range(args.workers):
                    stack.enter_context(WorkerProcess(state / f"spool-worker{receiving}-{n}",
                                                      redis_url=redis_server.url, spool_dir=server.spool_dir))
                time.sleep(3)
                results[name] = timed_push(files, server.dicom_port, server.aet, indexed_by(server), together)
        with ExitStack() as stack:
            redis_server = stack.enter_context(RedisServer(state / "redis-orthanc"))
            orthanc = stack.enter_context(OrthancServer(state / "orthanc", redis_url=redis_server.url))
            for n in range(args.workers):
                stack.enter_context(WorkerProcess(state / f"worker{n}", redis_url=redis_server.url, orthanc=orthanc))
            time.sleep(3)
            results["Orthanc + plugin + worker, storescu"] = timed_push(
                files, orthanc.dicom_port, orthanc.aet, lambda: orthanc.get_json("/cbir/status").get("indexed", 0),
                together)
        with OrthancServer(state / "orthanc-alone", redis_url="redis://127.0.0.1:1", with_cbir=False) as alone:
            results[ORTHANC_ALONE] = timed_push(files, alone.dicom_port, alone.aet, lambda: len(files), together)
        ram = Path("/dev/shm") if Path("/dev/shm").is_dir() else state
        with tempfile.TemporaryDirectory(prefix="cbir-null-", dir=ram) as out, null_receiver(Path(out)) as port:
            results[NULL_RECEIVER] = timed_push(files, port, "NULL", lambda: len(files), together)
    print(f"{len(files)} CT instances (512x512, {args.copies} copies of the 64-slice series), {together} storescu "
          f"at once, {args.workers} worker(s):")
    print("| receiver | received instances/s | indexed instances/s |\n|---|---:|---:|")
    for name, (received, indexed) in results.items():
        stored_only = name in (ORTHANC_ALONE, NULL_RECEIVER)
        print(f"| {name} | {len(files) / received:.1f} | {'-' if stored_only else f'{len(files) / indexed:.1f}'} |")
    print("\n| path | indexed / its reference's received |\n|---|---:|")
    for name, reference in (("Orthanc + plugin + worker, storescu", ORTHANC_ALONE),
                            ("standalone SCP (orthanc-cbir serve), storescu", NULL_RECEIVER),
                            (STANDALONE_PROCESSES, NULL_RECEIVER), (RECEIVING_PROCESSES, NULL_RECEIVER)):  # fmt: skip
        print(f"| {name} against {reference} | {results[reference][0] / results[name][1]:.2f}x |")


ORTHANC_ALONE = "Orthanc 1.10 alone (no plugin), storescu"
STANDALONE_PROCESSES = "standalone SCP (orthanc-cbir serve --workers 0) + orthanc-cbir worker processes, storescu"
RECEIVING_PROCESSES = ("standalone SCP in several receiving processes (CBIR_SCP_PROCESSES, serve --workers 0) + "
                       "orthanc-cbir worker processes, storescu")
NULL_RECEIVER = "DCMTK storescp to a RAM disk (null receiver), storescu"


if __name__ == "__main__":
    main()
