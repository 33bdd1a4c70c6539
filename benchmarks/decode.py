"""Pixel-step throughput: instances/s per transfer syntax, on one 512x512 CT slice
re-encoded in each syntax pydicom can write here, plus the shared corpus when present.

    .venv/bin/python benchmarks/decode.py [--repeat 20]

Prints one row per syntax: instances/s and ms per instance (median of the repeats).
A figure to compare between syntaxes of one run, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthanc_cbir.dicom import DecodedInstance, decode_instance  # noqa: E402
from tests.dicom_factory import grey_image  # noqa: E402

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def encoded_ct(syntax) -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 + (xx - 256) ** 2 < 200**2) * 1064 + rng.integers(0, 60, (512, 512))
    ds = grey_image(body.astype(np.uint16), bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024)
    if syntax.is_compressed:
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, little_endian=syntax != ExplicitVRBigEndian,
               implicit_vr=False)  # fmt: skip
    return buffer.getvalue()


def time_decode(payload: bytes | Path, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        outcome = decode_instance(payload)
        timings.append(time.perf_counter() - start)
        assert isinstance(outcome, DecodedInstance), str(outcome)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"{'source':58} {'inst/s':>8} {'ms/inst':>8}")
    for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                   JPEG2000Lossless):  # fmt: skip
        seconds = time_decode(encoded_ct(syntax), args.repeat)
        print(f"{'CT 512x512 ' + syntax.name:58} {1 / seconds:8.1f} {1000 * seconds:8.2f}")
    for name in ("REF/CT1_UNC", "JPLL/CT1_JPLL", "JLSL/CT1_JLSL", "J2KR/CT1_J2KR", "JPLY/MR1_JPLY"):
        path = SHARED_DICOM / "single" / "nema_wg04" / name
        if path.exists():
            seconds = time_decode(path, max(3, args.repeat // 4))
            print(f"{'shared ' + name:58} {1 / seconds:8.1f} {1000 * seconds:8.2f}")


if __name__ == "__main__":
    main()
