"""Peak memory of ``orthanc-cbir backfill`` against a DICOMweb server that answers too much.

    .venv/bin/python benchmarks/backfill_memory.py

Each case runs the real ``orthanc-cbir backfill`` process (shipped model, a real redis-server)
against a small DICOMweb server on loopback, in this process, that answers one way; the peak
RSS of the backfill process (``ru_maxrss`` from ``wait4``) is printed beside what the run said:

- ``ordinary``: one study of one 256 x 256 CT instance: the process's working size (model loaded);
- ``large instance``: one valid instance of two 8192 x 8192 16-bit frames (256 MiB of pixel data,
  under the default ``MaxFileBytes``): what a legitimate large file costs;
- ``declares 10 GiB``: a WADO-RS answer whose Content-Length says 10 GiB (refused from the header);
- ``endless WADO-RS``: a chunked answer without a length that never ends, read up to ``MaxFileBytes``
  (``CBIR_MAX_FILE_BYTES``, here the 2 GiB default and 256 MiB);
- ``search at the bound``: a study search answering one JSON array just under the search-page
  bound (``MAX_SEARCH_BYTES``): the most a page can cost once parsed;
- ``endless search``: a study search answering an array that never ends (stopped at the bound).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import redis
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))
from orthanc_cbir.ingest.backfill import MAX_SEARCH_BYTES  # noqa: E402
from orthanc_cbir.local_services import RedisServer  # noqa: E402

STUDY, SERIES, INSTANCE = (f"1.2.826.0.1.3680043.8.498.81.{n}" for n in range(3))
LISTED_STUDY = [{"0020000D": {"vr": "UI", "Value": [STUDY]}, "00201208": {"vr": "IS", "Value": [1]}}]
LISTED_INSTANCE = [{"0020000D": {"vr": "UI", "Value": [STUDY]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
                    "00080018": {"vr": "UI", "Value": [INSTANCE]}, "00080060": {"vr": "CS", "Value": ["CT"]}}]
# A study search entry without a StudyInstanceUID: parsed, then skipped (no instance search follows)
UNUSABLE_ENTRY = b'{"00080020": {"vr": "DA", "Value": ["20240131"]}, "00080061": {"vr": "CS", "Value": ["CT"]}}'
BOUNDARY = b"cbir-benchmark"


def ct_instance(rows: int, frames: int = 1) -> bytes:
    """A valid CT instance of ``frames`` frames of ``rows`` x ``rows`` 16-bit noise, as a Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = INSTANCE
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, INSTANCE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, SERIES, "CT"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (frames, rows, rows), dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    answer: Callable[[BaseHTTPRequestHandler, str, int], None]
    """Answers one request (the handler, the path, the offset asked)."""
    environment: dict[str, str]


def send(handler: BaseHTTPRequestHandler, content_type: str, body: bytes, length: int | None = None) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def send_chunked(handler: BaseHTTPRequestHandler, content_type: str, chunks: Iterator[bytes]) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    try:
        for chunk in chunks:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.wfile.write(b"0\r\n\r\n")
    except OSError:  # the client stopped reading
        pass


def listing(handler: BaseHTTPRequestHandler, path: str, offset: int) -> bool:
    """The ordinary study and instance searches (one study of one instance); True when answered."""
    if path == "/studies":
        send(handler, "application/dicom+json", json.dumps([] if offset else LISTED_STUDY).encode())
    elif path == f"/studies/{STUDY}/instances":
        send(handler, "application/dicom+json", json.dumps([] if offset else LISTED_INSTANCE).encode())
    else:
        return False
    return True


def multipart(data: bytes) -> bytes:
    return b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n--%s--\r\n" % (BOUNDARY, data, BOUNDARY)


MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'


def retrieving(data: bytes) -> Callable[[BaseHTTPRequestHandler, str, int], None]:
    body = multipart(data)

    def answer(handler: BaseHTTPRequestHandler, path: str, offset: int) -> None:
        if not listing(handler, path, offset):
            send(handler, MULTIPART, body)

    return answer


def declaring(size: int) -> Callable[[BaseHTTPRequestHandler, str, int], None]:
    def answer(handler: BaseHTTPRequestHandler, path: str, offset: int) -> None:
        if not listing(handler, path, offset):
            send(handler, MULTIPART, b"", length=size)

    return answer


def endless_instance(handler: BaseHTTPRequestHandler, path: str, offset: int) -> None:
    if listing(handler, path, offset):
        return
    block = b"\0" * (1 << 20)
    head = b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % BOUNDARY
    send_chunked(handler, MULTIPART, iter([head] + [block] * (16 << 10)))  # 16 GiB if nobody stops


def search_array(size: int) -> Callable[[BaseHTTPRequestHandler, str, int], None]:
    """A study search answering a JSON array of about ``size`` bytes of unusable entries."""

    def answer(handler: BaseHTTPRequestHandler, path: str, offset: int) -> None:
        if path != "/studies" or offset:
            send(handler, "application/dicom+json", b"[]")
            return
        entry = UNUSABLE_ENTRY + b","
        block = entry * ((1 << 20) // len(entry))
        blocks = max(size // len(block), 1)

        def chunks() -> Iterator[bytes]:
            yield b"["
            for _ in range(blocks):
                yield block
            yield UNUSABLE_ENTRY + b"]"

        send_chunked(handler, "application/dicom+json", chunks())

    return answer


@contextmanager
def dicomweb_server(answer: Callable[[BaseHTTPRequestHandler, str, int], None]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            answer(self, parts.path, int(parse_qs(parts.query).get("offset", ["0"])[0]))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_backfill(url: str, redis_url: str, environment: dict[str, str]) -> tuple[int, float, str]:
    """(exit status, peak RSS in MiB, the run's last line) of one ``orthanc-cbir backfill``."""
    process = subprocess.Popen([sys.executable, "-m", "orthanc_cbir.cli", "backfill", "--dicomweb", url,
                                "--redis-url", redis_url, "--restart"],
                               env={**os.environ, "PYTHONPATH": str(ROOT / "plugin"), **environment},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return process.returncode, usage.ru_maxrss / 1024, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    cases = [
        Case("ordinary", retrieving(ct_instance(256)), {}),
        Case("large instance (256 MiB of pixels)", retrieving(ct_instance(8192, frames=2)), {}),
        Case("declares 10 GiB", declaring(10 << 30), {}),
        Case("endless WADO-RS, MaxFileBytes 2 GiB", endless_instance, {}),
        Case("endless WADO-RS, MaxFileBytes 256 MiB", endless_instance, {"CBIR_MAX_FILE_BYTES": str(256 << 20)}),
        Case(f"search at the bound ({MAX_SEARCH_BYTES >> 20} MiB)", search_array(MAX_SEARCH_BYTES - (2 << 20)), {}),
        Case("endless search", search_array(64 * MAX_SEARCH_BYTES), {}),
    ]
    with tempfile.TemporaryDirectory() as state, RedisServer(Path(state)) as redis_server:
        print(f"{'case':42s} {'exit':>4s} {'peak RSS':>10s}  what the run said")
        for case in cases:
            redis.Redis.from_url(redis_server.url).flushdb()  # every case indexes the same instance anew
            with dicomweb_server(case.answer) as url:
                code, peak_mb, said = run_backfill(url, redis_server.url, case.environment)
            print(f"{case.name:42s} {code:4d} {peak_mb:7.0f} MiB  {said[:110]}", flush=True)


if __name__ == "__main__":
    main()
