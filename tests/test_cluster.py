"""Redis Cluster mode against a real three-primary cluster: sharded pub/sub end to end.

With a `redis+cluster://` URL the producer's script publishes with SPUBLISH, and every gateway
replica keeps one SSUBSCRIBE connection per primary (ShardedPubSubBroker). These tests run two
replicas on one cluster and check both what the hub promises a watcher (hub.py: the current
state first, then only strictly newer versions, and the terminal state never lost) and where
the subscriptions live in Redis: each task channel on the node that owns its slot, one
subscription per replica, none left behind once the clients are gone.

One cluster serves the whole module; every test has its own key prefix and leaves the cluster
healthy (cluster_state:ok) for the next.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from taskcast.broker_cluster import ShardedPubSubBroker
from taskcast.errors import StoreUnavailable
from taskcast.keys import TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import (
    REDIS_CLI,
    Gateway,
    RedisClusterNodes,
    RedisServer,
    free_port,
    run_gateway,
    wait_ready,
)
from tests.sse_client import (
    TERMINAL,
    Follower,
    Transcript,
    read_metric,
    stream_problems,
    wait_for_metric,
)

BOUND_S = 20.0  # one step: a connection, a subscription settling, a state arriving
RUN_BOUND_S = 60.0  # a whole run, or waiting out a node failure
TASKS_PER_NODE = 10
CONTROL_CHANNEL = re.compile(r":gateway:\{control-\d+\}$")
READY = {"code": 200, "msg": "ready", "data": {"redis": "ok", "pubsub": "ok", "cluster": "ok"}}
NOT_READY = {"code": 503, "msg": "redis unavailable", "data": {"redis": "unavailable"}}
NOT_FOUND = {"code": 404, "msg": "task not found", "data": None}


# -- the cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def revive(cluster: RedisClusterNodes) -> None:
    """Start every node that is not running (same port and dir: nodes.conf rejoins it)."""
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            node.start()


@pytest.fixture
def healthy_cluster(cluster: RedisClusterNodes) -> RedisClusterNodes:
    """The module's cluster, all nodes up and in cluster_state:ok (an earlier test may have
    killed or restarted nodes, or failed before it brought them back)."""
    revive(cluster)
    cluster.wait_ok(RUN_BOUND_S)
    return cluster


class Layout:
    """Which primary serves which slots (CLUSTER NODES) and each key's slot (CLUSTER KEYSLOT)."""

    def __init__(self, cluster: RedisClusterNodes, ranges: list[tuple[int, int, RedisServer]]
                 ) -> None:
        self.cluster = cluster
        self.ranges = ranges
        self._slots: dict[str, int] = {}

    @classmethod
    async def read(cls, cluster: RedisClusterNodes) -> Layout:
        by_port = {node.port: node for node in cluster.nodes}
        text = await asyncio.to_thread(cluster.nodes[0].cli, "CLUSTER", "NODES")
        ranges = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8 or "master" not in parts[2].split(","):
                continue
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for item in parts[8:]:
                if item.startswith("["):  # a slot being migrated: none in these tests
                    continue
                first, _, last = item.partition("-")
                ranges.append((int(first), int(last or first), by_port[port]))
        covered = sum(last - first + 1 for first, last, _ in ranges)
        assert covered == 16384, f"the cluster does not cover every slot:\n{text}"
        return cls(cluster, ranges)

    def node_of_slot(self, slot: int) -> RedisServer:
        return next(node for first, last, node in self.ranges if first <= slot <= last)

    async def slot(self, key: str) -> int:
        """The slot as the cluster itself computes it (memoized: one redis-cli call per key)."""
        if key not in self._slots:
            reply = await asyncio.to_thread(self.cluster.nodes[0].cli, "CLUSTER", "KEYSLOT", key)
            self._slots[key] = int(reply)
        return self._slots[key]

    async def owner(self, key: str) -> RedisServer:
        return self.node_of_slot(await self.slot(key))


async def spread_task_ids(layout: Layout, keys: TaskKeys, per_node: int) -> dict[int, list[int]]:
    """`per_node` task ids on every primary, keyed by the primary's port.

    The ids are picked with redis-py's CRC16 and then confirmed with the cluster's own
    CLUSTER KEYSLOT: the record and the channel of a task share the `{ID}` hash tag, hence a slot.
    """
    chosen: dict[int, list[int]] = {node.port: [] for node in layout.cluster.nodes}
    for task_id in itertools.count(1):
        port = layout.node_of_slot(key_slot(keys.record(task_id).encode())).port
        if len(chosen[port]) < per_node:
            chosen[port].append(task_id)
        if all(len(ids) == per_node for ids in chosen.values()):
            break
    for port, task_ids in chosen.items():
        for task_id in task_ids:
            record_slot = await layout.slot(keys.record(task_id))
            assert await layout.slot(keys.channel(task_id)) == record_slot
            assert layout.node_of_slot(record_slot).port == port
    assert all(len(task_ids) == per_node for task_ids in chosen.values())
    return chosen


async def wait_cluster_state(nodes: Iterable[RedisServer], state: str) -> None:
    nodes = list(nodes)
    async with asyncio.timeout(RUN_BOUND_S):
        while True:
            infos = [await asyncio.to_thread(node.cli, "CLUSTER", "INFO", check=False)
                     for node in nodes]
            if all(f"cluster_state:{state}" in info for info in infos):
                return
            await asyncio.sleep(0.1)


# -- where the subscriptions are --------------------------------------------------------------


async def shard_numsub(node: RedisServer, channels: list[str]) -> dict[str, int]:
    """`PUBSUB SHARDNUMSUB` on one node (redis-cli without -c: no redirects, that node only)."""
    if not channels:
        return {}
    words = (await asyncio.to_thread(node.cli, "PUBSUB", "SHARDNUMSUB", *channels)).split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


async def shard_channels(node: RedisServer, prefix: str) -> set[str]:
    return set((await asyncio.to_thread(node.cli, "PUBSUB", "SHARDCHANNELS", f"{prefix}:*")
                ).split())


def gateway_view(gateway: Gateway) -> dict[str, set[str]]:
    """ShardedPubSubBroker.node_channels(): which node each channel is subscribed on."""
    view: dict[str, set[str]] = gateway.app.state.hub.broker.node_channels()
    return view


async def subscription_problems(
    layout: Layout,
    prefix: str,
    gateways: Mapping[str, Gateway],
    expected: Mapping[str, Collection[str]],
    loose: Collection[str] = (),
) -> list[str]:
    """What differs from `expected` (channel -> names of the replicas subscribed to it).

    On the node that owns a channel's slot SHARDNUMSUB counts one connection per subscribed
    replica, on every other node 0. SHARDCHANNELS of a node lists only channels whose slot it
    owns: the expected task channels and the replicas' control channels (`loose` channels may be
    there or not, but only on their owner). Each replica's own view agrees.
    """
    problems = []
    owners = {channel: await layout.owner(channel) for channel in [*expected, *loose]}
    for node in layout.cluster.nodes:
        counts = await shard_numsub(node, sorted(expected))
        for channel, replicas in sorted(expected.items()):
            want = len(replicas) if owners[channel] is node else 0
            if counts.get(channel) != want:
                problems.append(f"node {node.port}: SHARDNUMSUB {channel} is "
                                f"{counts.get(channel)}, expected {want}")
        listed = await shard_channels(node, prefix)
        for channel in sorted(listed):
            owner = owners.get(channel) or await layout.owner(channel)
            if owner is not node:
                problems.append(f"node {node.port} lists {channel}, whose slot node "
                                f"{owner.port} owns")
            if not CONTROL_CHANNEL.search(channel) and channel not in expected \
                    and channel not in loose:
                problems.append(f"node {node.port} lists {channel}, which nobody watches")
        for channel, replicas in sorted(expected.items()):
            if replicas and owners[channel] is node and channel not in listed:
                problems.append(f"node {node.port} does not list {channel}")
    for name, gateway in gateways.items():
        view = gateway_view(gateway)
        for node_name, channels in sorted(view.items()):
            for channel in sorted(channels):
                owner = owners.get(channel) or await layout.owner(channel)
                if node_name != f"127.0.0.1:{owner.port}":
                    problems.append(f"{name} subscribes {channel} on {node_name}, but node "
                                    f"{owner.port} owns its slot")
        subscribed = set().union(*view.values()) if view else set()
        want = {channel for channel, replicas in expected.items() if name in replicas}
        extra = subscribed - want - set(loose)
        if want - subscribed or extra:
            problems.append(f"{name} subscribes {sorted(subscribed)}, expected {sorted(want)}")
    return problems


async def wait_for_subscriptions(
    layout: Layout,
    prefix: str,
    gateways: Mapping[str, Gateway],
    expected: Mapping[str, Collection[str]],
    loose: Collection[str] = (),
) -> None:
    """Subscribing is asynchronous (a broker's writer sends SSUBSCRIBE): poll until it settles."""
    problems: list[str] = []
    try:
        async with asyncio.timeout(BOUND_S):
            while problems := await subscription_problems(layout, prefix, gateways, expected,
                                                          loose):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError("subscriptions did not settle:\n" + "\n".join(problems)) from None


# -- clients ------------------------------------------------------------------------------


def cluster_settings(cluster: RedisClusterNodes, prefix: str) -> Settings:
    return Settings(redis_url=cluster.url, prefix=prefix, resync_interval_s=0.5,
                    redis_ping_deadline_s=1.5, redis_timeout_s=0.5, sse_keepalive_s=2.0)


@asynccontextmanager
async def producer_on(cluster: RedisClusterNodes, prefix: str) -> AsyncIterator[Producer]:
    """A producer on a client of its own (`redis+cluster://` makes it publish with SPUBLISH)."""
    producer = Producer.from_url(cluster.url, prefix=prefix)
    try:
        yield producer
    finally:
        async with asyncio.timeout(BOUND_S):
            await producer.close()


@asynccontextmanager
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the gateway, once it is ready.

    Waiting for /readyz, as a load balancer would, also makes the gateway's cluster client read
    the slot map before a burst of concurrent reads needs it (see
    test_a_burst_of_subscriptions_on_a_cold_gateway_is_served).
    """
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as client:
        ready = await wait_ready(client, BOUND_S)
        assert ready.json() == READY
        yield client


def events_path(task_ids: Iterable[int]) -> str:
    return "/events?task_id=" + ",".join(str(task_id) for task_id in task_ids)


async def finish(producer: Producer, task_id: int, n: int) -> Task:
    """Every other task completes, the rest fail: both terminal states get delivered."""
    async with asyncio.timeout(BOUND_S):
        if n % 2:
            return await producer.fail(task_id, f"task {task_id} broke")
        return await producer.complete(task_id, image_url=f"https://cdn.example/{task_id}.png")


class StateLog:
    """Task states one client received, checked against the delivery guarantee as they come."""

    def __init__(self) -> None:
        self.versions: dict[int, list[int]] = {}
        self.terminal: dict[int, dict[str, Any]] = {}
        self.problems: list[str] = []

    def add(self, task: dict[str, Any]) -> None:
        task_id, version = task["task_id"], task["version"]
        seen = self.versions.setdefault(task_id, [])
        if task_id in self.terminal:
            self.problems.append(f"task {task_id}: v{version} after its terminal state")
        if seen and version <= seen[-1]:
            self.problems.append(f"task {task_id}: v{version} after v{seen[-1]}")
        seen.append(version)
        if task["status"] in TERMINAL:
            self.terminal[task_id] = task


class WsWatcher:
    """One `/ws` socket; a background reader logs every frame it gets."""

    def __init__(self, gateway: Gateway, name: str) -> None:
        self.gateway = gateway
        self.name = name
        self.log = StateLog()
        self.subscribed: set[int] = set()
        self.other_frames: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WsWatcher:
        self._ws = await connect(self.gateway.ws_url + "/ws", proxy=None, open_timeout=BOUND_S,
                                 close_timeout=BOUND_S, max_size=None)
        self._reader = asyncio.create_task(self._read(self._ws), name=f"reader {self.name}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._ws is not None and self._reader is not None
        async with asyncio.timeout(BOUND_S):
            await self._ws.close()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                frame = orjson.loads(message)
                if frame["type"] == "task":
                    self.log.add(frame["data"])
                elif frame["type"] == "subscribed":
                    self.subscribed.update(frame["task_ids"])
                else:
                    self.other_frames.append(frame)
        except ConnectionClosed as exc:
            self.closed = exc

    async def until(self, what: str, done: Callable[[], bool], bound_s: float = BOUND_S) -> None:
        try:
            async with asyncio.timeout(bound_s):
                while not done():
                    assert self._reader is not None
                    if self._reader.done():
                        raise AssertionError(f"{self.name} closed ({self.closed!r}) before {what}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what}; versions {self.log.versions}, other "
                                 f"frames {self.other_frames}") from None

    async def subscribe(self, task_ids: list[int]) -> None:
        assert self._ws is not None
        async with asyncio.timeout(BOUND_S):
            await self._ws.send(orjson.dumps({"op": "subscribe", "task_ids": task_ids}).decode())
        await self.until("subscribed reply", lambda: set(task_ids) <= self.subscribed)

    def has(self, task_ids: Iterable[int], version: int = 1) -> Callable[[], bool]:
        """A condition: every task has reached at least `version` on this socket."""
        ids = list(task_ids)
        return lambda: all(self.log.versions.get(t, [0])[-1] >= version for t in ids)

    def finished(self, task_ids: Iterable[int]) -> Callable[[], bool]:
        ids = list(task_ids)
        return lambda: all(t in self.log.terminal for t in ids)


async def until_sse(follower: Follower, what: str, done: Callable[[Transcript], bool]) -> None:
    try:
        async with asyncio.timeout(BOUND_S):
            while not done(follower.transcript):
                assert follower.task is not None
                if follower.task.done():
                    raise AssertionError(f"stream ended before {what}: "
                                         f"{follower.transcript.summary()}")
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no {what}: {follower.transcript.summary()}") from None


def sse_versions(transcript: Transcript, task_id: int) -> list[int]:
    return [task["version"] for task in transcript.by_task().get(task_id, [])]


def sse_reached(task_ids: Iterable[int], version: int) -> Callable[[Transcript], bool]:
    ids = list(task_ids)
    return lambda t: all((sse_versions(t, task_id) or [0])[-1] >= version for task_id in ids)


def sse_finished(task_ids: Iterable[int]) -> Callable[[Transcript], bool]:
    ids = list(task_ids)
    return lambda t: all(t.by_task().get(task_id, [{}])[-1].get("status") in TERMINAL
                         for task_id in ids)


def sse_terminals(transcript: Transcript) -> dict[int, dict[str, Any]]:
    return {task_id: tasks[-1] for task_id, tasks in transcript.by_task().items()}


async def stop_all(followers: Iterable[Follower]) -> None:
    for follower in followers:
        await follower.stop()


# -- REST and readiness -----------------------------------------------------------------------


async def test_rest_and_readiness_work_in_cluster_mode(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    by_node = await spread_task_ids(layout, keys, per_node=2)
    existing = [task_ids[0] for task_ids in by_node.values()]  # one task on every primary
    missing = [task_ids[1] for task_ids in by_node.values()]  # and one absent id on each
    async with producer_on(cluster, prefix) as producer:
        tasks = {}
        for task_id in existing:
            await producer.create(task_id=task_id, type="txt2img", angle="front")
            tasks[task_id] = await producer.progress(task_id, 40)
    async with run_gateway(cluster_settings(cluster, prefix)) as gateway, http(gateway) as client:
        ready = await wait_ready(client, BOUND_S)
        async with asyncio.timeout(BOUND_S):
            found = {task_id: await client.get(f"/tasks/{task_id}") for task_id in existing}
            cached = {task_id: await client.get(f"/tasks/{task_id}",
                                                headers={"If-None-Match": '"2"'})
                      for task_id in existing}
            absent = {task_id: await client.get(f"/tasks/{task_id}") for task_id in missing}
    assert ready.status_code == 200
    assert ready.json() == READY
    for task_id, response in found.items():
        assert response.status_code == 200, response.text
        assert response.json() == {"code": 200, "msg": "success",
                                   "data": tasks[task_id].to_dict()}
        assert response.headers["etag"] == '"2"'
        assert cached[task_id].status_code == 304
    for response in absent.values():
        assert response.status_code == 404
        assert response.json() == NOT_FOUND


async def run_cli(*args: str) -> dict[str, Any]:
    """`taskcast task ...` (the operator CLI, on the blocking SyncProducer); its JSON output."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("TASKCAST_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taskcast", "task", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(BOUND_S):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode(errors="replace")
    result: dict[str, Any] = orjson.loads(out)
    return result


async def test_the_operator_cli_publishes_sharded_events_in_cluster_mode(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    task_ids = sorted(ids[0] for ids in (await spread_task_ids(layout, keys, 1)).values())
    where = ["--redis-url", cluster.url, "--prefix", prefix]
    # No periodic re-read within the test: only SPUBLISH events can carry the changes.
    settings = cluster_settings(cluster, prefix).with_changes(resync_interval_s=600.0)
    async with run_gateway(settings) as gateway, http(gateway) as client:
        created = await asyncio.gather(*(run_cli("create", "--id", str(task_id), *where)
                                         for task_id in task_ids))
        assert [task["version"] for task in created] == [1] * len(task_ids)
        async with WsWatcher(gateway, "ws") as ws:
            await ws.subscribe(task_ids)
            await ws.until("first states", ws.has(task_ids))
            await wait_for_subscriptions(layout, prefix, {"gw": gateway},
                                         {keys.channel(t): ("gw",) for t in task_ids})
            await asyncio.gather(*(run_cli("progress", str(task_id), "50", *where)
                                   for task_id in task_ids))
            completed = await asyncio.gather(*(
                run_cli("complete", str(task_id), "--image-url",
                        f"https://cdn.example/{task_id}.png", *where)
                for task_id in task_ids))
            finals = {task["task_id"]: task for task in completed}
            await ws.until("terminal states", ws.finished(task_ids))
        events = await read_metric(client, "taskcast_events_received_total")
    assert ws.log.problems == []
    assert ws.log.terminal == finals
    assert events == 2 * len(task_ids)
    read_back = await asyncio.gather(*(run_cli("get", str(task_id), *where)
                                       for task_id in task_ids))
    assert {task["task_id"]: task for task in read_back} == finals


# -- two replicas, three shards ---------------------------------------------------------------


async def test_two_replicas_deliver_every_terminal_state_from_all_three_shards(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    by_node = await spread_task_ids(layout, keys, TASKS_PER_NODE)
    task_ids = sorted(itertools.chain(*by_node.values()))
    settings = cluster_settings(cluster, prefix)
    finals: dict[int, Task] = {}
    async with run_gateway(settings) as gw1, run_gateway(settings) as gw2, \
            http(gw1) as client1, http(gw2) as client2, producer_on(cluster, prefix) as producer:
        gateways = {"gw1": gw1, "gw2": gw2}
        for task_id in task_ids:
            await producer.create(task_id=task_id, type="txt2img")
        # A WebSocket on each replica, and a multi-task SSE stream on the other one.
        async with WsWatcher(gw1, "ws@gw1") as ws1, WsWatcher(gw2, "ws@gw2") as ws2:
            await ws1.subscribe(task_ids)
            await ws2.subscribe(task_ids)
            sse2 = Follower(client2, events_path(task_ids), expect=task_ids).start()
            sse1 = Follower(client1, events_path(task_ids), expect=task_ids).start()
            try:
                await ws1.until("first states", ws1.has(task_ids))
                await ws2.until("first states", ws2.has(task_ids))
                for follower in (sse1, sse2):
                    await until_sse(follower, "first states", sse_reached(task_ids, 1))

                # However many watchers, each replica subscribes once per task, on its owner.
                await wait_for_subscriptions(layout, prefix, gateways,
                                             {keys.channel(t): ("gw1", "gw2") for t in task_ids})

                events = [await read_metric(client, "taskcast_events_received_total") or 0
                          for client in (client1, client2)]
                async with asyncio.timeout(RUN_BOUND_S):
                    for progress in (10, 50):
                        for task_id in task_ids:
                            await producer.progress(task_id, progress)
                for n, task_id in enumerate(task_ids):
                    finals[task_id] = await finish(producer, task_id, n)

                await ws1.until("terminal states", ws1.finished(task_ids), RUN_BOUND_S)
                await ws2.until("terminal states", ws2.finished(task_ids), RUN_BOUND_S)
                transcripts = [await sse1.result(RUN_BOUND_S), await sse2.result(RUN_BOUND_S)]
            finally:
                await stop_all([sse1, sse2])
        for client, before in zip((client1, client2), events, strict=True):
            # Each replica got every change as a sharded pub/sub event (not by re-reading).
            after = await read_metric(client, "taskcast_events_received_total")
            assert after == before + 3 * len(task_ids)

        expected_finals = {task_id: task.to_dict() for task_id, task in finals.items()}
        assert {task.status.value for task in finals.values()} == set(TERMINAL)
        for ws in (ws1, ws2):
            assert ws.log.problems == [], ws.name
            assert ws.other_frames == [], ws.name
            assert ws.log.terminal == expected_finals, ws.name
            assert all(versions[0] == 1 for versions in ws.log.versions.values()), ws.name
        for transcript in transcripts:
            assert stream_problems(transcript, task_ids, multi=True) == []
            assert sse_terminals(transcript) == expected_finals

        # Every client has left: no task channel is subscribed anywhere any more.
        await wait_for_subscriptions(layout, prefix, gateways,
                                     {keys.channel(t): () for t in task_ids})


# -- a node killed and restarted under two replicas -------------------------------------------


async def advance_through_outage(cluster: RedisClusterNodes, prefix: str, task_ids: list[int],
                                 progress: int) -> dict[int, Task]:
    """Move every task to `progress`, retrying while the cluster refuses writes.

    A progress change is idempotent (the same value again changes nothing and returns the
    current state), so a retry after a write whose reply was lost is harmless. While the
    cluster is down the producer raises CLUSTERDOWN as redis-py's ClusterDownError rather than
    StoreUnavailable (reported as a bug), hence the broad except.
    """
    states: dict[int, Task] = {}
    async with producer_on(cluster, prefix) as producer:
        for task_id in task_ids:
            while task_id not in states:
                try:
                    async with asyncio.timeout(BOUND_S):
                        states[task_id] = await producer.progress(task_id, progress)
                except (StoreUnavailable, RedisError, RedisClusterException, TimeoutError):
                    await asyncio.sleep(0.2)
    return states


async def test_a_node_killed_and_restarted_mid_run_every_watcher_still_ends_terminal(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    by_node = await spread_task_ids(layout, keys, TASKS_PER_NODE)
    # Not the node the URL names: the gateways and producers find the cluster through that one.
    victim = cluster.nodes[1]
    victim_name = f"127.0.0.1:{victim.port}"
    survivors = [node for node in cluster.nodes if node is not victim]
    on_victim = by_node[victim.port]
    # Redis runs without persistence, so every record on the victim dies with it, and a task
    # re-created afterwards starts again at version 1. A client that already holds a higher
    # version of such a task is in undefined territory: the gateway passes on only versions
    # above the newest it knows, so depending on timing it would either report the task gone
    # (when it re-reads the record in the gap before it is re-created) or silently hold back
    # the new incarnation's states up to the old version. So the victim's tasks come in two
    # well-defined groups:
    kv_done = on_victim[:3]  # finished before the kill: the watchers already hold the end
    kv_new = on_victim[3:]  # not watched before the kill; re-created, then watched
    ko = sorted(itertools.chain(*(by_node[node.port] for node in survivors)))
    first_watch = sorted(ko + kv_done)
    all_ids = sorted(first_watch + kv_new)
    k0, k1, kv0 = ko[0], ko[1], kv_new[0]
    finals: dict[int, Task] = {}
    settings = cluster_settings(cluster, prefix)
    async with run_gateway(settings) as gw1, run_gateway(settings) as gw2, \
            http(gw1) as client1, http(gw2) as client2:
        gateways = {"gw1": gw1, "gw2": gw2}
        async with producer_on(cluster, prefix) as producer:
            for task_id in all_ids:
                await producer.create(task_id=task_id, type="txt2img")
            await producer.progress(kv0, 30)  # v2 of the incarnation about to be lost

        # A client reads kv0 up to v2 and leaves before the kill (nothing watches kv0 then).
        old_reader = Follower(client1, f"/tasks/{kv0}/events",
                              stop_when=lambda f, t: f.is_task and f.task()["version"] >= 2)
        old_transcript = await old_reader.start().result(BOUND_S)

        async with WsWatcher(gw1, "ws@gw1") as ws:
            await ws.subscribe(first_watch)
            sse = Follower(client2, events_path(first_watch), expect=first_watch).start()
            # This client reads k0 up to v2 on gw1, goes away, and comes back on gw2 later.
            reader = Follower(client1, f"/tasks/{k0}/events",
                              stop_when=lambda f, t: f.is_task and f.task()["version"] >= 2)
            followers = [sse, reader.start()]
            try:
                await ws.until("first states", ws.has(first_watch))
                await until_sse(sse, "first states", sse_reached(first_watch, 1))
                await wait_for_subscriptions(
                    layout, prefix, gateways,
                    {keys.channel(t): ("gw1", "gw2") for t in first_watch}
                    | {keys.channel(t): () for t in kv_new})

                async with producer_on(cluster, prefix) as producer:
                    for task_id in ko:
                        await producer.progress(task_id, 30)  # v2
                    for n, task_id in enumerate(kv_done):
                        await producer.progress(task_id, 30)
                        finals[task_id] = await finish(producer, task_id, n)  # v3, the end
                reader_transcript = await reader.result(BOUND_S)
                await ws.until("v2 and the kv_done ends",
                               lambda: ws.has(ko, 2)() and ws.finished(kv_done)())
                await until_sse(sse, "v2 and the kv_done ends",
                                lambda t: sse_reached(ko, 2)(t) and sse_finished(kv_done)(t))
                # gw2 still watches kv_done for its stream, so both replicas hold a live
                # connection to the victim (gw1 at least for its control channel) when it dies.
                assert victim_name in gateway_view(gw1)
                assert gateway_view(gw2)[victim_name] == {keys.channel(t) for t in kv_done}
                reconnects = [await read_metric(client, "taskcast_redis_reconnects_total") or 0
                              for client in (client1, client2)]

                # -- SIGKILL one primary mid-run. Nothing replicates it: its slots are down
                # until it comes back, and the rest of the cluster answers CLUSTERDOWN meanwhile.
                victim.kill()
                outage_writes = asyncio.create_task(
                    advance_through_outage(cluster, prefix, ko, 60))
                await wait_cluster_state(survivors, "fail")
                for client, before in zip((client1, client2), reconnects, strict=True):
                    # Both replicas noticed that their connection to the victim broke.
                    await wait_for_metric(client, "taskcast_redis_reconnects_total",
                                          lambda value, before=before: value > before,
                                          timeout=BOUND_S)
                await asyncio.to_thread(victim.start)  # same port and dir: nodes.conf rejoins
                await asyncio.to_thread(cluster.wait_ok, RUN_BOUND_S)
                async with asyncio.timeout(RUN_BOUND_S):
                    outage_states = await outage_writes
                assert {state.version for state in outage_states.values()} == {3}

                # The victim came back empty.
                async with asyncio.timeout(BOUND_S):
                    for task_id in on_victim:
                        gone = await client1.get(f"/tasks/{task_id}")
                        assert gone.status_code == 404, (task_id, gone.text)
                async with producer_on(cluster, prefix) as producer:
                    for task_id in kv_new:
                        recreated = await producer.create(task_id=task_id, type="txt2img")
                        assert recreated.version == 1

                # Only now do clients connect to the re-created tasks.
                await ws.subscribe(kv_new)
                sse_new = Follower(client2, events_path(kv_new), expect=kv_new).start()
                # Back on the other replica with the last version it saw: only newer ones.
                resumed = Follower(client2, f"/tasks/{k0}/events",
                                   headers={"Last-Event-ID": "2"}).start()
                # Last-Event-ID 2 is above anything the re-created kv0 (v1) ever had: the
                # gateway starts that client from the current state (sse.py), a defined case.
                reborn = Follower(client2, f"/tasks/{kv0}/events",
                                  headers={"Last-Event-ID": "2"}).start()
                followers += [sse_new, resumed, reborn]
                await ws.until("states after the restart",
                               lambda: ws.has(kv_new)() and ws.has(ko, 3)())
                await until_sse(sse, "the outage states", sse_reached(ko, 3))
                await until_sse(sse_new, "first states", sse_reached(kv_new, 1))
                await until_sse(resumed, "the resumed state", sse_reached([k0], 3))
                await until_sse(reborn, "the re-created state", sse_reached([kv0], 1))

                # Subscriptions are back where the slots are, the restarted victim's included.
                await wait_for_subscriptions(
                    layout, prefix, gateways,
                    {keys.channel(t): ("gw1", "gw2") for t in ko + kv_new},
                    loose=[keys.channel(t) for t in kv_done])

                # A change whose event is lost (written to the record without the script, so
                # nothing is published) still reaches both replicas' watchers: the periodic
                # re-read survived the outage.
                owner = await layout.owner(keys.record(k1))
                await asyncio.to_thread(owner.cli, "HSET", keys.record(k1), "progress", "70",
                                        "version", "4")
                await ws.until("v4 of the task whose event was lost", ws.has([k1], 4))
                await until_sse(sse, "v4 of the task whose event was lost",
                                sse_reached([k1], 4))

                async with producer_on(cluster, prefix) as producer:
                    for task_id in kv_new:
                        await producer.progress(task_id, 50)
                    for n, task_id in enumerate(ko + kv_new):
                        finals[task_id] = await finish(producer, task_id, n)

                await ws.until("terminal states", ws.finished(all_ids), RUN_BOUND_S)
                sse_transcript = await sse.result(RUN_BOUND_S)
                sse_new_transcript = await sse_new.result(RUN_BOUND_S)
                resumed_transcript = await resumed.result(RUN_BOUND_S)
                reborn_transcript = await reborn.result(RUN_BOUND_S)
            finally:
                await stop_all(followers)

        # Every client has left; both replicas are still up: nothing is subscribed any more.
        await wait_for_subscriptions(layout, prefix, gateways,
                                     {keys.channel(t): () for t in all_ids})

    expected_finals = {task_id: task.to_dict() for task_id, task in finals.items()}
    assert {task.status.value for task in finals.values()} == set(TERMINAL)
    assert ws.log.problems == []
    assert ws.other_frames == []  # no 404 frame: the socket never watched a vanished record
    assert ws.closed is None
    assert ws.log.terminal == expected_finals
    assert all(ws.log.versions[t][0] == 1 for t in kv_new)

    assert stream_problems(sse_transcript, first_watch, multi=True) == []
    assert sse_terminals(sse_transcript) == {t: expected_finals[t] for t in first_watch}
    assert stream_problems(sse_new_transcript, kv_new, multi=True) == []
    assert sse_terminals(sse_new_transcript) == {t: expected_finals[t] for t in kv_new}

    assert sse_versions(old_transcript, kv0) == [2]
    assert sse_versions(reader_transcript, k0) == [1, 2]
    assert stream_problems(resumed_transcript, [k0]) == []
    assert sse_versions(resumed_transcript, k0) == [3, 4]  # nothing it already had
    assert sse_terminals(resumed_transcript) == {k0: expected_finals[k0]}
    assert stream_problems(reborn_transcript, [kv0]) == []
    assert sse_versions(reborn_transcript, kv0)[0] == 1
    assert sse_terminals(reborn_transcript) == {kv0: expected_finals[kv0]}


# -- a slot moved to another primary ----------------------------------------------------------


async def node_id(node: RedisServer) -> str:
    return (await asyncio.to_thread(node.cli, "CLUSTER", "MYID")).strip()


async def test_a_slot_resharded_under_watched_tasks_takes_their_subscriptions_along(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    source, target = cluster.nodes[1], cluster.nodes[2]
    # `redis-cli --cluster reshard` moves the source's lowest slots first: put a task there.
    slot = min(first for first, _, owner in layout.ranges if owner is source)
    moving = next(task_id for task_id in itertools.count(1)
                  if key_slot(keys.record(task_id).encode()) == slot)
    staying = next(task_id for task_id in itertools.count(1)
                   if layout.node_of_slot(key_slot(keys.record(task_id).encode())) is source
                   and key_slot(keys.record(task_id).encode()) != slot)
    assert await layout.slot(keys.record(moving)) == slot
    task_ids = [moving, staying]
    # No periodic re-read within the test: after the move, only the new node's SPUBLISH events
    # (and the re-read that its subscription confirmation triggers) can deliver.
    settings = cluster_settings(cluster, prefix).with_changes(resync_interval_s=600.0)
    async with run_gateway(settings) as gw1, run_gateway(settings) as gw2, \
            http(gw1) as client1, http(gw2) as client2, producer_on(cluster, prefix) as producer:
        gateways = {"gw1": gw1, "gw2": gw2}
        for task_id in task_ids:
            await producer.create(task_id=task_id, type="txt2img")
        async with WsWatcher(gw1, "ws@gw1") as ws:
            await ws.subscribe(task_ids)
            sse = Follower(client2, events_path(task_ids), expect=task_ids).start()
            try:
                await ws.until("first states", ws.has(task_ids))
                await until_sse(sse, "first states", sse_reached(task_ids, 1))
                expected = {keys.channel(t): ("gw1", "gw2") for t in task_ids}
                await wait_for_subscriptions(layout, prefix, gateways, expected)

                # Move the slot, record included (MIGRATE), while both replicas watch it.
                reshard = await asyncio.create_subprocess_exec(
                    REDIS_CLI, "--cluster", "reshard", f"127.0.0.1:{source.port}",
                    "--cluster-from", await node_id(source), "--cluster-to",
                    await node_id(target), "--cluster-slots", "1", "--cluster-yes",
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT)
                try:
                    async with asyncio.timeout(RUN_BOUND_S):
                        output, _ = await reshard.communicate()
                finally:
                    if reshard.returncode is None:
                        reshard.kill()
                        await reshard.wait()
                assert reshard.returncode == 0, output.decode(errors="replace")
                await asyncio.to_thread(cluster.wait_ok, RUN_BOUND_S)
                moved = await Layout.read(cluster)
                assert moved.node_of_slot(slot) is target, output.decode(errors="replace")

                # Redis unsubscribed the replicas from the moved channel on the old node; each
                # re-reads the slot map and subscribes again where the slot lives now.
                await wait_for_subscriptions(moved, prefix, gateways, expected)
                events = [await read_metric(client, "taskcast_events_received_total") or 0
                          for client in (client1, client2)]
                finals = {}
                for n, task_id in enumerate(task_ids):
                    await producer.progress(task_id, 50)
                    finals[task_id] = await finish(producer, task_id, n)
                await ws.until("terminal states", ws.finished(task_ids))
                transcript = await sse.result(BOUND_S)
            finally:
                await sse.stop()
        for client, before in zip((client1, client2), events, strict=True):
            after = await read_metric(client, "taskcast_events_received_total")
            assert after == before + 2 * len(task_ids)  # every change came as an event
        async with asyncio.timeout(BOUND_S):
            moved_record = await client1.get(f"/tasks/{moving}")
        await wait_for_subscriptions(moved, prefix, gateways,
                                     {keys.channel(t): () for t in task_ids})

    expected_finals = {task_id: task.to_dict() for task_id, task in finals.items()}
    assert ws.log.problems == []
    assert ws.other_frames == []
    assert ws.log.terminal == expected_finals
    assert stream_problems(transcript, task_ids, multi=True) == []
    assert sse_terminals(transcript) == expected_finals
    assert moved_record.json()["data"] == expected_finals[moving]


# -- failures that once escaped as raw errors ------------------------------------------------


async def test_a_burst_of_subscriptions_on_a_cold_gateway_is_served(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    by_node = await spread_task_ids(await Layout.read(cluster), keys, TASKS_PER_NODE)
    task_ids = sorted(itertools.chain(*by_node.values()))
    async with producer_on(cluster, prefix) as producer:
        for task_id in task_ids:
            await producer.create(task_id=task_id)
    # The race does not strike every time; three cold gateways in a row make it near certain.
    for attempt in range(3):
        async with run_gateway(cluster_settings(cluster, prefix)) as gateway:
            # No /readyz first: the subscription is the first thing this gateway reads.
            async with WsWatcher(gateway, f"cold ws #{attempt}") as ws:
                await ws.subscribe(task_ids)
                await ws.until("first states", ws.has(task_ids))
            assert ws.other_frames == []


async def test_a_write_the_cluster_refuses_raises_store_unavailable(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    node = cluster.nodes[2]
    task_id = (await spread_task_ids(layout, keys, 1))[node.port][0]
    # Take one other slot away from the node: it then reports cluster_state:fail and answers
    # every command with CLUSTERDOWN, as a cluster does while a primary is missing.
    slot = next(first for first, _, owner in layout.ranges if owner is node)
    assert slot != await layout.slot(keys.record(task_id))
    async with producer_on(cluster, prefix) as producer:
        await producer.redis.ping()  # the client is set up while the cluster is whole
        await asyncio.to_thread(node.cli, "CLUSTER", "DELSLOTS", str(slot))
        try:
            await wait_cluster_state([node], "fail")
            with pytest.raises(StoreUnavailable):
                async with asyncio.timeout(BOUND_S):
                    await producer.create(task_id=task_id)
        finally:
            await asyncio.to_thread(node.cli, "CLUSTER", "ADDSLOTS", str(slot))
            await asyncio.to_thread(cluster.wait_ok, RUN_BOUND_S)


async def test_after_the_whole_cluster_was_down_a_lost_event_is_still_recovered(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    cluster, keys = healthy_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    by_node = await spread_task_ids(layout, keys, 2)
    before, after = [ids[0] for ids in by_node.values()], [ids[1] for ids in by_node.values()]
    async with producer_on(cluster, prefix) as producer:
        for task_id in before:
            await producer.create(task_id=task_id)
    gateway_redis = None
    try:
        async with run_gateway(cluster_settings(cluster, prefix)) as gateway, \
                http(gateway) as client:
            gateway_redis = gateway.app.state.store.redis
            # A watched unfinished task: the hub re-reads it every resync interval.
            watching = Follower(client, events_path(before), expect=before).start()
            try:
                await until_sse(watching, "first states", sse_reached(before, 1))
                for node in cluster.nodes:
                    node.kill()
                async with asyncio.timeout(BOUND_S):
                    while (await client.get(f"/tasks/{before[0]}")).status_code != 500:
                        await asyncio.sleep(0.1)
                await asyncio.sleep(4 * 0.5)  # a few resync intervals meet the outage
                async with asyncio.timeout(BOUND_S):
                    not_ready = await client.get("/readyz")
                assert (not_ready.status_code, not_ready.json()) == (503, NOT_READY)
                for node in cluster.nodes:
                    await asyncio.to_thread(node.start)
                await asyncio.to_thread(cluster.wait_ok, RUN_BOUND_S)
            finally:
                await watching.stop()

            # Nothing carried over (no persistence): new tasks, and a new client on them.
            async with producer_on(cluster, prefix) as producer:
                for task_id in after:
                    await producer.create(task_id=task_id)
            async with WsWatcher(gateway, "ws after the outage") as ws:
                await ws.subscribe(after)
                await ws.until("current states", ws.has(after))
                # A change whose event never arrives (as when it is published while the
                # gateway's subscription is down): written to the record without the script,
                # so nothing is published. Only the periodic re-read can deliver it.
                lost = after[0]
                owner = await layout.owner(keys.record(lost))
                await asyncio.to_thread(owner.cli, "HSET", keys.record(lost), "status",
                                        "processing", "progress", "50", "version", "2")
                await ws.until("v2 of the task whose event was lost", ws.has([lost], 2),
                               bound_s=8)
            assert ws.log.problems == []
    finally:
        if gateway_redis is not None:  # a failed shutdown skips closing it
            async with asyncio.timeout(BOUND_S):
                await gateway_redis.aclose()
        await asyncio.to_thread(revive, cluster)
        await asyncio.to_thread(cluster.wait_ok, RUN_BOUND_S)


async def test_many_concurrent_creates_on_a_cold_cluster_producer_all_succeed(
    healthy_cluster: RedisClusterNodes, prefix: str
) -> None:
    """A new client, a flushed script cache and 300 creates at once: every one succeeds and
    no create is reported as EXISTS although it was written."""
    cluster = healthy_cluster
    for node in cluster.nodes:
        await asyncio.to_thread(node.cli, "SCRIPT", "FLUSH")
    async with producer_on(cluster, prefix) as producer:
        async with asyncio.timeout(RUN_BOUND_S):
            created = await asyncio.gather(*(producer.create() for _ in range(300)))
    assert sorted(task.task_id for task in created) == list(range(1, 301))


async def test_subscribing_before_the_slot_map_is_loaded_waits_for_the_next_refresh(
    prefix: str
) -> None:
    """A gateway that started while the cluster was unreachable has no slot map: following a
    task must not raise (redis-py raises SlotNotCoveredError, not a RedisError, there)."""
    cluster = RedisCluster(host="127.0.0.1", port=free_port())  # nothing listens there
    broker = ShardedPubSubBroker(cluster, TaskKeys(prefix))
    try:
        broker.subscribe(1)
        assert broker.subscription_count == 1 and broker.node_channels() == {}
        broker.unsubscribe(1)
        assert broker.subscription_count == 0
    finally:
        await cluster.aclose()
