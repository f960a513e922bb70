"""The pub/sub clients' connections are rebuilt by the broker, never reconnected inside redis-py.

redis-py's failure handler disconnects and connects again even with zero retries. When the
broker's reader and writer both fail on one dropped connection, each reconnected it: the socket
opened first was overwritten and left for the garbage collector, whose ResourceWarning failed a
Redis-kill test in CI. These tests drop the connection under both coroutines at once.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from taskcast.connection import connect, never_reconnect
from tests.servers import RedisServer


def plain_pubsub_client(url: str) -> aioredis.Redis:
    """The client app.py gives a single Redis's broker."""
    return connect(url, timeout=1.0, max_connections=4, retries=0, protocol=2)


def node_pubsub_client(url: str) -> aioredis.Redis:
    """The client broker_cluster.py gives each cluster node's broker."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=never_reconnect(), protocol=2)
    return client


async def drop_under_a_reader_and_a_writer(client: aioredis.Redis, admin: aioredis.Redis) -> Any:
    pubsub = client.pubsub(ignore_subscribe_messages=False)
    try:
        await pubsub.subscribe("taskcast-test:pubsub-drop")
        assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
        assert await admin.client_kill_filter(_type="pubsub") == 1
        await asyncio.sleep(0.1)  # the kill reaches the socket
        # The broker's two coroutines: the reader reads, the writer pings, on one connection.
        return await asyncio.gather(pubsub.get_message(timeout=0.5), pubsub.ping(),
                                    pubsub.get_message(timeout=0.5), return_exceptions=True)
    finally:
        await pubsub.aclose()


@pytest.mark.parametrize("make_client", [plain_pubsub_client, node_pubsub_client])
async def test_a_dropped_pubsub_connection_is_not_reconnected_and_no_socket_is_left_behind(
    redis_server: RedisServer, make_client: Callable[[str], aioredis.Redis]
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    client = make_client(redis_server.url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(5):
            results = await drop_under_a_reader_and_a_writer(client, admin)
            # The error reaches the caller, so the broker rebuilds; nothing answered behind
            # its back (a silent reconnect would re-subscribe and read the confirmation).
            assert any(isinstance(result, RedisConnectionError) for result in results), results
            assert not any(isinstance(result, dict) for result in results), results
        await client.aclose()
        gc.collect()
    await admin.aclose()
    leaks = [str(warning.message) for warning in caught
             if issubclass(warning.category, ResourceWarning)]
    assert leaks == []
