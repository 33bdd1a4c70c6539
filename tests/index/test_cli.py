"""``orthanc-cbir index``, ``query`` and ``evaluate`` end to end: the shipped model,
a real redis-server, pictures written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from orthanc_cbir.answers.similar_cases import SimilarCase, secondary_capture_series
from orthanc_cbir.cli import main
from orthanc_cbir.evaluation.model_report import LANDMARKS
from orthanc_cbir.index.records import decode_file
from orthanc_cbir.index.series_levels import TOLERANCE_MM
from orthanc_cbir.model.lung_extent import LUNG_SPAN_MM
from orthanc_cbir.search import STRATEGIES
from tests.dicom_factory import grey_image, structured_report, to_bytes


def write_image_folder(root, per_class: int = 8, seed: int = 0):
    """Two classes that any model separates: bright discs and dark stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for name in ("disc", "stripes"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            if name == "disc":
                image = 200 * (((yy - 32 - i) ** 2 + (xx - 30) ** 2) < (12 + i) ** 2)
            else:
                image = 120 * ((xx // (4 + i % 3)) % 2)
            image = np.clip(image + rng.normal(0, 5, (64, 64)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    return root


def test_index_twice_then_query_a_picture(redis_url, client, tmp_path, capsys):
    folder = write_image_folder(tmp_path / "pictures")
    (tmp_path / "pictures" / "broken.png").write_bytes(b"not a picture")
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    ct = grey_image(np.arange(64 * 64, dtype=np.int16).reshape(64, 64), BodyPartExamined="CHEST")
    (dicom / "ct.dcm").write_bytes(to_bytes(ct))
    (dicom / "report.dcm").write_bytes(to_bytes(structured_report()))
    assert main(["index", str(folder), str(dicom), "--redis-url", redis_url]) == 0
    first = capsys.readouterr().out
    assert "indexed 17, skipped as duplicate 0, rejected 2" in first
    assert "rejected: unsupported image: 1" in first and "rejected: not an image: 1" in first
    assert main(["index", str(folder), str(dicom), "--redis-url", redis_url]) == 0
    assert "indexed 0, skipped as duplicate 17" in capsys.readouterr().out

    query = folder / "disc" / "003.png"
    assert main(["query", str(query), "--redis-url", redis_url, "--strategy", "exact", "--k", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["index_size"] == 17 and len(answer["hits"]) == 5
    assert all(not hit["SeriesDescription"].endswith("disc/003.png") for hit in answer["hits"])  # never itself
    assert all(hit["SeriesDescription"].split("/")[-2] == "disc" for hit in answer["hits"][:3])

    assert main(["query", "--uid", ct.SOPInstanceUID, "--redis-url", redis_url, "--json", "--k", "3",
                 "--filter", "modality=CT"]) == 0  # fmt: skip
    answer = json.loads(capsys.readouterr().out)
    assert answer["hits"] == []  # the CT is the only CT, and a query never answers itself


def test_index_and_query_decode_under_the_configured_limits(redis_url, tmp_path, capsys, monkeypatch):
    # index and query used the pixel step's built-in limits, not the deployment's (a live bug)
    ct = grey_image(np.zeros((512, 512), dtype=np.int16), BodyPartExamined="CHEST")  # 512 KiB of pixels
    (tmp_path / "ct.dcm").write_bytes(to_bytes(ct))
    picture = write_image_folder(tmp_path / "pictures", per_class=1) / "disc" / "000.png"  # 64 x 64
    monkeypatch.setenv("CBIR_MAX_FILE_BYTES", "10000")
    monkeypatch.setenv("CBIR_MAX_PIXELS_PER_FRAME", "1000")
    assert main(["index", str(tmp_path / "ct.dcm"), str(picture), "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert "indexed 0, skipped as duplicate 0, rejected 2" in out and "rejected: too large: 2" in out
    assert main(["query", str(picture), "--redis-url", redis_url]) == 1
    assert "rejected: too large" in capsys.readouterr().err


def test_index_refuses_the_services_own_similar_cases_images(redis_url, tmp_path, capsys):
    # the worker and backfill refused them, orthanc-cbir index indexed them (the three loops had drifted)
    query = grey_image(np.zeros((64, 64), dtype=np.int16))
    gradient = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    case = SimilarCase(1, 0.1, "exact", "CT", "CHEST", True, gradient)
    made = secondary_capture_series(query, [case])[0]
    (tmp_path / "similar.dcm").write_bytes(to_bytes(made))
    assert main(["index", str(tmp_path / "similar.dcm"), "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert "indexed 0, skipped as duplicate 0, rejected 1" in out and "rejected: orthanc-cbir output: 1" in out


def test_index_rejects_an_instance_without_a_valid_sop_instance_uid_and_goes_on(redis_url, tmp_path, capsys):
    # the worker rejected it; orthanc-cbir index (and backfill) indexed it under a key no DICOM client can name
    bad = grey_image(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    bad.SOPInstanceUID = "not-a-uid"
    good = grey_image(np.arange(64 * 64, dtype=np.int16).reshape(64, 64)[::-1].copy())
    (tmp_path / "bad.dcm").write_bytes(to_bytes(bad))
    (tmp_path / "good.dcm").write_bytes(to_bytes(good))
    assert main(["index", str(tmp_path), "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert "indexed 1, skipped as duplicate 0, rejected 1" in out and "rejected: no SOPInstanceUID: 1" in out


def test_query_refuses_a_bad_filter_with_a_message(redis_url, tmp_path, capsys):
    assert main(["query", "--uid", "1.2.3", "--redis-url", redis_url, "--filter", "colour=red"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_evaluate_reports_every_strategy_as_one_json_line(redis_url, client, tmp_path, capsys):
    gallery = write_image_folder(tmp_path / "gallery", per_class=10)
    queries = write_image_folder(tmp_path / "queries", per_class=3, seed=1)
    report = tmp_path / "report"
    code = main(["evaluate", "--gallery", str(gallery), "--queries", str(queries), "--report", str(report),
                 "--redis-url", redis_url, "--json"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_gallery"] == 20 and summary["n_queries"] == 6
    assert set(summary["strategies"]) == set(STRATEGIES)
    figure_names = {"map@10", "p@1", "ndcg@10", "recall@10_vs_exact", "candidate_fraction", "latency_ms_p50"}
    for figures in summary["strategies"].values():
        assert figure_names <= set(figures)
    assert summary["strategies"]["exact"]["p@1"] == 1.0  # two classes a child could tell apart
    assert summary["strategies"]["exact"]["recall@10_vs_exact"] == 1.0
    assert (report / "report.md").exists() and (report / "precision_recall.png").exists()
    assert not list(client.scan_iter(match="cbir-eval-*"))  # the private key space is gone


REAL_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom" / "series" / "lung_pet_ct_dx" / (
    "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl")


def test_a_real_ct_series_indexed_in_batches_lands_in_its_lung_frame(redis_url, client, capsys):
    """The shipped model reads this chest CT's levels at about 0.8 of their true distances; the index
    holds its slices in the lung frame its own lungs define (apex 0, base -250 mm), whatever batches
    they came in."""
    from orthanc_cbir.index import IndexInfo, IndexStore
    from orthanc_cbir.index.snapshot import IndexSnapshot
    from orthanc_cbir.model.embedder import Embedder

    files = sorted(REAL_CT.glob("*.dcm"))
    for start in range(0, len(files), 16):  # four runs: later ones move the rows of earlier ones
        assert main(["index", *map(str, files[start : start + 16]), "--redis-url", redis_url]) == 0
    assert f"indexed {len(files) - 48}," in capsys.readouterr().out
    embedder = Embedder()
    store = IndexStore(client, IndexInfo.from_card(embedder.card))
    level = embedder.card.level
    assert level is not None and store.count() == len(files)
    snapshot = IndexSnapshot(store)
    snapshot.refresh()
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    positions = np.array([float(header.ImagePositionPatient[2]) for header in headers])
    uids = [str(header.SOPInstanceUID) for header in headers]
    levels = level.decode(snapshot.vectors(np.array([store.row(uid) for uid in uids])))
    by_eye = next(entry for entry in json.loads(LANDMARKS.read_text())["series"].values() if "A0001" in entry["name"])
    apex, base = by_eye["lung_apex_mm"], by_eye["lung_base_mm"]
    frame = (positions - apex) * LUNG_SPAN_MM / (apex - base)
    assert np.abs(levels - frame).max() < 10.0  # found slice by slice within 10 mm of the landmarks seen by eye
    line = np.polyval(np.polyfit(positions, levels, 1), positions)
    # one straight line, the series' own spacing (a row is rewritten once it is 5 mm off), no slice's own bias
    assert np.abs(levels - line).max() < TOLERANCE_MM + 1.0
    own = level.decode(embedder.embed_pixels([decode_file(f).images[0].model_pixels for f in files]).features)
    assert np.polyfit(positions, own, 1)[0] < 0.9  # what the index corrects: the model alone compresses it
