"""``orthanc-cbir serve`` with ``CBIR_SCP_PROCESSES``: several processes listen on its one DICOM
port, each spools what it receives, one that dies is started again, and none outlives its server.
Real processes: the server, its spawned receiving processes, redis-server and storescu."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import urllib.request
from pathlib import Path

import pytest
import redis

from orthanc_cbir.config import load_settings
from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.ingest.receivers import ReceivingProcesses
from orthanc_cbir.local_services import StandaloneServer, free_port
from orthanc_cbir.model.embedder import Embedder
from tests.integration.pushing import push, storescu, synthetic_series, wait_until

pytestmark = pytest.mark.integration

PROCESSES = 3


def sockets(port: int, state: str) -> list[str]:
    """The inodes of this host's TCP sockets on local ``port`` in ``state`` (/proc/net/tcp: 0A is
    LISTEN, 01 ESTABLISHED)."""
    found = []
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():  # a kernel without IPv6
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                found.append(fields[9])
    return found


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` on this host."""
    return len(sockets(port, "0A"))


def holds_an_association(pid: int, port: int) -> bool:
    """Whether ``pid`` holds a connection accepted on ``port`` (one of its descriptors is that socket)."""
    accepted = {f"socket:[{inode}]" for inode in sockets(port, "01")}
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in accepted:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


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


def status(server: StandaloneServer) -> dict:
    request = urllib.request.Request(server.url + "/cbir/status", headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def indexed(server: StandaloneServer) -> int:
    return int(status(server).get("indexed", 0))


@pytest.fixture
def server(redis_server, tmp_path):
    with StandaloneServer(tmp_path / "serve", redis_url=redis_server.url, scp_processes=PROCESSES) as started:
        wait_until(lambda: listening_sockets(started.dicom_port) == PROCESSES, 60, "every process listening")
        yield started


def test_every_receiving_process_listens_on_the_one_port_and_spools_what_it_receives(server, tmp_path):
    paths = synthetic_series(tmp_path / "push", slices=12, size=128)
    children = receiving_processes(server)
    assert len(children) == PROCESSES - 1
    assert status(server)["receiving_processes"] == {"processes": PROCESSES, "running": PROCESSES - 1, "restarts": 0}
    before = {pid: written_bytes(pid) for pid in children}
    already = indexed(server)  # the Redis is the session's
    for path in paths:  # an association each: the kernel hands each to one of the listening processes
        storescu(server, [path])
    wait_until(lambda: indexed(server) == already + len(paths), 120, "every instance indexed")
    # each file is copied into the spool by the process that received it: (1/3)^12 that none was a child's
    smallest = min(path.stat().st_size for path in paths)
    assert max(written_bytes(pid) - before[pid] for pid in children) >= smallest


def test_a_receiving_process_that_dies_is_started_again_is_counted_in_the_status_and_the_port_keeps_receiving(
    server, tmp_path
):
    first, *others = receiving_processes(server)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: first not in receiving_processes(server) and len(receiving_processes(server)) == PROCESSES - 1,
               30, "the receiving process started again")  # fmt: skip
    assert set(others) <= set(receiving_processes(server))
    wait_until(lambda: status(server)["receiving_processes"] == {"processes": PROCESSES, "running": PROCESSES - 1,
                                                                 "restarts": 1}, 30, "the restart in /cbir/status")
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


def test_a_receiving_process_killed_mid_association_loses_nothing_it_acknowledged(server, redis_server, tmp_path):
    store = IndexStore(redis.Redis.from_url(redis_server.url), IndexInfo.from_card(Embedder().card))
    senders: list[threading.Thread] = []
    acknowledged: list[list[str]] = []
    victim = None
    for n in range(20):  # associations one after another until a receiving process (not the server) holds one
        paths, sent, started = synthetic_series(tmp_path / f"push{n}", slices=60, size=256), [], threading.Event()
        senders.append(threading.Thread(target=push, args=(server, paths, sent, started)))
        acknowledged.append(sent)
        senders[-1].start()
        assert started.wait(60), "the SCP acknowledged nothing"
        victim = next((pid for pid in receiving_processes(server) if holds_an_association(pid, server.dicom_port)),
                      None)  # fmt: skip
        if victim is not None:
            break
    assert victim is not None, "no association reached a receiving process (1 in 3 each)"
    os.kill(victim, signal.SIGKILL)  # mid-association: the SCU learns it broke, the rest is not acknowledged
    for sender in senders:
        sender.join(timeout=120)
    assert any(len(sent) < 60 for sent in acknowledged), "no association was cut"
    kept = [uid for sent in acknowledged for uid in sent]
    wait_until(lambda: all(store.row(uid) is not None for uid in kept), 120,
               f"the {len(kept)} acknowledged instances indexed")  # fmt: skip


def test_the_status_of_the_receiving_processes_can_be_read_while_one_is_started_again(redis_server, tmp_path):
    """``/cbir/status`` reads it in an HTTP thread while the server's loop starts a process again;
    the status asked each process whether it ran, one of them the process just closed: ValueError."""
    settings = load_settings(env={}, redis_url=redis_server.url, spool_dir=str(tmp_path / "spool"))
    receivers = ReceivingProcesses(settings, 1).start(free_port())
    failures: list[BaseException] = []
    done = threading.Event()

    def read_status() -> None:
        while not done.is_set():
            try:
                receivers.status()
            except BaseException as exc:  # noqa: BLE001 - what a status request would have answered 500 for
                failures.append(exc)

    reader = threading.Thread(target=read_status, daemon=True)
    try:
        reader.start()
        for _ in range(3):  # kill it and start it again, three times, with the status read all along
            (child,) = [process for process in multiprocessing.active_children() if process.name == "cbir-receiver"]
            os.kill(child.pid, signal.SIGKILL)
            restarts = receivers.restarts
            wait_until(lambda r=restarts: receivers.check() or receivers.restarts > r, 30, "the process started again")
    finally:
        done.set()
        reader.join(10)
        receivers.stop()
    assert not failures, failures[:1]
    assert receivers.status()["restarts"] == 3
