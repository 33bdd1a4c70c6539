"""Region queries ("Similar regions" in OHIF): what they find and what they cost.

    .venv/bin/python benchmarks/regions.py SERIES_FOLDER [SERIES_FOLDER ...] [--boxes 60]

For each folder of axial CT (or MR) slices, indexed with region entries in a redis-server of
its own, it prints:

- rank 1 on random rectangles: the share of rectangles (30-100 pixels a side, over
  structure, on random slices) whose first hit is a region of a neighbouring slice that
  overlaps the rectangle: the answer a reader expects of "the same thing, one slice on";
- the Redis bytes of the region entries per image (``MEMORY USAGE`` of their hash over the
  images), beside those of the instance rows' keys;
- indexing time per image with and without region entries (decode excluded, one thread
  pool of the Embedder's), and a region query's p50 / p95 over the rectangles.

The tumour-box figure on the annotated Lung-PET-CT-Dx series is a test
(tests/index/test_regions.py); this script measures any series, annotated or not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
from orthanc_cbir.dicom import DecodedInstance, decode_instance  # noqa: E402
from orthanc_cbir.index import IndexInfo, IndexStore  # noqa: E402
from orthanc_cbir.index.records import embed_instances  # noqa: E402
from orthanc_cbir.local_services import RedisServer  # noqa: E402
from orthanc_cbir.model.embedder import Embedder  # noqa: E402
from orthanc_cbir.search.service import SimilaritySearch, search_options  # noqa: E402


def slices(folder: Path) -> list[DecodedInstance]:
    decoded = [decode_instance(path) for path in sorted(folder.glob("*.dcm"))]
    kept = [d for d in decoded if isinstance(d, DecodedInstance) and d.metadata.axial_position_mm is not None]
    return sorted(kept, key=lambda instance: instance.metadata.axial_position_mm or 0.0)


def measure(folder: Path, boxes: int, seed: int) -> None:
    instances = slices(folder)
    embedder = Embedder(batch_size=256)
    with RedisServer(Path(tempfile.mkdtemp(prefix="regions-"))) as server:
        client = redis.Redis.from_url(server.url)
        store = IndexStore(client, IndexInfo.from_card(embedder.card))
        started = time.perf_counter()
        plain = [r for s in range(0, len(instances), 64) for r in embed_instances(embedder, instances[s : s + 64])]
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        records = [r for s in range(0, len(instances), 64)
                   for r in embed_instances(embedder, instances[s : s + 64], regions=True)]  # fmt: skip
        regions_s = time.perf_counter() - started
        del plain
        store.add(records)
        region_bytes = store.regions.stored_bytes()
        row_bytes = sum(int(client.memory_usage(key, samples=0) or 0) for key in client.scan_iter(count=1000)) \
            - region_bytes  # fmt: skip
        order = [instance.metadata.sop_instance_uid for instance in instances]
        core = SimilaritySearch(store)
        page = search_options({"k": "3"}, store.info.layout, default_level="instance", default_strategy="exact",
                              max_results=100)  # fmt: skip
        rng = np.random.default_rng(seed)
        found, times = [], []
        while len(found) < boxes:
            z = int(rng.integers(1, len(order) - 1))
            pixels = instances[z].images[0].model_pixels
            rows, columns = pixels.shape
            width, height = (int(v) for v in rng.integers(30, 100, size=2))
            x, y = int(rng.integers(0, columns - width)), int(rng.integers(0, rows - height))
            if pixels[y : y + height, x : x + width].std() < 0.05:
                continue  # air or a flat organ: no structure a reader would box
            box = (x, y, x + width, y + height)
            started = time.perf_counter()
            hit = core.similar_regions(order[z], box, page).hits[0]
            times.append((time.perf_counter() - started) * 1000)
            region = hit.region or (0, 0, 0, 0)
            overlap = min(region[2], box[2]) > max(region[0], box[0]) and min(region[3], box[3]) > max(
                region[1], box[1])  # fmt: skip
            found.append(abs(order.index(hit.sop_instance_uid) - z) == 1 and overlap)
        n = len(instances)
        print(f"{folder.name}: {n} slices")
        print(f"  rank 1 is a neighbouring slice's overlapping region: {np.mean(found):.3f} of {len(found)} rectangles")
        print(f"  Redis bytes per image: region entries {region_bytes / n:,.0f}, instance rows and the rest "
              f"{row_bytes / n:,.0f}")  # fmt: skip
        print(f"  indexing per image (model passes): {plain_s / n * 1000:.1f} ms without regions, "
              f"{regions_s / n * 1000:.1f} ms with")  # fmt: skip
        print(f"  region query: p50 {np.percentile(times, 50):.1f} ms, p95 {np.percentile(times, 95):.1f} ms "
              f"({n} images' entries)")  # fmt: skip
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--boxes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for folder in args.folders:
        measure(folder, args.boxes, args.seed)


if __name__ == "__main__":
    main()
