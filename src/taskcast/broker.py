"""Redis pub/sub for the hub (hub.Broker): one dedicated connection per process (or per shard).

A broker keeps a set of subscribed tasks and tells its listener about three things:
a message on a task channel, a subscription confirmation (initial or after a reconnect, so a
gap is possible and the record must be re-read), and connection loss. Delivery from a broker is
at most once: the hub, not the broker, makes it reliable (see hub.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from taskcast.aio import Backoff, cancel_and_wait
from taskcast.hub import BrokerListener
from taskcast.keys import TaskKeys
from taskcast.store import STORE_ERRORS

logger = logging.getLogger(__name__)


STALL_GRACE_S = 0.5  # how late a timed wake-up may be before the loop counts as stalled


class HungConnection(Exception):
    """Redis accepted the connection but stopped answering PING (e.g. SIGSTOP, a dead link)."""


class RedisPubSubBroker:
    """Pub/sub on one dedicated connection: classic, or sharded (one cluster node's shard).

    One writer coroutine sends every (S)SUBSCRIBE/(S)UNSUBSCRIBE/PING (batched, never
    concurrent), one reader drains the connection, and the writer doubles as a watchdog: when
    nothing, not even a PONG, arrives for `ping_deadline_s`, the connection is declared hung and
    rebuilt. After every rebuild all channels are subscribed again, and each confirmation tells
    the listener to re-read that task's record.

    A hub.Broker: delivery is at most once, and the methods only record what is wanted and
    wake the writer, so they never block and never raise for a Redis that is down.
    """

    SUBSCRIBE_CHUNK = 1000

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: TaskKeys,
        *,
        ping_interval_s: float = 1.0,
        ping_deadline_s: float = 5.0,
        backoff_cap_s: float = 5.0,
        sharded: bool = False,
        control_channel: str | None = None,
        on_channel_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ping_interval_s = ping_interval_s
        self.ping_deadline_s = ping_deadline_s
        self._backoff = Backoff(cap=backoff_cap_s)
        self.sharded = sharded
        self._on_channel_lost = on_channel_lost
        # A control channel keeps the connection subscribed (redis-py's listen() returns when
        # nothing is subscribed) and gives PINGs something to ride on when no task is watched.
        # A sharded connection needs one whose slot lives on its node.
        self._control = control_channel or f"{keys.prefix}:gateway:control"
        self._desired: set[str] = set()
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._wake = asyncio.Event()
        self._last_seen = time.monotonic()
        self._listener: BrokerListener | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = False

    @property
    def subscription_count(self) -> int:
        """Channels wanted, the control channel not counted."""
        return len(self._desired)

    @property
    def connected(self) -> bool:
        """Whether the pub/sub connection is up: from Redis's confirmation of the control
        channel until the connection is declared lost (for /readyz)."""
        return self._connected

    @property
    def channels(self) -> set[str]:
        """The channels wanted: the live set, not a copy; read it, do not change it."""
        return self._desired

    def start(self, listener: BrokerListener) -> None:
        """Start the connection task, which reconnects with backoff until close()."""
        self._listener = listener
        self._runner = asyncio.create_task(self._run(), name="taskcast-broker")

    async def close(self) -> None:
        """Stop the connection task and close the pub/sub connection; no listener call
        follows. The Redis client is the caller's to close."""
        if self._runner is not None:
            await cancel_and_wait(self._runner)

    def subscribe(self, task_id: int) -> None:
        """hub.Broker.subscribe: add_channel of the task's channel."""
        self.add_channel(self.keys.channel(task_id))

    def unsubscribe(self, task_id: int) -> None:
        """hub.Broker.unsubscribe: remove_channel of the task's channel."""
        self.remove_channel(self.keys.channel(task_id))

    def add_channel(self, channel: str) -> None:
        """Want `channel`: the writer subscribes it soon, and every rebuilt connection
        again; each confirmation of a task channel reaches on_subscribed."""
        self._desired.add(channel)
        self._to_unsubscribe.discard(channel)
        self._to_subscribe.add(channel)
        self._wake.set()

    def remove_channel(self, channel: str) -> None:
        """Stop wanting `channel`: unsubscribed in the writer's next round, and not
        subscribed again after a rebuild."""
        self._desired.discard(channel)
        self._to_subscribe.discard(channel)
        self._to_unsubscribe.add(channel)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            pubsub: Any = self.redis.pubsub(ignore_subscribe_messages=False)
            try:
                await self._session(pubsub)
            except (*STORE_ERRORS, HungConnection) as exc:
                logger.warning("Redis pub/sub connection lost (%s); reconnecting", exc or
                               type(exc).__name__)
            except Exception:
                # Whatever redis-py raises, the one subscription of this process must live on.
                logger.exception("Redis pub/sub connection failed unexpectedly; reconnecting")
            finally:
                self._connected = False
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await pubsub.aclose()
            assert self._listener is not None
            self._listener.on_connection_lost()
            await asyncio.sleep(self._backoff.next())

    async def _session(self, pubsub: Any) -> None:
        channels = [self._control, *self._desired]
        self._to_subscribe.clear()
        self._to_unsubscribe.clear()
        self._last_seen = time.monotonic()
        async with asyncio.timeout(self.ping_deadline_s):
            for start in range(0, len(channels), self.SUBSCRIBE_CHUNK):
                await self._subscribe(pubsub, channels[start : start + self.SUBSCRIBE_CHUNK])
        reader = asyncio.create_task(self._read(pubsub))
        writer = asyncio.create_task(self._write(pubsub))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionError("pub/sub loop ended")
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read(self, pubsub: Any) -> None:
        listener = self._listener
        assert listener is not None
        async for message in pubsub.listen():
            self._last_seen = time.monotonic()
            kind = message["type"]
            if kind in ("message", "smessage"):
                task_id = self.keys.task_id_of_channel(_text(message["channel"]))
                if task_id is not None:
                    listener.on_message(task_id, message["data"])
            elif kind == "sunsubscribe":
                # Unasked for, this means the slot moved to another node (Redis >= 7).
                channel = _text(message["channel"])
                if channel in self._desired and self._on_channel_lost is not None:
                    self._on_channel_lost(channel)
            elif kind in ("subscribe", "ssubscribe"):
                channel = _text(message["channel"])
                task_id = self.keys.task_id_of_channel(channel)
                if task_id is not None:
                    # First confirmation, or redis-py re-subscribing after a silent reconnect:
                    # either way messages may have been missed, so the record is re-read.
                    listener.on_subscribed(task_id)
                elif channel == self._control:
                    self._backoff.reset()
                    self._connected = True

    async def _write(self, pubsub: Any) -> None:
        last_ping = 0.0
        while True:
            waited_from = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ping_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            # Woken late, the event loop itself was stalled (a burst of large frames): replies
            # may be waiting unread in the socket. Judge Redis only after the reader has had
            # its turn, or a healthy connection is rebuilt and every watched task re-read.
            stalled = now - waited_from > self.ping_interval_s + STALL_GRACE_S
            if not stalled and now - self._last_seen > self.ping_deadline_s:
                raise HungConnection(f"no reply from Redis for {now - self._last_seen:.1f} s")
            connection = pubsub.connection
            if connection is None or not connection.is_connected:
                # Never let a command reconnect behind the reader's back: rebuild instead.
                raise ConnectionError("pub/sub connection closed")
            if self._to_unsubscribe:
                channels, self._to_unsubscribe = list(self._to_unsubscribe), set()
                if self.sharded:
                    for channel in channels:  # the channels of one command must share a slot
                        await pubsub.sunsubscribe(channel)
                else:
                    await pubsub.unsubscribe(*channels)
            while self._to_subscribe:
                batch = list(self._to_subscribe)[: self.SUBSCRIBE_CHUNK]
                self._to_subscribe.difference_update(batch)
                await self._subscribe(pubsub, batch)
            if now - last_ping >= self.ping_interval_s:
                last_ping = now
                await pubsub.ping()


    async def _subscribe(self, pubsub: Any, channels: list[str]) -> None:
        if self.sharded:
            for channel in channels:  # the channels of one command must share a slot
                await pubsub.ssubscribe(channel)
        else:
            await pubsub.subscribe(*channels)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
