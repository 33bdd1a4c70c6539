"""Indexing throughput of the worker processes, 1 to N of them on the same backlog; and, with
``--live``, the live pipeline (storescu push -> Orthanc -> plugin -> stream -> worker -> index).

    .venv/bin/python benchmarks/ingest.py [--workers 1,2,4] [--copies 4] [--threads T]
    .venv/bin/python benchmarks/ingest.py --live [--workers 1] [--copies 1]

The instances are the real 64-slice CT series of ../shared/data (512x512), ``--copies`` times
with new study, series and instance UIDs (so each copy is new to the index).

Default (scaling): starts a private Redis and Orthanc with the plugin and no worker, pushes the
files with storescu as a PACS would (the plugin enqueues each stored instance; the push rate is
printed), then for each worker count k of ``--workers`` (default 1, 2, ... os.cpu_count()): a
fresh, empty Redis database, k ``orthanc-cbir worker`` processes started and waiting on it (model
loaded), the plugin's entries put on its stream in one transaction (the whole backlog waits at
once: the receiver is not what is measured), and the clock runs until every instance is in the
index. Each worker process gets ``--threads`` onnxruntime threads (``CBIR_EMBED_THREADS``, and the
same ``OMP_NUM_THREADS``), by default its fair share: max(1, cores // k). Prints the core count and
a table: workers | threads/worker | instances | seconds | instances/s | speed-up vs 1 worker
(against the first count when 1 is not in the list) | entries per worker process (from their logs),
then the embedder's own images/s at batch 32 for each thread count used.

``--live``: for each worker count, a fresh Redis and Orthanc with k worker processes already
running, the files pushed with storescu; prints how long the push took, how long after it ended
the last instance was indexed, and instances/s from the first byte sent to the last indexed
(``--live --copies 1`` is the 64-slice run this script made before it measured scaling).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from scp import copies_of_series  # noqa: E402  (benchmarks/, the script's own folder)

from orthanc_cbir.config import DEFAULT_MODEL  # noqa: E402
from orthanc_cbir.index import IndexInfo, IndexStore  # noqa: E402
from orthanc_cbir.ingest.queue import STORE, IngestQueue  # noqa: E402
from orthanc_cbir.local_services import OrthancServer, RedisServer, WorkerProcess, dcmtk_environment  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402

SERIES = (
    ROOT.parent / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"
)
TIMEOUT_S = 600
BATCH_LINE = re.compile(r"batch of (\d+):")


def push(files: list[Path], orthanc: OrthancServer) -> None:
    """Send the files to Orthanc with storescu, in one association, as a PACS would."""
    subprocess.run(["storescu", "-aet", "BENCH_PACS", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                    *map(str, files)], check=True, capture_output=True, timeout=TIMEOUT_S,
                   env=dcmtk_environment())  # fmt: skip


def wait_for(condition, what: str, timeout_s: float = TIMEOUT_S, poll_s: float = 0.02) -> float:
    """Poll ``condition()`` until it is true; returns ``time.monotonic()`` then."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.monotonic()


def with_database(url: str, db: int) -> str:
    """The same Redis URL on database ``db``."""
    return url.rsplit("/", 1)[0] + f"/{db}"


def worker_environment(threads: int) -> dict[str, str]:
    """A worker process's thread budget: onnxruntime's intra-op pool and any OpenMP/BLAS pool."""
    return {"CBIR_EMBED_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # fmt: skip


def start_workers(stack: ExitStack, state: Path, count: int, threads: int, redis_url: str,
                  orthanc: OrthancServer) -> list[WorkerProcess]:  # fmt: skip
    workers = []
    for n in range(count):
        worker = WorkerProcess(state / f"worker{n}", redis_url=redis_url, orthanc=orthanc)
        worker.environment.update(worker_environment(threads))
        workers.append(stack.enter_context(worker))
    return workers


def waiting_workers(client: redis.Redis) -> int:
    """Connections to the database of ``client`` that read the stream: workers with their model
    loaded (Redis 7.0 lists a consumer only once a read hands it an entry, so not XINFO CONSUMERS)."""
    db = str(client.connection_pool.connection_kwargs.get("db", 0))
    return sum(1 for c in client.client_list() if c["db"] == db and c["cmd"] in ("xreadgroup", "xautoclaim"))


def entries_per_worker(workers: list[WorkerProcess]) -> list[int]:
    """Stream entries each worker process took, summed from its batch log lines."""
    return [sum(int(m.group(1)) for m in BATCH_LINE.finditer(w.log_path.read_text(errors="replace")))
            for w in workers]  # fmt: skip


def scaling(files: list[Path], counts: list[int], threads: int | None, cores: int, scratch: Path) -> set[int]:
    """The scaling table; returns the thread counts used."""
    total = len(files)
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer(scratch / "redis"))
        orthanc = stack.enter_context(OrthancServer(scratch / "orthanc", redis_url=redis_server.url))
        plugin_db = redis.Redis.from_url(redis_server.url)
        stream = IngestQueue(plugin_db).keys.stream
        started = time.monotonic()
        push(files, orthanc)
        pushed = time.monotonic()

        def plugin_ids() -> list[str]:
            entries = plugin_db.xrange(stream)
            return list(dict.fromkeys(f[b"orthanc_id"].decode() for _, f in entries if f[b"action"] == STORE.encode()))

        wait_for(lambda: len(plugin_ids()) >= total, "the plugin's stream entries")
        ids = plugin_ids()
        print(f"{total} CT instances (512x512, {total // 64} copies of the 64-slice series) pushed to Orthanc with "
              f"storescu in {pushed - started:.2f} s ({total / (pushed - started):.1f} instances/s), "
              f"{len(ids)} entries enqueued by the plugin; no worker running")  # fmt: skip

        db_url = with_database(redis_server.url, 1)  # each round: this database, flushed
        client = redis.Redis.from_url(db_url)
        store = IndexStore(client, IndexInfo.for_model(DEFAULT_MODEL))
        queue = IngestQueue(client)
        rows, used = [], set()
        for k in counts:
            share = threads or max(1, cores // k)
            used.add(share)
            client.flushdb()
            queue.ensure_group()
            with ExitStack() as round_stack:
                workers = start_workers(round_stack, scratch / f"round{k}", k, share, db_url, orthanc)
                # every worker has loaded the model and is waiting on the stream before the clock starts
                wait_for(lambda k=k: waiting_workers(client) >= k, "workers ready", 120, 0.1)
                time.sleep(0.5)
                pipe = client.pipeline(transaction=True)  # the backlog appears at once
                for orthanc_id in ids:
                    pipe.xadd(queue.keys.stream, {"action": STORE, "orthanc_id": orthanc_id})
                start = time.monotonic()
                pipe.execute()
                done = wait_for(lambda: store.count() + queue.counts()["rejected"] >= len(ids), f"{k} worker(s)")
                seconds = done - start
                indexed, rejected = store.count(), queue.counts()["rejected"]
            split = entries_per_worker(workers)  # after the round: the logs are complete
            rows.append((k, share, indexed, rejected, seconds, split))

    print(f"\ncores (os.cpu_count()): {cores}")
    base = next((r for r in rows if r[0] == 1), rows[0])
    header = ("workers", "threads/worker", "instances", "seconds", "instances/s", f"speed-up vs {base[0]} worker",
              "entries per worker")  # fmt: skip
    table = [header]
    for k, share, indexed, rejected, seconds, split in rows:
        rate = indexed / seconds
        table.append((str(k), str(share), f"{indexed}" + (f" (+{rejected} rejected)" if rejected else ""),
                      f"{seconds:.2f}", f"{rate:.1f}", f"{rate / (base[2] / base[4]):.2f}x",
                      "/".join(map(str, split))))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("-|-".join("-" * w for w in widths))
    return used


def live(files: list[Path], counts: list[int], threads: int | None, cores: int, scratch: Path) -> set[int]:
    """The live pipeline, workers running while storescu pushes; returns the thread counts used."""
    used = set()
    for k in counts:
        share = threads or max(1, cores // k)
        used.add(share)
        with ExitStack() as stack:
            state = scratch / f"live{k}"
            redis_server = stack.enter_context(RedisServer(state / "redis"))
            orthanc = stack.enter_context(OrthancServer(state / "orthanc", redis_url=redis_server.url))
            start_workers(stack, state, k, share, redis_server.url, orthanc)
            time.sleep(3)  # let the workers load the model before the clock starts
            started = time.monotonic()
            push(files, orthanc)
            pushed = time.monotonic()
            done = wait_for(lambda orthanc=orthanc: orthanc.get_json("/cbir/status").get("indexed", 0) >= len(files),
                            "indexed", 300, 0.05)  # fmt: skip
        print(f"{len(files)} CT slices (512x512), {k} worker(s) x {share} thread(s): "
              f"push took {pushed - started:.2f} s, last slice indexed {done - pushed:.2f} s after the push ended; "
              f"{len(files) / (done - started):.1f} instances/s from first byte to last indexed")  # fmt: skip
    return used


def embedder_rate(threads: int) -> float:
    """The embedder alone: images/s at batch 32 with ``threads`` onnxruntime threads."""
    embedder = Embedder(threads=threads)
    batch = np.random.default_rng(0).random((32, 64, 64), dtype=np.float32)
    embedder.embed(batch)
    t = time.perf_counter()
    for _ in range(20):
        embedder.embed(batch)
    return 20 * 32 / (time.perf_counter() - t)


def worker_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts are positive integers, comma-separated (1,2,4)")
    return counts


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=worker_counts, default=None,
                        help=f"worker process counts, comma-separated (default 1..{cores}: 1..os.cpu_count(); "
                             "with --live: 1)")  # fmt: skip
    parser.add_argument("--copies", type=int, default=None,
                        help="copies of the 64-slice series, each with new UIDs (default 4; with --live: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads per worker process (default: max(1, cores // workers))")
    parser.add_argument("--live", action="store_true", help="push with the workers running (the live pipeline)")
    args = parser.parse_args()
    counts = args.workers or ([1] if args.live else list(range(1, cores + 1)))
    copies = args.copies or (1 if args.live else 4)
    series = sorted(SERIES.glob("*.dcm"))
    if not series:
        sys.exit(f"no series at {SERIES}")

    with tempfile.TemporaryDirectory(prefix="cbir-ingest-") as scratch:
        files = copies_of_series(series, copies, Path(scratch) / "files")
        used = (live if args.live else scaling)(files, counts, args.threads, cores, Path(scratch))
    print("embedder alone, batch 32: " + ", ".join(f"{embedder_rate(t):,.0f} images/s with {t} thread(s)"
                                                   for t in sorted(used)))  # fmt: skip


if __name__ == "__main__":
    main()
