"""Query latency, recall@10 and memory against index size: every strategy beside numpy and FAISS.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/query_scale.py [--sizes 10000,100000,1000000] [--queries 200]
        [--candidates auto,3000,4000,6000] [--out docs/query_scale.md]

For each size N the script starts a private redis-server, fills it with N instances
through ``IndexStore.add`` (each with a realistic CT / MR / CR metadata record) and
times ``Searcher.search`` one query at a time (``time.perf_counter`` around the call,
hits' records read: what a client waits for, minus the query's own embedding) for
each strategy: ``graph`` (the default), ``exact``, ``hamming`` with the code scan and
with the multi-index (per ``--candidates``), ``class``, ``multilateral``, and ``cluster``
where the offline ``recluster`` is affordable (``--cluster-up-to``). These answers list
every stored row (``copies=False``): rows interpolated from one real pair lie closer
than two copies of one picture may (``COPY_DISTANCE``) and would be folded into one hit
as copies; the default answer, one hit per picture, is timed in its own rows against
``exact``'s answer folded the same way, as are filters keeping 1% and 10% of the rows.
The strategies take turns query by query; the default is then timed again alone, its
queries one after another (``timed alone``): taking turns leaves each answer cold caches
and an idle Redis, which on a VM costs an answer that reads Redis after its ranking more
than the answer itself. So is the default's ranking on the snapshot as it stands (no
Redis read: the work a library's search does). Then, in the same run and over the same
float32 vectors and packed codes, the baselines: a numpy brute-force scan, FAISS
``IndexFlatL2``, FAISS ``IndexHNSWFlat`` and ``IndexHNSWSQ`` (8-bit, its vectors padded
with zeros to a multiple of 8 dimensions, where FAISS's SIMD code applies, as the
product's graph's are) and hnswlib (the graph libraries, M 32, efConstruction 64, built
with one ``add`` of every row; each also timed alone), and FAISS ``IndexBinaryFlat`` /
``IndexBinaryMultiHash`` taking the top C by Hamming distance and re-ranking those
C by float32 distance (the same coarse-to-fine work as ``hamming``). Everything runs
on one thread: FAISS's OpenMP, hnswlib and numpy's OpenBLAS (``OPENBLAS_NUM_THREADS=1``
unless set otherwise), so latencies are per core and the baselines compare evenly.

The rows: the shipped model's outputs (features, code logits, class logits) for the
47,554 MedNIST training images, plus synthetic rows up to N, each interpolated
SMOTE-style between a real training row and one of its 10 nearest real neighbours
(features renormalised; code and class logits interpolated with the same weight, so
the code bits are those the model would give: its code logits are nearly linear in
its features). Below 47,554 rows, a random subset of the real ones. The queries are
real held-out MedNIST images, never in the index. Printed first, a check that growing
a set this way looks to the queries like growing it with real images: 1/4 and 1/20 of
the real rows grown back to 47,554 by interpolation, next to the real 47,554 (the
10^6 index is 1/21 real).

Reported per size and method: p50 / p95 latency in ms; recall@10 against the exact
float32 top 10 (a hit counts when its float32 similarity to the query reaches the
exact 10th one, so byte-identical duplicates tie rather than miss); bytes per
instance (Redis ``used_memory`` growth for the index, the searcher's snapshot as RSS
growth in the notes; for the baselines the index's RSS growth, plus the float32 vectors
where they re-rank). Written as a markdown table (``--out``) and a log-log plot of p50
against N beside it (.png).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as dt
import gc
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# One BLAS thread, like FAISS: on a busy two-core machine a second thread that cannot get
# a core costs a scheduler slice (~8 ms) per product. Set before numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import faiss
import hnswlib
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from orthanc_cbir.config import DEFAULT_MODEL  # noqa: E402
from orthanc_cbir.dicom.metadata import InstanceMetadata  # noqa: E402
from orthanc_cbir.evaluation.metrics import code_statistics, recall_vs_exact  # noqa: E402
from orthanc_cbir.index import IndexInfo, IndexRecord, IndexStore  # noqa: E402
from orthanc_cbir.index.graph import (  # noqa: E402
    BUILD_BATCH,
    EF_CONSTRUCTION,
    GRAPH_M,
    ef_search,
    padded_dimension,
)
from orthanc_cbir.index.graph_file import GraphFiles  # noqa: E402
from orthanc_cbir.local_services import RedisServer  # noqa: E402
from orthanc_cbir.model.codes import pack_codes  # noqa: E402
from orthanc_cbir.model.embedder import CLASS_LOGITS_PREFIX, CODE_LOGITS, FEATURES, INPUT_NAME, Embedder  # noqa: E402
from orthanc_cbir.search import Filters, Query, Searcher, SearchOptions  # noqa: E402
from orthanc_cbir.search.clustering import recluster  # noqa: E402
from orthanc_cbir.training.data import MEDNIST_CLASSES, block_split, read_mednist  # noqa: E402

MEDNIST = ROOT.parent / "shared" / "data" / "mednist" / "mednist_dev.tar.gz"
CACHE = ROOT / "state" / "cache"
K = 10
NEIGHBOURS = 10
"""Real nearest neighbours a synthetic row may be interpolated towards."""
CHUNK = 20_000
"""Rows generated (and turned into records) at a time."""
ADD_BATCH = 2_000
"""Records per ``IndexStore.add`` call."""
EF_SEARCHES = (32, 64, 128)
"""The graph libraries' efSearch settings timed."""
TIE = 1e-6
"""Similarity slack when a hit is compared with the exact 10th (float32 summation order)."""


# -- the rows: the model's outputs on MedNIST, and synthetic ones like them -------------------------


@dataclass
class Rows:
    """Model outputs for some images (real or synthetic), one row each."""

    features: np.ndarray
    """float32 (n, D), L2-normalised."""
    code_logits: np.ndarray
    """float32 (n, B): code bit = logit > 0."""
    class_logits: dict[str, np.ndarray]
    """Per label head, float32 (n, classes)."""
    fine_class: np.ndarray
    """int (n,): the MedNIST class of the row (of its first parent for a synthetic row)."""

    def __len__(self) -> int:
        return len(self.features)

    def take(self, index) -> Rows:
        return Rows(self.features[index], self.code_logits[index], {h: v[index] for h, v in self.class_logits.items()},
                    self.fine_class[index])  # fmt: skip

    @property
    def codes(self) -> np.ndarray:
        return pack_codes(self.code_logits)

    @property
    def probabilities(self) -> dict[str, np.ndarray]:
        return {head: softmax(logits) for head, logits in self.class_logits.items()}

    def queries(self) -> list[Query]:
        """One :class:`Query` per row, as the model would have asked it."""
        codes, probabilities = self.codes, self.probabilities
        return [Query(self.features[i], codes[i], {h: p[i] for h, p in probabilities.items()})
                for i in range(len(self))]  # fmt: skip


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def embed_mednist(embedder: Embedder) -> tuple[Rows, np.ndarray, np.ndarray]:
    """Every MedNIST image through the model (cached under state/cache by model hash);
    returns the rows and the training / held-out indices of :func:`block_split`."""
    stat = MEDNIST.stat()
    cache = CACHE / f"mednist-outputs-{embedder.card.sha256[:12]}-{stat.st_size}-{int(stat.st_mtime)}.npz"
    if not cache.exists():
        mednist = read_mednist(MEDNIST, CACHE)
        train, held_out = block_split(mednist)
        heads = list(embedder.card.labels)
        names = [FEATURES, CODE_LOGITS] + [CLASS_LOGITS_PREFIX + h for h in heads]
        inputs = mednist.as_float()
        parts = [embedder.session.run(names, {INPUT_NAME: inputs[s : s + 256]}) for s in range(0, len(inputs), 256)]
        outputs = {name: np.concatenate([p[n] for p in parts]).astype(np.float32) for n, name in enumerate(names)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, fine_class=mednist.fine_class, train=train, held_out=held_out, **outputs)
    saved = np.load(cache)
    heads = [name.removeprefix(CLASS_LOGITS_PREFIX) for name in saved.files if name.startswith(CLASS_LOGITS_PREFIX)]
    rows = Rows(saved[FEATURES], saved[CODE_LOGITS], {h: saved[CLASS_LOGITS_PREFIX + h] for h in heads},
                saved["fine_class"])  # fmt: skip
    return rows, saved["train"], saved["held_out"]


def nearest_real(features: np.ndarray, count: int) -> np.ndarray:
    """(n, count) indices of each row's nearest other rows by cosine similarity."""
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    _, found = index.search(features, count + 1)
    return np.stack([row[row != i][:count] for i, row in enumerate(found)])


def synthetic(real: Rows, neighbours: np.ndarray, count: int, rng: np.random.Generator) -> Rows:
    """``count`` rows, each a random point on the segment from a real row to one of its neighbours."""
    i = rng.integers(len(real), size=count)
    j = neighbours[i, rng.integers(neighbours.shape[1], size=count)]
    t = rng.random((count, 1), dtype=np.float32)

    def between(values: np.ndarray) -> np.ndarray:
        return values[i] + t * (values[j] - values[i])

    features = between(real.features)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return Rows(features, between(real.code_logits), {h: between(v) for h, v in real.class_logits.items()},
                real.fine_class[i])  # fmt: skip


def index_rows(real: Rows, neighbours: np.ndarray, size: int, rng: np.random.Generator) -> Iterator[Rows]:
    """The N rows of an index, in chunks: a random subset of the real rows when N is
    smaller than them, else all of them and N - len(real) synthetic rows."""
    if size <= len(real):
        chosen = np.sort(rng.choice(len(real), size=size, replace=False))
        for start in range(0, size, CHUNK):
            yield real.take(chosen[start : start + CHUNK])
        return
    for start in range(0, len(real), CHUNK):
        yield real.take(slice(start, start + CHUNK))
    for start in range(len(real), size, CHUNK):
        yield synthetic(real, neighbours, min(CHUNK, size - start), rng)


def grown(real: Rows, share: int, rng: np.random.Generator) -> Rows:
    """A random 1/``share`` of ``real`` plus synthetic rows interpolated within it, as many rows as ``real``."""
    seed = real.take(np.sort(rng.choice(len(real), size=len(real) // share, replace=False)))
    extra = synthetic(seed, nearest_real(seed.features, NEIGHBOURS), len(real) - len(seed), rng)
    return Rows(np.concatenate([seed.features, extra.features]), np.concatenate([seed.code_logits, extra.code_logits]),
                {h: np.concatenate([v, extra.class_logits[h]]) for h, v in seed.class_logits.items()},
                np.concatenate([seed.fine_class, extra.fine_class]))  # fmt: skip


def mimic_check(real: Rows, queries: Rows, rng: np.random.Generator) -> list[str]:
    """How sets grown by interpolation look to the queries next to the real set of the same
    size: distance to the 1st / 10th nearest row, Hamming coarse-to-fine recall (pools of
    0.5 / 1 / 2 % re-ranked), distinct codes, mean bucket size, bit imbalance."""
    sets = {f"real ({len(real):,})": real, **{f"1/{g} real + synthetic": grown(real, g, rng) for g in (4, 20)}}
    lines = [f"Grown sets against the real one, {len(real):,} rows each, seen from the {len(queries)} queries:", "",
             "| set | distance to 1st NN | to 10th NN | hamming recall@10, pool 0.5 / 1 / 2 % | distinct codes "
             "| mean bucket | bit imbalance |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in sets.items():
        similarity = queries.features @ rows.features.T
        top = -np.sort(-np.partition(similarity, -K, axis=1)[:, -K:], axis=1)
        distance = np.sqrt(np.maximum(2 - 2 * top, 0)).mean(axis=0)
        recall = recall_vs_exact(queries.features, queries.codes, rows.features, rows.codes, (0.005, 0.01, 0.02))
        stats = code_statistics(rows.codes)
        lines.append(f"| {name} | {distance[0]:.3f} | {distance[-1]:.3f} | "
                     f"{' / '.join(f'{v:.3f}' for v in recall.values())} | {stats['distinct_codes']:,} | "
                     f"{stats['mean_bucket_size']:.2f} | {stats['bit_imbalance']:.3f} |")  # fmt: skip
    return lines


# -- the index in Redis ----------------------------------------------------------------------------

UID_ROOT = "1.2.826.0.1.3680043.8.498.7214930586"
"""Instance UIDs are ``UID_ROOT.<kind>.<number>``: DICOM-like lengths (50-60 characters)."""
SCANNERS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "Canon Medical Systems")
STUDY_TYPES = {  # MedNIST class -> (modality, SOP class, body part, study, series, rows, spacing mm)
    "AbdomenCT": ("CT", "1.2.840.10008.5.1.4.1.1.2", "ABDOMEN", "CT ABDOMEN PELVIS W CONTR", "AX 5mm STND", 512, 0.78),
    "BreastMRI": ("MR", "1.2.840.10008.5.1.4.1.1.4", "BREAST", "MRI BREAST BILATERAL W WO", "AX T1 FS POST", 448, 0.8),
    "CXR": ("CR", "1.2.840.10008.5.1.4.1.1.1", "CHEST", "XR CHEST 2 VIEWS", "PA", 2500, 0.15),
    "ChestCT": ("CT", "1.2.840.10008.5.1.4.1.1.2", "CHEST", "CT CHEST WO CONTRAST", "AX LUNG 1.25mm", 512, 0.7),
    "Hand": ("CR", "1.2.840.10008.5.1.4.1.1.1", "HAND", "XR HAND 3+ VIEWS LEFT", "PA", 2000, 0.1),
    "HeadCT": ("CT", "1.2.840.10008.5.1.4.1.1.2", "HEAD", "CT HEAD WO CONTRAST", "AX BRAIN 5mm", 512, 0.45),
}
SERIES_SIZE, SERIES_PER_STUDY, STUDIES_PER_PATIENT = 60, 3, 2


def uid(kind: int, number: int) -> str:
    return f"{UID_ROOT}.{kind}.{number}"


def row_of(sop_instance_uid: str) -> int:
    return int(sop_instance_uid.rsplit(".", 1)[1])


def records(rows: Rows, first: int, rng: np.random.Generator) -> list[IndexRecord]:
    """Index records for rows numbered from ``first``: consecutive rows share a series,
    series a study, studies a patient; the metadata follows each row's MedNIST class."""
    class_names = sorted(MEDNIST_CLASSES)
    codes, probabilities = rows.codes, rows.probabilities
    sexes = rng.choice(["F", "M"], size=len(rows))
    ages = np.round(rng.uniform(18, 90, size=len(rows)), 3)
    days = rng.integers(0, 3650, size=len(rows))
    out = []
    for n in range(len(rows)):
        row = first + n
        series = row // SERIES_SIZE
        study = series // SERIES_PER_STUDY
        kind = STUDY_TYPES[class_names[rows.fine_class[n]]]
        modality, sop_class, body_part, study_text, series_text, size, spacing = kind
        volume = modality != "CR"
        metadata = InstanceMetadata(
            sop_instance_uid=uid(3, row), series_instance_uid=uid(2, series), study_instance_uid=uid(1, study),
            sop_class_uid=sop_class, modality=modality, body_part_examined=body_part, study_description=study_text,
            series_description=series_text, patient_sex=str(sexes[n]), patient_age_years=float(ages[n]),
            study_date=dt.date(2015, 1, 1) + dt.timedelta(days=int(days[n])), manufacturer=SCANNERS[study % 4],
            rows=size, columns=size, number_of_frames=1, pixel_spacing_mm=(spacing, spacing),
            slice_location=float(row % SERIES_SIZE) * 2.5 if volume else None,
            image_position_patient=(-200.0, -180.5, float(row % SERIES_SIZE) * 2.5) if volume else None,
            patient_key=hashlib.sha256(str(study // STUDIES_PER_PATIENT).encode()).hexdigest()[:16],
        )  # fmt: skip
        out.append(IndexRecord(metadata, rows.features[n], codes[n], {h: p[n] for h, p in probabilities.items()}))
    return out


@dataclass
class Index:
    """One size's rows: in Redis, and as the float32 vectors and packed codes the baselines scan."""

    features: np.ndarray
    codes: np.ndarray
    load_s: float
    redis_bytes: int
    nearest: np.ndarray
    """(Q, K) float32 similarities of each query's exact K nearest rows, nearest first."""


def fill(store: IndexStore, chunks: Iterator[Rows], size: int, queries: Rows, rng: np.random.Generator) -> Index:
    """Add every chunk's records to ``store``, keeping one float32 copy of the vectors."""
    info = store.info
    features = np.empty((size, info.feature_dim), np.float32)
    codes = np.empty((size, info.code_bytes), np.uint8)
    before = int(store.client.info("memory")["used_memory"])
    started, first = time.perf_counter(), 0
    for chunk in chunks:
        features[first : first + len(chunk)] = chunk.features
        codes[first : first + len(chunk)] = chunk.codes
        batch = records(chunk, first, rng)
        for start in range(0, len(batch), ADD_BATCH):
            store.add(batch[start : start + ADD_BATCH])
        first += len(chunk)
    load_s = time.perf_counter() - started
    redis_bytes = int(store.client.info("memory")["used_memory"]) - before
    return Index(features, codes, load_s, redis_bytes, exact_nearest(features, queries.features))


# -- timing and scoring ------------------------------------------------------------------------------


@dataclass
class Result:
    size: int
    method: str
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    recall: float = float("nan")
    bytes_per_instance: float = float("nan")
    notes: list[str] = field(default_factory=list)


def exact_nearest(features: np.ndarray, queries: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """(Q, K) float32 similarities of each query's exact K nearest rows, nearest first."""
    best = np.full((len(queries), K), -np.inf, np.float32)
    for start in range(0, len(features), chunk):
        similarity = queries @ features[start : start + chunk].T
        best = np.partition(np.concatenate([best, similarity], axis=1), -K, axis=1)[:, -K:]
    return -np.sort(-best, axis=1)


Search = Callable[[int], np.ndarray]
"""A method under test: query number -> the rows it found, best first."""


def measure(results: dict[str, Result], searches: dict[str, Search], index: Index, queries: Rows,
            budget_s: float) -> None:  # fmt: skip
    """Time each search on every query and score its top K against the exact one. Each method
    first answers every query once untimed (up to ``budget_s``), so that no method's timing pays
    for the first visit of its pages (the graphs are built for minutes before it). Then the methods
    take turns query by query, so that a busy moment of the shared machine falls on all of them;
    each answer so starts on caches the method before it left cold, and a method that reads Redis
    after its ranking finds it idle for that long (the README says what that costs on a VM). A
    method that raises is reported and dropped; one that has used up ``budget_s`` stops there."""
    elapsed: dict[str, list[float]] = {name: [] for name in searches}
    found: dict[str, list[np.ndarray]] = {name: [] for name in searches}
    active, failed = dict(searches), set()

    def timed(name: str, q: int) -> tuple[np.ndarray, float] | None:
        try:
            started = time.perf_counter()
            rows = active[name](q)
            return rows, (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001 - a broken strategy is a row of the report, not the end of the run
            results[name].notes.append(f"error: {type(exc).__name__}: {str(exc)[:120]}")
            del active[name]
            failed.add(name)
            return None

    for name in list(active):  # the untimed pass
        spent = 0.0
        for q in range(len(queries)):
            outcome = timed(name, q)
            if outcome is None:
                break
            spent += outcome[1]
            if spent > budget_s * 1000:
                break
    for q in range(len(queries)):
        for name in list(active):
            outcome = timed(name, q)
            if outcome is None:
                continue
            found[name].append(outcome[0])
            elapsed[name].append(outcome[1])
            if sum(elapsed[name]) > budget_s * 1000 and q + 1 < len(queries):
                results[name].notes.append(f"{q + 1} of {len(queries)} queries (time budget)")
                del active[name]
    for name in searches.keys() - failed:
        hits = [np.count_nonzero(index.features[rows[:K]] @ queries.features[q] >= index.nearest[q, -1] - TIE)
                for q, rows in enumerate(found[name])]  # fmt: skip
        results[name].p50_ms, results[name].p95_ms = np.percentile(elapsed[name], [50, 95])
        results[name].recall = float(np.mean(hits)) / K


def top_k(similarity: np.ndarray, k: int = K) -> np.ndarray:
    """Positions of the k largest similarities, largest first."""
    part = np.argpartition(-similarity, k)[:k] if k < len(similarity) else np.arange(len(similarity))
    return part[np.argsort(-similarity[part])]


def rss_bytes() -> int:
    """This process's resident memory, after handing freed heap pages back (so that a growth is new memory)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the project's strategies --------------------------------------------------------------------------


def pools(candidates: list[int | None], size: int) -> list[tuple[int | None, str]]:
    """(the ``candidates`` option, its report label) per ``--candidates`` entry; ``auto`` is
    the library's default pool at ``size`` allowed instances."""
    return [(pool, f"C={pool}" if pool else "C=auto") for pool in candidates]


def strategies(candidates: list[int | None], size: int, cluster: bool) -> dict[str, SearchOptions]:
    """The searches timed through ``Searcher``, by report name: every stored row its own hit
    (``copies=False``, see the module's note)."""
    default = SearchOptions().strategy
    runs = {f"{default} (default)": SearchOptions(k=K, copies=False),
            f"{default} (default), ranking only": SearchOptions(k=K, copies=False, with_records=False)}
    runs |= {name: SearchOptions(name, k=K, copies=False) for name in ("exact", "graph") if name != default}
    for pool, label in pools(candidates, size):
        for how in ("scan", "multi-index"):
            runs[f"hamming {how} ({label})"] = SearchOptions("hamming", k=K, candidates=pool, hamming_search=how,
                                                             copies=False)  # fmt: skip
    runs["class"] = SearchOptions("class", k=K, copies=False)
    if cluster:
        runs["cluster"] = SearchOptions("cluster", k=K, copies=False)
    pool, label = pools(candidates, size)[0]
    runs[f"multilateral ({label})"] = SearchOptions("multilateral", k=K, candidates=pool, copies=False)
    return runs


def run_strategies(size: int, real: Rows, neighbours: np.ndarray, queries: Rows, args,
                   rng: np.random.Generator) -> tuple[Index, list[Result], list[str]]:  # fmt: skip
    """Fill a private Redis with ``size`` rows and time every strategy; returns the rows, the
    results and notes on the index (load time, memory, snapshot, clustering)."""
    with tempfile.TemporaryDirectory(prefix="cbir-scale-") as scratch, RedisServer(Path(scratch)) as server:
        store = IndexStore(redis.Redis.from_url(server.url), IndexInfo.for_model(DEFAULT_MODEL))
        index = fill(store, index_rows(real, neighbours, size, rng), size, queries, rng)
        notes = [f"loaded in {index.load_s:.0f} s ({size / index.load_s:,.0f} instances/s: records built and "
                 f"`IndexStore.add` in batches of {ADD_BATCH:,}); Redis used_memory "
                 f"+{index.redis_bytes / 2**20:,.0f} MiB"]  # fmt: skip
        distance = np.sqrt(np.maximum(2 - 2 * index.nearest, 0)).mean(axis=0)
        notes.append(f"queries' mean distance to their exact 1st / 10th nearest: {distance[0]:.3f} / "
                     f"{distance[-1]:.3f}")  # fmt: skip
        stats = code_statistics(index.codes)
        notes.append(f"codes: {stats['distinct_codes']:,} distinct, mean bucket {stats['mean_bucket_size']:.2f}, "
                     f"bit imbalance {stats['bit_imbalance']:.3f}")  # fmt: skip
        cluster = size <= args.cluster_up_to
        if cluster:
            summary = recluster(store)
            notes.append(f"recluster: {summary.clusters} clusters in {summary.seconds:.0f} s (one BLAS thread)")
        else:
            notes.append(f"cluster not run: recluster (exact 10-NN graph + Louvain) is only run up to "
                         f"{args.cluster_up_to:,} instances")  # fmt: skip
        files = GraphFiles(Path(scratch) / "graph", store.info.version)  # the graph_dir setting
        searcher, rss = Searcher(store, graph_files=files), rss_bytes()
        started = time.perf_counter()
        searcher.snapshot.refresh()
        notes.append(f"searcher snapshot read in {time.perf_counter() - started:.1f} s, RSS +"
                     f"{(rss_bytes() - rss) / size:,.0f} bytes/instance; this process's RSS {rss_bytes() / 2**30:.1f} "
                     "GiB in all (searcher, the float32 copy for the baselines, the MedNIST outputs)")  # fmt: skip
        rss, started = rss_bytes(), time.perf_counter()
        graph = searcher.graph()
        built = graph.wait(24 * 3600)
        build_s, started = time.perf_counter() - started, time.perf_counter()
        while files.current(searcher.snapshot.epoch, graph.dimensions) is None and time.perf_counter() - started < 600:
            time.sleep(0.1)  # the builder writes the graph for the other processes once it answers here
        write_s = time.perf_counter() - started
        disk_bytes = sum(path.stat().st_size for path in files.directory.iterdir())
        notes.append(f"graph (HNSW SQ8, M={GRAPH_M}, efConstruction {EF_CONSTRUCTION}, {BUILD_BATCH:,} rows per add in "
                     "a random order) built from the snapshot in "
                     f"{build_s:.0f} s{'' if built else ' (not finished)'} on "
                     f"{faiss.omp_get_max_threads()} thread(s), RSS +{(rss_bytes() - rss) / size:,.0f} bytes/instance; "
                     "until then a graph query scans the rows it lacks; written to the graph folder in "
                     f"{write_s:.1f} s, {disk_bytes / size:,.0f} bytes/instance on disk")  # fmt: skip
        query_objects = queries.queries()

        def through(options: SearchOptions) -> Search:
            def search(q: int) -> np.ndarray:
                searcher.snapshot.forget_entries()  # a new query's hits: read, not the last method's
                return np.array([row_of(u) for u in searcher.search(query_objects[q], options).sop_instance_uids])

            return search

        runs = strategies(args.candidates, size, cluster)
        results = {name: Result(size, name, bytes_per_instance=index.redis_bytes / size) for name in runs}
        load = os.getloadavg()[0]
        measure(results, {name: through(options) for name, options in runs.items()}, index, queries, args.budget_s)
        for name in [name for name in runs if name.startswith(f"{SearchOptions().strategy} (default)")]:
            # the default once more, its queries one after another with no other method between them
            alone = f"{name}, timed alone"
            results[alone] = Result(size, alone, bytes_per_instance=index.redis_bytes / size)
            measure(results, {alone: through(runs[name])}, index, queries, args.budget_s)
        # its ranking as a library's search is timed: on the snapshot as it stands, no Redis read at all
        on_snapshot, ranking = f"{SearchOptions().strategy} (default), ranking on the snapshot, timed alone", \
            SearchOptions(k=K, copies=False, with_records=False)  # fmt: skip
        results[on_snapshot] = Result(size, on_snapshot, notes=["no refresh: the ranking a library row is set against"])
        measure(results, {on_snapshot: lambda q: np.array([row_of(u) for u in searcher.search(
            query_objects[q], ranking, refresh=False).sop_instance_uids])}, index, queries, args.budget_s)  # fmt: skip
        against_exact = [measure_against_exact(searcher, query_objects, size, "one hit per picture", Filters(),
                                               args.budget_s)]  # fmt: skip
        for days in (37, 365):  # 1% of the rows, which the graph strategy scans; 10%, a walk with a selector
            end = dt.date(2015, 1, 1) + dt.timedelta(days=days - 1)
            filters = Filters.parse([f"date=2015-01-01..{end.isoformat()}"])
            against_exact.append(measure_against_exact(searcher, query_objects, size,
                                                       f"filter keeping {days / 3650:.0%}", filters, args.budget_s))
        graph_alone = [np.count_nonzero(index.features[graph.search(queries.features[q], searcher.snapshot.live, K)]
                                        @ queries.features[q] >= index.nearest[q, -1] - TIE) / K
                       for q in range(len(queries))]  # fmt: skip
        notes.append(f"graph after the timing: {graph.nodes:,} nodes, {graph.builds} build(s); the graph alone (its "
                     f"8-bit distances, no re-rank, efSearch {ef_search(graph.nodes, graph.nodes)}): recall@10 "
                     f"{np.mean(graph_alone):.3f}")  # fmt: skip
        notes.append(started_again(server.url, store, files, size))
        notes.append(f"load average (1 min) while timing the strategies: {load:.1f} at the start, "
                     f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    return index, list(results.values()) + [r for pair in against_exact for r in pair], notes


def started_again(redis_url: str, store: IndexStore, files: GraphFiles, size: int) -> str:
    """Warm-up of a searcher in another process (or this one started again): its snapshot read from
    Redis, then the graph read from the folder the first one wrote it to instead of built."""
    rss, started = rss_bytes(), time.perf_counter()
    searcher = Searcher(IndexStore(redis.Redis.from_url(redis_url), store.info), graph_files=files)
    searcher.snapshot.refresh()
    snapshot_s, started = time.perf_counter() - started, time.perf_counter()
    graph = searcher.graph()
    ready = graph.wait(3600)
    read_s = time.perf_counter() - started
    return (f"a second searcher (another process, or this one started again): snapshot read in {snapshot_s:.1f} s, "
            f"then the graph {'read' if graph.reads and not graph.builds else 'NOT read'} from the graph folder in "
            f"{read_s:.1f} s{'' if ready else ' (not finished)'} ({graph.builds} built, {graph.reads} read), "
            f"RSS +{(rss_bytes() - rss) / size:,.0f} bytes/instance for both")  # fmt: skip


def measure_against_exact(searcher: Searcher, query_objects: list[Query], size: int, label: str, filters: Filters,
                          budget_s: float) -> tuple[Result, Result]:  # fmt: skip
    """The default strategy and ``exact`` as the product answers (one hit per picture, copies
    folded) under ``filters`` (the study-date filters keep 37 or 365 days of the records' ten
    years: 1% or 10% of the rows), one query at a time, taking turns; recall@10 against ``exact``'s
    answer, and how many answers held fewer than k hits."""
    strategies = ("exact", SearchOptions().strategy)
    found: dict[str, list[list[str]]] = {name: [] for name in strategies}
    elapsed: dict[str, list[float]] = {name: [] for name in strategies}
    for query in query_objects:
        for strategy in strategies:
            searcher.snapshot.forget_entries()  # the other strategy's read of the same hits must not serve this one
            started = time.perf_counter()
            hits = searcher.search(query, SearchOptions(strategy, k=K, filters=filters)).sop_instance_uids
            elapsed[strategy].append((time.perf_counter() - started) * 1000)
            found[strategy].append(hits)
        if sum(sum(times) for times in elapsed.values()) > budget_s * 1000:
            break
    out = []
    for strategy in strategies:
        recall = np.mean([len(set(g) & set(e)) / K for g, e in zip(found[strategy], found["exact"], strict=True)])
        short = sum(len(hits) < K for hits in found[strategy])
        p50, p95 = np.percentile(elapsed[strategy], [50, 95])
        out.append(Result(size, f"{strategy}, {label}", p50, p95, float(recall),
                          notes=[f"recall against exact's answer ({label}); {short} of {len(found[strategy])} "
                                 "answers with fewer than 10 hits"]))  # fmt: skip
    return out[0], out[1]


# -- the baselines ---------------------------------------------------------------------------------------


def run_baselines(size: int, index: Index, queries: Rows, args) -> tuple[list[Result], str]:
    """numpy and FAISS over the same float32 vectors and packed codes, one query at a time;
    returns the results and the load average while timing."""
    features, codes, query_codes = index.features, index.codes, queries.codes
    vector_bytes = features.nbytes / size
    built: dict[str, tuple[object, float]] = {}  # name -> (FAISS index, bytes per instance)
    for name, make in (
        ("faiss IndexFlatL2", lambda: faiss.IndexFlatL2(features.shape[1])),
        ("faiss IndexBinaryFlat", lambda: faiss.IndexBinaryFlat(codes.shape[1] * 8)),
        (f"faiss IndexBinaryMultiHash {args.mih_tables}x{args.mih_bits}b nflip={args.mih_flips}",
         lambda: multihash(codes, args)),
    ):  # fmt: skip
        rss = rss_bytes()
        faiss_index = make()
        faiss_index.add(features if name.endswith("FlatL2") else codes)
        built[name] = faiss_index, (rss_bytes() - rss) / size

    def reranked(binary, pool: int) -> Search:
        def search(q: int) -> np.ndarray:
            found = binary.search(query_codes[q : q + 1], pool)[1][0]
            found = found[found >= 0]
            return found[top_k(features[found] @ queries.features[q])]

        return search

    flat, flat_bytes = built.pop("faiss IndexFlatL2")
    searches: dict[str, Search] = {
        "numpy brute force": lambda q: top_k(features @ queries.features[q]),
        "faiss IndexFlatL2": lambda q: flat.search(queries.features[q : q + 1], K)[1][0],
    }
    results = {"numpy brute force": Result(size, "numpy brute force", bytes_per_instance=vector_bytes),
               "faiss IndexFlatL2": Result(size, "faiss IndexFlatL2", bytes_per_instance=flat_bytes)}  # fmt: skip
    dim = features.shape[1]
    # FAISS's scalar quantizer takes its SIMD path only at a dimension that is a multiple of 8 (index/graph.py's
    # SIMD_DIMENSIONS): its SQ8 graph gets the vectors padded with zeros, as the product's graph does
    sq_dim = padded_dimension(dim)
    for name, make, width in (
        (f"faiss IndexHNSWFlat M={GRAPH_M}", lambda: faiss.IndexHNSWFlat(dim, GRAPH_M, faiss.METRIC_INNER_PRODUCT),
         dim),
        (f"faiss IndexHNSWSQ 8-bit M={GRAPH_M}",
         lambda: faiss.IndexHNSWSQ(sq_dim, faiss.ScalarQuantizer.QT_8bit, GRAPH_M, faiss.METRIC_INNER_PRODUCT), sq_dim),
    ):  # fmt: skip
        rss, started = rss_bytes(), time.perf_counter()
        graph = make()
        graph.hnsw.efConstruction = EF_CONSTRUCTION
        graph.train(padded(features[:: max(1, size // 65536)], width))
        graph.add(padded(features, width))
        build_s, graph_bytes = time.perf_counter() - started, (rss_bytes() - rss) / size
        graph_queries = padded(queries.features, width)
        for ef in EF_SEARCHES:
            label = f"{name} efSearch={ef}"
            parameters = faiss.SearchParametersHNSW(efSearch=ef)
            searches[label] = (lambda g, p, x: lambda q: g.search(x[q : q + 1], K, params=p)[1][0])(
                graph, parameters, graph_queries)  # fmt: skip
            results[label] = Result(size, label, bytes_per_instance=graph_bytes,
                                    notes=[f"built in {build_s:.0f} s on {faiss.omp_get_max_threads()} thread(s)"])
        del graph
        gc.collect()
    rss, started = rss_bytes(), time.perf_counter()
    hnsw = hnswlib.Index(space="ip", dim=dim)
    hnsw.init_index(max_elements=size, M=GRAPH_M, ef_construction=EF_CONSTRUCTION)
    hnsw.add_items(features, num_threads=1)
    build_s, graph_bytes = time.perf_counter() - started, (rss_bytes() - rss) / size
    for ef in EF_SEARCHES:
        label = f"hnswlib M={GRAPH_M} ef={ef}"

        def search(q: int, ef: int = ef) -> np.ndarray:
            hnsw.set_ef(ef)  # one index for every ef: set before each query, as the methods take turns
            return hnsw.knn_query(queries.features[q : q + 1], K, num_threads=1)[0][0].astype(np.int64)

        searches[label] = search
        results[label] = Result(size, label, bytes_per_instance=graph_bytes,
                                notes=[f"built in {build_s:.0f} s on 1 thread"])
    for pool, pool_label in pools(args.candidates, size):
        for name, (binary, binary_bytes) in built.items():
            label = f"{name} ({pool_label})"
            searches[label] = reranked(binary, pool or SearchOptions().pool(size))
            results[label] = Result(size, label, bytes_per_instance=binary_bytes + vector_bytes,
                                    notes=["top C by Hamming distance, re-ranked by float32 distance"])  # fmt: skip
    load = os.getloadavg()[0]
    measure(results, searches, index, queries, args.budget_s)
    for label in [label for label in searches if label.startswith(("faiss IndexHNSW", "hnswlib"))]:
        alone = f"{label}, timed alone"  # as the default is: one library's queries one after another
        results[alone] = dataclasses.replace(results[label], method=alone, p50_ms=float("nan"), notes=[])
        measure(results, {alone: searches[label]}, index, queries, args.budget_s)
    return list(results.values()), (f"load average (1 min) while timing the baselines: {load:.1f} at the start, "
                                    f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip


def padded(vectors: np.ndarray, width: int) -> np.ndarray:
    """``vectors`` with zero dimensions added up to ``width`` (themselves when they are that wide)."""
    if vectors.shape[1] == width:
        return vectors
    out = np.zeros((len(vectors), width), np.float32)
    out[:, : vectors.shape[1]] = vectors
    return out


def multihash(codes: np.ndarray, args) -> faiss.IndexBinaryMultiHash:
    index = faiss.IndexBinaryMultiHash(codes.shape[1] * 8, args.mih_tables, args.mih_bits)
    index.nflip = args.mih_flips
    return index


# -- the report ------------------------------------------------------------------------------------------

HEADER = ["N", "method", "p50 ms", "p95 ms", "recall@10", "bytes/instance", "notes"]
RECALL_TARGET = 0.95


def fastest_at_target(results: list[Result]) -> list[str]:
    """Per N and method (its pool settings together), the lowest p50 among the settings whose
    recall@10 reaches :data:`RECALL_TARGET`, fastest first."""
    lines = []
    for size in sorted({r.size for r in results}):
        best: dict[str, Result] = {}
        for result in results:
            method = result.method.split(" (C=")[0]
            if result.size == size and result.recall >= RECALL_TARGET and (
                    method not in best or result.p50_ms < best[method].p50_ms):  # fmt: skip
                best[method] = result
        ranked = sorted(best.values(), key=lambda r: r.p50_ms)
        lines.append(f"- N = {size:,}: " + ", ".join(f"{r.method} {r.p50_ms:.2f} ms ({r.recall:.3f})" for r in ranked))
    return lines


def format_row(result: Result) -> str:
    def number(value: float, digits: int) -> str:
        return "" if np.isnan(value) else f"{value:,.{digits}f}"

    return (f"| {result.size:,} | {result.method} | {number(result.p50_ms, 2)} | {number(result.p95_ms, 2)} | "
            f"{number(result.recall, 3)} | {number(result.bytes_per_instance, 0)} | "
            f"{'; '.join(result.notes)} |")  # fmt: skip


def write_report(path: Path, args, results: list[Result], preamble: list[str], notes: dict[int, list[str]],
                 elapsed_s: float) -> None:  # fmt: skip
    lines = [
        "# Query latency, recall and memory against index size", "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/query_scale.py', *sys.argv[1:]])}`", "",
        f"{dt.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}: {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, numpy "
        f"{np.__version__} (OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}), faiss {faiss.__version__} "
        f"on 1 thread, redis-server from `RedisServer`; the run took {elapsed_s / 60:.1f} min.", "",
        *preamble, "",
        "Latency: one query at a time, client side (`time.perf_counter` around `Searcher.search`, hits' records "
        "read; for the baselines around the search call and the re-rank). recall@10: share of the exact float32 "
        "top 10 found. bytes/instance: Redis `used_memory` growth over N for the index (the searcher's snapshot "
        "is in the notes per size); for the baselines the index's RSS growth, plus the float32 vectors where "
        "they re-rank. C: the instances re-ranked by feature distance; C=auto is the library's default, "
        "N/128 between 1,000 and 10,000 (1,000 up to 128,000 instances, 7,812 at 10^6), for the FAISS binary "
        "indexes too.", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
        *[format_row(r) for r in results], "",
        f"Fastest setting of each method with recall@10 >= {RECALL_TARGET} (p50, recall):", "",
        *fastest_at_target(results), "",
    ]  # fmt: skip
    for size, size_notes in notes.items():
        lines += [f"N = {size:,}:", "", *[f"- {note}" for note in size_notes], ""]
    lines.append(f"![p50 latency against N]({path.with_suffix('.png').name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results: list[Result]) -> None:
    """p50 latency against N per method, log-log; each label gives the method's recall@10 at the largest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 9))
    # one pool setting per method keeps the plot readable: the library's default
    methods = list(dict.fromkeys(r.method for r in results if "(C=" not in r.method or "(C=auto)" in r.method))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    for n, method in enumerate(methods):
        measured = [r for r in results if r.method == method and not np.isnan(r.p50_ms)]
        if not measured:
            continue
        baseline = method.startswith(("numpy", "faiss"))
        axes.plot([r.size for r in measured], [r.p50_ms for r in measured], "--" if baseline else "-",
                  marker="s" if baseline else "o", color=colours[n % 20],
                  label=f"{method}: recall@10 {measured[-1].recall:.3f} at {measured[-1].size:,}")  # fmt: skip
    axes.axhline(10, color="grey", linestyle=":", linewidth=1)
    axes.annotate("10 ms", (0.005, 10), xycoords=("axes fraction", "data"), va="bottom", color="grey", fontsize=8)
    axes.set(xscale="log", yscale="log", xlabel="indexed instances N", ylabel="p50 latency, one query at a time (ms)",
             title="Query latency against index size\n(solid: orthanc-cbir through Redis; dashed: numpy, FAISS)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="index sizes N, comma separated")
    parser.add_argument("--queries", type=int, default=200, help="real held-out MedNIST queries")
    parser.add_argument("--candidates", default="auto,3000,4000,6000",
                        help="Hamming pool(s) C re-ranked by features, comma separated; auto: the library's default")
    parser.add_argument("--cluster-up-to", type=int, default=100_000, help="largest N at which recluster is run")
    parser.add_argument("--mih-tables", type=int, default=8, help="IndexBinaryMultiHash: hash tables")
    parser.add_argument("--mih-bits", type=int, default=16, help="IndexBinaryMultiHash: bits per table")
    parser.add_argument("--mih-flips", type=int, default=1, help="IndexBinaryMultiHash: bit flips probed per table")
    parser.add_argument("--budget-s", type=float, default=120.0, help="at most this long timing one method at one N")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "query_scale.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.candidates = [None if c == "auto" else int(c) for c in args.candidates.split(",")]
    started, rng = time.perf_counter(), np.random.default_rng(args.seed)

    embedder = Embedder(DEFAULT_MODEL, threads=os.cpu_count() or 1)
    outputs, train, held_out = embed_mednist(embedder)
    real, queries = outputs.take(train), outputs.take(np.sort(rng.choice(held_out, size=args.queries, replace=False)))
    neighbours = nearest_real(real.features, NEIGHBOURS)
    faiss.omp_set_num_threads(1)
    preamble = [f"Model `{embedder.version}`. Rows: the {len(real):,} MedNIST training images through the model, "
                f"then SMOTE-style interpolations between a real row and one of its {NEIGHBOURS} nearest; "
                f"queries: {len(queries)} held-out MedNIST images.", "",
                *mimic_check(real, queries, rng)]  # fmt: skip
    print("\n".join(preamble), flush=True)

    results, notes = [], {}
    print("\n| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    for size in args.sizes:
        index, size_results, notes[size] = run_strategies(size, real, neighbours, queries, args, rng)
        gc.collect()
        baselines, load = run_baselines(size, index, queries, args)
        notes[size].append(load)
        for result in size_results + baselines:
            print(format_row(result), flush=True)
        for note in notes[size]:
            print(f"  N={size:,}: {note}", flush=True)
        results += size_results + baselines
        del index
        gc.collect()
    print("\n".join(["", f"Fastest with recall@10 >= {RECALL_TARGET}:", *fastest_at_target(results)]), flush=True)
    write_report(args.out, args, results, preamble, notes, time.perf_counter() - started)
    plot(args.out.with_suffix(".png"), results)
    print(f"\n{args.out} and {args.out.with_suffix('.png')} written in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
