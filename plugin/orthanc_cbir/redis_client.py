"""The one place a Redis client is made: a single server (``redis.Redis``) or, with the
``redis_cluster`` setting, a Redis Cluster (``redis.cluster.RedisCluster``, seeded by the
URL of any of its nodes).

Every command the index and the queue send touches one key, or keys that share a hash tag
(one index shard's transaction): on a cluster, each goes to the master that owns its slot,
and a pipeline fans out over the masters.

A ``RedisCluster`` connects when it is made (a ``redis.Redis`` only when first used), so
the cluster client is made on first use, and while the cluster cannot be reached that
raises :class:`redis.ConnectionError`, as a single server's client would. Once made, a cluster
client whose nodes are all gone raises :class:`~redis.exceptions.RedisClusterException`, which is
no :class:`redis.RedisError`: :data:`UNREACHABLE` names both, for the callers that wait out a
Redis outage (the Orthanc plugin's enqueue buffer, workers, the 503 of the similarity routes).
"""

from __future__ import annotations

import threading
from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from .config import Settings

UNREACHABLE: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, RedisClusterException)
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException)
"""Everything a Redis command may raise, a cluster's own failures included (they are no ``RedisError``)."""
"""What a Redis server or Redis Cluster that is down, restarting or too slow raises."""


SEARCH_COMMAND_TIMEOUT_S = 10
"""How long a Redis command of a search may take before it fails (a similarity route answers 503): a
hung Redis must not hold a server thread for the worker waits of the routes. Snapshot refreshes read
in bounded blocks. Every similarity core's client has it, a worker's "Similar cases" maker's too: the
cores of a process share one searcher, which reads through the client of the first core made."""

RedisClient: TypeAlias = "redis.Redis | RedisCluster | LazyCluster"
"""What :func:`connect` makes: one server (or Sentinel-managed master) or a Redis Cluster (a
:class:`LazyCluster`: every attribute is the cluster client's)."""


def text(value: bytes | str) -> str:
    """A Redis reply as text: clients here answer bytes (``decode_responses`` off), which redis-py
    types as ``bytes | str``.

    >>> text(b"1.2.3"), text("1.2.3")
    ('1.2.3', '1.2.3')
    """
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    """A Redis reply as bytes (the other half of :func:`text`)."""
    return value.encode() if isinstance(value, str) else value


def connect(url: str, *, cluster: bool = False, password: str = "", **options: Any) -> RedisClient:
    """A client of ``url`` (``redis://``, ``rediss://``); ``options`` go to ``from_url``
    (``socket_timeout``...). ``password`` is sent when the URL carries none (redis-py lets the URL's
    own win): a password given apart needs no URL quoting. With ``cluster``: a :class:`LazyCluster`."""
    if password:
        options["password"] = password
    if cluster:
        return LazyCluster(url, **options)
    return redis.Redis.from_url(url, **options)


def client_for(settings: Settings, **options: Any) -> RedisClient:
    """:func:`connect` to the Redis of ``settings`` (``redis_url``, ``redis_password``, ``redis_cluster``)."""
    return connect(settings.redis_url, cluster=settings.redis_cluster, password=settings.redis_password, **options)


class LazyCluster:
    """A ``RedisCluster`` of ``url``, made on first use (and tried again on the next use while
    the cluster cannot be reached); every attribute is the cluster client's."""

    def __init__(self, url: str, **options: Any):
        self.url = url
        self.options = options
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def cluster(self) -> RedisCluster:
        """The cluster client (made now if it was not yet). Raises :class:`redis.ConnectionError`
        when no node answers."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = RedisCluster.from_url(self.url, **self.options)
                    except RedisClusterException as exc:
                        raise redis.ConnectionError(f"Redis Cluster at {_public(self.url)}: {exc}") from exc
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> LazyCluster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def server_of(client: Any) -> str:
    """Which Redis server (or cluster) and database a client talks to, without its password: what
    tells two clients of one process apart from two of the same index. A client of another kind
    (Sentinel) is its own: ``client:<id>``.

    >>> server_of(connect("redis://:secret@127.0.0.1:6390/2")), server_of(connect("unix:///run/redis.sock"))
    ('127.0.0.1:6390/2', '/run/redis.sock/0')
    """
    if isinstance(client, LazyCluster):
        return f"cluster {_public(client.url)}"
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) if type(pool) is redis.ConnectionPool else None
    if not kwargs or not (kwargs.get("path") or kwargs.get("host")):
        return f"client:{id(client)}"
    where = kwargs.get("path") or f"{kwargs['host']}:{kwargs.get('port', 6379)}"
    return f"{where}/{kwargs.get('db', 0)}"


def _public(url: str) -> str:
    return url.split("@")[-1]
