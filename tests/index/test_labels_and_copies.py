"""Issue 16, deliverables 4 and 5 against a real Redis:

- the file's Modality and BodyPartExamined, not the model's MedNIST-trained heads, decide
  the ``class`` strategy and the modality / region sub-codes of ``multilateral``; the model
  fills only what the file does not say, and each hit says which it used;
- one picture, one hit: copies of one image (other encodings, other SOPInstanceUIDs) are
  one hit listing the others, and the answer still holds ``k`` distinct pictures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from orthanc_cbir.index import IndexRecord
from orthanc_cbir.model.codes import pack_codes
from orthanc_cbir.search import Query, QueryContext, Searcher, SearchOptions
from orthanc_cbir.search.labels import LabelMap, file_label, upload_header
from orthanc_cbir.search.strategies import COPY_DISTANCE
from tests.dicom_factory import grey_image, to_bytes
from tests.records_factory import BASE, DIM, LABELS

NEMA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom" / "single" / "nema_wg04"
MODALITY = {name: i for i, name in enumerate(LABELS["modality"])}
REGION = {name: i for i, name in enumerate(LABELS["region"])}


def record(uid: str, features, *, modality=None, body_part=None, said_modality="CT", said_region="chest",
           rows=64, position=None, series="1.2.3.9") -> IndexRecord:  # fmt: skip
    """A record whose file says ``modality`` / ``body_part`` and whose model heads say
    ``said_modality`` / ``said_region``; the code's label bits follow the model's heads."""
    features = np.asarray(features, np.float32)
    features = features / np.linalg.norm(features)
    m, r = MODALITY[said_modality], REGION[said_region]
    label_bits = np.concatenate([np.arange(8) == m, np.arange(8) == r, np.arange(8) == 0])
    bits = np.concatenate([label_bits, np.resize(features > 0, 104)]).astype(np.float32) - 0.5
    metadata = dataclasses.replace(BASE, sop_instance_uid=uid, series_instance_uid=series,
                                   study_instance_uid=series + ".1", modality=modality, body_part_examined=body_part,
                                   rows=rows, columns=rows, image_position_patient=position)  # fmt: skip
    probabilities = {"modality": np.eye(3, dtype=np.float32)[m], "region": np.eye(5, dtype=np.float32)[r],
                     "pathology": np.eye(2, dtype=np.float32)[0]}  # fmt: skip
    return IndexRecord(metadata, features, pack_codes(bits[None])[0], probabilities)


def query_of(searcher: Searcher, uid: str) -> Query:
    searcher.snapshot.refresh()
    return searcher.stored_query(np.array([searcher.store.row(uid)]))


# -- 4. trust the file over the model ---------------------------------------------------------


@pytest.fixture
def misnamed(store):
    """A CT archive the model misnames: 12 chest CTs (file CT / CHEST) whose heads say MR / head,
    8 MR heads the model gets right, 5 pictures with no header (the model's word only) and
    3 US images (a modality the model has no label for: the model's word)."""
    rng = np.random.default_rng(4)
    centre = rng.normal(size=DIM)
    records = [record(f"1.2.4.ct.{i}", centre + 0.8 * rng.normal(size=DIM), modality="CT", body_part="CHEST",
                      said_modality="MR", said_region="head") for i in range(12)]  # fmt: skip
    records += [record(f"1.2.4.mr.{i}", centre + 0.8 * rng.normal(size=DIM), modality="MR", body_part="HEAD",
                       said_modality="MR", said_region="head") for i in range(8)]  # fmt: skip
    records += [record(f"1.2.4.png.{i}", centre + 0.8 * rng.normal(size=DIM), rows=None,
                       said_modality="CT", said_region="chest") for i in range(5)]  # fmt: skip
    records += [record(f"1.2.4.us.{i}", centre + 0.8 * rng.normal(size=DIM), modality="US", body_part="LUNG",
                       said_modality="MR", said_region="abdomen") for i in range(3)]  # fmt: skip
    store.add(records)
    return Searcher(store)


def test_class_finds_a_ct_the_model_calls_mr_among_the_cts(misnamed):
    searcher = misnamed
    query = query_of(searcher, "1.2.4.ct.0")  # a CT whose model heads say MR / head
    hits = searcher.search(query, SearchOptions("class", k=30)).hits
    uids = [h.sop_instance_uid for h in hits]
    # the 11 other CTs (file: CT, chest) and the pictures the model calls CT / chest; no MR, no US
    assert sorted(uids) == sorted([f"1.2.4.ct.{i}" for i in range(1, 12)] + [f"1.2.4.png.{i}" for i in range(5)])
    for hit in hits:
        labels = hit.labels
        if hit.sop_instance_uid.startswith("1.2.4.ct."):
            assert labels["modality"] == {"value": "CT", "source": "file"}
            assert labels["region"] == {"value": "chest", "source": "file"}
        else:
            assert labels["modality"] == {"value": "CT", "source": "model"}
            assert labels["region"] == {"value": "chest", "source": "model"}
        assert labels["pathology"] == {"value": "normal", "source": "model"}


def test_class_of_an_mr_head_answers_mr_heads_not_the_misnamed_cts(misnamed):
    searcher = misnamed
    hits = searcher.search(query_of(searcher, "1.2.4.mr.0"), SearchOptions("class", k=30)).hits
    assert sorted(h.sop_instance_uid for h in hits) == sorted(f"1.2.4.mr.{i}" for i in range(1, 8))


def test_a_modality_the_model_has_no_label_for_falls_back_to_the_model(misnamed):
    searcher = misnamed
    hits = searcher.search(query_of(searcher, "1.2.4.us.0"), SearchOptions("class", k=30)).hits
    # US is not CT, MR or XR: the model's MR; LUNG is chest: the file's chest
    # the other US: MR by the model, chest by the file
    assert sorted(h.sop_instance_uid for h in hits) == ["1.2.4.us.1", "1.2.4.us.2"]
    assert searcher.labels.describe({"modality": "US", "body_part_examined": "LUNG"},
                                    {"modality": [0, 1, 0], "region": [1, 0, 0, 0, 0]}) == {  # fmt: skip
        "modality": {"value": "MR", "source": "model"}, "region": {"value": "chest", "source": "file"},
        "pathology": {"value": None, "source": "model"}}  # fmt: skip


def test_an_uploaded_dicom_query_counts_its_header(misnamed):
    """A query that is not indexed: its context carries its file's Modality and BodyPartExamined."""
    searcher = misnamed
    stored = query_of(searcher, "1.2.4.ct.0")
    body = to_bytes(grey_image(np.zeros((8, 8), np.int16), modality="CT", BodyPartExamined="THORAX"))
    modality, body_part = upload_header(body)
    assert (modality, body_part) == ("CT", "THORAX")
    upload = Query(stored.features, stored.code, stored.probabilities,
                   QueryContext(modality=modality, body_part=body_part))  # fmt: skip
    uids = searcher.search(upload, SearchOptions("class", k=30)).sop_instance_uids
    assert "1.2.4.ct.0" in uids and not any(u.startswith(("1.2.4.mr", "1.2.4.us")) for u in uids)
    # the same picture without a header: the model's MR / head decides
    bare = Query(stored.features, stored.code, stored.probabilities)
    assert {u.split(".")[3] for u in searcher.search(bare, SearchOptions("class", k=30)).sop_instance_uids} == {"mr"}
    assert upload_header(b"\x89PNG\r\n\x1a\n" + bytes(40)) == (None, None)
    assert upload_header(b"not a dicom file at all") == (None, None)


def test_multilateral_modality_sub_code_follows_the_file(misnamed):
    searcher = misnamed
    query = query_of(searcher, "1.2.4.ct.0")
    only_modality = {"region": 0.0, "pathology": 0.0, "appearance": 0.0}
    hits = searcher.search(query, SearchOptions("multilateral", k=27, weights=only_modality)).hits
    by_kind: dict[str, set] = {}
    for hit in hits:
        by_kind.setdefault(hit.sop_instance_uid.split(".")[3], set()).add(hit.distance)
    assert by_kind["ct"] == {0.0}  # same label by the file, whatever the model's bits say
    assert by_kind["mr"] == {4.0}  # another class: half the 8 bits, the distance of two hash centres
    assert by_kind["png"] == {0.0}  # no header: the model says CT
    assert by_kind["us"] == {4.0}  # US: the model's MR
    assert [h.sop_instance_uid.split(".")[3] for h in hits[:16]].count("mr") == 0


def test_multilateral_without_any_header_keeps_the_models_bits(misnamed):
    """Neither side's file says: the sub-code counts the model's bits, as before."""
    searcher = misnamed
    query = query_of(searcher, "1.2.4.png.0")
    weights = {"region": 0.0, "pathology": 0.0, "appearance": 0.0}
    hits = searcher.search(query, SearchOptions("multilateral", k=40, weights=weights)).hits
    distances = {h.sop_instance_uid.split(".")[3]: h.distance for h in hits}
    assert distances["png"] == 0.0 and distances["mr"] == 4.0  # query from the model (CT) vs an MR file: by label
    assert distances["us"] == 2.0  # both from the model: the two one-hot bytes differ in 2 bits


def test_file_labels_map_dicom_values_to_the_models_names():
    assert [file_label("modality", v) for v in ("CT", "MR", "CR", "DX", "MG", "RG", "US", None)] == [
        "CT", "MR", "XR", "XR", "XR", "XR", None, None]  # fmt: skip
    assert [file_label("region", v) for v in ("CHEST", "lung", "ABDOMEN", "PELVIS", "BRAIN", "BREAST", "HAND",
                                              "EXTREMITY", "CHESTABDOMEN")] == [
        "chest", "chest", "abdomen", "abdomen", "head", "breast", "hand", None, None]  # fmt: skip
    narrow = LabelMap({"modality": ("CT", "MR")})  # a model without XR: an X-ray file is the model's to name
    assert narrow.file_class("modality", "DX") is None and narrow.file_class("modality", "MR") == 1


# -- 5. one picture, one hit ------------------------------------------------------------------


def test_six_copies_are_one_hit_with_five_copies_and_k_distinct_pictures(store):
    rng = np.random.default_rng(5)
    centre = rng.normal(size=DIM)
    picture = centre + 0.3 * rng.normal(size=DIM)
    picture /= np.linalg.norm(picture)
    # six encodings of one image: lossless ones equal, lossy ones a little off (well within COPY_DISTANCE)
    copies = [record(f"1.2.5.copy.{i}", picture + (0.01 * i) * rng.normal(size=DIM) / np.sqrt(DIM),
                     modality="CT", position=(0.0, 0.0, 10.0)) for i in range(6)]  # fmt: skip
    others = [record(f"1.2.5.other.{i}", centre + 0.6 * rng.normal(size=DIM), modality="CT",
                     position=(0.0, 0.0, float(20 + i))) for i in range(30)]  # fmt: skip
    store.add(copies + others)
    searcher = Searcher(store)
    query = Query(picture + 0.05 * rng.normal(size=DIM) / np.sqrt(DIM), copies[0].code)
    for strategy in ("exact", "graph", "hamming", "class", "cluster", "multilateral"):
        result = searcher.search(query, SearchOptions(strategy, k=10, candidates=36))
        uids = result.sop_instance_uids
        assert len(uids) == 10 and len(set(uids)) == 10, strategy
        leads = [h for h in result.hits if h.sop_instance_uid.startswith("1.2.5.copy.")]
        assert len(leads) == 1, (strategy, uids)  # the six copies are one hit...
        listed = [c.entry.sop_instance_uid for c in leads[0].copies]
        # ...listing the other five
        assert sorted(listed + [leads[0].sop_instance_uid]) == sorted(c.key for c in copies)
        distances = [c.distance for c in leads[0].copies]  # to the query, best first
        assert distances == sorted(distances) and distances[0] >= leads[0].distance, strategy
        assert all(h.copies == [] for h in result.hits if h is not leads[0])
        # nothing else is collapsed: the 9 other hits are the nearest 9 of the 30 other pictures
    exact = searcher.search(query, SearchOptions("exact", k=10))
    assert exact.hits[0].sop_instance_uid.startswith("1.2.5.copy.")
    everything = searcher.search(query, SearchOptions("exact", k=36, copies=False)).sop_instance_uids
    assert exact.sop_instance_uids[1:] == [u for u in everything if not u.startswith("1.2.5.copy.")][:9]


def test_copies_that_fill_the_first_ranks_are_refilled_from_deeper(store):
    """60 copies of one picture nearest the query: the answer still has k distinct pictures."""
    rng = np.random.default_rng(6)
    picture = rng.normal(size=DIM)
    copies = [record(f"1.2.6.copy.{i}", picture + 0.001 * rng.normal(size=DIM)) for i in range(60)]
    others = [record(f"1.2.6.other.{i}", picture + 1.5 * rng.normal(size=DIM)) for i in range(20)]
    store.add(copies + others)
    query = Query(picture / np.linalg.norm(picture), copies[0].code)
    result = Searcher(store).search(query, SearchOptions("exact", k=5))
    assert len(result.hits) == 5 and sum(h.sop_instance_uid.startswith("1.2.6.copy.") for h in result.hits) == 1
    assert len(result.hits[0].copies) == 59


def test_near_pictures_that_differ_in_their_records_are_not_copies(store):
    rng = np.random.default_rng(7)
    picture = rng.normal(size=DIM)
    twins = [
        record("1.2.7.a", picture, modality="CT", position=(0.0, 0.0, 10.0)),
        record("1.2.7.b", picture, modality="CT", position=(0.0, 0.0, 11.0)),  # the neighbouring slice position
        record("1.2.7.c", picture, modality="CT", rows=128, position=(0.0, 0.0, 10.0)),  # another matrix
        record("1.2.7.d", picture, modality="MR", position=(0.0, 0.0, 10.0)),  # another modality
        record("1.2.7.e", picture, modality="CT", position=(0.0, 0.0, 10.0)),  # a copy of a
    ]  # fmt: skip
    store.add(twins)
    query = Query(picture / np.linalg.norm(picture), twins[0].code)
    result = Searcher(store).search(query, SearchOptions("exact", k=5))
    assert len(result.hits) == 4
    by_uid = {h.sop_instance_uid: [c.entry.sop_instance_uid for c in h.copies] for h in result.hits}
    assert sorted(by_uid) == ["1.2.7.a", "1.2.7.b", "1.2.7.c", "1.2.7.d"] or sorted(by_uid) == [
        "1.2.7.b", "1.2.7.c", "1.2.7.d", "1.2.7.e"]  # fmt: skip
    assert sum(len(v) for v in by_uid.values()) == 1


def test_bulk_evaluation_and_group_levels_rank_every_row(store):
    rng = np.random.default_rng(8)
    picture = rng.normal(size=DIM)
    store.add([record(f"1.2.8.{i}", picture) for i in range(4)])
    searcher = Searcher(store)
    query = Query(picture / np.linalg.norm(picture), np.zeros(16, np.uint8))
    assert len(searcher.search(query, SearchOptions("exact", k=4, with_records=False)).hits) == 4
    assert len(searcher.search(query, SearchOptions("exact", k=4, copies=False)).hits) == 4
    assert len(searcher.search(query, SearchOptions("exact", k=4)).hits) == 1


def test_hit_json_shows_labels_and_copies(store):
    from orthanc_cbir.answers.hits import hit_json

    rng = np.random.default_rng(9)
    picture = rng.normal(size=DIM)
    store.add([record(f"1.2.9.{i}", picture, modality="CT") for i in range(3)])
    hit = Searcher(store).search(Query(picture / np.linalg.norm(picture), np.zeros(16, np.uint8)),
                                 SearchOptions("exact", k=3)).hits[0]  # fmt: skip
    shown = hit_json(hit, "exact")
    assert shown["labels"]["modality"] == {"value": "CT", "source": "file"}
    assert shown["labels"]["region"] == {"value": "chest", "source": "model"}  # no BodyPartExamined
    assert len(shown["copies"]) == 2 and shown["copies"][0]["SOPInstanceUID"].startswith("1.2.9.")


# -- the real corpus: one NEMA image in many transfer syntaxes --------------------------------


@pytest.fixture(scope="module")
def nema_records():
    if not NEMA.is_dir():
        pytest.skip(f"{NEMA} is absent (the shared DICOM corpus)")
    from orthanc_cbir.dicom import Rejection
    from orthanc_cbir.index.records import decode_file, embed_instances
    from orthanc_cbir.model.embedder import Embedder

    decoded = [d for d in (decode_file(p) for p in sorted(NEMA.glob("*/*"))) if not isinstance(d, Rejection)]
    if len(decoded) < 40:
        pytest.skip("the pixel step decodes too few NEMA files here")
    embedder = Embedder()
    return embedder, embed_instances(embedder, decoded)


def test_nema_copies_are_one_hit_each(client, nema_records):
    from orthanc_cbir.index import IndexInfo, IndexStore

    embedder, records = nema_records
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    store.add(records)
    searcher = Searcher(store)
    mr1 = [r.key for r in records if r.metadata.patient_key == records_named(records, "MR1")]
    assert len(mr1) == 6  # UNC, J2KR, JLSL, JPLL, lossy JPLY, RLE
    ct1 = [r.key for r in records if r.metadata.patient_key == records_named(records, "CT1")]
    query = query_of(searcher, ct1[0])
    for strategy in ("exact", "hamming", "class", "multilateral"):
        result = searcher.search(query, SearchOptions(strategy, k=10))
        patients = [h.entry.metadata.patient_key for h in result.hits]
        assert len(set(patients)) == len(patients), (strategy, patients)  # never one picture twice
        if strategy != "class":  # class: only the CTs (two pictures) qualify
            assert len(patients) == 10, (strategy, patients)  # ten distinct pictures of the 15
        if strategy != "multilateral":  # multilateral ranks by codes, ties in any order
            first = result.hits[0]
            assert first.sop_instance_uid in ct1 and len(first.copies) == 3  # 5 copies, the query left out
    exact = searcher.search(query, SearchOptions("exact", k=15))
    mr = [h for h in exact.hits if h.sop_instance_uid in mr1]
    assert len(mr) == 1 and len(mr[0].copies) == 5


def records_named(records, stem: str) -> str:
    """The patient key of a NEMA image (each NEMA image is its own patient, ``1CT1``, ``4MR1``...)."""
    from orthanc_cbir.dicom.metadata import patient_key

    patient = next(p for p in ("1CT1", "2CT2", "4MR1", "6MR3", "7MR4") if p.endswith(stem))
    return patient_key(patient)


def test_nema_copy_distances_stay_far_below_the_threshold(nema_records):
    """The measurement behind COPY_DISTANCE, kept: copies within a half of it, different pictures far beyond."""
    from orthanc_cbir.index.schema import quantize

    _, records = nema_records
    features = np.stack([r.features for r in records])
    quantized, scales = quantize(features)
    stored = quantized * scales[:, None]
    distances = np.sqrt(np.maximum(2 - 2 * stored @ stored.T, 0))
    same = np.array([[a.metadata.patient_key == b.metadata.patient_key for b in records] for a in records])
    assert distances[same].max() < COPY_DISTANCE
    assert distances[~same].min() > 2 * COPY_DISTANCE


def test_neighbouring_slices_of_real_series_are_never_copies(client):
    """The other side of the threshold: different slices of the shared real series (a 5 mm chest CT,
    a prostate MR, a 3-slice CT) lie beyond COPY_DISTANCE, and no answer collapses two of them."""
    series = NEMA.parents[1] / "series"
    paths = sorted(series.glob("**/*.dcm")) if series.is_dir() else []
    if len(paths) < 10:
        pytest.skip(f"{series} is absent (the shared DICOM corpus)")
    from orthanc_cbir.dicom import Rejection
    from orthanc_cbir.index import IndexInfo, IndexStore
    from orthanc_cbir.index.records import decode_file, embed_instances
    from orthanc_cbir.index.schema import quantize
    from orthanc_cbir.model.embedder import Embedder

    embedder = Embedder()
    records = embed_instances(embedder, [d for d in map(decode_file, paths) if not isinstance(d, Rejection)])
    quantized, scales = quantize(np.stack([r.features for r in records]))
    stored = quantized * scales[:, None]
    distances = np.sqrt(np.maximum(2 - 2 * stored @ stored.T, 0)) + 9 * np.eye(len(records))
    assert distances.min() > COPY_DISTANCE  # the nearest two slices: 0.356 with the shipped model
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    store.add(records)
    searcher = Searcher(store)
    for uid in (records[0].key, records[len(records) // 2].key):
        hits = searcher.search(query_of(searcher, uid), SearchOptions("exact", k=20)).hits
        assert len(hits) == 20 and all(h.copies == [] for h in hits)


def test_a_hit_says_whether_it_is_the_querys_patient_without_saying_who():
    from orthanc_cbir.answers.hits import patient_relation

    assert patient_relation("a1b2", "a1b2") == "this patient"
    assert patient_relation("a1b2", "ffff") == "another patient"
    assert patient_relation(None, "a1b2") is None and patient_relation("a1b2", None) is None
