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
the associations it held are aborted, and their SCUs send again what was not acknowledged. One that
keeps ending soon after its start waits longer each time before it is started again
(:func:`restart_delay`): a process that cannot run costs a spawn a minute, not a core. One
whose server is gone (killed: it had no chance to stop them) stops by itself, so that no process
keeps the port and acknowledges what no server watches over.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
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
STABLE_S = 60.0
"""A receiving process that ran this long before it ended is started again at once."""
MAX_RESTART_DELAY_S = 60.0
"""The longest wait before a receiving process that keeps ending is started again."""


def restart_delay(ran_s: float, previous_s: float) -> float:
    """Seconds to wait before starting again a receiving process that ended after ``ran_s`` seconds,
    the wait before its start having been ``previous_s``: none after a run of :data:`STABLE_S`, else
    twice the last wait (1 s the first time), at most :data:`MAX_RESTART_DELAY_S`.

    >>> restart_delay(3600, 8.0), restart_delay(0.5, 0.0), restart_delay(0.5, 1.0), restart_delay(2, 40.0)
    (0.0, 1.0, 2.0, 60.0)
    """
    if ran_s >= STABLE_S:
        return 0.0
    return min(max(2 * previous_s, 1.0), MAX_RESTART_DELAY_S)


def shared_port_supported() -> bool:
    """Whether this system spreads the connections of one port over several listening processes:
    Linux's ``SO_REUSEPORT`` (BSD and macOS have the option, but hand every connection to one socket)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class ReceivingProcesses:
    """``count`` processes receiving on one port (:meth:`start`), beside a server whose own SCP
    listens there with ``shared_port=True``."""

    def __init__(self, settings: Settings, count: int):
        self.settings = settings
        self.count = count
        self.port = 0
        self.restarts = 0
        """Receiving processes started again after one ended."""
        self._context = multiprocessing.get_context("spawn")  # no fork of a process running threads
        self._processes: list[_Receiver] = []

    def start(self, port: int) -> ReceivingProcesses:
        """Start them on ``port`` and wait until each listens.

        Raises:
            RuntimeError: one ended, or did not listen within :data:`START_TIMEOUT_S` (its log says why).
        """
        self.port = port
        self._processes = [self._launch() for _ in range(self.count)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for receiver in self._processes:
            process = receiver.process
            while not receiver.listening.wait(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"a DICOM receiving process did not listen (exit code {process.exitcode})")
        return self

    def check(self) -> None:
        """Start again each process that ended, once its :func:`restart_delay` is over (the server's
        loop calls it every second)."""
        now = time.monotonic()
        for n, receiver in enumerate(self._processes):
            process = receiver.process
            if receiver.restart_at is None:
                if process.is_alive():
                    continue
                receiver.delay_s = restart_delay(now - receiver.started, receiver.delay_s)
                receiver.restart_at = now + receiver.delay_s
                log.warning("DICOM receiving process %d ended (exit code %s); starting it again in %.0f s", n + 1,
                            process.exitcode, receiver.delay_s)  # fmt: skip
            if now >= receiver.restart_at:
                process.close()
                self._processes[n] = self._launch(delay_s=receiver.delay_s)
                self.restarts += 1

    def status(self) -> dict[str, int]:
        """What ``/cbir/status`` says of them: ``processes`` receiving on the port (the server's own
        included), how many of the others ran at the server's last look (:meth:`check`, every second),
        and how many were started again. It asks no process: an HTTP thread reads it while
        :meth:`check` closes the process it starts again."""
        running = sum(1 for receiver in self._processes if receiver.restart_at is None)
        return {"processes": self.count + 1, "running": running, "restarts": self.restarts}

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM each, wait for it to end its associations, SIGKILL the ones that do not."""
        for receiver in self._processes:
            if receiver.process.is_alive():
                receiver.process.terminate()
        for receiver in self._processes:
            process = receiver.process
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._processes = []

    def _launch(self, delay_s: float = 0.0) -> _Receiver:
        """A receiving process, started; ``delay_s``: the wait before this start."""
        listening = self._context.Event()
        process = self._context.Process(target=receive, args=(self.settings, self.port, os.getpid(), listening),
                                        name="cbir-receiver")  # fmt: skip
        process.start()
        return _Receiver(process, listening, time.monotonic(), delay_s)


@dataclass
class _Receiver:
    """One receiving process as the server watches it."""

    process: SpawnProcess
    listening: Event
    """Set by the process once it listens (kept here: the process reads it when it starts)."""
    started: float
    """``time.monotonic()`` at its start."""
    delay_s: float
    """The wait before this start (:func:`restart_delay`)."""
    restart_at: float | None = None
    """Once it ended: when it is started again."""


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
