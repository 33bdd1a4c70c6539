"""The end-to-end demo behind ``make demo``.

It starts a private Redis and Orthanc (with this project's plugin) on loopback
ports, pushes real DICOM with DCMTK's dcmsend as a PACS would, reads
every stored instance back through Orthanc's REST API, runs the pixel step on it
and draws the contact sheet, then stops what it started.

The pipeline currently ends after the model step (embeddings, codes and predicted
labels of every image); the index and the queries join it as they land (see the
README's roadmap).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

from .dicom import Rejection, decode_instance
from .local_services import REPO_ROOT, OrthancServer, RedisServer
from .preview import PreviewEntry, describe, render_sheet

SHARED_DICOM = REPO_ROOT.parent / "shared" / "data" / "dicom"
# A real CT series and one file of each kind the pixel step must handle.
_SHARED_PICKS = (
    "series/lung_pet_ct_dx/Lung_Dx-A0001_CT_chest_5mm_kernelL_64sl",
    "series/qin_prostate_adc_mr_20sl",
    "single/nema_wg04/JPLY/RG3_JPLY",
    "single/nema_wg04/J2KR/US1_J2KR",
    "single/nema_wg04/RLE/XA1_RLE",
    "single/nema_wg04/JLSL/MG1_JLSL",
    "single/pydicom_data_wheel/OT-PAL-8-face.dcm",
    "single/pydicom_wheel/examples_ybr_color.dcm",
    "single/pydicom_data_wheel/emri_small_jpeg_2k_lossless.dcm",
    "single/pydicom_wheel/test-SR.dcm",
)
_PYDICOM_PICKS = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "rtplan.dcm")


def run_demo(state_dir: Path, data_dir: Path | None = None) -> int:
    """Run the demo; returns the process exit status (0 when every instance ended as
    an image or a named rejection)."""
    files = _demo_files(data_dir)
    state_dir = state_dir.resolve()
    print(f"demo: {len(files)} DICOM files, state in {state_dir}")
    with RedisServer(state_dir / "redis") as redis_server, OrthancServer(
        state_dir / "orthanc", redis_url=redis_server.url
    ) as orthanc:
        print(f"demo: redis on {redis_server.url}, Orthanc on {orthanc.url} (DICOM port {orthanc.dicom_port})")
        status = orthanc.get_json("/cbir/status")
        print(f"demo: plugin answers /cbir/status: {json.dumps(status)}")
        started = time.monotonic()
        push_with_dcmtk(files, orthanc)
        instances = orthanc.get_json("/instances")
        print(f"demo: Orthanc stored {len(instances)} instances in {time.monotonic() - started:.1f} s")

        outcomes: Counter[str] = Counter()
        entries = []
        for instance_id in instances:
            code, body, _ = orthanc.request("GET", f"/instances/{instance_id}/file")
            outcome = decode_instance(body) if code == 200 else None
            if outcome is None:
                print(f"demo: {instance_id}: could not be read back (HTTP {code})")
                return 1
            outcomes["rejected" if isinstance(outcome, Rejection) else "image"] += 1
            print(f"  {instance_id}: {describe(outcome)}")
            entries.append(PreviewEntry(label=instance_id, outcome=outcome))
        sheet = render_sheet(entries, state_dir / "preview.png", columns=8)
    print(f"demo: pixel step done: {outcomes['image']} images, {outcomes['rejected']} rejected; sheet at {sheet}")
    embed_step([e.outcome for e in entries if not isinstance(e.outcome, Rejection)])
    print("demo: the pipeline stops after the model step for now (index and search come next).")
    return 0


def embed_step(decoded: list) -> None:
    """Run the shipped model on every decoded image; print what it predicts."""
    from .model.embedder import Embedder

    embedder = Embedder()
    started = time.monotonic()
    out = embedder.embed_pixels([instance.images[0].pixels for instance in decoded])
    seconds = time.monotonic() - started
    print(f"demo: model {embedder.version}: {len(decoded)} images embedded in {seconds:.2f} s "
          f"({out.features.shape[1]}-d features, {out.codes.shape[1] * 8}-bit codes)")  # fmt: skip
    predicted: Counter[str] = Counter()
    for i, instance in enumerate(decoded):
        labels = {head: embedder.card.labels[head][int(p[i].argmax())] for head, p in out.probabilities.items()}
        predicted[f"{instance.metadata.modality} -> {labels['modality']} {labels['region']}"] += 1
    for line, count in sorted(predicted.items()):
        print(f"  {count:3d} x DICOM {line}")


def push_with_dcmtk(files: list[Path], orthanc: OrthancServer) -> None:
    """C-STORE files to Orthanc as a PACS would, with DCMTK's dcmsend (it proposes
    each file's own transfer syntax, compressed ones included)."""
    command = ["dcmsend", "-aet", "CBIR_DEMO", "-aec", orthanc.aet, "--no-halt", "127.0.0.1", str(orthanc.dicom_port)]
    done = subprocess.run(command + [str(f) for f in files], capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, 22):  # 22: some files were not DICOM or refused (SR of unknown class...)
        raise RuntimeError(f"dcmsend failed ({done.returncode}): {done.stderr[-2000:]}")


def _demo_files(data_dir: Path | None) -> list[Path]:
    if data_dir is not None:
        return sorted(p for p in data_dir.rglob("*") if p.is_file())
    if SHARED_DICOM.is_dir():
        picks = []
        for name in _SHARED_PICKS:
            path = SHARED_DICOM / name
            picks.extend(sorted(path.glob("*.dcm")) if path.is_dir() else [path])
        return [p for p in picks if p.exists()]
    from pydicom.data import get_testdata_file

    return [Path(get_testdata_file(name)) for name in _PYDICOM_PICKS]
