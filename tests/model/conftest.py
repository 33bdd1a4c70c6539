"""A tiny MedNIST-like archive and a model trained on it for a few steps (module scope:
the training run is shared by the tests that need a checkpoint)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the 'train' extra (torch) is not installed")

from orthanc_cbir.training.data import MEDNIST_CLASSES  # noqa: E402


def synthetic_picture(class_index: int, number: int, rng: np.random.Generator) -> bytes:
    """A 64x64 JPEG: a class-specific blob pattern that drifts with the file number."""
    yy, xx = np.mgrid[:64, :64]
    centre = 20 + 4 * class_index + (number % 10)
    image = 120 * np.exp(-((yy - centre) ** 2 + (xx - 64 + centre) ** 2) / (60 + 25 * class_index))
    image = image + 40 * (class_index % 2) * (xx > 32) + rng.normal(0, 6, (64, 64))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_mednist(tmp_path_factory):
    path = tmp_path_factory.mktemp("mednist") / "tiny_mednist.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for class_index, name in enumerate(sorted(MEDNIST_CLASSES)):
            for number in range(40):
                data = synthetic_picture(class_index, number, rng)
                info = tarfile.TarInfo(f"{name}/{number:06d}.jpeg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_mednist, tmp_path_factory):
    from orthanc_cbir.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("training")
    config = TrainConfig(mednist=str(tiny_mednist), epochs=1, batch_size=32, widths=(8, 16, 32, 64),
                         embedding_dim=32, appearance_bits=16, spectral_frequencies=4, spectral_dims=16,
                         split_block=4, cache_dir=None)  # fmt: skip
    summary = train(config, out, progress=False)
    return out / "checkpoint.pt", summary
