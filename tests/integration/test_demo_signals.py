"""``orthanc-cbir demo`` stopped by SIGTERM (kill, systemd, a container's stop) or SIGHUP (its
terminal closed) stops the Redis, Orthanc and worker it started, as Ctrl-C does: their
processes exit and their ports close.

A real demo process (its own session, so the signal reaches it alone, not the services it
started), with real redis-server, Orthanc and worker children."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import dicom_factory as factory

pytestmark = pytest.mark.integration

STARTED = re.compile(r"demo: redis on redis://127\.0\.0\.1:(\d+)/0, Orthanc on http://127\.0\.0\.1:(\d+) "
                     r"\(DICOM port (\d+)\)")  # fmt: skip


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: no psutil here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state is the parent's pid
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_what_the_demo_started(tmp_path, signum):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        ds = factory.grey_image(np.full((32, 32), 100 * i, dtype=np.uint16), InstanceNumber=i + 1)
        (data / f"{i}.dcm").write_bytes(factory.to_bytes(ds))
    demo = subprocess.Popen(
        [sys.executable, "-m", "orthanc_cbir.cli", "demo", "--state", str(tmp_path / "state"), "--data", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )  # fmt: skip
    services: list[int] = []
    output: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            output.append(line)
            if started := STARTED.search(line):
                break
        else:
            pytest.fail(f"the demo did not start its services:\n{''.join(output)}")
        ports = [int(port) for port in started.groups()]
        services = children_of(demo.pid)  # redis-server, Orthanc, the worker (and dcmsend, once pushing)
        assert len(services) >= 3 and all(listening(port) for port in ports), (services, ports)
        demo.send_signal(signum)
        rest, _ = demo.communicate(timeout=90)
        output.append(rest)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in services):
            time.sleep(0.2)
        assert not [pid for pid in services if alive(pid)], f"left running:\n{''.join(output)}"
        assert not [port for port in ports if listening(port)], "ports still open"
        assert demo.returncode == 128 + signum, "".join(output)
        assert f"demo: stopped by {signal.Signals(signum).name}" in "".join(output)
    finally:
        # The old demo left its services behind: end exactly those (by pid), so other tests do not meet them.
        for pid in [demo.pid, *services]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        demo.wait(timeout=30)
