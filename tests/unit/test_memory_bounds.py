"""Decompression bombs are refused from their headers, before anything their size is allocated
(issue 17 item 5): a Deflated dataset whose deflate stream inflates to a gigabyte, and JPEG,
JPEG-LS and JPEG 2000 files of a few KB whose codestream declares a huge frame, or a frame
other than Rows x Columns. Each file is decoded by a fresh subprocess (the limits at their
defaults, an address-space limit so that a regression cannot take the machine down) whose peak
RSS is read from ``/proc/self/status`` (VmHWM): the process starts at about 80 MB, and before the fix these
files took it to 2.1 GB (Deflated), 3.0 GB (JPEG-LS) and past 6 GB (JPEG)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

from orthanc_cbir.dicom import DecodedInstance, Rejection, RejectionReason, decode_instance
from orthanc_cbir.dicom.pixels import INFLATE_SLACK, read_header
from tests import dicom_factory as factory

MiB = 2**20
PEAK_BOUND_MB = 600
"""What one of these files may cost a decoding process, start included (README, "Bad input")."""


def deflated_bomb(pixel_bytes: int = 2**30, rows: int = 16, columns: int = 16, **attributes) -> bytes:
    """A Deflated Explicit VR Little Endian file of about pixel_bytes / 1000 bytes whose pixel data
    (declared ``pixel_bytes`` long, all zeros) inflates to ``pixel_bytes``: a zlib bomb. Its
    header declares a ``rows`` x ``columns`` 16-bit image."""
    ds = factory.grey_image(np.zeros((rows, columns), np.uint16), **attributes)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.PixelData = b""
    data = factory.to_bytes(ds)
    start = 144 + struct.unpack("<I", data[140:144])[0]  # after the file meta group
    body = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    head = body[:body.rfind(b"\xe0\x7f\x10\x00")] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)]
    zeros = deflate.compress(bytes(MiB)) + deflate.flush(zlib.Z_FULL_FLUSH)  # the same bytes for each MiB
    stream += [zeros] * (pixel_bytes // MiB)
    stream.append(deflate.compress(bytes(pixel_bytes % MiB)) + deflate.flush())
    return data[:start] + b"".join(stream)


def _claiming(data: bytes, marker: bytes, offset: int, fmt: str, values: tuple[int, int]) -> bytes:
    at = data.find(marker)
    assert at > 0, marker
    out = bytearray(data)
    struct.pack_into(fmt, out, at + offset, *values)
    return bytes(out)


def jpeg_ls(rows: int = 64, columns: int = 64, claim: tuple[int, int] | None = None) -> bytes:
    """JPEG-LS of a blank frame; ``claim`` rewrites its SOF55 (height, width)."""
    ds = factory.grey_image(np.zeros((rows, columns), np.uint16), bits_stored=12)
    ds.compress(JPEGLSLossless)
    data = factory.to_bytes(ds)
    return _claiming(data, b"\xff\xf7", 5, ">HH", claim) if claim else data


def jpeg_2000(rows: int = 64, columns: int = 64, claim: tuple[int, int] | None = None) -> bytes:
    """JPEG 2000 of a blank frame; ``claim`` rewrites its SIZ (height, width)."""
    ds = factory.grey_image(np.zeros((rows, columns), np.uint16), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = factory.to_bytes(ds)
    return _claiming(data, b"\xff\x51", 6, ">II", claim[::-1]) if claim else data


def jpeg(rows: int = 64, columns: int = 64, claim: tuple[int, int] | None = None) -> bytes:
    """Baseline JPEG (Pillow's) of a blank frame; ``claim`` rewrites its SOF0 (height, width)."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((rows, columns), np.uint8)).save(out, format="JPEG")
    ds = factory.grey_image(np.zeros((rows, columns), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([out.getvalue()])
    ds["PixelData"].VR = "OB"
    data = factory.to_bytes(ds)
    return _claiming(data, b"\xff\xc0", 5, ">HH", claim) if claim else data


_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))  # a regression fails, the machine stays up
from orthanc_cbir.dicom import decode_instance
def peak_mb():  # this process's own high-water mark (getrusage's carries the parent's across fork and exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
start = peak_mb()
outcome = decode_instance(sys.argv[1])
print(json.dumps({"start_mb": start, "peak_mb": peak_mb(), "reason": getattr(outcome, "reason", None)
                  and outcome.reason.value, "detail": getattr(outcome, "detail", "")}))
"""


def decode_in_subprocess(path) -> dict:
    """Decode a file in a fresh process (default limits): its outcome and peak RSS in MB."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


BOMBS = {
    # name: (file, reason, a word of the detail)
    "deflated, 1 MB inflating to 1 GiB": (lambda: deflated_bomb(2**30), RejectionReason.TOO_LARGE,
                                          "inflates past the end of the pixel data its header declares"),
    "deflated, header of 8192 x 8192 over 1 GiB of zeros": (
        lambda: deflated_bomb(2**30, rows=8192, columns=8192), RejectionReason.TOO_LARGE, "inflates past"),
    "deflated, 128 KB declaring 8192 x 8192": (
        lambda: deflated_bomb(128 * MiB, rows=8192, columns=8192), RejectionReason.TOO_LARGE, "a decompression bomb"),
    "deflated, header of 2048 x 2048 over 1 GiB of zeros": (
        lambda: deflated_bomb(2**30, rows=2048, columns=2048), RejectionReason.TOO_LARGE, "inflates past"),
    "JPEG-LS, 2 KB declaring 8192 x 8192 everywhere": (lambda: jpeg_ls(8192, 8192), RejectionReason.TOO_LARGE,
                                                      "a decompression bomb"),
    "JPEG-LS, SOF55 declaring 40000 x 40000": (lambda: jpeg_ls(claim=(40000, 40000)), RejectionReason.TOO_LARGE,
                                              "codestream declares 40000 x 40000"),
    "JPEG, SOF0 declaring 40000 x 40000": (lambda: jpeg(claim=(40000, 40000)), RejectionReason.TOO_LARGE,
                                           "codestream declares 40000 x 40000"),
    "JPEG 2000, SIZ declaring 40000 x 40000": (lambda: jpeg_2000(claim=(40000, 40000)), RejectionReason.TOO_LARGE,
                                               "codestream declares 40000 x 40000"),
    "JPEG, SOF0 declaring 4000 x 4000 over Rows/Columns 64": (
        lambda: jpeg(claim=(4000, 4000)), RejectionReason.CORRUPT_PIXEL_DATA, "the header 64 x 64"),
    "JPEG-LS, SOF55 declaring 4000 x 4000 over Rows/Columns 64": (
        lambda: jpeg_ls(claim=(4000, 4000)), RejectionReason.CORRUPT_PIXEL_DATA, "the header 64 x 64"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_is_refused_with_a_bounded_peak_rss(name, tmp_path):
    build, reason, word = BOMBS[name]
    path = tmp_path / "bomb.dcm"
    path.write_bytes(build())
    assert path.stat().st_size < 2 * MiB
    measured = decode_in_subprocess(path)
    assert measured["reason"] == reason.value, measured
    assert word in measured["detail"], measured
    assert measured["peak_mb"] < PEAK_BOUND_MB, f"{name}: peak RSS {measured['peak_mb']:.0f} MB " \
                                                f"(the process started at {measured['start_mb']:.0f} MB)"


def test_the_same_kinds_of_file_decode_when_honest(tmp_path):
    """The checks refuse bombs, not files: each kind decodes at an ordinary size, in the bound."""
    honest = {"deflated": factory.to_bytes(_deflated(np.arange(300 * 200, dtype=np.uint16).reshape(300, 200))),
              "JPEG-LS": jpeg_ls(300, 200), "JPEG": jpeg(300, 200), "JPEG 2000": jpeg_2000(300, 200),
              "JPEG-LS 2048 x 2048 blank": jpeg_ls(2048, 2048)}  # fmt: skip
    for name, data in honest.items():
        outcome = decode_instance(data)
        assert isinstance(outcome, DecodedInstance), f"{name}: {outcome}"
    path = tmp_path / "blank.dcm"
    path.write_bytes(honest["JPEG-LS 2048 x 2048 blank"])
    measured = decode_in_subprocess(path)
    assert measured["reason"] is None and measured["peak_mb"] < PEAK_BOUND_MB, measured


def _deflated(pixels: np.ndarray):
    ds = factory.grey_image(pixels)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def test_a_deflated_file_inflates_no_further_than_its_declared_pixel_data():
    """Trailing elements and padding up to INFLATE_SLACK are read; more is a bomb."""
    ds = _deflated(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    ds.DataSetTrailingPadding = bytes(INFLATE_SLACK // 2)
    assert isinstance(decode_instance(factory.to_bytes(ds)), DecodedInstance)
    ds.DataSetTrailingPadding = bytes(2 * INFLATE_SLACK)
    outcome = decode_instance(factory.to_bytes(ds))
    assert isinstance(outcome, Rejection) and outcome.reason is RejectionReason.TOO_LARGE, outcome


def test_a_deflated_file_is_measured_against_max_file_bytes_and_max_pixels_per_frame():
    bomb = deflated_bomb(64 * MiB, rows=2048, columns=2048)  # declares 8 MiB of pixel data
    outcome = decode_instance(bomb, max_file_bytes=4 * MiB)
    assert outcome.reason is RejectionReason.TOO_LARGE and "file size limit" in outcome.detail, outcome
    outcome = decode_instance(bomb, max_pixels_per_frame=2048 * 2048 - 1)
    assert outcome.reason is RejectionReason.TOO_LARGE and "2048 x 2048" in outcome.detail, outcome
    # 64 KB of deflate holding a 4096 x 4096 frame: more than 100 pixels a byte
    assert "a decompression bomb" in decode_instance(deflated_bomb(64 * MiB, rows=4096, columns=4096)).detail


def test_a_receiver_reads_a_deflated_header_without_inflating_the_pixel_data(tmp_path):
    """STOW-RS reads each part's UIDs with read_header: the bomb's pixel data is never inflated."""
    import tracemalloc

    path = tmp_path / "bomb.dcm"
    data = deflated_bomb(2**30)
    path.write_bytes(data)
    tracemalloc.start()
    try:
        header = read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.SOPInstanceUID and "PixelData" not in header
    assert peak < 8 * MiB, f"{peak / MiB:.0f} MiB to read a header"


# -- the worker's batch ---------------------------------------------------------------------------


def test_a_worker_batch_holds_one_large_instance_at_a_time(monkeypatch):
    """A batch of 8 large honest instances (5000 x 5000: 200 MB of pictures each) is embedded one
    instance at a time, so the batch's peak is one instance's, while small ones still share one
    embedding pass. Measured with tracemalloc (numpy's allocations are traced)."""
    import tracemalloc
    from types import SimpleNamespace
    from unittest import mock

    from orthanc_cbir.dicom import NormalisedImage
    from orthanc_cbir.ingest import pipeline
    from orthanc_cbir.ingest import worker as worker_module
    from orthanc_cbir.ingest.queue import STORE, IngestEvent

    sizes = {}

    def decode(data, **_):  # a decoded instance of the size its id names, its pixels allocated here
        side = sizes[data]
        image = NormalisedImage(np.ones((side, side), np.float32), np.ones((side, side), np.float32), 0, ())
        metadata = SimpleNamespace(sop_instance_uid=f"1.2.3.{list(sizes).index(data) + 1}")
        return DecodedInstance(metadata=metadata, number_of_frames=1, images=(image,))

    passes = []

    def embed(embedder, instances, ids, regions=False):
        passes.append(len(instances))
        return [SimpleNamespace(metadata=i.metadata, orthanc=dict(o)) for i, o in zip(instances, ids, strict=True)]

    monkeypatch.setattr(worker_module, "read_instance", lambda data, **_: data)  # the "dataset" is the id
    monkeypatch.setattr(worker_module, "decode_dataset", decode)
    monkeypatch.setattr(pipeline, "embed_instances", embed)
    monkeypatch.setattr(pipeline, "reject_own_output", lambda outcome: outcome)
    orthanc = SimpleNamespace(instance_file=lambda orthanc_id: orthanc_id,
                              parents=lambda orthanc_id, identifiers: {"instance": orthanc_id})  # fmt: skip
    store = mock.MagicMock()
    store.add.side_effect = lambda records: SimpleNamespace(added=len(records), duplicates=0)
    worker = worker_module.Worker(mock.MagicMock(), orthanc, store, embedder=None)

    large = [f"L{n}" for n in range(8)]
    sizes.update({name: 5000 for name in large})
    tracemalloc.start()
    try:
        outcome = worker.process([IngestEvent(str(n), STORE, name) for n, name in enumerate(large)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_instance = 2 * 5000 * 5000 * 4
    assert outcome.indexed == 8 and passes == [1] * 8
    assert peak < 1.5 * one_instance, f"{peak / MiB:.0f} MiB held for a batch of 8 of {one_instance / MiB:.0f} MiB"

    passes.clear()
    small = [f"S{n}" for n in range(32)]
    sizes.update({name: 512 for name in small})
    assert worker.process([IngestEvent(str(n), STORE, name) for n, name in enumerate(small)]).indexed == 32
    assert passes == [32]  # ordinary instances: one embedding pass for the batch
