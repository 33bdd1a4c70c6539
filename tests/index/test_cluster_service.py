"""The local Redis Cluster launcher: three masters on loopback that share the slots, and
nothing left running or listening after the ``with`` block."""

from __future__ import annotations

import shutil
import socket

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from orthanc_cbir.local_services import RedisCluster

if not shutil.which("redis-server"):
    pytest.skip("the Redis Cluster tests need redis-server (run `make test`)", allow_module_level=True)

pytestmark = pytest.mark.integration


def listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def bindable(port: int) -> bool:
    """Whether a server could listen on the port again (SO_REUSEADDR, as redis-server sets it:
    the connections the stopped server closed linger in TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_three_master_cluster_spreads_keys_and_stops(tmp_path):
    keys = {f"{{patient-{i}}}:features": str(i) for i in range(60)}  # 60 hash tags, 60 slots
    with RedisCluster(tmp_path / "cluster", masters=3) as cluster:
        assert cluster.url.startswith("redis://127.0.0.1:")
        assert len({port for _, port in cluster.nodes}) == 3
        assert all(host == "127.0.0.1" for host, _ in cluster.nodes)
        ports = [port for _, port in cluster.nodes]
        bus_ports = [node.bus_port for node in cluster._nodes]
        processes = [node.process for node in cluster._nodes]

        client = cluster.client()
        try:
            for key, value in keys.items():
                client.set(key, value)
            assert {key: client.get(key).decode() for key in keys} == keys
            assert len(client.get_primaries()) == 3
        finally:
            client.close()

        sizes, owners = [], {key: [] for key in keys}
        for host, port in cluster.nodes:
            with redis.Redis(host=host, port=port) as node:
                sizes.append(node.dbsize())
                for key in keys:
                    if node.execute_command("CLUSTER COUNTKEYSINSLOT", key_slot(key.encode())):
                        owners[key].append(port)
        assert all(size > 0 for size in sizes), f"keys per master: {sizes}"
        assert sum(sizes) == len(keys)
        assert all(len(holders) == 1 for holders in owners.values()), owners

    assert all(process is not None and process.poll() is not None for process in processes)
    assert not any(listens(port) for port in ports + bus_ports)
    assert all(bindable(port) for port in ports + bus_ports)


def test_a_cluster_with_a_password_refuses_strangers(tmp_path):
    with RedisCluster(tmp_path / "cluster", masters=3, password="s3cret/+:@") as cluster:
        assert "s3cret" in cluster.url
        with cluster.client() as client:
            client.set("{a}key", "value")
            assert client.get("{a}key") == b"value"
        host, port = cluster.nodes[1]
        # no retries: redis-py would retry the refused handshake with backoff for seconds
        with redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0)) as stranger, \
             pytest.raises(redis.AuthenticationError):  # fmt: skip
            stranger.ping()
