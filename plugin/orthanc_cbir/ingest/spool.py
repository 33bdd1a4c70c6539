"""The spool: where the standalone receivers (DICOM SCP, STOW-RS) keep what they received
until a worker has indexed it.

A receiver hands each instance to :meth:`Spool.accept` *before* it acknowledges it: the
bytes go to a temporary file, are flushed to disk (``fsync``), renamed to their final name
(atomic), and one ``store-file`` entry naming the file goes on the ingest stream. A worker
reads the file, indexes it, deletes it, then acknowledges the entry. So a crash loses
nothing that was acknowledged: a file whose entry never reached the stream is enqueued
again by :meth:`Spool.recover` when the server starts (indexing is idempotent, so a file
enqueued twice is indexed once; the second entry finds the file gone). A store that is
refused (the entry could not be added: Redis away; or the write failed) leaves nothing behind:
the sender was told it is not kept and sends it again, so nothing it did not see acknowledged
is indexed later behind its back. A file that cannot be indexed is moved to ``rejected/``
beside its reason in the rejected list.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .queue import STORE_FILE, IngestQueue

_SUFFIX = ".dcm"
_SAFE_NAME = re.compile(r"[^0-9A-Za-z.\-]")


@dataclass(frozen=True)
class Accepted:
    """An instance now safe on disk and on the stream."""

    name: str
    """The spool file's name (the ``store-file`` entry's id)."""
    entry_id: str


class Spool:
    """One spool directory and the queue its files go on."""

    def __init__(self, directory: Path, queue: IngestQueue):
        self.directory = Path(directory)
        self.queue = queue
        self.directory.mkdir(parents=True, exist_ok=True)

    def accept(self, data: bytes, sop_instance_uid: str) -> Accepted:
        """Keep one received instance (a DICOM Part 10 file) and enqueue it; returns once both are durable."""
        return self._accept_stream(io.BytesIO(data), sop_instance_uid)

    def accept_copy(self, source: Path, sop_instance_uid: str) -> Accepted:
        """Like :meth:`accept` for a file elsewhere (pynetdicom's received dataset): copied in
        blocks, so a large file never sits in memory."""
        with open(source, "rb") as reader:
            return self._accept_stream(reader, sop_instance_uid)

    def accept_file(self, path: Path, sop_instance_uid: str) -> Accepted:
        """Like :meth:`accept` for a file already written inside the spool directory (a STOW-RS
        part): it is synced and renamed, not copied."""
        with open(path, "rb") as written:  # the bytes on disk before the name that makes them count
            os.fsync(written.fileno())
        name = self.name_for(sop_instance_uid)
        target = self.directory / name
        # A copy acknowledged earlier (its entry on the stream, not yet indexed) must outlive a
        # refused resend: that entry reads this name.
        acknowledged_before = target.exists()
        os.replace(path, target)
        _fsync_directory(self.directory)
        try:
            return Accepted(name, self.queue.enqueue(name, STORE_FILE))
        except Exception:  # refused: nothing stays that the sender was told is not kept
            if not acknowledged_before:
                target.unlink(missing_ok=True)
            raise

    def _accept_stream(self, reader: BinaryIO, sop_instance_uid: str) -> Accepted:
        handle = tempfile.NamedTemporaryFile(dir=self.directory, prefix=".part-", delete=False)
        partial = Path(handle.name)
        try:
            with handle:
                shutil.copyfileobj(reader, handle, 1 << 20)
            return self.accept_file(partial, sop_instance_uid)
        finally:  # a full disk (or any failure before the rename) leaves no half-written file
            partial.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """The file of a ``store-file`` entry (names never leave the spool directory)."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a spool file name: {name!r}")
        return self.directory / name

    @property
    def rejected_directory(self) -> Path:
        """Where the files that could not be indexed are kept (their reasons: ``GET /cbir/rejected``)."""
        return self.directory / "rejected"

    def set_aside(self, name: str) -> None:
        """Move a file that could not be indexed out of the way, into :attr:`rejected_directory`
        (also one whose name :meth:`path` refuses, as an older version could write)."""
        if "/" in name or name in ("", ".", ".."):
            return
        self.rejected_directory.mkdir(exist_ok=True)
        source = self.directory / name
        if source.is_file():
            os.replace(source, self.rejected_directory / name)

    def recover(self) -> int:
        """Enqueue every file left in the spool (run at start, before receiving); returns how many.
        Half-written temporary files (the sender was never acknowledged) are removed."""
        for partial in self.directory.glob(".part-*"):
            partial.unlink(missing_ok=True)
        for hidden in self.directory.glob(f".*{_SUFFIX}"):  # an older version's name for a UID starting with '.'
            self.set_aside(hidden.name)  # no entry could ever read it: enqueued, it stopped the worker
        names = sorted(p.name for p in self.directory.glob(f"*{_SUFFIX}") if not p.name.startswith("."))
        for name in names:
            self.queue.enqueue(name, STORE_FILE)
        return len(names)

    @staticmethod
    def name_for(sop_instance_uid: str) -> str:
        """The spool name of an instance: its UID (a sender cannot name a path with it, nor a
        hidden file that :meth:`path` refuses)."""
        return "_" * sop_instance_uid.startswith(".") + _SAFE_NAME.sub("_", sop_instance_uid)[:200] + _SUFFIX

    def pending(self) -> int:
        """Files received and not yet indexed."""
        return sum(1 for p in self.directory.glob(f"*{_SUFFIX}") if not p.name.startswith("."))


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
