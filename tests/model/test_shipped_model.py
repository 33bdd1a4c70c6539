"""The model this checkout ships: its card matches the file, and it does on real
held-out data what the card says (re-measured here on a sample, through onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orthanc_cbir.config import DEFAULT_MODEL
from orthanc_cbir.evaluation.metrics import exact_top_k
from orthanc_cbir.model.embedder import Embedder, file_sha256
from orthanc_cbir.model.heads import all_heads_correct

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MEDNIST = SHARED / "mednist" / "mednist_dev.tar.gz"
needs_mednist = pytest.mark.skipif(not MEDNIST.exists(), reason=f"MedNIST is absent ({MEDNIST} not found)")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(DEFAULT_MODEL, batch_size=256)


def test_shipped_card_matches_the_shipped_file(embedder):
    card = embedder.card
    assert card.sha256 == file_sha256(DEFAULT_MODEL)
    assert [s.name for s in card.code_layout.sub_codes] == ["modality", "region", "pathology", "appearance"]
    assert card.code_bits % 8 == 0 and card.embedding_dim >= 128
    assert card.raw["training"]["seed"] == 0
    assert card.raw["validation"]["command"].startswith("orthanc-cbir validate-model")
    assert DEFAULT_MODEL.stat().st_size < 20 * 2**20


def test_shipped_model_runs_without_torch_installed_in_the_process():
    import subprocess
    import sys

    code = ("import sys, numpy as np; sys.modules['torch'] = None\n"
            "from orthanc_cbir.model.embedder import Embedder\n"
            "out = Embedder().embed(np.zeros((2, 64, 64), np.float32)); print(out.features.shape)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(2, " in done.stdout


@pytest.fixture(scope="module")
def mednist_split():
    from orthanc_cbir.training.data import block_split, read_mednist

    mednist = read_mednist(MEDNIST, Path("state/cache"))
    return mednist, *block_split(mednist)


@needs_mednist
def test_shipped_model_classifies_held_out_mednist_blocks(embedder, mednist_split):
    mednist, _, validation = mednist_split
    probabilities = embedder.embed(mednist.subset(validation).as_float()).probabilities
    heads = ("modality", "region")
    correct = all_heads_correct({h: probabilities[h] for h in heads}, {h: mednist.labels[h][validation] for h in heads})
    assert correct.mean() >= 0.995


@needs_mednist
def test_shipped_model_orders_images_within_a_class(embedder, mednist_split):
    """Exact top-10 neighbours of a held-out image mostly share its class, and its codes
    are not one per class: thousands of distinct codes in a class of thousands."""
    mednist, train, validation = mednist_split
    gallery = embedder.embed(mednist.subset(train).as_float())
    queries = validation[:: max(1, len(validation) // 300)]
    top = exact_top_k(embedder.embed(mednist.subset(queries).as_float()).features, gallery.features, 10)
    assert (mednist.fine_class[train][top] == mednist.fine_class[queries][:, None]).mean() >= 0.99
    in_class = gallery.codes[mednist.fine_class[train] == 0]
    assert len(np.unique(in_class, axis=0)) >= 0.5 * len(in_class)


SHARED_CT = SHARED / "dicom" / "series" / "lung_pet_ct_dx" / "Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl"


@pytest.mark.skipif(not SHARED_CT.exists(), reason=f"the shared real CT series is absent ({SHARED_CT})")
def test_a_real_ct_slice_embeds_the_same_whatever_display_window_the_file_carries(embedder):
    from orthanc_cbir.evaluation.model_report import window_invariance

    figures = window_invariance(embedder, SHARED_CT, slices=4)
    # lung window, soft-tissue window and none: closer to each other than a tenth of the next slice
    assert figures["share_below_a_tenth"] == 1.0 and figures["max_ratio_to_neighbour"] < 0.1


def test_the_card_says_where_every_piece_of_real_anatomy_came_from_and_how_the_model_saw_it(embedder):
    card = embedder.card.raw
    sources = card["training"]["sources"]
    assert {"OrganAMNIST", "LIDC-IDRI-0314", "TotalSegmentator examples"} <= set(sources)
    for name, source in sources.items():
        assert source.get("licence"), f"{name}: no licence recorded"
        if "GitHub" in source.get("obtained", "") or "repository" in source:
            assert len(source.get("commit", "")) == 40, f"{name}: no commit recorded"
    # the measure's two chest CTs were never trained on, and the card says so
    assert set(card["training"]["held_out_patients"]) == {"LIDC-IDRI-0314", "Lung_Dx-A0001"}
    assert card["input"]["ct_mapping_hu_to_grey"][0] == [-1000.0, 0.0]
    assert "never the file's display window" in card["input"]["preprocessing"]
    validation = card["validation"]
    for measure in ("organs", "cross_patient_level", "plane_region", "window_invariance"):
        assert measure in validation, f"validate-model did not measure {measure}"
    assert validation["window_invariance"]["share_below_a_tenth"] == 1.0
    assert validation["pneumonia"]["held_back_test"]["map10"] >= 0.90
    assert validation["copy_detection"]["rank1"] >= 0.99
    assert validation["real_series"]["top_hit_within_2_slices"] >= 0.95
    # issue 16's targets across patients
    assert validation["organs"]["map10"] >= 0.90 and validation["plane_region"]["precision_at_5"] >= 0.90
    level = validation["cross_patient_level"]
    assert level["first_to_second"] >= 0.90 and level["second_to_first"] >= 0.90
    assert embedder.card.level is not None and embedder.card.level.weight == 0.5
