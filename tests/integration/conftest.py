"""Real services for the integration tests: a redis-server and an Orthanc (DICOMweb and
Python plugins, this project's entry script) on free loopback ports in a temp dir.
Both are stopped, and waited for, when the module's tests are done; ``client`` is a Redis
connection to that server, ``embedder`` the shipped model and ``store`` its index there."""

from __future__ import annotations

import shutil

import pytest
import redis

from orthanc_cbir.index import IndexInfo, IndexStore
from orthanc_cbir.local_services import ORTHANC_BINARY, OrthancServer, RedisServer
from orthanc_cbir.model.embedder import Embedder

MISSING = [tool for tool in ("redis-server", ORTHANC_BINARY, "storescu", "dcmsend") if not shutil.which(tool)]
if MISSING:  # `make test` installs them; a bare `pytest` on another machine may not have them
    pytest.skip(f"integration tests need {', '.join(MISSING)} (run `make test`)", allow_module_level=True)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, redis_server):
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), redis_url=redis_server.url) as server:
        yield server


@pytest.fixture(scope="module")
def client(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def embedder():
    return Embedder(batch_size=64)


@pytest.fixture(scope="module")
def store(client):
    return IndexStore(client, IndexInfo.from_card(Embedder().card))
