"""Query load while ingesting: concurrent similarity queries against a live server while storescu
keeps pushing new series.

    .venv/bin/python benchmarks/load.py [--clients 8] [--duration 20] [--workers 1] [--standalone]

Starts a private Redis, Orthanc (with the plugin) and ``--workers`` ``orthanc-cbir worker``
processes (with ``--standalone``: ``orthanc-cbir serve`` with ``--workers`` worker threads
instead), indexes one copy of the real 64-slice CT of ../shared/data (synthetic slices if it is
missing), then for ``--duration`` seconds runs ``--clients`` threads that each send
``GET /cbir/instances/{uid}/similar?k=10&strategy=S`` back to back (a random indexed instance, a
random strategy of ``--strategies``) while a storescu loop pushes further copies of the series
(new study, series and instance UIDs each time). Prints queries/s, p50/p95/p99 latency (overall
and per strategy), errors, and instances pushed and indexed per second during the window.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import requests
from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
sys.path.insert(0, str(ROOT))
from orthanc_cbir.local_services import (  # noqa: E402
    OrthancServer,
    RedisServer,
    StandaloneServer,
    WorkerProcess,
    dcmtk_environment,
)

SERIES = (
    ROOT.parent / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"
)
STRATEGIES = ("graph", "exact", "hamming", "class", "cluster", "multilateral")


def source_series(scratch: Path) -> tuple[list[Path], str]:
    files = sorted(SERIES.glob("*.dcm"))
    if files:
        return files, "the 64-slice CT (512x512) of ../shared/data"
    from tests.integration.pushing import synthetic_series

    return synthetic_series(scratch / "synthetic", slices=64, size=256, texture=5), "64 synthetic slices (256x256)"


def copy_series(files: list[Path], out: Path) -> tuple[list[Path], list[str]]:
    """One copy of the series with new study, series and instance UIDs: (paths, SOPInstanceUIDs)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths, uids = [], []
    for n, source in enumerate(files):
        ds = dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(out / f"{n:03d}.dcm")
        uids.append(str(ds.SOPInstanceUID))
        ds.save_as(paths[-1])
    return paths, uids


def storescu(files: list[Path], port: int, aet: str) -> None:
    subprocess.run(["storescu", "-aet", "LOAD_PACS", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, timeout=600, env=dcmtk_environment())  # fmt: skip


class Target:
    """Where the queries go: a base URL, a session maker and the index count."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None,
                 dicom_port: int = 0, aet: str = ""):  # fmt: skip
        self.url, self.auth, self.headers, self.dicom_port, self.aet = url, auth, headers or {}, dicom_port, aet

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = self.auth
        session.headers.update(self.headers)
        return session

    def indexed(self) -> int:
        return int(self.session().get(self.url + "/cbir/status", timeout=30).json().get("indexed", 0))


def wait_indexed(target: Target, count: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while target.indexed() < count:
        if time.monotonic() > deadline:
            sys.exit(f"not {count} indexed after {timeout_s:.0f} s")
        time.sleep(0.2)


def run_load(target: Target, uids: list[str], strategies: list[str], clients: int, duration_s: float,
             copies: list[list[Path]]) -> dict:  # fmt: skip
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    reasons: dict[str, int] = defaultdict(int)
    pushed = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = target.session()
        mine: dict[str, list[float]] = defaultdict(list)
        failed: dict[str, int] = defaultdict(int)
        why: dict[str, int] = defaultdict(int)
        while not stop.is_set():
            strategy = rng.choice(strategies)
            url = f"{target.url}/cbir/instances/{rng.choice(uids)}/similar?k=10&strategy={strategy}"
            started = time.perf_counter()
            try:
                answer = session.get(url, timeout=60)
                ok = answer.status_code == 200
                reason = f"HTTP {answer.status_code}: {answer.text[:120]!r}"
            except requests.RequestException as exc:
                ok, reason = False, type(exc).__name__
            if stop.is_set():  # finished after the window: not counted
                break
            if ok:
                mine[strategy].append(time.perf_counter() - started)
            else:
                failed[strategy] += 1
                why[f"{strategy}: {reason}"] += 1
        with lock:
            for strategy, values in mine.items():
                latencies[strategy] += values
            for strategy, count in failed.items():
                errors[strategy] += count
            for reason, count in why.items():
                reasons[reason] += count

    def pusher() -> None:
        for files in copies:
            if stop.is_set():
                return
            storescu(files, target.dicom_port, target.aet)
            if not stop.is_set():  # a push that ends after the window is not counted
                pushed[0] += len(files)
        print(f"warning: the {len(copies)} prepared copies were all pushed before the end", file=sys.stderr)

    before = target.indexed()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    push_thread = threading.Thread(target=pusher, daemon=True)
    started = time.monotonic()
    push_thread.start()
    for thread in threads:
        thread.start()
    time.sleep(duration_s)
    stop.set()
    elapsed = time.monotonic() - started
    indexed = target.indexed() - before
    for thread in threads:
        thread.join(timeout=90)
    push_thread.join(timeout=600)  # the storescu in flight ends (it is not counted)
    return {"latencies": latencies, "errors": errors, "reasons": reasons, "elapsed": elapsed, "indexed": indexed,
            "pushed": pushed[0]}


def percentiles(values: list[float]) -> str:
    if not values:
        return "- | - | -"
    p50, p95, p99 = np.percentile(np.array(values) * 1000, [50, 95, 99])
    return f"{p50:.1f} | {p95:.1f} | {p99:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent query threads (default 8)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of load (default 20)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (threads with --standalone)")
    parser.add_argument("--standalone", action="store_true", help="orthanc-cbir serve instead of Orthanc + plugin")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated mix (default: all six)")
    parser.add_argument("--copies", type=int, default=16, help="series copies prepared for the push loop (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix="cbir-load-") as scratch, ExitStack() as stack:
        state = Path(scratch)
        files, what = source_series(state)
        first, uids = copy_series(files, state / "indexed")
        copies = [copy_series(files, state / f"copy{n:02d}")[0] for n in range(args.copies)]
        redis_server = stack.enter_context(RedisServer(state / "redis"))
        if args.standalone:
            server = stack.enter_context(StandaloneServer(state / "serve", redis_url=redis_server.url,
                                                          workers=args.workers))  # fmt: skip
            target = Target(server.url, headers={"Authorization": f"Bearer {server.token}"},
                            dicom_port=server.dicom_port, aet=server.aet)  # fmt: skip
            receiver = f"orthanc-cbir serve ({args.workers} worker thread(s))"
        else:
            orthanc = stack.enter_context(OrthancServer(state / "orthanc", redis_url=redis_server.url))
            for n in range(args.workers):
                stack.enter_context(WorkerProcess(state / f"worker{n}", redis_url=redis_server.url, orthanc=orthanc))
            target = Target(orthanc.url, auth=orthanc.auth, dicom_port=orthanc.dicom_port, aet=orthanc.aet)
            receiver = f"Orthanc + plugin + {args.workers} orthanc-cbir worker process(es)"
        storescu(first, target.dicom_port, target.aet)
        wait_indexed(target, len(first))
        for strategy in strategies:  # warm up: the first query of a strategy builds what it needs
            target.session().get(f"{target.url}/cbir/instances/{uids[0]}/similar?k=10&strategy={strategy}", timeout=120)
        result = run_load(target, uids, strategies, args.clients, args.duration, copies)

    latencies, errors, elapsed = result["latencies"], result["errors"], result["elapsed"]
    every = [v for values in latencies.values() for v in values]
    print(f"{receiver}; {args.clients} query clients for {elapsed:.1f} s, GET /cbir/instances/{{uid}}/similar?k=10 "
          f"over {len(uids)} indexed instances of {what}, strategies {','.join(strategies)}; "
          f"storescu pushing copies of the series meanwhile")  # fmt: skip
    print(f"queries: {len(every)} ok ({len(every) / elapsed:.1f}/s), {sum(errors.values())} errors; "
          f"ingest during the window: {result['pushed']} instances pushed ({result['pushed'] / elapsed:.1f}/s), "
          f"{result['indexed']} indexed ({result['indexed'] / elapsed:.1f}/s)")  # fmt: skip
    print("| strategy | queries | errors | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    for strategy in strategies:
        print(f"| {strategy} | {len(latencies[strategy])} | {errors[strategy]} | {percentiles(latencies[strategy])} |")
    print(f"| all | {len(every)} | {sum(errors.values())} | {percentiles(every)} |")
    for reason, count in sorted(result["reasons"].items(), key=lambda item: -item[1])[:5]:
        print(f"error x{count}: {reason}")


if __name__ == "__main__":
    main()
