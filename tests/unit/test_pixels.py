"""The pixel step on DICOM built by the tests: each rule of the grey pipeline pinned."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, RLELossless

from orthanc_cbir.dicom import (
    DecodedInstance,
    Rejection,
    RejectionReason,
    decode_dataset,
    decode_instance,
    select_frames,
)
from tests import dicom_factory as factory


def decoded(source, **kwargs) -> DecodedInstance:
    outcome = decode_instance(source, **kwargs) if not isinstance(source, Dataset) else decode_dataset(source, **kwargs)
    assert isinstance(outcome, DecodedInstance), f"expected an image, got {outcome}"
    return outcome


def grey(source, **kwargs) -> np.ndarray:
    return decoded(source, **kwargs).images[0].pixels


HU_INTERCEPT = -2048


def hu_ramp(hu_values: list[int]) -> np.ndarray:
    """A 4x(len) CT image of the given HU values, stored for RescaleIntercept ``HU_INTERCEPT``."""
    return np.tile(np.array(hu_values, dtype=np.int32) - HU_INTERCEPT, (4, 1)).astype(np.uint16)


def test_ct_rescale_and_file_window_map_hounsfield_units_to_unit_range():
    ds = factory.grey_image(hu_ramp([-1000, -160, 40, 240, 1000]), RescaleSlope=1, RescaleIntercept=HU_INTERCEPT,
                            WindowCenter=40, WindowWidth=400)  # fmt: skip
    image = decoded(ds).images[0]
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (4, 5)
    np.testing.assert_allclose(image.pixels[0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=0.003)
    assert "modality LUT: slope 1, intercept -2048" in image.decisions
    assert any(d.startswith("display VOI: window centre 40 width 400") for d in image.decisions)


@pytest.mark.parametrize(
    "window", [{"WindowCenter": -600, "WindowWidth": 1600}, {"WindowCenter": 40, "WindowWidth": 350}, {}]
)
def test_ct_model_picture_ignores_the_file_window_and_the_display_keeps_it(window):
    hu = [-1000, -400, -100, 40, 200, 1000]
    ds = factory.grey_image(hu_ramp(hu), RescaleSlope=1, RescaleIntercept=HU_INTERCEPT, **window)
    image = decoded(ds).images[0]
    from orthanc_cbir.dicom.pixels import CT_MODEL_MAPPING

    np.testing.assert_allclose(image.model_pixels[0], np.interp(hu, *zip(*CT_MODEL_MAPPING, strict=True)), atol=1e-6)
    assert any(d.startswith("model input: CT Hounsfield units") for d in image.decisions)
    if window:  # the display picture is the file's own window
        low = window["WindowCenter"] - window["WindowWidth"] / 2
        expected = np.clip((np.array(hu) - low) / window["WindowWidth"], 0, 1)
        np.testing.assert_allclose(image.pixels[0], expected, atol=0.01)


def test_mr_model_picture_is_its_percentile_range_whatever_the_window():
    stored = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    narrow = decoded(factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR", WindowCenter=2000,
                                        WindowWidth=500)).images[0]  # fmt: skip
    plain = decoded(factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR")).images[0]
    np.testing.assert_allclose(narrow.model_pixels, plain.model_pixels)
    assert not np.allclose(narrow.pixels, plain.pixels)


@pytest.mark.parametrize(
    ("body_part", "window_name", "low_hu", "high_hu"),
    [("CHEST", "lung", -1350, 150), ("HEAD", "brain", 0, 80), ("ABDOMEN", "soft tissue", -160, 240),
     (None, "soft tissue", -160, 240)],
)  # fmt: skip
def test_ct_without_window_uses_the_body_part_default(body_part, window_name, low_hu, high_hu):
    attributes = {"BodyPartExamined": body_part} if body_part else {}
    ds = factory.grey_image(hu_ramp([low_hu, (low_hu + high_hu) // 2, high_hu]), RescaleSlope=1,
                            RescaleIntercept=HU_INTERCEPT, **attributes)  # fmt: skip
    image = decoded(ds).images[0]
    # LINEAR windows shift by half a value (PS3.3 C.11.2.1.2.1): a 1/(width-1) tolerance
    np.testing.assert_allclose(image.pixels[0], [0.0, 0.5, 1.0], atol=1.01 / (high_hu - low_hu - 1))
    assert any(f"CT {window_name} default" in d for d in image.decisions)


def test_image_without_window_or_calibration_is_scaled_by_its_own_percentiles():
    stored = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    image = decoded(factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR")).images[0]
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert 0.45 < float(image.pixels.mean()) < 0.55
    assert any("auto window 0.5-99.5 percentile" in d for d in image.decisions)


def test_monochrome1_is_inverted_so_that_bright_means_dense():
    stored = np.array([[0, 1023, 2047, 4095]], dtype=np.uint16)
    as_mono2 = grey(factory.grey_image(stored, sop_class=factory.CR_IMAGE, modality="CR", bits_stored=12,
                                       WindowCenter=2048, WindowWidth=4096))  # fmt: skip
    as_mono1 = grey(factory.grey_image(stored, sop_class=factory.CR_IMAGE, modality="CR", bits_stored=12,
                                       photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096))  # fmt: skip
    np.testing.assert_allclose(as_mono1, 1.0 - as_mono2, atol=1e-6)
    assert as_mono1[0, 0] == pytest.approx(1.0, abs=1e-3)


def test_signed_pixels_keep_their_sign_through_rescale():
    stored = np.array([[-1024, -24, 0, 976]], dtype=np.int16)  # HU = stored
    ds = factory.grey_image(stored, RescaleSlope=1, RescaleIntercept=0, WindowCenter=0, WindowWidth=2000)
    np.testing.assert_allclose(grey(ds)[0], [0.0, 0.488, 0.5, 0.988], atol=0.002)


def test_sigmoid_voi_function_is_honoured():
    stored = np.array([[0, 500, 1000]], dtype=np.uint16)
    ds = factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR", WindowCenter=500,
                            WindowWidth=200, VOILUTFunction="SIGMOID")  # fmt: skip
    values = grey(ds)[0]
    assert values[1] == pytest.approx(0.5, abs=1e-3) and values[0] < 0.01 and values[2] > 0.99


def test_modality_lut_sequence_replaces_rescale():
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.LUTData = [0, 100, 300, 400]
    ds = factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR", WindowCenter=200, WindowWidth=400,
                            VOILUTFunction="LINEAR_EXACT")  # fmt: skip
    ds.ModalityLUTSequence = Sequence([lut])
    np.testing.assert_allclose(grey(ds)[0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_voi_lut_sequence_wins_over_window():
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]
    lut.LUTData = [255, 0, 255, 0]  # deliberately not monotonic: only the LUT gives this
    ds = factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR", WindowCenter=1, WindowWidth=2)
    ds.VOILUTSequence = Sequence([lut])
    image = decoded(ds).images[0]
    np.testing.assert_allclose(image.pixels[0], [1.0, 0.0, 1.0, 0.0])
    assert any(d.startswith("display VOI: LUT sequence") for d in image.decisions)


def test_rgb_becomes_bt601_luma():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = 255
    np.testing.assert_allclose(grey(factory.colour_image(rgb)), [[0.299, 0.587, 0.114], [1, 1, 1]], atol=1e-3)


def test_ybr_full_gives_the_same_grey_as_its_rgb():
    from pydicom.pixels.processing import convert_color_space

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    from_rgb = grey(factory.colour_image(rgb))
    from_ybr = grey(factory.colour_image(ybr, photometric="YBR_FULL"))
    np.testing.assert_allclose(from_ybr, from_rgb, atol=2.5 / 255)


def test_palette_colour_is_looked_up_then_made_grey():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)
    zeros = np.zeros(256, dtype=np.uint16)
    ds = factory.palette_image(np.array([[0, 255], [128, 64]]), red=ramp, green=zeros, blue=zeros)
    image = decoded(ds).images[0]
    np.testing.assert_allclose(image.pixels, 0.299 * np.array([[0, 1], [128 / 255, 64 / 255]]), atol=2e-3)
    assert any(d.startswith("palette colour") for d in image.decisions)


def test_enhanced_ct_takes_rescale_and_window_of_the_chosen_frame():
    frames = np.stack([np.full((4, 4), value, dtype=np.uint16) for value in (100, 200, 300)])
    ds = factory.enhanced_ct(frames, per_frame_rescale=[(1, 0), (1, -200), (1, 0)],
                             per_frame_window=[(0, 100), (25, 100), (0, 100)])  # fmt: skip
    image = decoded(ds).images[0]
    assert image.frame_index == 1  # the middle frame
    # frame 1: HU = 200 - 200 = 0; its own window 25/100 (PS3.3 C.11.2.1.2.1) puts 0 at 0.2525
    assert image.pixels[0, 0] == pytest.approx((0 - (25 - 0.5)) / (100 - 1) + 0.5, abs=1e-3)
    assert "modality LUT: slope 1, intercept -200" in image.decisions


def test_multi_frame_instance_yields_evenly_spread_frames():
    frames = np.stack([np.full((2, 2), 10 * i, dtype=np.uint16) for i in range(10)])
    outcome = decoded(factory.grey_image(frames, sop_class=factory.MR_IMAGE, modality="MR"), max_frames=3)
    assert outcome.number_of_frames == 10
    assert [image.frame_index for image in outcome.images] == [1, 5, 8]


@pytest.mark.parametrize(
    ("frames", "max_frames", "expected"),
    [(1, 1, [0]), (30, 1, [15]), (2, 1, [1]), (3, 5, [0, 1, 2]), (10, 2, [2, 7]), (120, 4, [15, 45, 75, 105])],
)
def test_select_frames_takes_all_or_the_centres_of_even_shares(frames, max_frames, expected):
    assert select_frames(frames, max_frames) == expected


def test_select_frames_refuses_zero():
    with pytest.raises(ValueError):
        select_frames(5, 0)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_lossless_compression_decodes_to_the_same_image(syntax):
    stored = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    native = factory.grey_image(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024)
    compressed = factory.grey_image(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024)
    compressed.compress(syntax)
    image = decoded(factory.to_bytes(compressed)).images[0]
    np.testing.assert_array_equal(image.pixels, grey(native))
    assert image.decisions[0] == f"decoder: pydicom ({syntax.name})"


def test_file_without_preamble_or_file_meta_decodes():
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    ds = factory.grey_image(stored, sop_class=factory.MR_IMAGE, modality="MR", WindowCenter=8, WindowWidth=16)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    write_dataset(buffer, ds)  # the body alone, no preamble or file meta, like an old ACR-NEMA file
    image = decoded(buffer.getvalue()).images[0]
    assert image.pixels.shape == (4, 4)
    assert image.decisions[0] == "decoder: pydicom (Implicit VR Little Endian)"


def test_structured_report_is_rejected_as_not_an_image():
    outcome = decode_instance(factory.to_bytes(factory.structured_report()))
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectionReason.NOT_AN_IMAGE
    assert "Comprehensive SR Storage has no pixel data" in str(outcome)
    assert outcome.metadata is not None and outcome.metadata.modality == "SR"


@pytest.mark.parametrize("payload", [b"", b"\x89PNG\r\n\x1a\n" + bytes(200), b"hello world" * 30])
def test_bytes_that_are_not_dicom_are_rejected_not_raised(payload):
    outcome = decode_instance(payload)
    assert isinstance(outcome, Rejection) and outcome.reason is RejectionReason.NOT_DICOM


def test_truncated_pixel_data_is_rejected_as_corrupt():
    ds = factory.grey_image(np.zeros((64, 64), dtype=np.uint16))
    ds.PixelData = ds.PixelData[:1000]
    outcome = decode_dataset(ds)
    assert isinstance(outcome, Rejection) and outcome.reason is RejectionReason.CORRUPT_PIXEL_DATA


def test_transfer_syntax_without_decoder_is_rejected_as_no_decoder():
    ds = factory.grey_image(np.zeros((8, 8), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: video, no image decoder
    outcome = decode_dataset(ds)
    assert isinstance(outcome, Rejection) and outcome.reason is RejectionReason.NO_DECODER
    assert "MPEG2" in outcome.detail


def test_unknown_photometric_interpretation_is_rejected_as_unsupported():
    ds = factory.grey_image(np.zeros((8, 8), dtype=np.uint16), photometric="HSV")
    outcome = decode_dataset(ds)
    assert isinstance(outcome, Rejection) and outcome.reason is RejectionReason.UNSUPPORTED_IMAGE


def test_decoding_writes_no_patient_identifier_to_logs_or_warnings(caplog, recwarn):
    caplog.set_level(logging.DEBUG)
    ds = factory.grey_image(np.zeros((8, 8), dtype=np.uint16))
    ds.PatientBirthDate = "not-a-date"  # malformed values make pydicom talk
    raw = factory.to_bytes(ds).replace(b"TestVendor", b"TestVend\xff\xfe")
    for payload in (raw, raw[: len(raw) // 2], factory.to_bytes(factory.structured_report())):
        decode_instance(payload)
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    for identifier in (factory.PATIENT_NAME, "Doe", factory.PATIENT_ID):
        assert identifier not in said


SHARED_SINGLE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom" / "single" / "pydicom_data_wheel"
)


@pytest.mark.skipif(not (SHARED_SINGLE / "OBXXXX1A_expb.dcm").exists(), reason="the shared DICOM corpus is absent")
def test_a_big_endian_palette_image_decodes_like_its_little_endian_twin():
    little = decode_instance(SHARED_SINGLE / "OBXXXX1A.dcm")
    big = decode_instance(SHARED_SINGLE / "OBXXXX1A_expb.dcm")
    np.testing.assert_allclose(big.images[0].pixels, little.images[0].pixels)
    again = decode_instance(SHARED_SINGLE / "OBXXXX1A_expb.dcm")  # nothing of the first decode left behind
    np.testing.assert_allclose(again.images[0].pixels, little.images[0].pixels)
