"""Indexing speed of the live pipeline: storescu push -> Orthanc -> plugin -> stream -> worker -> index.

    .venv/bin/python benchmarks/ingest.py [--workers 1]

Starts a private Redis, Orthanc (with the plugin) and ``--workers`` worker
processes, pushes the real 64-slice CT series of ../shared/data with storescu as
a PACS would, and prints how long after the push ended the last slice was
indexed, and instances/s from the first byte sent to the last slice indexed,
beside the embedder's own images/s in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from orthanc_cbir.local_services import OrthancServer, RedisServer, WorkerProcess  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402

SERIES = ROOT.parent / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    files = sorted(SERIES.glob("*.dcm"))
    if not files:
        sys.exit(f"no series at {SERIES}")

    with tempfile.TemporaryDirectory(prefix="cbir-ingest-") as scratch, ExitStack() as stack:
        state = Path(scratch)
        redis_server = stack.enter_context(RedisServer(state / "redis"))
        orthanc = stack.enter_context(OrthancServer(state / "orthanc", redis_url=redis_server.url))
        for n in range(args.workers):
            stack.enter_context(WorkerProcess(state / f"worker{n}", redis_url=redis_server.url, orthanc=orthanc))
        time.sleep(3)  # let the workers load the model before the clock starts
        started = time.monotonic()
        subprocess.run(["storescu", "-aet", "BENCH_PACS", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                        *map(str, files)], check=True, capture_output=True, timeout=300)  # fmt: skip
        pushed = time.monotonic()
        while orthanc.get_json("/cbir/status").get("indexed", 0) < len(files):
            if time.monotonic() - pushed > 300:
                sys.exit("not indexed after 300 s")
            time.sleep(0.05)
        done = time.monotonic()

    embedder = Embedder()
    batch = np.random.default_rng(0).random((32, 64, 64), dtype=np.float32)
    embedder.embed(batch)
    t = time.perf_counter()
    for _ in range(20):
        embedder.embed(batch)
    embed_rate = 20 * 32 / (time.perf_counter() - t)
    print(f"{len(files)} CT slices (512x512), {args.workers} worker(s): push took {pushed - started:.2f} s, "
          f"last slice indexed {done - pushed:.2f} s after the push ended; "
          f"{len(files) / (done - started):.1f} instances/s from first byte to last indexed; "
          f"embedder alone {embed_rate:,.0f} images/s at batch 32")  # fmt: skip


if __name__ == "__main__":
    main()
