"""Bad input ends as a named rejection, never an exception, and never allocates what a header
claims: a corpus of broken DICOM (and not-DICOM) built here, and hypothesis mutating valid files.

Fuzz budget: 300 examples over DICOM mutations, 150 over random bytes, 100 over pictures
(``deadline=None``, derandomized: the same examples each run; a few seconds in all on two cores).
``CBIR_FUZZ_EXAMPLES=5000`` runs that many of each with fresh random seeds."""

from __future__ import annotations

import io
import os
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from orthanc_cbir.config import Settings
from orthanc_cbir.dicom import DecodedInstance, Rejection, RejectionReason, decode_dataset, decode_instance
from orthanc_cbir.dicom.pixels import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS_PER_FRAME
from orthanc_cbir.index.records import decode_bytes
from tests import dicom_factory as factory

R = RejectionReason
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
EXPLICIT_LE = b"1.2.840.10008.1.2.1\x00"
MiB = 2**20


def ramp(rows: int = 16, columns: int = 16) -> np.ndarray:
    return (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) * 7) % 4096


def ct(**attributes) -> bytes:
    return factory.to_bytes(factory.grey_image(ramp(), RescaleSlope=1, RescaleIntercept=-1024, **attributes))


def patched(**attributes) -> bytes:
    """A valid CT whose attributes are then overwritten (pydicom writes what it is given)."""
    ds = factory.grey_image(ramp(), RescaleSlope=1, RescaleIntercept=-1024)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return factory.to_bytes(ds)


def element_offset(data: bytes, tag: bytes) -> int:
    """Where an explicit VR little endian element's tag starts."""
    offset = data.find(tag, 132)
    assert offset > 0
    return offset


def with_length(data: bytes, tag: bytes, length: int) -> bytes:
    """``data`` with the declared length of an explicit VR element changed (its value untouched)."""
    at = element_offset(data, tag)
    vr = data[at + 4:at + 6]
    out = bytearray(data)
    if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OV"):
        out[at + 8:at + 12] = struct.pack("<I", length)
    else:
        out[at + 6:at + 8] = struct.pack("<H", length)
    return bytes(out)


def deflated_with_corrupt_stream() -> bytes:
    ds = factory.grey_image(ramp())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = factory.to_bytes(ds)
    meta_length = struct.unpack("<I", data[132 + 8:132 + 12])[0]
    start = 132 + 12 + meta_length
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[start:])  # the original stream inflates
    return data[:start] + bytes(random.Random(7).randbytes(400))


def rle(**attributes) -> bytes:
    ds = factory.grey_image(ramp())
    ds.compress(RLELossless)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return factory.to_bytes(ds)


VALID = ct()
SOP_UID_TAG = b"\x08\x00\x18\x00"

# (case id, file bytes, the reason it must end as, a word of the detail)
CORPUS: list[tuple[str, bytes, RejectionReason, str]] = [
    ("zero bytes", b"", R.NOT_DICOM, "no DICOM"),
    ("png header", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, R.NOT_DICOM, "no DICOM"),
    ("random bytes", random.Random(1).randbytes(4096), R.NOT_DICOM, ""),
    ("text", b"Patient: nobody\nThis is not DICOM.\n" * 30, R.NOT_DICOM, "no DICOM"),
    ("preamble then garbage", b"\x00" * 128 + b"DICM" + random.Random(2).randbytes(3000), R.NOT_DICOM, "preamble"),
    ("preamble only", VALID[:132], R.NOT_DICOM, "preamble"),
    ("cut in the preamble", VALID[:60], R.NOT_DICOM, ""),
    ("cut inside SOPInstanceUID", VALID[:element_offset(VALID, SOP_UID_TAG) + 12], R.TRUNCATED, "(0008,0018)"),
    ("cut inside pixel data", VALID[:element_offset(VALID, PIXEL_DATA_TAG) + 12 + 100], R.TRUNCATED, "(7FE0,0010)"),
    ("last byte missing", VALID[:-1], R.TRUNCATED, "(7FE0,0010)"),
    ("cut before pixel data", VALID[:element_offset(VALID, PIXEL_DATA_TAG)], R.NOT_AN_IMAGE, "no pixel data"),
    ("pixel data length past the end", with_length(VALID, PIXEL_DATA_TAG, 0xFFFFFFF0), R.TRUNCATED, "(7FE0,0010)"),
    ("Rows length 200", with_length(VALID, b"\x28\x00\x10\x00", 200), R.TRUNCATED, "ends inside"),
    ("Rows length 3", with_length(VALID, b"\x28\x00\x10\x00", 3), R.TRUNCATED, "ends inside"),
    ("SOPInstanceUID length 0xFFFF", with_length(VALID, SOP_UID_TAG, 0xFFFF), R.TRUNCATED, "ends inside"),
    ("absurd Rows/Columns", patched(Rows=65535, Columns=65535), R.TOO_LARGE, "65535 x 65535"),
    ("absurd Rows/Columns, colour", patched(Rows=65535, Columns=65535, SamplesPerPixel=3, PlanarConfiguration=0),
     R.TOO_LARGE, "65535 x 65535 x 3"),
    ("zero Rows", patched(Rows=0), R.CORRUPT_PIXEL_DATA, "0 x 16"),
    ("BitsAllocated 12", patched(BitsAllocated=12), R.CORRUPT_PIXEL_DATA, "bits allocated 12"),
    ("BitsAllocated 0", patched(BitsAllocated=0), R.CORRUPT_PIXEL_DATA, "bits allocated 0"),
    ("BitsAllocated 128", patched(BitsAllocated=128), R.CORRUPT_PIXEL_DATA, "bits allocated 128"),
    ("BitsAllocated 32 for 16-bit data", patched(BitsAllocated=32, BitsStored=32, HighBit=31),
     R.CORRUPT_PIXEL_DATA, "shorter than"),
    ("BitsStored > BitsAllocated", patched(BitsStored=32), R.CORRUPT_PIXEL_DATA, "Bits Stored"),
    ("SamplesPerPixel 4", patched(SamplesPerPixel=4), R.CORRUPT_PIXEL_DATA, "4 samples"),
    ("pixel data shorter than declared", patched(PixelData=b"\x00" * 100), R.CORRUPT_PIXEL_DATA, "shorter than"),
    ("NumberOfFrames 100000, one frame of data", patched(NumberOfFrames=100000), R.CORRUPT_PIXEL_DATA,
     "100000 frames"),
    ("NumberOfFrames negative", patched(NumberOfFrames=-5), R.CORRUPT_PIXEL_DATA, "Number of Frames"),
    ("RLE, NumberOfFrames 100000", rle(NumberOfFrames=100000), R.CORRUPT_PIXEL_DATA, "100000 frames"),
    ("RLE, absurd Rows/Columns", rle(Rows=65535, Columns=65535), R.TOO_LARGE, "65535 x 65535"),
    ("RLE, garbage fragments", rle(PixelData=b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x10\x00\x00\x00"
                                   + b"\x01" * 16 + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"),
     R.CORRUPT_PIXEL_DATA, "RLE"),
    ("unknown transfer syntax", VALID.replace(EXPLICIT_LE, b"1.2.3.4.5.6.7.8.9.10", 1), R.NO_DECODER, "1.2.3.4.5"),
    ("deflated, corrupt stream", deflated_with_corrupt_stream(), R.NOT_DICOM, ""),
    ("structured report", factory.to_bytes(factory.structured_report()), R.NOT_AN_IMAGE, "no pixel data"),
    ("photometric nonsense", patched(PhotometricInterpretation="HSV"), R.UNSUPPORTED_IMAGE, "HSV"),
]


@pytest.mark.parametrize(("data", "reason", "word"), [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS])
def test_broken_file_ends_as_a_named_rejection(data, reason, word):
    outcome = decode_instance(data)
    assert isinstance(outcome, Rejection), f"expected {reason}, got an image"
    assert outcome.reason is reason, str(outcome)
    assert word in outcome.detail, str(outcome)
    assert "\n" not in outcome.detail and len(outcome.detail) < 1000  # one line (two, DCMTK's included)


def test_the_valid_files_the_corpus_breaks_do_decode():
    for data in (VALID, rle()):
        assert isinstance(decode_instance(data), DecodedInstance)


def rle_that_panics() -> bytes:
    """An RLE file one byte of whose first segment makes pylibjpeg-rle's Rust code index out
    of bounds: a ``pyo3_runtime.PanicException``, a BaseException that ``except Exception`` misses
    (found by the fuzzing below)."""
    data = bytearray(rle())
    data[element_offset(bytes(data), PIXEL_DATA_TAG) + 140] = 75
    return bytes(data)


def test_a_decoder_panic_is_a_rejection_or_left_to_the_next_decoder(monkeypatch):
    assert isinstance(decode_instance(rle_that_panics()), (DecodedInstance, Rejection))  # pydicom's own RLE decoder
    monkeypatch.setattr("orthanc_cbir.dicom.pixels._plugins", lambda decoder: ["pylibjpeg"])
    monkeypatch.setattr("orthanc_cbir.dicom.pixels._dcmtk_tool", lambda ds: None)
    outcome = decode_instance(rle_that_panics())
    assert isinstance(outcome, Rejection) and outcome.reason is R.CORRUPT_PIXEL_DATA, str(outcome)
    assert outcome.detail.startswith("RLE Lossless: pylibjpeg: index out of bounds"), outcome.detail


def test_gdcm_is_not_tried_where_another_plugin_decodes():
    """GDCM aborts the process on some corrupt JPEG 2000 streams (fuzzing): no except catches that."""
    from pydicom.pixels import get_decoder

    from orthanc_cbir.dicom.pixels import _plugins

    for syntax in (JPEG2000Lossless, RLELossless):
        decoder = get_decoder(syntax)
        if set(decoder.available_plugins) - {"gdcm"}:
            assert "gdcm" not in _plugins(decoder), syntax.name


def test_malformed_elements_met_late_are_named_rejections():
    """pydicom converts an element on first use: a VR it does not know raises there (fuzzing)."""
    data = VALID.replace(b"\x28\x00\x00\x01US", b"\x28\x00\x00\x01TS", 1)  # BitsAllocated, VR "TS"
    outcome = decode_instance(data)
    assert isinstance(outcome, Rejection) and outcome.reason is R.CORRUPT_PIXEL_DATA, str(outcome)
    assert "unreadable image size" in outcome.detail
    ds = factory.grey_image(ramp())
    del ds.SOPClassUID  # so that the file meta's is read
    data = factory.to_bytes(ds).replace(b"\x02\x00\x02\x00UI", b"\x02\x00\x02\x00\x55\xf0", 1)
    outcome = decode_instance(data)
    assert isinstance(outcome, Rejection) and outcome.reason is R.NOT_DICOM, str(outcome)


@pytest.mark.parametrize("case", ["absurd Rows/Columns", "absurd Rows/Columns, colour", "RLE, absurd Rows/Columns",
                                  "NumberOfFrames 100000, one frame of data", "RLE, NumberOfFrames 100000",
                                  "pixel data length past the end"])  # fmt: skip
def test_absurd_sizes_are_refused_before_anything_is_allocated(case):
    data = dict((c[0], c[1]) for c in CORPUS)[case]
    tracemalloc.start()
    try:
        outcome = decode_instance(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, Rejection)
    assert peak < 2 * MiB, f"{peak / MiB:.1f} MiB allocated to reject {case}"


def test_the_limits_are_settings_and_keyword_arguments():
    assert Settings().max_file_bytes == DEFAULT_MAX_FILE_BYTES == 2 * 2**30
    assert Settings().max_pixels_per_frame == DEFAULT_MAX_PIXELS_PER_FRAME == 64 * MiB
    too_big = decode_instance(VALID, max_file_bytes=len(VALID) - 1)
    assert too_big.reason is R.TOO_LARGE and str(len(VALID)) in too_big.detail
    assert isinstance(decode_instance(VALID, max_file_bytes=len(VALID)), DecodedInstance)
    assert decode_instance(VALID, max_pixels_per_frame=255).reason is R.TOO_LARGE  # 16 x 16 = 256
    assert isinstance(decode_instance(VALID, max_pixels_per_frame=256), DecodedInstance)
    assert decode_dataset(factory.grey_image(ramp()), max_pixels_per_frame=255).reason is R.TOO_LARGE
    assert decode_bytes(VALID, "q", max_file_bytes=10).reason is R.TOO_LARGE


def test_file_objects_and_paths_are_measured_before_they_are_read(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(VALID)
    assert decode_instance(path, max_file_bytes=100).reason is R.TOO_LARGE
    assert decode_instance(io.BytesIO(VALID), max_file_bytes=100).reason is R.TOO_LARGE
    assert isinstance(decode_instance(io.BytesIO(VALID)), DecodedInstance)


def picture(size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size[::-1], dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its CRC recomputed) over 16 x 16 data."""
    data = bytearray(picture())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(("data", "reason"), [
    (png_claiming(60000, 60000), R.TOO_LARGE),  # Pillow's own bomb limit
    (png_claiming(9000, 9000), R.TOO_LARGE),  # under Pillow's, over max_pixels_per_frame
    (picture()[:40], R.UNSUPPORTED_IMAGE),
    (b"\xff\xd8\xff" + b"\x00" * 50, R.UNSUPPORTED_IMAGE),
    (b"\x89PNG\r\n\x1a\n", R.UNSUPPORTED_IMAGE),
], ids=["png 60000x60000", "png 9000x9000", "truncated png", "jpeg signature only", "png signature only"])  # fmt: skip
def test_broken_pictures_are_named_rejections(data, reason):
    tracemalloc.start()
    try:
        outcome = decode_bytes(data, "upload")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, Rejection) and outcome.reason is reason, str(outcome)
    assert peak < 2 * MiB


# -- fuzzing ----------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    """Small valid files of each kind the decoder handles differently."""
    signed = factory.grey_image((ramp(8, 12).astype(np.int16) - 900), modality="MR", sop_class=factory.MR_IMAGE,
                                WindowCenter=[0, 40], WindowWidth=[400, 80])  # fmt: skip
    colour = factory.colour_image(np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    palette = factory.palette_image(np.arange(64, dtype=np.uint8).reshape(8, 8), *(np.arange(256) * 256,) * 3)
    enhanced = factory.enhanced_ct(np.stack([ramp(8, 8)] * 3), [(1, -1024)] * 3, [(40, 400)] * 3)
    implicit = factory.grey_image(
        ramp(8, 8), sop_class=factory.CR_IMAGE, modality="CR", PhotometricInterpretation="MONOCHROME1"
    )
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    deflated = factory.grey_image(ramp(8, 8))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    j2k = factory.grey_image(ramp(32, 32), bits_stored=12)
    j2k.compress(JPEG2000Lossless)
    files = [factory.to_bytes(ds) for ds in (signed, colour, palette, enhanced, implicit, deflated, j2k)]
    return [ct(), rle(), *files]


SEEDS = _seeds()
INTERESTING = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFF0]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "length":  # a 2- or 4-byte field, likely a length, set to a value that tests bounds
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(INTERESTING)) & (2 ** (8 * width) - 1)
            data[at:at + width] = value.to_bytes(width, "little")
    return bytes(data)


def assert_outcome(outcome) -> None:
    assert isinstance(outcome, (DecodedInstance, Rejection)), type(outcome)
    if isinstance(outcome, Rejection):
        assert isinstance(outcome.reason, RejectionReason) and outcome.detail
        return
    for image in outcome.images:
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert np.isfinite(image.pixels).all() and 0.0 <= image.pixels.min() <= image.pixels.max() <= 1.0


EXAMPLES = int(os.environ.get("CBIR_FUZZ_EXAMPLES", 0))
FUZZ = settings(deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@settings(FUZZ, max_examples=EXAMPLES or 300)
@given(data=mutated(), frames=st.sampled_from([1, 3]))
def test_fuzz_mutated_dicom_never_raises(data, frames):
    assert_outcome(decode_instance(data, max_frames=frames, max_pixels_per_frame=2**16))


@settings(FUZZ, max_examples=EXAMPLES or 150)
@given(data=st.one_of(st.binary(max_size=2048), st.binary(max_size=512).map(lambda b: b"\x00" * 128 + b"DICM" + b)))
def test_fuzz_random_bytes_never_raise(data):
    assert_outcome(decode_instance(data))
    assert_outcome(decode_bytes(data, "upload"))


PICTURES = [picture(), picture((5, 3), "JPEG"), picture((1, 1))]


@settings(FUZZ, max_examples=EXAMPLES or 100)
@given(seed=st.sampled_from(PICTURES), cuts=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
       end=st.integers(8, 2000))  # fmt: skip
def test_fuzz_pictures_never_raise(seed, cuts, end):
    data = bytearray(seed)
    for at, value in cuts:
        if 8 <= at < len(data):  # keep the signature, so that the picture path is taken
            data[at] = value
    assert_outcome(decode_bytes(bytes(data[:end]), "upload", max_pixels_per_frame=2**16))


def test_a_dcmtk_decoder_gets_no_secret_of_the_worker(monkeypatch, tmp_path):
    """DCMTK parses untrusted pixel data in a child process: the worker's passwords must not be in
    its environment. A stand-in decoder (a real child process) writes what it was given."""
    seen = tmp_path / "environment.txt"
    decoder = tmp_path / "dcmdrle"
    decoder.write_text(f"#!/bin/sh\nenv > {seen}\nexit 1\n")
    decoder.chmod(0o755)
    monkeypatch.setenv("CBIR_REDIS_PASSWORD", "redis-secret-4471")
    monkeypatch.setenv("CBIR_ORTHANC_PASSWORD", "orthanc-secret-9902")
    monkeypatch.setenv("CBIR_HTTP_TOKEN", "token-secret-3315")
    monkeypatch.setattr("orthanc_cbir.dicom.pixels._plugins", lambda decoder: [])
    monkeypatch.setattr("orthanc_cbir.dicom.pixels._dcmtk_tool", lambda ds: str(decoder))
    outcome = decode_instance(rle())
    assert isinstance(outcome, Rejection) and "dcmdrle failed" in outcome.detail, str(outcome)
    environment = seen.read_text()
    assert "PATH=" in environment
    assert not any(secret in environment for secret in ("redis-secret", "orthanc-secret", "token-secret", "CBIR_"))
