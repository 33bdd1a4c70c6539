"""What the integration tests share: pushing DICOM the way a PACS does, and waiting for it."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from orthanc_cbir.local_services import dcmtk_environment
from tests import dicom_factory as factory


def storescu(orthanc, paths) -> None:
    done = subprocess.run(["storescu", "-aet", "TEST_PACS", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120,
                          env=dcmtk_environment())  # fmt: skip
    assert done.returncode == 0, done.stderr


def sop_instance_uids(paths) -> set[str]:
    """The SOPInstanceUIDs of DICOM files."""
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def synthetic_series(folder: Path, slices: int = 12, size: int = 64, texture: int = 0, **attributes: Any) -> list[Path]:
    """A smooth phantom whose slices change gradually, so neighbours are the adjacent slices;
    ``texture`` (0 = none) stripes it so that two series are told apart. ``attributes`` (patient,
    ``StudyInstanceUID``...) are set on every slice."""
    folder.mkdir(parents=True, exist_ok=True)
    attributes = {"StudyInstanceUID": factory.generate_uid(), "BodyPartExamined": "CHEST", **attributes}
    series = factory.generate_uid()
    yy, xx = np.mgrid[:size, :size] * (64 / size)
    paths = []
    for z in range(slices):
        radius = 8 + 1.5 * z
        disc = ((yy - 32) ** 2 + (xx - 20 - z) ** 2) < radius**2
        stripes = ((xx + yy) // texture) % 2 if texture else 0
        image = (disc * (1000 + 600 * stripes)).astype(np.uint16)
        ds = factory.grey_image(image, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, SeriesInstanceUID=series,
                                InstanceNumber=z + 1, ImagePositionPatient=[0, 0, 5.0 * z], **attributes)  # fmt: skip
        paths.append(folder / f"slice{z:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def push(server, paths, acknowledged: list[str], started: threading.Event | None = None) -> None:
    """C-STORE each file on one association to ``server`` (its ``dicom_port`` and ``aet``), as pynetdicom's SCU,
    recording the SOPInstanceUIDs answered Success, until the association breaks; ``started`` is set at the 5th."""
    ae = AE(ae_title="TEST_PACS")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    if not association.is_established:
        return
    try:
        for path in paths:
            ds = dcmread(path)
            try:
                status = association.send_c_store(ds)
            except (RuntimeError, OSError):  # pynetdicom's word for an association that broke meanwhile
                return
            if not association.is_established or "Status" not in status or int(status.Status) != 0:
                return
            acknowledged.append(str(ds.SOPInstanceUID))
            if started is not None and len(acknowledged) == 5:
                started.set()
    finally:
        if association.is_established:
            association.release()
