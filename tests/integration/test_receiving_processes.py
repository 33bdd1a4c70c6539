"""``orthanc-cbir serve`` with ``CBIR_SCP_PROCESSES``: several processes listen on its one DICOM
port, each spools what it receives, one that dies is started again, and none outlives its server.
Real processes: the server, its spawned receiving processes, redis-server and storescu."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from orthanc_cbir.local_services import StandaloneServer
from tests.integration.pushing import storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

PROCESSES = 3


def listening_sockets(port: int) -> int:
    """Sockets listening on ``port`` on this host (/proc/net/tcp: state 0A is LISTEN)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():  # a kernel without IPv6
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                count += 1
    return count


def receiving_processes(server: StandaloneServer) -> list[int]:
    """The server's spawned receiving processes (its children that run multiprocessing's spawn)."""
    assert server.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # ended meanwhile
        if parent == server.process.pid and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


def written_bytes(pid: int) -> int:
    """Bytes ``pid`` has passed to write() so far (/proc/PID/io's wchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def indexed(server: StandaloneServer) -> int:
    request = urllib.request.Request(server.url + "/cbir/status", headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read()).get("indexed", 0))


@pytest.fixture
def server(redis_server, tmp_path):
    with StandaloneServer(tmp_path / "serve", redis_url=redis_server.url, scp_processes=PROCESSES) as started:
        wait_until(lambda: listening_sockets(started.dicom_port) == PROCESSES, 60, "every process listening")
        yield started


def test_every_receiving_process_listens_on_the_one_port_and_spools_what_it_receives(server, tmp_path):
    paths = synthetic_series(tmp_path / "push", slices=12, size=128)
    children = receiving_processes(server)
    assert len(children) == PROCESSES - 1
    before = {pid: written_bytes(pid) for pid in children}
    already = indexed(server)  # the Redis is the session's
    for path in paths:  # an association each: the kernel hands each to one of the listening processes
        storescu(server, [path])
    wait_until(lambda: indexed(server) == already + len(paths), 120, "every instance indexed")
    # each file is copied into the spool by the process that received it: (1/3)^12 that none was a child's
    smallest = min(path.stat().st_size for path in paths)
    assert max(written_bytes(pid) - before[pid] for pid in children) >= smallest


def test_a_receiving_process_that_dies_is_started_again_and_the_port_keeps_receiving(server, tmp_path):
    first, *others = receiving_processes(server)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: first not in receiving_processes(server) and len(receiving_processes(server)) == PROCESSES - 1,
               30, "the receiving process started again")  # fmt: skip
    assert set(others) <= set(receiving_processes(server))
    wait_until(lambda: listening_sockets(server.dicom_port) == PROCESSES, 60,
               f"every process listening again ({listening_sockets(server.dicom_port)} now)")
    paths = synthetic_series(tmp_path / "push", slices=8, size=64)
    already = indexed(server)  # the Redis is the session's
    for path in paths:
        storescu(server, [path])
    wait_until(lambda: indexed(server) == already + len(paths), 120, "every instance indexed")


def test_receiving_processes_end_with_their_killed_server_and_free_the_port(server):
    children = receiving_processes(server)
    server.kill()  # SIGKILL: the server cannot stop them itself
    wait_until(lambda: not any(alive(pid) for pid in children), 30, "the receiving processes gone")
    assert listening_sockets(server.dicom_port) == 0
