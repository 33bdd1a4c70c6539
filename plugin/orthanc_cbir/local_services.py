"""Start a private redis-server and Orthanc on free loopback ports, in a state directory.

``make demo`` and the integration tests use these; production runs the Debian
services or the docker compose file instead. :class:`RedisCluster` starts a
several-master Redis Cluster the same way, for the cluster tests and benchmarks.
All are context managers that stop what they started (and wait for it to exit)
when the block ends::

    with RedisServer(state / "redis") as redis_server, \\
         OrthancServer(state / "orthanc", redis_url=redis_server.url) as orthanc:
        requests.get(orthanc.url + "/cbir/status", auth=orthanc.auth)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.cluster

from .errors import ServiceError
from .ingest.orthanc_client import OrthancClient

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout: holds ``orthanc.json``, ``plugin/orthanc_entry.py`` and ``.venv``."""

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NO_DELAY = {"TCP_NODELAY": "1"}
"""The environment DCMTK (``storescu``, ``storescp``) and Orthanc, which uses DCMTK for DICOM,
need to send each PDU at once: without it Nagle's algorithm holds back the last packet of every
message and a push runs about 30 times slower (issue 19: storescu to storescp 22 against 718 files/s).
Every Orthanc started here, and every DCMTK tool the tests and benchmarks run, gets it."""


def dcmtk_environment() -> dict[str, str]:
    """This process's environment with :data:`NO_DELAY`: for ``subprocess.run(["storescu", ...], env=...)``."""
    return {**os.environ, **NO_DELAY}


class _Process:
    """A child process with its log in the state directory."""

    name = "service"

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.log_path = self.state_dir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], environment: dict[str, str] | None = None) -> None:
        """Start ``argv`` in the state directory, its output appended to the log; ``environment``
        is added to this process's own."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **environment} if environment else None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=self.state_dir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.process.returncode}\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"{self.name} not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the service's log."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the process to stop, wait for it to exit, kill it if it will not."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisServer(_Process):
    """A redis-server bound to 127.0.0.1 on a free port.

    With ``persistent=False`` (tests) nothing is written to disk; otherwise the
    data is kept as an append-only file in the state directory. With ``password``
    it runs with ``--requirepass`` and :attr:`url` carries the password.
    """

    name = "redis"

    def __init__(self, state_dir: Path, *, port: int | None = None, persistent: bool = False,
                 password: str | None = None):  # fmt: skip
        super().__init__(state_dir)
        self.port = port or free_port()
        self.persistent = persistent
        self.password = password

    @property
    def url(self) -> str:
        credentials = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def _arguments(self) -> list[str]:
        """redis-server's command-line options, after the binary."""
        persistence = ["--appendonly", "yes"] if self.persistent else ["--appendonly", "no", "--save", ""]
        return ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.state_dir), "--protected-mode",
                "yes", *persistence, *(["--requirepass", self.password] if self.password else [])]  # fmt: skip

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        self._launch()
        self._wait_ready(timeout_s)
        return self

    def _launch(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._spawn([binary, *self._arguments()])

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            self._wait_until(lambda: _redis_answers(client), timeout_s)
        finally:
            client.close()

    def __enter__(self) -> RedisServer:
        return self.start()


class _ClusterNode(RedisServer):
    """One master of a :class:`RedisCluster`: a :class:`RedisServer` in cluster mode, its
    cluster bus on ``bus_port`` and its ``nodes.conf`` in its own state directory."""

    def __init__(self, state_dir: Path, *, port: int, bus_port: int, password: str | None):
        super().__init__(state_dir, port=port, password=password)
        self.bus_port = bus_port

    def _arguments(self) -> list[str]:
        return [*super()._arguments(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--cluster-port", str(self.bus_port), "--cluster-announce-ip",
                "127.0.0.1", *(["--masterauth", self.password] if self.password else [])]  # fmt: skip


class RedisCluster:
    """A Redis Cluster of ``masters`` redis-server masters (no replicas) on free 127.0.0.1
    ports, node ``i`` in ``state_dir/node-i``, nothing persisted.

    :meth:`start` forms the cluster with redis-py alone (no ``redis-cli``): the 16384 slots
    split evenly by ``CLUSTER ADDSLOTSRANGE``, every node ``CLUSTER MEET``s the others, and it
    returns once every node reports ``cluster_state:ok`` and knows all the others (about 2 s:
    a master stays ``fail`` for 2 s after it starts). With ``password`` every node runs with
    ``--requirepass``/``--masterauth`` and :attr:`url` carries it. A context manager like the
    other services: the block gets the started cluster, and its end stops every node and
    waits for it to exit::

        with RedisCluster(tmp_path / "cluster") as cluster:
            client = cluster.client()
    """

    name = "redis-cluster"

    SLOTS = 16384

    def __init__(self, state_dir: Path, *, masters: int = 3, password: str | None = None):
        if masters < 1:
            raise ValueError(f"a cluster needs at least one master, not {masters}")
        self.state_dir = Path(state_dir)
        self.password = password
        ports = _distinct_free_ports(2 * masters)
        self._nodes = [
            _ClusterNode(self.state_dir / f"node-{i}", port=ports[2 * i], bus_port=ports[2 * i + 1], password=password)
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<first node's port>``: a seed for
        ``redis.cluster.RedisCluster.from_url``, which discovers the other nodes from it."""
        credentials = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self._nodes[0].port}"

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master, the first one first (the client ports, not the bus ports)."""
        return [("127.0.0.1", node.port) for node in self._nodes]

    @property
    def node_urls(self) -> list[str]:
        """A plain ``redis://`` URL per master, for ``redis.Redis.from_url`` (one node's keys only)."""
        return [node.url for node in self._nodes]

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A new cluster client of :attr:`url` (``kwargs`` go to ``from_url``); the caller closes it."""
        return redis.cluster.RedisCluster.from_url(self.url, **kwargs)

    def start(self, timeout_s: float = 30.0) -> RedisCluster:
        """Start every node, assign the slots, introduce the nodes and wait until the cluster is
        healthy; on failure stop what was started and raise :class:`ServiceError`."""
        deadline = time.monotonic() + timeout_s
        try:
            for node in self._nodes:  # all at once: each node stays cluster_state:fail for 2 s after it starts
                node._launch()
            for node in self._nodes:
                node._wait_ready(max(deadline - time.monotonic(), 1.0))
            self._form(deadline, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, deadline: float, timeout_s: float) -> None:
        clients = [redis.Redis.from_url(url, socket_timeout=2, decode_responses=True) for url in self.node_urls]
        try:
            bounds = [i * self.SLOTS // len(clients) for i in range(len(clients) + 1)]
            for i, client in enumerate(clients):
                client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)  # distinct epochs, as redis-cli sets them
            # Every pair meets (gossip alone may take seconds to introduce a third node), and MEET
            # names the bus port, which it would otherwise take to be the port + 10000.
            for i, client in enumerate(clients):
                for earlier in self._nodes[:i]:
                    client.execute_command("CLUSTER MEET", "127.0.0.1", earlier.port, earlier.bus_port)
            problems = ["not asked yet"]
            while time.monotonic() < deadline:
                for node in self._nodes:
                    if node.process is not None and node.process.poll() is not None:
                        raise ServiceError(f"cluster node {node.port} exited with {node.process.returncode}\n"
                                           f"{self.log_tail()}")  # fmt: skip
                problems = [problem for client, node in zip(clients, self._nodes, strict=True)
                            if (problem := self._unhealthy(client, node))]  # fmt: skip
                if not problems:
                    return
                time.sleep(0.1)
            raise ServiceError(f"{self.name} not ready after {timeout_s:.0f} s: {'; '.join(problems)}\n"
                               f"{self.log_tail()}")  # fmt: skip
        finally:
            for client in clients:
                client.close()

    def _unhealthy(self, client: redis.Redis, node: _ClusterNode) -> str | None:
        """Why ``node`` does not yet see a healthy cluster of all the nodes, or None if it does."""
        try:
            info = client.execute_command("CLUSTER INFO")
            known = client.execute_command("CLUSTER NODES")
        except redis.RedisError as error:
            return f"node {node.port}: {error}"
        if info.get("cluster_state") != "ok":
            return f"node {node.port}: cluster_state {info.get('cluster_state')}"
        expected = {f"{host}:{port}" for host, port in self.nodes}
        if int(info.get("cluster_known_nodes", 0)) != len(self._nodes) or set(known) != expected:
            return f"node {node.port} knows {sorted(known)}, not {sorted(expected)}"
        for address, peer in known.items():
            if not peer["connected"] or {"handshake", "fail", "fail?", "noaddr"} & set(peer["flags"].split(",")):
                return f"node {node.port} sees {address} as {peer['flags']}"
        return None

    def log_tail(self, lines: int = 10) -> str:
        """The last lines of every node's log, each under its port."""
        return "\n".join(f"--- node {node.port} ---\n{node.log_tail(lines)}" for node in self._nodes)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every node and wait for it to exit (kill one that will not)."""
        running = [node.process for node in self._nodes if node.process is not None and node.process.poll() is None]
        for process in running:  # all at once, then wait for each
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` different ports that :func:`free_port` found free."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class OrthancServer(_Process):
    """Orthanc with the DICOMweb and Python plugins, configured from the repository's
    ``orthanc.json`` with ports, storage and a fresh password of its own.

    Authentication stays on and remote access off, so although Orthanc 1.10 binds
    every interface, only loopback clients with the password get in.
    """

    name = "orthanc"

    def __init__(
        self,
        state_dir: Path,
        *,
        redis_url: str,
        http_port: int | None = None,
        dicom_port: int | None = None,
        aet: str = "CBIR",
        cbir: dict[str, Any] | None = None,
        stable_age_s: int | None = None,
        with_cbir: bool = True,
    ):
        """``cbir``: settings of the ``Cbir`` section besides ``RedisUrl``; ``stable_age_s``: Orthanc's
        ``StableAge``, seconds without a new instance before a study is stable (default: orthanc.json's);
        ``with_cbir`` False: Orthanc with its DICOMweb plugin only, what the benchmarks compare with."""
        super().__init__(state_dir)
        self.with_cbir = with_cbir
        self.stable_age_s = stable_age_s
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.aet = aet
        self.username = "cbir"
        self.password = secrets.token_urlsafe(16)
        self.cbir_section = {"RedisUrl": redis_url, **(cbir or {})}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.password

    def configuration(self) -> dict[str, Any]:
        """The repository's ``orthanc.json`` with this instance's ports, paths and user."""
        config = json.loads((REPO_ROOT / "orthanc.json").read_text())
        config.update(
            {
                "Name": f"orthanc-cbir-{self.http_port}",
                "StorageDirectory": str(self.state_dir / "storage"),
                "IndexDirectory": str(self.state_dir / "storage"),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "DicomAet": self.aet,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": True,
                "RegisteredUsers": {self.username: self.password},
                "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
            }
        )
        if self.with_cbir:
            config["Plugins"].append(str(ORTHANC_PLUGINS / "libOrthancPython.so"))
            config["PythonScript"] = str(REPO_ROOT / "plugin" / "orthanc_entry.py")
        if self.stable_age_s is not None:
            config["StableAge"] = self.stable_age_s
        config["Cbir"] = {**config.get("Cbir", {}), **self.cbir_section}
        return config

    def start(self, timeout_s: float = 60.0) -> OrthancServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.state_dir / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        self._spawn([ORTHANC_BINARY, str(config_path)], NO_DELAY)
        self._wait_until(lambda: self._answers("/system"), timeout_s)
        return self

    def _answers(self, path: str) -> bool:
        try:
            self.get_json(path, timeout_s=2)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    @property
    def client(self) -> OrthancClient:
        """An authenticated REST client of this Orthanc."""
        return OrthancClient(self.url, self.username, self.password)

    def request(self, method: str, path: str, body: bytes | None = None, *, content_type: str | None = None,
                headers: dict[str, str] | None = None, timeout_s: float = 30) -> tuple[int, bytes, str]:  # fmt: skip
        """One authenticated HTTP request: (status, body, content type). 4xx/5xx do not raise."""
        return self.client.request(method, path, body, content_type=content_type, headers=headers, timeout_s=timeout_s)

    def get_json(self, path: str, *, timeout_s: float = 30) -> Any:
        """GET a JSON resource; raises ``ValueError`` on a status other than 200."""
        return self.client.get_json(path, timeout_s=timeout_s)

    def __enter__(self) -> OrthancServer:
        return self.start()


def cbir_environment(redis_url: str, orthanc: OrthancServer) -> dict[str, str]:
    """The ``CBIR_*`` variables that point a worker or a CLI command at this Redis and Orthanc."""
    return {"CBIR_REDIS_URL": redis_url, "CBIR_ORTHANC_URL": orthanc.url, "CBIR_ORTHANC_USERNAME": orthanc.username,
            "CBIR_ORTHANC_PASSWORD": orthanc.password}  # fmt: skip


class WorkerProcess(_Process):
    """An ``orthanc-cbir worker`` process indexing into one Redis what one Orthanc stores, or
    (``orthanc`` None, ``spool_dir`` given) what an ``orthanc-cbir serve`` spools there."""

    name = "worker"

    def __init__(self, state_dir: Path, *, redis_url: str, orthanc: OrthancServer | None = None,
                 spool_dir: Path | None = None, batch_size: int = 32, regions: bool = False):  # fmt: skip
        super().__init__(state_dir)
        if (orthanc is None) == (spool_dir is None):
            raise ValueError("a worker indexes what one Orthanc stores or what one spool holds: give one of them")
        source = cbir_environment(redis_url, orthanc) if orthanc is not None else {
            "CBIR_REDIS_URL": redis_url, "CBIR_SPOOL_DIR": str(spool_dir)}  # fmt: skip
        self.environment = {**source, "CBIR_WORKER_BATCH_SIZE": str(batch_size),
                            "CBIR_REGIONS": "1" if regions else "0"}  # fmt: skip

    def start(self) -> WorkerProcess:
        self._spawn([sys.executable, "-m", "orthanc_cbir.cli", "worker"], self.environment)
        return self

    def __enter__(self) -> WorkerProcess:
        return self.start()


class StandaloneServer(_Process):
    """An ``orthanc-cbir serve`` process (DICOM SCP, HTTP API, workers) on free loopback ports,
    its spool in the state directory. ``token`` is the bearer token of its HTTP API."""

    name = "serve"

    def __init__(self, state_dir: Path, *, redis_url: str, aet: str = "CBIR", allowed_aets: str = "",
                 workers: int = 1, dicom_port: int | None = None, http_port: int | None = None,
                 scp_processes: int = 1):  # fmt: skip
        """``scp_processes``: processes receiving on its DICOM port (the ``scp_processes`` setting)."""
        super().__init__(state_dir)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.token = secrets.token_urlsafe(16)
        self.workers = workers
        self.spool_dir = self.state_dir / "spool"
        self.environment = {"CBIR_REDIS_URL": redis_url, "CBIR_SPOOL_DIR": str(self.spool_dir), "CBIR_SCP_AET": aet,
                            "CBIR_SCP_PORT": str(self.dicom_port), "CBIR_HTTP_PORT": str(self.http_port),
                            "CBIR_HTTP_TOKEN": self.token, "CBIR_SCP_ALLOWED_AETS": allowed_aets,
                            "CBIR_SCP_PROCESSES": str(scp_processes)}  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60.0) -> StandaloneServer:
        self._spawn([sys.executable, "-m", "orthanc_cbir.cli", "serve", "--workers", str(self.workers)],
                    self.environment)  # fmt: skip
        self._wait_until(self._answers, timeout_s)
        return self

    def _answers(self) -> bool:
        with socket.socket() as dicom:
            dicom.settimeout(1)
            if dicom.connect_ex(("127.0.0.1", self.dicom_port)) != 0:
                return False
        request = urllib.request.Request(self.url + "/cbir/status", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash does (nothing is flushed, nothing is closed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> StandaloneServer:
        return self.start()


def _redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class ViewerServer(_Process):
    """``orthanc-cbir viewer`` on a free loopback port: the OHIF viewer with one Orthanc behind
    it on the same origin (see :mod:`orthanc_cbir.viewer`). It fetches nothing: the OHIF
    ``dist`` folder (``dist``, default ``build/ohif``'s, made by ``make ohif``) must be there.

    ``url`` + ``/viewer?StudyInstanceUIDs=UID`` opens a study. With ``demo`` (the default: the demo
    and the browser tests) the proxy adds Orthanc's credentials for anonymous callers; without it,
    callers send their own. ``environment``: more ``CBIR_*`` variables for the viewer process.
    ``extension``: the built orthanc-cbir OHIF extension to serve (default ``build/ohif``'s, where
    ``make ohif`` built it; else OHIF alone).
    """

    name = "viewer"

    def __init__(self, state_dir: Path, *, orthanc: OrthancServer, dist: Path | None = None, port: int | None = None,
                 demo: bool = True, environment: dict[str, str] | None = None,
                 extension: Path | None = None):  # fmt: skip
        super().__init__(state_dir)
        self.orthanc = orthanc
        self.demo = demo
        self.environment = environment or {}
        self.dist = dist
        self.extension = extension
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ViewerServer:
        from .viewer import extension_dir, extension_present, ohif_dist

        dist = Path(self.dist or ohif_dist()).resolve()
        if not (dist / "index.html").is_file():
            raise ServiceError(f"no OHIF viewer in {dist}: run `make ohif` (orthanc-cbir viewer --fetch-only)")
        if self.extension is not None:
            extension = ["--extension", str(self.extension)]
        else:  # the one `make ohif` built, where it is there
            extension = ["--extension", str(extension_dir())] if extension_present() else ["--no-extension"]
        environment = {"CBIR_ORTHANC_URL": self.orthanc.url, "CBIR_ORTHANC_USERNAME": self.orthanc.username,
                       "CBIR_ORTHANC_PASSWORD": self.orthanc.password, **self.environment}  # fmt: skip
        self._spawn([sys.executable, "-m", "orthanc_cbir.cli", "viewer", "--host", "127.0.0.1", "--port",
                     str(self.port), "--dist", str(dist), *extension, *(["--demo"] if self.demo else [])],
                    environment)  # fmt: skip
        self._wait_until(self._answers, timeout_s)
        return self

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/app-config.js", timeout=2) as response:
                return response.status == 200
        except urllib.error.HTTPError as error:  # outside the demo: 401 without credentials, but up
            return error.code == 401
        except OSError:
            return False

    def __enter__(self) -> ViewerServer:
        return self.start()
