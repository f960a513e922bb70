"""Building Redis clients from a URL: a real server, or the embedded `memory://` store.

The embedded store is fakeredis with Lua, so the gateway and the producer run the very same
update script and pub/sub code path as against a real server. Clients opened on the same
`memory://NAME` URL in one process share one in-memory server.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from taskcast.store import STORE_ERRORS

logger = logging.getLogger(__name__)

MEMORY_SCHEME = "memory://"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

_memory_servers: dict[str, Any] = {}


def is_memory_url(url: str) -> bool:
    """`memory://[NAME]` selects the embedded store, which lives in this process only."""
    return url.startswith(MEMORY_SCHEME)


def is_cluster_url(url: str) -> bool:
    """`redis+cluster://host:port` (any node of the cluster) selects Redis Cluster mode."""
    return url.startswith(CLUSTER_SCHEMES)


def _plain_url(url: str) -> str:
    return url.replace("+cluster://", "://", 1)


def _memory_server(url: str) -> Any:
    import fakeredis

    name = url[len(MEMORY_SCHEME) :] or "default"
    if name not in _memory_servers:
        _memory_servers[name] = fakeredis.FakeServer()
    return _memory_servers[name]


def never_reconnect() -> Retry:
    """A retry policy for connections the caller rebuilds itself (pub/sub): no retry, and
    no reconnect either.

    redis-py runs a failed command's failure handler, which disconnects *and connects again*,
    even with zero retries. On a pub/sub connection the reader and the writer coroutine can
    both fail at once; each then reconnects the same connection, and the socket opened first
    is overwritten and never closed (a ResourceWarning, and a leaked socket per outage). Only
    the errors a Retry supports reach that handler, so supporting none lets every error
    propagate untouched to the broker, which closes the connection and builds a new one."""
    return Retry(NoBackoff(), 0, supported_errors=())


def connect(
    url: str, *, timeout: float = 2.0, max_connections: int = 50, retries: int = 2,
    protocol: int | None = None, pool_timeout: float | None = None,
) -> aioredis.Redis:
    """An asyncio client that fails fast: a request should see a 500 within about `timeout`
    seconds of Redis going away, not after redis-py's default ten retries.

    `retries=0` is for pub/sub: no retry and no reconnect inside a command (see
    never_reconnect), so the broker rebuilds the connection itself.
    `protocol=2` is for pub/sub too: redis-py's RESP3 push path looks up a logger for every
    message, a measurable share of the gateway's CPU per event.
    `pool_timeout` (default `timeout`): how long a command waits for a free connection."""
    if is_memory_url(url):
        import fakeredis

        client: aioredis.Redis = fakeredis.FakeAsyncRedis(
            server=_memory_server(url), decode_responses=False
        )
        return client
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        cluster: aioredis.Redis = RedisCluster.from_url(  # type: ignore[assignment]
            _plain_url(url),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Per node, and not a blocking pool: past it redis-py raises at once.
            max_connections=max(max_connections, 500),
        )
        return cluster
    # A blocking pool: a burst of requests waits (up to `timeout`) for one of a bounded set of
    # connections, instead of opening hundreds of sockets or failing past the limit.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=(Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=retries)
               if retries > 0 else never_reconnect()),
        max_connections=max_connections,
        timeout=timeout if pool_timeout is None else pool_timeout,
        health_check_interval=0,
        **({"protocol": protocol} if protocol is not None else {}),
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


def connect_sync(url: str, *, timeout: float = 5.0) -> Any:
    """A blocking client for the synchronous producer and the CLI."""
    if is_memory_url(url):
        import fakeredis

        return fakeredis.FakeRedis(server=_memory_server(url))
    import redis

    if is_cluster_url(url):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(_plain_url(url), socket_timeout=timeout,
                                     socket_connect_timeout=timeout)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


async def initialize_cluster(redis: object) -> None:
    """Load the slot map now: redis-py initializes a cluster client lazily, and a burst of
    concurrent first commands races inside that (AttributeError on a half-made connection)."""
    try:
        await redis.initialize()  # type: ignore[attr-defined]
    except STORE_ERRORS as exc:
        logger.warning("Redis Cluster not reachable at start-up (%s); will keep trying", exc)


def safe_url(url: str) -> str:
    """The Redis URL without its credentials, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
