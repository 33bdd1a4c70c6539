"""Region entries and region queries (the ``regions`` setting): the shared Lung-PET-CT-Dx chest
CT indexed with its regions in a real Redis through the shipped model; a rectangle around each
annotated tumour finds, at rank 1, a region of a neighbouring slice that overlaps the tumour."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from orthanc_cbir.dicom import decode_instance
from orthanc_cbir.errors import BadParameters, NotIndexed
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.index.records import embed_instances
from orthanc_cbir.index.regions import decode_regions, encode_regions
from orthanc_cbir.model.embedder import Embedder
from orthanc_cbir.model.regions import SliceRegions, best_overlap, region_grid
from orthanc_cbir.search.service import SimilaritySearch, search_options

LUNG = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx"
SERIES = LUNG / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"
BOXES = LUNG / "annotations_voc_xml" / "A0001"
pytestmark = pytest.mark.skipif(not SERIES.is_dir(), reason=f"the shared Lung-PET-CT-Dx series is not at {SERIES}")


def tumour_boxes(uids: set[str]) -> dict[str, tuple[int, int, int, int]]:
    """The annotated tumour box (Pascal VOC: xmin, ymin, xmax, ymax) of each slice of the series that has one."""
    boxes = {}
    for path in sorted(BOXES.glob("*.xml")):
        if path.stem in uids:
            box = ElementTree.parse(path).find(".//bndbox")
            boxes[path.stem] = tuple(int(box.find(name).text) for name in ("xmin", "ymin", "xmax", "ymax"))
    return boxes


def overlaps(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


@pytest.fixture(scope="module")
def series():
    """The series' slices (feet first) embedded with their region entries, and the tumour boxes."""
    embedder = Embedder(batch_size=256)
    instances = sorted((decode_instance(path) for path in sorted(SERIES.glob("*.dcm"))),
                       key=lambda instance: instance.metadata.axial_position_mm)  # fmt: skip
    order = [instance.metadata.sop_instance_uid for instance in instances]
    return {"records": embed_instances(embedder, instances, regions=True), "order": order,
            "boxes": tumour_boxes(set(order)), "info": IndexInfo.from_card(embedder.card)}  # fmt: skip


@pytest.fixture(scope="module")
def indexed(redis_url, series):
    """The series indexed in one batch."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = IndexStore(client, series["info"])
    store.add(series["records"])
    yield {**series, "store": store}
    client.close()


def region_page(store: IndexStore, **parameters: str):
    """The page the route would make of these query parameters (k, offset, filters)."""
    return search_options(parameters, store.info.layout, default_level="instance", default_strategy="exact",
                          max_results=100)  # fmt: skip


def tumour_found_at_rank_1(store: IndexStore, order: list[str], boxes: dict) -> float:
    """The share of tumour boxes whose first hit is a neighbouring slice's region overlapping its tumour."""
    core = SimilaritySearch(store)
    found = []
    for uid, box in boxes.items():
        answer = core.similar_regions(uid, box, region_page(store, k="5"))
        first = answer.hits[0]
        z, hit_z = order.index(uid), order.index(first.sop_instance_uid)
        target = boxes.get(first.sop_instance_uid, box)  # a neighbour without a box: the query's
        found.append(abs(hit_z - z) == 1 and overlaps(first.region, target))
        assert overlaps(answer.query_region, box), "the searched patch is not the one the box overlaps"
        assert [h.rank for h in answer.hits] == [1, 2, 3, 4, 5] and uid not in {h.sop_instance_uid for h in answer.hits}
        distances = [h.distance for h in answer.hits]
        assert distances == sorted(distances)
    print(f"tumour boxes answered at rank 1 by a neighbouring slice's overlapping region: {np.mean(found):.3f} "
          f"({sum(found)}/{len(found)})")
    return float(np.mean(found))


def test_a_tumour_box_finds_the_tumour_on_a_neighbouring_slice_at_rank_1(indexed):
    assert len(indexed["boxes"]) >= 10
    assert tumour_found_at_rank_1(indexed["store"], indexed["order"], indexed["boxes"]) >= 0.9


def test_region_entries_move_with_their_slices_when_a_series_arrives_in_batches(redis_url, series):
    """A worker indexes a series batch by batch, head first; each batch moves the earlier slices to
    the series' level. Region entries written with a batch's provisional level would leave
    neighbouring slices far apart: they must end at their rows' level."""
    import redis

    client = redis.Redis.from_url(redis_url)
    store = IndexStore(client, series["info"], prefix="batched")
    records = series["records"][::-1]
    for start in range(0, len(records), 8):
        store.add(records[start : start + 8])
    level = store.info.level
    for uid in series["order"][::9]:
        entry = store.describe([uid])[0]
        row_level = level.decode(store_vector(store, entry.row)[None])[0]
        region_level = level.decode(np.pad(decode_regions(client.hget(store.regions.entries, uid)).level,
                                           (level.start, 0))[None])[0]  # fmt: skip
        assert abs(region_level - row_level) < 1.0, f"region entry at {region_level:.1f} mm, row at {row_level:.1f}"
    assert tumour_found_at_rank_1(store, series["order"], series["boxes"]) >= 0.9
    client.close()


def store_vector(store: IndexStore, row: int) -> np.ndarray:
    from orthanc_cbir.index import IndexSnapshot

    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    return snapshot.vectors([row])[0]


def test_region_answers_honour_the_filters_and_pages(indexed):
    store, boxes = indexed["store"], indexed["boxes"]
    core = SimilaritySearch(store)
    uid, box = next(iter(boxes.items()))
    assert core.similar_regions(uid, box, region_page(store, k="5", exclude="same-series")).hits == []
    assert core.similar_regions(uid, box, region_page(store, k="5", modality="MR")).hits == []
    whole = core.similar_regions(uid, box, region_page(store, k="10"))
    second = core.similar_regions(uid, box, region_page(store, k="5", offset="5"))
    assert [h.sop_instance_uid for h in second.hits] == [h.sop_instance_uid for h in whole.hits[5:10]]


def test_a_removed_instance_loses_its_region_entries_and_is_never_answered(indexed):
    store, boxes = indexed["store"], indexed["boxes"]
    core = SimilaritySearch(store)
    uid, box = next(iter(boxes.items()))
    first = core.similar_regions(uid, box, region_page(store, k="3")).hits[0].sop_instance_uid
    count = store.regions.count()
    assert store.remove(first)
    try:
        assert store.regions.count() == count - 1
        answered = core.similar_regions(uid, box, region_page(store, k="10")).hits
        assert first not in {h.sop_instance_uid for h in answered}
        with pytest.raises(NotIndexed):
            core.similar_regions(first, box, region_page(store, k="3"))
    finally:
        instance = decode_instance(next(p for p in SERIES.glob("*.dcm") if decode_instance(p).metadata.sop_instance_uid
                                        == first))  # fmt: skip
        store.add(embed_instances(Embedder(), [instance], regions=True))


def test_an_instance_indexed_without_regions_says_so(redis_url):
    import redis

    embedder = Embedder()
    store = IndexStore(redis.Redis.from_url(redis_url), IndexInfo.from_card(embedder.card), prefix="plain")
    path = sorted(SERIES.glob("*.dcm"))[0]
    record = embed_instances(embedder, [decode_instance(path)])[0]
    assert record.regions is None
    store.add([record])
    with pytest.raises(NotIndexed, match="no region entries"):
        SimilaritySearch(store).similar_regions(record.key, (0, 0, 50, 50), region_page(store, k="3"))


def test_region_entries_round_trip_and_other_bytes_are_refused():
    grid = region_grid(512, 512)
    assert len(grid) == 122 and grid.min() >= 0 and grid[:, 2:].max() <= 512
    appearance = np.random.default_rng(0).normal(size=(len(grid), 512)).astype(np.float32)
    appearance /= np.linalg.norm(appearance, axis=1, keepdims=True)
    raw = encode_regions(SliceRegions(512, 512, appearance), np.arange(8, dtype=np.float32))
    assert len(raw) == 12 + 32 + 122 * 516
    decoded = decode_regions(raw)
    assert (decoded.rows, decoded.columns) == (512, 512) and decoded.level.tolist() == list(range(8))
    assert np.abs(decoded.appearance - appearance).max() < 0.01
    for bad in (b"", raw[:-1], b"XXXX" + raw[4:]):
        with pytest.raises(ValueError):
            decode_regions(bad)
    assert best_overlap(grid, (290, 305, 338, 378)) in range(len(grid))
    assert best_overlap(grid, (600, 600, 700, 700)) is None


def test_a_malformed_box_is_a_clear_400_reason():
    from orthanc_cbir.api.similar import parse_box

    assert parse_box("1,2,30.5,40") == (1.0, 2.0, 30.5, 40.0)
    assert parse_box("30,40,1,2") == (1.0, 2.0, 30.0, 40.0), "opposite corners in either order"
    for bad in ("", "1,2,3", "1,2,3,4,5", "a,b,c,d", "10,10,10,20", "0,0,1e9,5", "nan,0,1,1", "-1,0,5,5",
                "1,2,3,4 ", "123456,0,1,1"):  # fmt: skip
        with pytest.raises(BadParameters, match="box is"):
            parse_box(bad)


def test_a_box_outside_the_image_is_a_clear_400_reason(indexed):
    store, boxes = indexed["store"], indexed["boxes"]
    uid = next(iter(boxes))
    with pytest.raises(BadParameters, match="outside the image"):
        SimilaritySearch(store).similar_regions(uid, (600, 600, 700, 700), region_page(store, k="3"))


def test_region_entries_of_a_flushed_index_are_never_answered(redis_url, series):
    """Redis flushed and the series indexed again, with as many region writes: the searcher's
    matrix of entries is read again (the index's epoch moved), not kept."""
    import redis

    client = redis.Redis.from_url(redis_url)
    store = IndexStore(client, series["info"], prefix="flushed")
    store.add(series["records"][:20])
    uid = series["order"][5]
    assert store.regions.matches(uid, (100, 100, 200, 200))[1]
    client.flushdb()
    store.add(series["records"][20:40])
    with pytest.raises(KeyError):
        store.regions.matches(uid, (100, 100, 200, 200))
    client.close()
