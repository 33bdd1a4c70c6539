"""Receiving STOW-RS (PS3.18 10.5), without the HTTP: the parts of a request into the spool.

The standalone server's HTTP adapter (:mod:`orthanc_cbir.api.http_server`) streams a
``multipart/related`` body through a parser whose callbacks are :class:`PartFiles`: each part
is written to its own file in the spool directory as it arrives (a request is never held whole
in memory). :func:`spool_parts` then reads each part's elements before the pixel data with
pydicom (a Deflated part inflated only that far, 16 MiB at most), checks its SOPInstanceUID and
study, syncs it and hands it to :meth:`.Spool.accept_file` (enqueued) before the answer names it
in the ReferencedSOPSequence; a worker indexes it later. It is the DICOM receiver's
(:mod:`.scp`) counterpart for DICOMweb.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydicom.dataset import Dataset

from ..dicom import looks_like_uid
from ..dicom.pixels import read_header
from .spool import Spool

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # a TypedDict defined for type checkers only

log = logging.getLogger(__name__)

# Failure Reason (0008,1197) codes of a STOW-RS answer (the C-STORE statuses, PS3.4 Annex B)
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
"""An instance of another study sent to ``POST /dicom-web/studies/{study}``."""
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


class PartFiles:
    """Multipart parser callbacks that write each part to its own file in the spool directory
    (``.part-*``: what :meth:`.Spool.recover` removes if the server dies mid-request)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: list[Path] = []
        self.ended = False
        self._handle: Any = None

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._close,
                "on_end": self._end}  # fmt: skip

    def _begin(self) -> None:
        self._close()
        self._handle = tempfile.NamedTemporaryFile(dir=self.directory, prefix=".part-", delete=False)
        self.files.append(Path(self._handle.name))

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._handle.write(data[start:end])

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        """Remove every part file not handed to the spool."""
        self._close()
        for path in self.files:
            path.unlink(missing_ok=True)


def spool_parts(spool: Spool, files: list[Path], study: str | None) -> tuple[list[Dataset], list[Dataset]]:
    """Read each part file with pydicom and hand it to the spool: (referenced, failed) items."""
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for number, path in enumerate(files, 1):
        sop_class = uid = ""
        try:
            ds = read_header(path)  # a Deflated part inflated only up to its pixel data, 16 MiB at most
            meta = getattr(ds, "file_meta", None)
            sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
            uid = str(ds.get("SOPInstanceUID") or "")
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on what is not DICOM
            log.warning("STOW-RS part %d is not a DICOM file: %s: %s", number, type(exc).__name__, exc)
            failed.append(_sop_item("", "", CANNOT_UNDERSTAND))
            continue
        if not looks_like_uid(uid):
            log.warning("STOW-RS part %d has no valid SOPInstanceUID (%r)", number, uid)
            failed.append(_sop_item(sop_class, uid if len(uid) <= 64 else "", CANNOT_UNDERSTAND))
            continue
        if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
            log.warning("STOW-RS part %d (%s) belongs to study %s, not %s", number, uid,
                        ds.get("StudyInstanceUID"), study)  # fmt: skip
            failed.append(_sop_item(sop_class, uid, DOES_NOT_MATCH))
            continue
        try:
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            spool.accept_file(path, uid)
        except (OSError, redis.RedisError) as exc:  # a full disk, or the queue down: the client may send again
            log.error("STOW-RS could not spool %s: %s: %s", uid, type(exc).__name__, exc)
            failed.append(_sop_item(sop_class, uid, OUT_OF_RESOURCES))
            continue
        except Exception:
            log.exception("STOW-RS could not spool %s", uid)
            failed.append(_sop_item(sop_class, uid, PROCESSING_FAILURE))
            continue
        referenced.append(_sop_item(sop_class, uid))
    return referenced, failed


def _sop_item(sop_class: str, uid: str, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    if failure is not None:
        item.FailureReason = failure
    return item
