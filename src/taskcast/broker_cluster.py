"""Sharded pub/sub on Redis Cluster: one SSUBSCRIBE connection per primary node.

A task's channel `P:task:{ID}:events` hashes (by its `{ID}` tag) to the same slot as its record,
and SPUBLISH delivers only within that slot's shard, so each event reaches only the node that
owns it instead of being copied to every node. This broker keeps one RedisPubSubBroker in
sharded mode per primary, each reading its own connection (polling every node from one loop
would add up to seconds of latency), and routes each channel to the node that owns its slot.

The slot map can change (failover, resharding, a node restarted). The broker re-reads it every
`topology_interval_s`, whenever a node's connection fails, and when a node unsubscribes us from
a channel unasked (what Redis does when a slot migrates); channels whose owner changed are moved,
and the new subscription's confirmation makes the hub re-read those records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from taskcast.aio import cancel_and_wait
from taskcast.broker import RedisPubSubBroker
from taskcast.connection import never_reconnect
from taskcast.hub import BrokerListener
from taskcast.keys import TaskKeys
from taskcast.store import STORE_ERRORS

logger = logging.getLogger(__name__)


class _NodeListener:
    """Passes messages through and reports connection losses to the cluster broker."""

    def __init__(self, owner: ShardedPubSubBroker, listener: BrokerListener) -> None:
        self.owner, self.listener = owner, listener

    def on_message(self, task_id: int, payload: bytes) -> None:
        self.listener.on_message(task_id, payload)

    def on_subscribed(self, task_id: int) -> None:
        self.listener.on_subscribed(task_id)

    def on_connection_lost(self) -> None:
        self.listener.on_connection_lost()
        self.owner.request_topology_refresh()


class ShardedPubSubBroker:
    """hub.Broker over sharded pub/sub: one RedisPubSubBroker per primary, each channel on
    the node that owns its slot. Delivery is at most once, as from any broker; a channel that
    moves to another node is confirmed there, which makes the hub re-read its record. The
    methods never wait for Redis: placing a channel reads the client's cached slot map."""

    def __init__(
        self,
        cluster: RedisCluster,
        keys: TaskKeys,
        *,
        ping_deadline_s: float = 5.0,
        topology_interval_s: float = 5.0,
        node_timeout_s: float = 2.0,
    ) -> None:
        self.cluster = cluster
        self.keys = keys
        self.ping_deadline_s = ping_deadline_s
        self.topology_interval_s = topology_interval_s
        self.node_timeout_s = node_timeout_s
        self._desired: set[str] = set()
        self._owner: dict[str, str] = {}  # channel -> node name
        self._nodes: dict[str, tuple[RedisPubSubBroker, Any]] = {}  # name -> (broker, client)
        self._listener: _NodeListener | None = None
        self._refresh = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def subscription_count(self) -> int:
        """Channels wanted, whether or not a node has them yet."""
        return len(self._desired)

    def start(self, listener: BrokerListener) -> None:
        """Start the task that keeps the slot map current; a node's connection starts with
        the first channel placed on it."""
        self._listener = _NodeListener(self, listener)
        self._runner = asyncio.create_task(self._maintain(), name="taskcast-cluster-broker")

    async def close(self) -> None:
        """Stop that task and every node's broker and client; no listener call follows."""
        if self._runner is not None:
            await cancel_and_wait(self._runner)
        for name in list(self._nodes):
            await self._drop_node(name)

    def subscribe(self, task_id: int) -> None:
        """Want the task's channel, and subscribe it on the node the cached slot map names
        for it; re-reads of the map move it when its owner changes."""
        channel = self.keys.channel(task_id)
        self._desired.add(channel)
        self._place(channel)

    def unsubscribe(self, task_id: int) -> None:
        """Stop wanting the task's channel, and unsubscribe it on its node."""
        channel = self.keys.channel(task_id)
        self._desired.discard(channel)
        name = self._owner.pop(channel, None)
        if name in self._nodes:
            self._nodes[name][0].remove_channel(channel)

    @property
    def connected(self) -> bool:
        """Whether every node connection the subscriptions need is up (for /readyz); true
        with no subscription, when no connection is needed."""
        return all(broker.connected for broker, _ in self._nodes.values())

    def request_topology_refresh(self, channel: str | None = None) -> None:
        """Re-read the slot map soon (a node failed, or `channel`'s slot moved)."""
        self._refresh.set()

    def node_channels(self) -> dict[str, set[str]]:
        """Which node each subscribed channel lives on (for tests and diagnostics)."""
        return {name: set(broker.channels) for name, (broker, _) in self._nodes.items()}

    # -- placement --------------------------------------------------------------------------

    def _owner_of(self, channel: str) -> str | None:
        try:
            node = self.cluster.get_node_from_key(channel)
        except (RedisError, RedisClusterException):
            # No slot map yet (the cluster was down at start-up) or the slot is not covered
            # right now (SlotNotCoveredError is not a RedisError): the next refresh places it.
            return None
        return node.name if node is not None else None

    def _place(self, channel: str) -> None:
        name = self._owner_of(channel)
        if name is None:
            self._refresh.set()
            return
        previous = self._owner.get(channel)
        if previous == name and name in self._nodes:
            return
        if previous is not None and previous in self._nodes:
            self._nodes[previous][0].remove_channel(channel)
        self._owner[channel] = name
        self._node_broker(name).add_channel(channel)

    def _node_broker(self, name: str) -> RedisPubSubBroker:
        if name not in self._nodes:
            host, port = name.rsplit(":", 1)
            # No retry, no reconnect: the node broker rebuilds its connection itself.
            node_client = Redis(host=host, port=int(port), socket_timeout=self.node_timeout_s,
                                socket_connect_timeout=self.node_timeout_s,
                                retry=never_reconnect(), protocol=2)
            broker = RedisPubSubBroker(
                node_client, self.keys, ping_deadline_s=self.ping_deadline_s, sharded=True,
                control_channel=self._control_channel_for(name),
                on_channel_lost=self.request_topology_refresh,
            )
            assert self._listener is not None
            broker.start(self._listener)
            self._nodes[name] = (broker, node_client)
        return self._nodes[name][0]

    def _control_channel_for(self, name: str) -> str:
        """A channel whose slot this node owns: SSUBSCRIBE elsewhere would be MOVED."""
        for n in range(100_000):
            channel = f"{self.keys.prefix}:gateway:{{control-{n}}}"
            if self._owner_of(channel) == name:
                return channel
        return f"{self.keys.prefix}:gateway:control"

    async def _drop_node(self, name: str) -> None:
        broker, client = self._nodes.pop(name)
        await broker.close()
        with contextlib.suppress(Exception):
            await client.aclose()

    # -- topology ---------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.topology_interval_s):
                    await self._refresh.wait()
            self._refresh.clear()
            try:
                await self.cluster.nodes_manager.initialize()
            except (*STORE_ERRORS, IndexError, AttributeError) as exc:
                logger.warning("could not read the cluster's slot map: %s", exc)
                await asyncio.sleep(0.5)
                self._refresh.set()
                continue
            primaries = {node.name for node in self.cluster.get_primaries()}
            for name in [name for name in self._nodes if name not in primaries]:
                logger.info("cluster node %s is no longer a primary; moving its channels", name)
                await self._drop_node(name)
            for channel in list(self._desired):
                self._place(channel)
