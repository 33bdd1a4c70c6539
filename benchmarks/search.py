"""Query latency over a large Redis index: ``hamming`` and ``exact`` beside a bare numpy scan.

    .venv/bin/python benchmarks/search.py [--rows 1000000] [--queries 200]

Starts a private redis-server, fills it with ``--rows`` instances and times queries
server side (from the query's stored vector to the ranked answer with each hit's
record; the query's own embedding is not included).

The rows: the shipped model embeds the MedNIST training blocks (47,554 real
images); each indexed row is one of them with Gaussian noise on its features
(sigma 0.02 per dimension, renormalised) and 5 % of its appearance bits flipped,
so the code buckets are as crowded as a real archive's of that size. Queries are
the held-out blocks' real embeddings. Also printed: recall@10 of ``hamming``
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
from orthanc_cbir.index import IndexInfo, IndexRecord, IndexStore  # noqa: E402
from orthanc_cbir.index.records import picture_metadata  # noqa: E402
from orthanc_cbir.local_services import RedisServer  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402
from orthanc_cbir.search import Query, Searcher, SearchOptions  # noqa: E402
from orthanc_cbir.training.data import block_split, read_mednist  # noqa: E402

MEDNIST = ROOT.parent / "shared" / "data" / "mednist" / "mednist_dev.tar.gz"


def synthetic_rows(features, codes, appearance: slice, rows: int, rng):
    """``rows`` (features, codes) pairs near the real ones (see the module docstring)."""
    source = rng.integers(0, len(features), size=rows)
    noisy = features[source] + rng.normal(0, 0.02, size=(rows, features.shape[1])).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    bits = np.unpackbits(codes[source], axis=1)
    flips = rng.random((rows, appearance.stop - appearance.start)) < 0.05
    bits[:, appearance] ^= flips.astype(np.uint8)
    return source, noisy.astype(np.float32), np.packbits(bits, axis=1)


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
    gallery = embedder.embed(mednist.as_float()[train_index])
    query_index = rng.choice(validation_index, size=args.queries, replace=False)
    queries = embedder.embed(mednist.as_float()[query_index])
    info = IndexInfo.from_card(embedder.card)
    appearance = next(s for s in info.layout.sub_codes if s.name == "appearance")
    span = slice(appearance.start, appearance.start + appearance.length)

    with tempfile.TemporaryDirectory(prefix="cbir-bench-") as scratch, RedisServer(Path(scratch)) as server:
        client = redis.Redis.from_url(server.url)
        store = IndexStore(client, info)
        started = time.perf_counter()
        for start in range(0, args.rows, 5000):
            count = min(5000, args.rows - start)
            source, features, codes = synthetic_rows(gallery.features, gallery.codes, span, count, rng)
            store.add([
                IndexRecord(picture_metadata(f"row-{start + i}", "bench"), features[i], codes[i],
                            {h: p[source[i]] for h, p in gallery.probabilities.items()})
                for i in range(count)
            ])  # fmt: skip
        load_s = time.perf_counter() - started
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

    print(f"index: {args.rows:,} instances, loaded in {load_s:.0f} s ({args.rows / load_s:,.0f}/s), "
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
