"""Where a graph index is kept between runs, and shared by the processes of one host.

Building the graph (:mod:`.graph`) takes a core about four minutes at 10^6 instances; reading
one back, seconds. With the ``graph_dir`` setting, the process that builds a graph writes it to
that directory, and every process that answers queries over the same index (the Orthanc
plugin, ``orthanc-cbir serve``, the workers making "Similar cases" series, each started again)
reads it from there instead of building its own: one build per host and index, the same graph
in every process.

Layout, one folder per model version (its index's key space)::

    <graph_dir>/<version>/current.json       which build is current: {"build", "epoch", "dimensions"}
    <graph_dir>/<version>/<build>.faiss      the FAISS index (faiss.write_index)
    <graph_dir>/<version>/<build>.npz        per node: its snapshot row and its row's UID fingerprint
    <graph_dir>/<version>/build.lock         held (flock) while a process builds or reads a graph

Redis stays the truth: a graph file only says which rows it holds, and the reader checks that
against its own snapshot. A file of another index (the index flushed and made again: another
epoch) is not read; a node whose row holds another instance now (its UID's fingerprint differs)
is read as a removed row, which the walk never returns. Files are written under temporary
names and renamed, so a reader sees a whole build or none; a file that cannot be read is a
missing one (the reader builds its own).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

NO_ROW = np.iinfo(np.int64).max
"""The row of a node read back whose row holds another instance now: past every snapshot's end,
so no mask ever allows it."""
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")


@dataclass(frozen=True)
class SavedGraph:
    """A graph as written: its FAISS index and, per node, its snapshot row and that row's UID fingerprint."""

    build: str
    """The build's name (one per graph written)."""
    index: Any
    """The ``faiss.IndexHNSWSQ``."""
    rows: np.ndarray
    """int64 (nodes,)."""
    fingerprints: np.ndarray
    """uint64 (nodes,): :meth:`~.snapshot.IndexSnapshot.uid_fingerprints` of the rows when it was built."""
    built_rows: int
    """Rows its build linked in (the rest were linked in late): when a rebuild is due counts from it."""


class GraphFiles:
    """The graph folder of one index (model version) under ``directory``."""

    def __init__(self, directory: Path, version: str):
        self.directory = Path(directory) / _UNSAFE.sub("_", version)

    @contextmanager
    def building(self) -> Iterator[None]:
        """Hold the folder's lock: one process builds (or reads) a graph at a time; the others
        wait here, then read what it wrote."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "build.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def current(self, epoch: str, dimensions: int) -> str | None:
        """The name of the build written for this index (its ``epoch``, vectors of ``dimensions``), if any."""
        try:
            pointer = json.loads((self.directory / "current.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(pointer, dict) or pointer.get("epoch") != epoch or pointer.get("dimensions") != dimensions:
            return None
        build = pointer.get("build")
        return build if isinstance(build, str) and not _UNSAFE.search(build) else None

    def load(self, build: str) -> SavedGraph | None:
        """The graph of ``build`` (:meth:`current`); ``None`` when it cannot be read (gone, or damaged)."""
        try:
            index = faiss.read_index(str(self.directory / f"{build}.faiss"))
            with np.load(self.directory / f"{build}.npz") as nodes:
                rows, fingerprints = nodes["rows"].astype(np.int64), nodes["fingerprints"].astype(np.uint64)
                built_rows = int(nodes["built_rows"])
        except (OSError, RuntimeError, ValueError, KeyError) as exc:  # FAISS raises RuntimeError on a bad file
            log.warning("graph index: the graph written in %s cannot be read (%s)", self.directory, type(exc).__name__)
            return None
        if index.ntotal != len(rows) or len(fingerprints) != len(rows):
            log.warning("graph index: the graph written in %s does not match its node list", self.directory)
            return None
        return SavedGraph(build, index, rows, fingerprints, built_rows)

    def remove(self) -> bool:
        """Delete the folder (its index was dropped: ``orthanc-cbir indexes --drop``); whether there was one."""
        if not self.directory.is_dir():
            return False
        shutil.rmtree(self.directory)
        return True

    def save(self, index: Any, rows: np.ndarray, fingerprints: np.ndarray, built_rows: int, epoch: str) -> str:
        """Write a graph and make it the current one; returns its build name. Call it holding
        :meth:`building`. The builds written before it are deleted (a process reading one holds it
        open: Linux keeps it until it is read), and the partial files of a process killed while writing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        build = secrets.token_hex(8)
        graph_path, nodes_path = self.directory / f"{build}.faiss", self.directory / f"{build}.npz"
        with _written(graph_path) as partial:
            faiss.write_index(index, str(partial))
        with _written(nodes_path) as partial, open(partial, "wb") as out:
            np.savez(out, rows=rows, fingerprints=fingerprints, built_rows=np.int64(built_rows))
        pointer = {"build": build, "epoch": epoch, "dimensions": int(index.d)}
        with _written(self.directory / "current.json") as partial:
            partial.write_text(json.dumps(pointer))
        kept = {"build.lock", "current.json", graph_path.name, nodes_path.name}
        for old in self.directory.iterdir():
            if old.name not in kept and old.is_file():
                old.unlink(missing_ok=True)
        return build


@contextmanager
def _written(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to it once written (and synced) without error."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
