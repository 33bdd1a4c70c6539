"""Pixel-step throughput: instances/s per transfer syntax, on one 512x512 CT slice
re-encoded in each syntax pydicom can write here, plus the shared corpus when present,
against a bare pydicom + numpy decode of the same bytes.

    .venv/bin/python benchmarks/decode.py [--repeat 20]

Prints one row per source: decode_instance's instances/s and ms per instance, the ms of the
bare decode (``pydicom.dcmread``, ``ds.pixel_array``, rescale slope and intercept, the file's
first window or else a soft-tissue CT window, clipped float32 in 0..1) and the ratio of the two:
what the pixel step adds to decoding (its size and codestream checks, the metadata record,
the model's second picture, the decisions). Medians of the repeats. ``-`` where pydicom alone
cannot decode the file (12-bit JPEG Extended: the pixel step hands it to DCMTK).
A figure to compare between syntaxes of one run, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
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
SOFT_TISSUE = (40.0, 400.0)
"""(centre, width) of the bare decode where the file has no window, as the pixel step's CT default."""


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


def pixel_step(payload: bytes | Path) -> None:
    outcome = decode_instance(payload)
    assert isinstance(outcome, DecodedInstance), str(outcome)


def bare_decode(payload: bytes | Path) -> np.ndarray:
    """The least a grey decode does: parse, decode the pixels, modality rescale, one window."""
    ds = pydicom.dcmread(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
    values = ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    centre, width = SOFT_TISSUE
    if "WindowCenter" in ds and "WindowWidth" in ds:
        first = [v[0] if isinstance(v, MultiValue) else v for v in (ds.WindowCenter, ds.WindowWidth)]
        centre, width = float(first[0]), float(first[1])
    return np.clip((values - (centre - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def bare_decodes(payload: bytes | Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bare_decode(payload)
    except Exception:  # noqa: BLE001 - whatever pydicom raises: no bare figure for this file
        return False
    return True


def time_both(payload: bytes | Path, repeat: int) -> tuple[float, float | None]:
    """Median seconds of the pixel step and of the bare decode (``None``: pydicom alone cannot)."""
    bare_ok = bare_decodes(payload)
    runs: list[tuple[str, Callable[[bytes | Path], object]]] = [("step", pixel_step)]
    if bare_ok:
        runs.append(("bare", bare_decode))
    timings: dict[str, list[float]] = {name: [] for name, _ in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as the pixel step does: pydicom's warnings cost time to format
        for _ in range(repeat):
            # interleaved, so that a load that comes and goes on the machine weighs on both alike
            for name, function in runs:
                start = time.perf_counter()
                function(payload)
                timings[name].append(time.perf_counter() - start)
    bare = statistics.median(timings["bare"]) if bare_ok else None
    return statistics.median(timings["step"]), bare


def row(label: str, step: float, bare: float | None) -> str:
    bare_ms, ratio = (f"{1000 * bare:8.2f}", f"{step / bare:6.2f}") if bare else (f"{'-':>8}", f"{'-':>6}")
    return f"{label:58} {1 / step:8.1f} {1000 * step:8.2f} {bare_ms} {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"{'source':58} {'inst/s':>8} {'ms/inst':>8} {'bare ms':>8} {'ratio':>6}")
    for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                   JPEG2000Lossless):  # fmt: skip
        step, bare = time_both(encoded_ct(syntax), args.repeat)
        print(row("CT 512x512 " + syntax.name, step, bare))
    for name in ("REF/CT1_UNC", "JPLL/CT1_JPLL", "JLSL/CT1_JLSL", "J2KR/CT1_J2KR", "JPLY/MR1_JPLY"):
        path = SHARED_DICOM / "single" / "nema_wg04" / name
        if path.exists():
            step, bare = time_both(path, max(3, args.repeat // 4))
            print(row("shared " + name, step, bare))


if __name__ == "__main__":
    main()
