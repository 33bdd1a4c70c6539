"""docker/compose.yaml as Compose reads it (``docker-compose config``: no Docker engine needed):
every port published on CBIR_BIND_ADDRESS (loopback unless set), the passwords and the AE titles
required, Redis's password given to every service that talks to Redis, each deployment on its own
stream. And the Redis service's own command, run with a real redis-server: the password comes
from the environment, never onto the command line."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orthanc_cbir.config import Settings
from orthanc_cbir.local_services import free_port
from orthanc_cbir.redis_client import client_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
if COMPOSE is None:  # `make test` installs it (APT_PACKAGES); a bare `pytest` elsewhere may not have it
    pytest.skip("the compose tests need docker-compose (run `make test`)", allow_module_level=True)

REQUIRED = {"ORTHANC_PASSWORD": "orthanc-pw", "REDIS_PASSWORD": "redis-Pw.7+/=", "CBIR_DICOM_ALLOWED_AETS": "PACS,CT_2"}
"""The variables the file cannot do without, each with a value."""


def compose_config(**variables: str) -> subprocess.CompletedProcess:
    """``docker-compose config`` of the file with the standalone profile, in an environment of
    ``REQUIRED`` updated with ``variables`` (an empty value removes one) and nothing of this machine's."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    env |= {name: value for name, value in (REQUIRED | variables).items() if value}
    return subprocess.run([str(COMPOSE), "-f", str(ROOT / "docker" / "compose.yaml"), "--profile", "standalone",
                           "config"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip


def services(**variables: str) -> dict[str, Any]:
    done = compose_config(**variables)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def published(port: str | dict[str, Any]) -> tuple[str, int]:
    """``(host address, host port)`` of a published port, short syntax (``127.0.0.1:8042:8042/tcp``,
    docker-compose 1) or long (``host_ip``, ``published``: Compose 2). No address means every one."""
    if isinstance(port, dict):
        return port.get("host_ip", "0.0.0.0"), int(port["published"])
    parts = port.split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else "0.0.0.0"), int(parts[-2])


def mounted(volume: str | dict[str, Any]) -> tuple[str, str]:
    """``(source, target)`` of a mounted volume, short syntax (``name:/path:rw``, docker-compose 1) or
    long (``source``, ``target``: Compose 2)."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return source, target


def ports(config: dict[str, Any]) -> dict[int, str]:
    """Every published port of every service, with the address it is published on."""
    found = [published(port) for service in config.values() for port in service.get("ports", [])]
    return {number: address for address, number in found}


def test_every_port_is_published_on_loopback_by_default():
    assert ports(services()) == {8042: "127.0.0.1", 4242: "127.0.0.1", 11112: "127.0.0.1", 8043: "127.0.0.1"}


def test_every_port_is_published_on_the_bind_address_a_site_sets():
    assert ports(services(CBIR_BIND_ADDRESS="10.1.2.3")) == {8042: "10.1.2.3", 4242: "10.1.2.3", 11112: "10.1.2.3",
                                                             8043: "10.1.2.3"}  # fmt: skip


@pytest.mark.parametrize("variable", sorted(REQUIRED))
def test_compose_refuses_to_start_without_each_required_variable(variable):
    done = compose_config(**{variable: ""})
    # docker-compose 1 quotes the service's whole environment before the message: the message is last
    assert done.returncode != 0 and f": set {variable} " in done.stderr, done.stderr


def test_every_service_that_talks_to_redis_gets_its_password_apart_from_the_url():
    config = services()
    assert config["redis"]["environment"]["REDIS_PASSWORD"] == REQUIRED["REDIS_PASSWORD"]
    clients = {name: service["environment"] for name, service in config.items() if "CBIR_REDIS_URL" in
               service.get("environment", {})}  # fmt: skip
    assert sorted(clients) == ["orthanc", "standalone", "standalone-worker", "worker"]
    for environment in clients.values():
        assert environment["CBIR_REDIS_PASSWORD"] == REQUIRED["REDIS_PASSWORD"]
        assert "@" not in environment["CBIR_REDIS_URL"]


def test_redis_gets_its_password_from_the_environment_not_from_the_file():
    command = " ".join(services()["redis"]["command"])
    assert REQUIRED["REDIS_PASSWORD"] not in command and "REDIS_PASSWORD" in command


def test_both_dicom_servers_admit_the_listed_ae_titles_only():
    config = services()
    assert config["orthanc"]["environment"]["CBIR_DICOM_ALLOWED_AETS"] == REQUIRED["CBIR_DICOM_ALLOWED_AETS"]
    assert config["standalone"]["environment"]["CBIR_SCP_ALLOWED_AETS"] == REQUIRED["CBIR_DICOM_ALLOWED_AETS"]


def test_compose_gives_the_standalone_server_its_own_stream():
    streams = {name: service.get("environment", {}).get("CBIR_INGEST_STREAM", Settings().ingest_stream)
               for name, service in services().items() if name != "redis"}  # fmt: skip
    assert streams["orthanc"] == streams["worker"]
    assert streams["standalone"] != streams["orthanc"]


def test_the_standalone_servers_workers_are_processes_of_their_own_on_its_stream_and_spool():
    config = services()
    server, worker = config["standalone"], config["standalone-worker"]
    assert server["entrypoint"][-2:] == ["--workers", "0"]  # no worker thread beside the DICOM receiver
    assert worker["entrypoint"][-1] == "worker"
    assert worker["environment"]["CBIR_INGEST_STREAM"] == server["environment"]["CBIR_INGEST_STREAM"]
    spool = server["environment"]["CBIR_SPOOL_DIR"]
    assert worker["environment"]["CBIR_SPOOL_DIR"] == spool
    mounts = {name: {mounted(volume) for volume in config[name]["volumes"]} for name in ("standalone",
                                                                                         "standalone-worker")}
    assert mounts["standalone"] == mounts["standalone-worker"]
    assert {target for _, target in mounts["standalone"]} == {spool, server["environment"]["CBIR_GRAPH_DIR"]}


def test_every_service_that_answers_queries_reads_the_graph_from_one_shared_volume():
    """The Orthanc plugin, the standalone server and the workers (their "Similar cases" series) search
    one index: the first to build its graph writes it, the others (and every restart) read it."""
    config = services()
    answering = ("orthanc", "worker", "standalone", "standalone-worker")
    folders = {config[name]["environment"]["CBIR_GRAPH_DIR"] for name in answering}
    assert len(folders) == 1
    sources = {source for name in answering for source, target in map(mounted, config[name]["volumes"])
               if target == next(iter(folders))}  # fmt: skip
    assert len(sources) == 1 and not next(iter(sources)).startswith("/")  # one named volume, on no host path


# -- the Redis service's command, with a real redis-server -----------------------------------------


def start_redis_service(tmp_path: Path, password: str) -> tuple[subprocess.Popen, int]:
    """The redis service's command as its container runs it, with a real redis-server: the image's
    docker-entrypoint.sh (which drops to user redis, then execs its arguments) stands in as a
    script that adds a free loopback port and nothing persisted."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (run `make test`)")
    command = services()["redis"]["command"]
    command = [part.replace("$$", "$") for part in command]  # what Compose hands the container
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entrypoint = bin_dir / "docker-entrypoint.sh"
    entrypoint.write_text(f'#!/bin/sh\nexec "$@" --port {port} --bind 127.0.0.1 --dir {tmp_path} --appendonly no '
                          "--save ''\n")  # fmt: skip
    entrypoint.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "REDIS_PASSWORD": password}
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    return process, port


def answers(client: redis.Redis, process: subprocess.Popen, timeout_s: float = 20) -> bool:
    """Whether ``client`` gets an answer to PING once the server has started (before ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            time.sleep(0.1)
    return False


@pytest.mark.integration
def test_the_redis_service_asks_for_its_password_which_no_command_line_shows(tmp_path):
    password = REQUIRED["REDIS_PASSWORD"]
    process, port = start_redis_service(tmp_path, password)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        with client_for(Settings(redis_url=url, redis_password=password), socket_timeout=2) as client:
            assert answers(client, process)
        with client_for(Settings(redis_url=url), socket_timeout=2) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
        # the shell exec'd redis-server: its command line is the container's, and holds no password
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "redis-server" in command_line and password not in command_line
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("password", ["two words", 'quote"d', "back\\slash", "dollar$sign"])
def test_the_redis_service_refuses_a_password_it_cannot_write_unquoted(tmp_path, password):
    process, _ = start_redis_service(tmp_path, password)
    try:
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 1 and "REDIS_PASSWORD may hold" in output
