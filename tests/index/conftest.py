"""A real redis-server for the index tests (module scope; each test gets an empty
database); the synthetic records are tests.records_factory's."""

from __future__ import annotations

import shutil

import pytest
import redis

from orthanc_cbir.index import IndexStore
from orthanc_cbir.local_services import RedisServer
from tests.records_factory import make_info

if not shutil.which("redis-server"):
    pytest.skip("the index tests need redis-server (run `make test`)", allow_module_level=True)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def client(redis_url):
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.close()


@pytest.fixture
def store(client):
    return IndexStore(client, make_info())


