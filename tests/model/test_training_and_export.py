"""A few training steps, the export to ONNX, and the embedder on the exported file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orthanc_cbir.model.embedder import Embedder, ModelContractError, card_path
from orthanc_cbir.training.export import export, load_checkpoint
from orthanc_cbir.training.spectrum import SpectralDescriptor
from orthanc_cbir.training.train import TrainConfig, refit

LEVEL_DIMS = 2 * len(TrainConfig.level_periods_mm)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    checkpoint, _ = tiny_checkpoint
    onnx_path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    export(checkpoint, onnx_path)
    return onnx_path


def test_a_tiny_training_run_records_its_history_and_checkpoint(tiny_checkpoint):
    checkpoint, summary = tiny_checkpoint
    assert checkpoint.exists()
    assert summary["history"][0]["epoch"] == 1
    assert 0.0 <= summary["history"][0]["mednist_accuracy"] <= 1.0
    assert summary["config"]["seed"] == 0 and summary["torch"] == torch.__version__


def test_onnx_agrees_with_torch(tiny_checkpoint, exported):
    model, _, _ = load_checkpoint(tiny_checkpoint[0])
    images = torch.rand(24, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features, code_logits, *class_logits = (t.numpy() for t in model(images))
    out = Embedder(exported, batch_size=7).embed(images.numpy())
    np.testing.assert_allclose(out.features, features, atol=1e-4)
    np.testing.assert_array_equal(out.codes, np.packbits(code_logits > 0, axis=1))
    for head_logits, probabilities in zip(class_logits, out.probabilities.values(), strict=False):
        np.testing.assert_array_equal(probabilities.argmax(axis=1), head_logits.argmax(axis=1))


def test_card_describes_the_exported_file(exported):
    card = json.loads(card_path(exported).read_text())
    embedder = Embedder(exported)
    assert embedder.card.code_bits == 3 * 8 + 16 == sum(s["length"] for s in card["code_layout"])
    assert [s["name"] for s in card["code_layout"]] == ["modality", "region", "pathology", "appearance"]
    # CNN embedding + spectral descriptor + the level circles (cos and sin each)
    assert card["outputs"]["features"] == 32 + 16 + LEVEL_DIMS and card["training"]["seed"] == 0
    assert embedder.version.startswith("tiny@")


def test_the_card_says_where_the_level_lies_and_the_product_reads_the_networks_level_back(tiny_checkpoint, exported):
    model, config, _ = load_checkpoint(tiny_checkpoint[0])
    level = Embedder(exported).card.level
    assert level is not None and level.stop == 32 + 16 + LEVEL_DIMS and level.weight == config.level_feature_weight
    images = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        predicted_mm = 100.0 * model.net(images)["level"].numpy()
    out = Embedder(exported).embed(images.numpy())
    np.testing.assert_allclose(level.decode(out.features), predicted_mm, atol=0.05)
    np.testing.assert_allclose(out.features[:, level.start :], level.encode(predicted_mm), atol=1e-5)


def test_embedder_is_batch_size_invariant(exported):
    images = np.random.default_rng(5).random((10, 64, 64)).astype(np.float32)
    one, many = Embedder(exported, batch_size=1).embed(images), Embedder(exported, batch_size=32).embed(images)
    np.testing.assert_allclose(one.features, many.features, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (("onnx", "sha256"), "0" * 64, "different exports"),
        (("outputs", "features"), 31, None),
        (("input", "size"), 96, None),
    ],
)
def test_embedder_refuses_a_card_that_breaks_the_contract(exported, tmp_path, field, value, message):
    card = json.loads(card_path(exported).read_text())
    card[field[0]][field[1]] = value
    copy = tmp_path / "model.onnx"
    copy.write_bytes(exported.read_bytes())
    card_path(copy).write_text(json.dumps(card))
    with pytest.raises(ModelContractError, match=message):
        Embedder(copy)


def test_embedder_refuses_a_model_without_its_card(exported, tmp_path):
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(exported.read_bytes())
    with pytest.raises(ModelContractError, match="no model card"):
        Embedder(lonely)


def test_spectral_log_magnitudes_are_those_of_the_fft_of_the_windowed_image():
    spectral = SpectralDescriptor(size=64, frequencies=5, dims=8)
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    windowed = (image - image.mean()) * np.outer(np.hanning(64), np.hanning(64))
    spectrum = np.fft.rfft2(windowed)
    rows = list(range(6)) + list(range(-5, 0))
    expected = np.log1p(10 * np.abs(spectrum[rows][:, :6])).ravel()
    actual = spectral.log_magnitudes(torch.from_numpy(image)[None, None])[0].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_spectral_pca_needs_as_many_images_as_dimensions():
    with pytest.raises(ValueError, match="needs >= 8 images"):
        SpectralDescriptor(size=64, frequencies=5, dims=8).fit(np.zeros((4, 1, 64, 64), np.float32))


def test_refit_reproduces_the_fits_of_the_training_run(tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    summary = refit(checkpoint, tmp_path)
    trained, refitted = (torch.load(path, weights_only=False) for path in (checkpoint, tmp_path / "checkpoint.pt"))
    assert summary["refit"]["from"] == str(checkpoint)
    for name, value in trained["spectral"].items():
        torch.testing.assert_close(refitted["spectral"][name], value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(refitted["itq_projection"], trained["itq_projection"], rtol=1e-4, atol=1e-5)


def test_refit_with_other_level_periods_exports_them_and_leaves_the_network_as_trained(tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    refit(checkpoint, tmp_path, level_periods_mm=(3200.0, 800.0, 100.0))
    export(tmp_path / "checkpoint.pt", tmp_path / "refitted.onnx")
    level = Embedder(tmp_path / "refitted.onnx").card.level
    assert level is not None and level.periods_mm == (3200.0, 800.0, 100.0) and level.stop == 32 + 16 + 6
    trained, refitted = (torch.load(path, weights_only=False) for path in (checkpoint, tmp_path / "checkpoint.pt"))
    for name, value in trained["state_dict"].items():
        torch.testing.assert_close(refitted["state_dict"][name], value)


def test_the_level_loss_ignores_each_volume_offset_and_punishes_a_reversed_order():
    from orthanc_cbir.training.train import level_loss

    z = torch.tensor([0.0, 50.0, 100.0, -300.0, -250.0, -200.0])
    volume = torch.tensor([1, 1, 1, 2, 2, 2])
    offsets = torch.tensor([7.0, 7.0, 7.0, -3.0, -3.0, -3.0])  # each volume shifted its own way
    assert level_loss(z / 100 + offsets, z, volume).item() == pytest.approx(0.0, abs=1e-7)
    assert level_loss(-z / 100, z, volume).item() > 0.3


def test_levels_are_taught_in_the_lung_frame_where_a_volume_shows_the_lungs_and_in_mm_elsewhere():
    from orthanc_cbir.training.data import ImageSet, label_arrays
    from orthanc_cbir.training.train import level_targets

    image_set = ImageSet(np.zeros((4, 8, 8), dtype=np.uint8), label_arrays(4), np.array([1, 1, 2, 2]),
                         np.arange(4), ["a", "b", "c", "d"], fine_class=np.zeros(4, dtype=np.int64))  # fmt: skip
    image_set.aux["level"] = np.array([-500.0, -400.0, 80.0, 120.0], dtype=np.float32)
    image_set.aux["anatomical_level"] = np.array([-250.0, -125.0, np.nan, np.nan], dtype=np.float32)
    target, anchored = level_targets(image_set, np.array([0, 1, 2, 3]))
    assert target.tolist() == [-250.0, -125.0, 80.0, 120.0]
    assert anchored.tolist() == [True, True, False, False]


def test_the_level_encoding_grows_with_the_level_difference_and_never_folds_back_within_the_body():
    from orthanc_cbir.training.spectrum import level_encoding

    levels = torch.arange(0, 1500, 5.0) / 100  # head to pelvis, in units of 100 mm
    codes = level_encoding(levels, TrainConfig.level_periods_mm)
    assert torch.allclose(codes.norm(dim=1), torch.ones(len(levels)))
    distance = (codes[:, None] - codes[None]).norm(dim=2)
    gap = (levels[:, None] - levels[None]).abs() * 100
    # anything 50 mm or more away is farther than anything within 20 mm
    assert distance[gap >= 50].min() > distance[gap <= 20].max()
