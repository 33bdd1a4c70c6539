"""Query latency over a large Redis index: ``hamming`` and ``exact`` beside a bare numpy scan.

    .venv/bin/python benchmarks/search.py [--rows 1000000] [--queries 200]

Starts a private redis-server, fills it with ``--rows`` instances and times queries
server side (from the query's stored vector to the ranked answer with each hit's
record; the query's own embedding is not included).

The rows: augmented copies of the MedNIST training blocks (47,554 real images:
shifted by up to 3 px, intensity x U(0.9, 1.1), Gaussian pixel noise sigma 0.02),
each embedded by the shipped model, so features and codes are the model's own and
the code buckets are as crowded as those of a real archive of that size. Queries
are real images of the held-out blocks. Also printed: recall@10 of ``hamming``
against ``exact``, the candidate fraction, Redis memory per instance, load time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from orthanc_cbir.config import DEFAULT_MODEL  # noqa: E402
from orthanc_cbir.index import IndexInfo, IndexStore  # noqa: E402
from orthanc_cbir.index.records import picture_records  # noqa: E402
from orthanc_cbir.local_services import RedisServer  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402
from orthanc_cbir.search import Query, Searcher, SearchOptions  # noqa: E402
from orthanc_cbir.training.data import block_split, read_mednist  # noqa: E402

MEDNIST = ROOT.parent / "shared" / "data" / "mednist" / "mednist_dev.tar.gz"


def augmented(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, S, S) -> float32 (N, S, S) model inputs: shift <= 3 px, intensity, noise."""
    out = np.empty(images.shape, np.float32)
    for i, (dy, dx) in enumerate(rng.integers(-3, 4, size=(len(images), 2))):
        out[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
    out *= rng.uniform(0.9, 1.1, size=(len(images), 1, 1)).astype(np.float32) / 255.0
    out += rng.normal(0, 0.02, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    embedder = Embedder(DEFAULT_MODEL, batch_size=256)
    mednist = read_mednist(MEDNIST, ROOT / "state" / "cache")
    train_index, validation_index = block_split(mednist)
    query_index = rng.choice(validation_index, size=args.queries, replace=False)
    queries = embedder.embed(mednist.as_float()[query_index])
    info = IndexInfo.from_card(embedder.card)

    with tempfile.TemporaryDirectory(prefix="cbir-bench-") as scratch, RedisServer(Path(scratch)) as server:
        client = redis.Redis.from_url(server.url)
        store = IndexStore(client, info)
        started = time.perf_counter()
        for start in range(0, args.rows, 5000):
            count = min(5000, args.rows - start)
            source = rng.choice(train_index, size=count)
            rows = embedder.embed(augmented(mednist.images[source], rng))
            store.add(picture_records([f"row-{start + i}" for i in range(count)], rows, "bench"))
        load_s = time.perf_counter() - started  # embedding included
        memory = int(client.info("memory")["used_memory"])
        searcher = Searcher(store)
        started = time.perf_counter()
        searcher.snapshot.refresh()
        snapshot_s = time.perf_counter() - started

        runs = {
            "hamming (multi-index)": SearchOptions("hamming", candidates=args.candidates, hamming_search="multi-index"),
            "hamming (code scan)": SearchOptions("hamming", candidates=args.candidates, hamming_search="scan"),
            "exact": SearchOptions("exact"),
        }
        timings: dict[str, list[float]] = {name: [] for name in [*runs, "numpy scan"]}
        answers: dict[str, list[list[str]]] = {name: [] for name in runs}
        examined: dict[str, list[float]] = {name: [] for name in runs}
        matrix = searcher.snapshot.features
        for i in range(args.queries):
            query = Query(queries.features[i], queries.codes[i], {h: p[i] for h, p in queries.probabilities.items()})
            for name, options in runs.items():
                result = searcher.search(query, options)
                timings[name].append(result.elapsed_ms)
                answers[name].append(result.sop_instance_uids)
                examined[name].append(result.examined / result.index_size)
            started = time.perf_counter()
            similarities = matrix @ queries.features[i]
            top = np.argpartition(-similarities, 10)[:10]
            top[np.argsort(-similarities[top])]
            timings["numpy scan"].append((time.perf_counter() - started) * 1000)

    print(f"index: {args.rows:,} instances, embedded and loaded in {load_s:.0f} s ({args.rows / load_s:,.0f}/s), "
          f"Redis {memory / args.rows:,.0f} bytes per instance, searcher snapshot {snapshot_s:.1f} s; "
          f"{args.queries} queries, {args.candidates} candidates re-ranked, model {embedder.version}")  # fmt: skip
    print(f"{'query (server side, k=10)':24s} {'p50 ms':>8s} {'p95 ms':>8s} {'recall@10 vs exact':>19s} {'codes examined':>15s}")
    for name, values in timings.items():
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(answers[name], answers["exact"])]) if name in answers else None
        share = f"{np.mean(examined[name]) * 100:.2f} %" if name in examined else "100 %"
        print(f"{name:24s} {np.percentile(values, 50):8.2f} {np.percentile(values, 95):8.2f} "
              f"{'' if recall is None else f'{recall:.3f}':>19s} {share:>15s}")  # fmt: skip


if __name__ == "__main__":
    main()
