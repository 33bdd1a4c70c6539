"""Receiving processes: the standalone DICOM SCP on one port in several processes.

pynetdicom runs each association in a thread of one Python process, and those threads share one
interpreter lock: one process receives 100-170 instances/s however many associations a PACS
opens (README, "Receiving without Orthanc"). With ``scp_processes`` N > 1, ``orthanc-cbir serve``
listens with ``SO_REUSEPORT`` and starts N - 1 receiving processes that listen on the same port
the same way: the kernel hands each new association to one of the N listening sockets. Each
process receives as the server's own SCP does (:class:`~.scp.StoreSCP`: same AE title, calling
AE titles and spool), so the spool's guarantee holds whichever process received a file: written,
synced, renamed and enqueued before Success.

A receiving process that ends is started again within a second (:meth:`ReceivingProcesses.check`);
the associations it held are aborted, and their SCUs send again what was not acknowledged. One
whose server is gone (killed: it had no chance to stop them) stops by itself, so that no process
keeps the port and acknowledges what no server watches over.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path

from ..config import Settings
from ..logs import configure_logging
from ..redis_client import client_for
from .queue import IngestQueue
from .scp import StoreSCP, allowed_calling_aets
from .spool import Spool

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
"""How long a receiving process may take to listen (it imports pynetdicom and pydicom)."""
_PARENT_CHECK_S = 1.0
"""How often a receiving process looks whether its server is still there."""


def shared_port_supported() -> bool:
    """Whether this system lets several processes listen on one port (``SO_REUSEPORT``)."""
    return hasattr(socket, "SO_REUSEPORT")


class ReceivingProcesses:
    """``count`` processes receiving on ``port``, beside a server whose own SCP listens there with
    ``shared_port=True``."""

    def __init__(self, settings: Settings, port: int, count: int):
        self.settings = settings
        self.port = port
        self.count = count
        self._context = multiprocessing.get_context("spawn")  # no fork of a process running threads
        self._processes: list[tuple[SpawnProcess, Event]] = []
        """Each process and the event it sets once it listens (kept: the child reads it at its start)."""

    def start(self) -> ReceivingProcesses:
        """Start them and wait until each listens.

        Raises:
            RuntimeError: one ended, or did not listen within :data:`START_TIMEOUT_S` (its log says why).
        """
        self._processes = [self._launch() for _ in range(self.count)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for process, listening in self._processes:
            while not listening.wait(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"a DICOM receiving process did not listen (exit code {process.exitcode})")
        return self

    def check(self) -> None:
        """Start again each process that ended (the server's loop calls it every second)."""
        for n, (process, _) in enumerate(self._processes):
            if not process.is_alive():
                log.warning("DICOM receiving process %d ended (exit code %s); starting it again", n + 1,
                            process.exitcode)  # fmt: skip
                process.close()
                self._processes[n] = self._launch()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM each, wait for it to end its associations, SIGKILL the ones that do not."""
        for process, _ in self._processes:
            if process.is_alive():
                process.terminate()
        for process, _ in self._processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._processes = []

    def _launch(self) -> tuple[SpawnProcess, Event]:
        """A receiving process, started, and the event it sets once it listens."""
        listening = self._context.Event()
        process = self._context.Process(target=receive, args=(self.settings, self.port, os.getpid(), listening),
                                        name="cbir-receiver")  # fmt: skip
        process.start()
        return process, listening


def receive(settings: Settings, port: int, server_pid: int, listening: Event) -> None:
    """A receiving process's life: listen on the shared ``port`` until SIGTERM, or until the
    server ``server_pid`` is gone."""
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C reaches the terminal's whole process group: the server stops its receivers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = client_for(settings)  # connects on its first command
    spool = Spool(Path(settings.spool_dir), IngestQueue.for_settings(client, settings))
    scp = StoreSCP(spool, settings.scp_aet, allowed_calling_aets(settings.scp_allowed_aets))
    scp.start(settings.scp_host, port, shared_port=True)
    listening.set()
    while not stop.wait(_PARENT_CHECK_S) and os.getppid() == server_pid:
        pass
    scp.stop()
