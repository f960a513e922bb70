"""Listening to Redis channels in tests: subscribe, wait until every subscription is confirmed,
and collect what was published. A sentinel published on the first channel arrives after
everything published before it, so reaching it proves nothing more is on its way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis

SENTINEL = b"--sentinel: everything before me has been delivered--"


class Published:
    def __init__(self, client: aioredis.Redis, pubsub: Any, probe_channel: str,
                 timeout: float) -> None:
        self.client = client
        self.pubsub = pubsub
        self.probe_channel = probe_channel
        self.timeout = timeout

    async def drain(self) -> list[bytes]:
        """Everything published on the subscribed channels so far, within a bounded wait."""
        received: list[bytes] = []
        async with asyncio.timeout(self.timeout):
            await self.client.publish(self.probe_channel, SENTINEL)
            while True:
                message = await self.pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
                if message is None:
                    continue
                if message["data"] == SENTINEL:
                    return received
                received.append(message["data"])


@asynccontextmanager
async def subscribed(client: aioredis.Redis, channels: Sequence[str], timeout: float
                     ) -> AsyncIterator[Published]:
    """Subscribed to `channels` (confirmed) for the block; each wait bounded by `timeout`."""
    pubsub = client.pubsub()
    try:
        async with asyncio.timeout(timeout):
            await pubsub.subscribe(*channels)
            confirmed = 0
            while confirmed < len(channels):
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1
        yield Published(client, pubsub, channels[0], timeout)
    finally:
        async with asyncio.timeout(timeout):
            await pubsub.aclose()
