"""The one preprocessing function shared by training and the runtime."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from orthanc_cbir.model.preprocess import read_picture, to_model_input


def test_square_image_is_resized_to_the_model_input():
    out = to_model_input(np.full((512, 512), 0.25, dtype=np.float32))
    assert out.shape == (64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


@pytest.mark.parametrize("side", [512, 500, 130, 128])
def test_a_shrunk_image_is_the_box_average_of_its_pixels_whole_factor_or_not(side):
    """A whole factor (512, 128) goes through PIL's reduce, any other through its box resize: each
    model pixel is the mean of the pixels it covers, as it was before reduce took the whole factors."""
    image = np.random.default_rng(side).random((side, side)).astype(np.float32)
    expected = np.asarray(Image.fromarray(image, mode="F").resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    np.testing.assert_allclose(to_model_input(image), expected, atol=1e-6)
    if side % 64 == 0:
        np.testing.assert_allclose(to_model_input(image), image.reshape(64, side // 64, 64, -1).mean(axis=(1, 3)),
                                   atol=1e-6)  # fmt: skip


def test_non_square_image_is_padded_around_its_centre_not_stretched():
    image = np.ones((32, 64), dtype=np.float32)
    out = to_model_input(image)
    assert out[:16].max() == 0 and out[48:].max() == 0  # black bands above and below
    np.testing.assert_allclose(out[16:48], 1.0, atol=1e-6)


def test_small_image_is_enlarged_and_values_stay_in_range():
    out = to_model_input(np.random.default_rng(0).random((28, 28)).astype(np.float32))
    assert out.shape == (64, 64) and 0.0 <= out.min() <= out.max() <= 1.0


def test_a_model_input_is_returned_unchanged():
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    np.testing.assert_array_equal(to_model_input(image), image)


def test_three_dimensional_input_is_refused():
    with pytest.raises(ValueError):
        to_model_input(np.zeros((3, 64, 64)))


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_pictures_are_read_as_grey_in_unit_range(mode):
    values = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    if mode == "I;16":
        picture = Image.fromarray((values * 65535).astype(np.uint16))
    else:
        picture = Image.fromarray((values * 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    grey = read_picture(buffer.getvalue())
    assert grey.shape == (16, 16) and grey.dtype == np.float32
    np.testing.assert_allclose(grey, values, atol=1 / 255 + 1e-6)
