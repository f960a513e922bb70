"""Webhooks (contract section 10) with real processes, a Redis Cluster and the SSRF guard.

- `taskcast webhooks` killed (SIGKILL) while a message is being retried: a new process sends
  it, under the same webhook-id, once the dead one's bucket leases expire (36 s with the
  default request timeout, by design: nothing tells a killed process's peers that it died).
  Stopped with SIGTERM, it gives its buckets up, and the next process takes over at once.
- `taskcast serve` with TASKCAST_WEBHOOK_SECRET delivers; with --webhooks off it does not;
  a malformed secret stops `taskcast serve` and `taskcast webhooks` with exit status 2, and
  the secret never shows in their output (nor in a debug log of normal deliveries).
- On a three-primary Redis Cluster, two gateways deliver each terminal message exactly once,
  prompted by the wake (a plain PUBLISH from the update script, on whichever node).
- Targets on loopback, private and link-local addresses are refused at delivery time without
  any connection, unless TASKCAST_WEBHOOK_ALLOWED_HOSTS names the host, address or network.

Everything is real: redis-server processes, uvicorn, `python -m taskcast` processes, a
receiver on 127.0.0.1 (tests/webhook_receiver.py) and, for [::1], a small HTTP listener of
this module. Waits are bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from taskcast.keys import WEBHOOK_BUCKETS, TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.webhook_targets import TargetPolicy, TargetRefused
from tests.servers import (
    ROOT,
    RedisClusterNodes,
    RedisServer,
    clean_environ,
    eventually,
    free_port,
    kill,
    run_gateway,
    start_serve,
    wait_until_answering,
)
from tests.sse_client import read_metric, wait_for_metric
from tests.test_cluster import Layout, spread_task_ids
from tests.test_webhooks import indexed, record
from tests.webhook_receiver import Receiver, Reply

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
SECRET_KEY = SECRET.removeprefix("whsec_")
BOUND_S = 20.0  # one step: a start-up, a delivery, an exit
# After a killed process's lease expires: the successor's next lease tick (every lease/6 s,
# 6 s with the default request timeout), its look at the bucket, the send.
TAKEOVER_SLACK_S = 20.0
DELIVERIES = "taskcast_webhook_deliveries_total"
IMAGE = "https://cdn.example/x.png"
# The request timeout of the SSRF tests: long, so that an attempted connection would not have
# ended (as a timeout) by the time the refusals are checked.
REQUEST_TIMEOUT_S = 20.0


# -- helpers -----------------------------------------------------------------------------------


def message_id(task: Task) -> str:
    return f"msg_{task.task_id}_{task.version}"


def assert_secret_absent(text: str) -> None:
    """Neither the secret, nor its key, nor a long piece of the key, is in `text`."""
    assert SECRET not in text
    assert SECRET_KEY not in text
    for start in range(0, len(SECRET_KEY) - 12, 6):
        assert SECRET_KEY[start:start + 12] not in text


def webhooks_env(redis_url: str, prefix: str, *, secret: str | None = SECRET,
                 allowed: str = "127.0.0.1") -> dict[str, str]:
    env = clean_environ()
    env.update({"TASKCAST_REDIS_URL": redis_url, "TASKCAST_PREFIX": prefix,
                "TASKCAST_WEBHOOK_ALLOWED_HOSTS": allowed, "TASKCAST_LOG_LEVEL": "debug"})
    if secret is not None:
        env["TASKCAST_WEBHOOK_SECRET"] = secret
    return env


@dataclass
class Processes:
    """`python -m taskcast ...` processes of one test; all killed at its end."""

    tmp_path: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def webhooks(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        log_file = self.tmp_path / f"webhooks-{next(self._names)}.log"
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "taskcast", "webhooks", *args], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self._add(process, log_file)

    def serve(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        log_file = self.tmp_path / f"serve-{next(self._names)}.log"
        return self._add(start_serve(args, log_file, env), log_file)

    def _add(self, process: subprocess.Popen[bytes], log_file: Path
             ) -> subprocess.Popen[bytes]:
        self.running.append(process)
        self.logs[process.pid] = log_file
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return self.logs[process.pid].read_text(errors="replace")

    async def stop(self, process: subprocess.Popen[bytes]) -> int:
        """SIGTERM and the exit status (bounded)."""
        process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(process.wait, BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within {BOUND_S} s of SIGTERM:\n{self.log(process)}")

    async def hard_kill(self, process: subprocess.Popen[bytes]) -> None:
        process.kill()
        await asyncio.to_thread(process.wait, BOUND_S)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        for process in started.running:
            kill(process, BOUND_S)


async def owners(redis: Any, keys: TaskKeys) -> dict[int, bytes]:
    """Bucket -> the member holding its lease, for the leased buckets."""
    found = {}
    for bucket in range(WEBHOOK_BUCKETS):
        owner = await redis.get(keys.webhook_owner(bucket))
        if owner is not None:
            found[bucket] = owner
    return found


async def wait_owned(redis: Any, keys: TaskKeys, bucket: int, process: subprocess.Popen[bytes],
                     log: Callable[[], str]) -> bytes:
    """The member that leases `bucket` once one does (the process must keep running)."""
    async def leased() -> bool:
        if process.poll() is not None:
            pytest.fail(f"taskcast webhooks exited {process.returncode}:\n{log()}")
        return await redis.get(keys.webhook_owner(bucket)) is not None

    await eventually(leased, f"a lease of bucket {bucket}", BOUND_S)
    owner = await redis.get(keys.webhook_owner(bucket))
    assert owner is not None
    return bytes(owner)


# -- 1. `taskcast webhooks` stopped in the middle of retrying ----------------------------------


async def retried_twice(redis: aioredis.Redis, producer: Producer, keys: TaskKeys,
                        receiver: Receiver, processes: Processes, env: dict[str, str]
                        ) -> tuple[Task, subprocess.Popen[bytes], bytes]:
    """A `taskcast webhooks` process that has tried a completed task's message twice (503
    each time): the task, the process, and its member id (the bucket's lease holder)."""
    receiver.program("/hook", then=Reply(503))
    first = processes.webhooks(env)
    task = await producer.create(webhook_url=receiver.url("/hook"))
    member = await wait_owned(redis, keys, task.task_id % WEBHOOK_BUCKETS, first,
                              lambda: processes.log(first))
    await producer.progress(task.task_id, 50)
    done = await producer.complete(task.task_id, image_url=IMAGE)
    failed = await receiver.wait_for("/hook", 2, timeout=BOUND_S)
    assert [r.reply.status for r in failed] == [503, 503]
    assert {r.webhook_id for r in failed} == {message_id(done)}
    return done, first, member


def assert_one_message_until_delivered(receiver: Receiver, done: Task) -> None:
    """Every attempt carried the same message (webhook-id, body), signed; exactly one was
    answered 2xx, the last."""
    attempts = receiver.requests("/hook")
    assert len(attempts) >= 3, attempts
    for attempt in attempts:
        assert attempt.webhook_id == message_id(done)
        payload = attempt.verify(SECRET)
        assert payload["type"] == "task.completed"
        assert payload["data"] == done.to_dict()
        assert attempt.body == attempts[0].body  # the same message, byte for byte
    assert [a.reply.status for a in attempts[:-1]] == [503] * (len(attempts) - 1)
    assert attempts[-1].reply.status == 204


async def test_a_killed_webhooks_process_is_taken_over_with_the_same_webhook_id(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    processes: Processes
) -> None:
    """SIGKILL mid-retry, then a new process: the message arrives, with the webhook-id of the
    failed attempts, delivered once. A killed process cannot give its buckets up: its leases
    must expire before the new process may take them (so that two processes never send one
    bucket's messages at once); the bound is what was left of the lease, plus a few ticks."""
    keys = TaskKeys(prefix)
    env = webhooks_env(redis_server.url, prefix)
    async with Receiver() as receiver:
        done, first, dead_member = await retried_twice(redis, producer, keys, receiver,
                                                       processes, env)
        bucket = done.task_id % WEBHOOK_BUCKETS
        await processes.hard_kill(first)
        assert (await owners(redis, keys)).get(bucket) == dead_member  # left behind
        lease_left_s = await redis.pttl(keys.webhook_owner(bucket)) / 1000
        assert lease_left_s > 0

        receiver.program("/hook", then=Reply(204))
        second = processes.webhooks(env)
        await receiver.wait_for_match("/hook", lambda r: r.reply.status == 204,
                                      timeout=lease_left_s + TAKEOVER_SLACK_S,
                                      what="the message from the second process")
        await eventually(lambda: _not_indexed(redis, keys, done.task_id),
                         "the index entry's removal", BOUND_S)
        new_owner = (await owners(redis, keys)).get(bucket)
        final = await record(redis, keys, done.task_id)
        log = processes.log(second)
        assert await processes.stop(second) == 0, log

    assert_one_message_until_delivered(receiver, done)
    assert new_owner is not None and new_owner != dead_member
    assert final["webhook_version"] == str(done.version)
    assert "webhook_attempts" not in final and "webhook_retry_at" not in final
    assert "webhook_state" not in final
    assert "Traceback" not in log


async def _not_indexed(redis: Any, keys: TaskKeys, task_id: int) -> bool:
    return await indexed(redis, keys, task_id) is None


async def test_a_stopped_webhooks_process_gives_its_buckets_to_the_next_at_once(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    processes: Processes
) -> None:
    """SIGTERM mid-retry: exit status 0, every bucket lease released and the process gone from
    the members, so a new process takes the buckets at its first tick and sends the message
    (same webhook-id) well within the time a left-behind lease would have held it back."""
    keys = TaskKeys(prefix)
    env = webhooks_env(redis_server.url, prefix)
    async with Receiver() as receiver:
        done, first, member = await retried_twice(redis, producer, keys, receiver, processes,
                                                  env)
        lease_left_s = await redis.pttl(keys.webhook_owner(done.task_id % WEBHOOK_BUCKETS)
                                        ) / 1000
        assert lease_left_s > 10  # renewed every lease/6 s: most of a lease is always left
        assert await processes.stop(first) == 0, processes.log(first)
        left_owners = await owners(redis, keys)
        left_members = await redis.zrange(keys.webhook_members, 0, -1)

        receiver.program("/hook", then=Reply(204))
        second = processes.webhooks(env)
        await receiver.wait_for_match("/hook", lambda r: r.reply.status == 204,
                                      timeout=lease_left_s / 2,
                                      what="the message from the second process")
        await eventually(lambda: _not_indexed(redis, keys, done.task_id),
                         "the index entry's removal", BOUND_S)
        assert await processes.stop(second) == 0, processes.log(second)

    assert left_owners == {}, f"leases left behind by {member!r}: {left_owners}"
    assert left_members == []
    assert_one_message_until_delivered(receiver, done)
    for process in (first, second):
        log = processes.log(process)
        assert "Traceback" not in log
        assert "taskcast webhooks stopping" in log
        assert_secret_absent(log)


# -- 2. `taskcast serve` and the secret ---------------------------------------------------------


async def test_serve_delivers_with_a_secret_and_not_with_webhooks_off(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    processes: Processes
) -> None:
    """`taskcast serve --webhooks off` (secret set) sends nothing and takes no bucket; the
    next `taskcast serve` (webhooks on by default) delivers what it left, and new tasks; the
    secret never shows in the debug logs."""
    keys = TaskKeys(prefix)
    env = webhooks_env(redis_server.url, prefix)

    async def serve(*extra: str) -> tuple[subprocess.Popen[bytes], httpx.AsyncClient]:
        port = free_port()
        process = processes.serve(env, "--port", str(port), *extra)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S)
        await wait_until_answering(client, process, processes.logs[process.pid], "/readyz",
                                   BOUND_S)
        return process, client

    async with Receiver() as receiver:
        off, off_client = await serve("--webhooks", "off")
        try:
            left = await producer.create(webhook_url=receiver.url("/left"))
            left_done = await producer.complete(left.task_id, image_url=IMAGE)
            score = await indexed(redis, keys, left.task_id)
            # A gateway that delivers answers a wake within milliseconds; give it seconds.
            await receiver.quiet(None, 3.0)
            buckets_off = await read_metric(off_client, "taskcast_webhook_buckets")
            members_off = await redis.zcard(keys.webhook_members)
            still = await indexed(redis, keys, left.task_id)
        finally:
            await off_client.aclose()
        assert await processes.stop(off) == 0, processes.log(off)

        on, on_client = await serve()
        try:
            first_left = await receiver.wait_for("/left", 1, timeout=BOUND_S)
            task = await producer.create(webhook_url=receiver.url("/on"),
                                         webhook_events=["start", "completed"])
            started = await producer.progress(task.task_id, 10)
            # A start not yet sent when the task finishes is conflated into the terminal
            # message: wait for it before going on.
            await receiver.wait_for("/on", 1, timeout=BOUND_S)
            await producer.progress(task.task_id, 20)
            done = await producer.complete(task.task_id, image_url=IMAGE)
            await receiver.wait_for_match("/on", lambda r: r.type == "task.completed",
                                          timeout=BOUND_S, what="task.completed")
            # Counted once the receiver's answer is in, a moment after it arrived.
            delivered = await wait_for_metric(on_client, DELIVERIES, lambda n: n >= 3,
                                              timeout=BOUND_S, outcome="delivered")
        finally:
            await on_client.aclose()
        assert await processes.stop(on) == 0, processes.log(on)

    assert buckets_off == 0 and members_off == 0
    assert score is not None and still == score  # untouched by the gateway that is off
    assert first_left[0].webhook_id == message_id(left_done)
    assert first_left[0].verify(SECRET)["data"] == left_done.to_dict()
    received_on = receiver.requests("/on")
    # start: the first change to processing, sent with the newest state when it is sent.
    assert [r.type for r in received_on] == ["task.start", "task.completed"]
    assert received_on[0].webhook_id == message_id(started)
    assert received_on[0].verify(SECRET)["data"] == started.to_dict()
    assert received_on[1].webhook_id == message_id(done)
    assert received_on[1].verify(SECRET)["data"] == done.to_dict()
    assert len(receiver.requests("/left")) == 1
    assert delivered == 1 + len(received_on) == 3
    off_log, on_log = processes.log(off), processes.log(on)
    assert "delivering webhooks" not in off_log
    assert "delivering webhooks" in on_log
    assert " DEBUG " in on_log  # the debug log was on
    for log in (off_log, on_log):
        assert "Traceback" not in log
        assert_secret_absent(log)


def _short_key(size: int) -> str:
    return base64.b64encode(os.urandom(size)).decode()


BAD_SECRETS = [
    pytest.param("nope", id="no-prefix"),
    pytest.param("whsec_!!!", id="not-base64"),
    pytest.param("whsec_" + _short_key(16), id="key-16-bytes"),
    pytest.param("whsec_" + _short_key(65), id="key-65-bytes"),
    pytest.param(SECRET + ",whsec_" + _short_key(8), id="rotation-second-bad"),
    pytest.param("whsec_" + _short_key(10) + "," + SECRET, id="rotation-first-bad"),
]


@pytest.mark.parametrize("secret", BAD_SECRETS)
@pytest.mark.parametrize("command", ["serve", "webhooks"])
async def test_a_malformed_secret_exits_2_without_showing_it(
    redis_server: RedisServer, prefix: str, command: str, secret: str
) -> None:
    """Both commands refuse a malformed TASKCAST_WEBHOOK_SECRET at start-up with exit status 2
    and a message that names the variable, never the secret (nor its parts)."""
    env = webhooks_env(redis_server.url, prefix, secret=secret)
    args = [sys.executable, "-m", "taskcast", command]
    if command == "serve":
        args += ["--port", str(free_port())]
    result = await asyncio.to_thread(
        subprocess.run, args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=BOUND_S, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "TASKCAST_WEBHOOK_SECRET" in output
    assert "Traceback" not in output
    for entry in secret.split(","):
        key = entry.removeprefix("whsec_")
        assert entry not in output
        if len(key) >= 3:
            assert key not in output
    if SECRET in secret:
        assert_secret_absent(output)


@pytest.mark.parametrize(("url", "secret", "says"), [
    pytest.param("redis", None, "needs TASKCAST_WEBHOOK_SECRET", id="no-secret"),
    pytest.param("redis", "", "needs TASKCAST_WEBHOOK_SECRET", id="empty-secret"),
    pytest.param("memory://", SECRET, "needs a shared Redis", id="memory-store"),
])
async def test_taskcast_webhooks_without_what_it_needs_exits_2(
    redis_server: RedisServer, prefix: str, url: str, secret: str | None, says: str
) -> None:
    env = webhooks_env(redis_server.url if url == "redis" else url, prefix, secret=secret)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "taskcast", "webhooks"], cwd=ROOT, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BOUND_S,
        check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert says in output
    assert_secret_absent(output)


# -- 3. Redis Cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("webhook-cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


async def test_two_gateways_on_a_cluster_deliver_each_message_once_on_wakes(
    webhook_cluster: RedisClusterNodes, prefix: str
) -> None:
    """Tasks on every primary, their webhook buckets spread over the nodes, two gateways with
    8 buckets each. Once every index entry is scheduled far ahead (recheck 600 s), only the
    wake (the script's plain PUBLISH, from whichever node holds the task) can prompt the
    deliveries: each terminal message arrives exactly once (by webhook-id), from the gateway
    holding the task's bucket."""
    cluster, keys = webhook_cluster, TaskKeys(prefix)
    layout = await Layout.read(cluster)
    task_ids = sorted(itertools.chain(*(await spread_task_ids(layout, keys, 5)).values()))
    index_nodes = {(await layout.owner(keys.webhooks_of(t))).port for t in task_ids}
    assert len(index_nodes) >= 2 and len({t % WEBHOOK_BUCKETS for t in task_ids}) >= 8
    settings = Settings(redis_url=cluster.url, prefix=prefix, webhook_secret=SECRET,
                        webhook_allowed_hosts="127.0.0.1", webhook_recheck_s=600.0)
    producer = Producer.from_url(cluster.url, prefix=prefix)
    try:
        async with Receiver() as receiver:
            for task_id in task_ids:
                await producer.create(task_id=task_id, webhook_url=receiver.url("/c"))
            async with run_gateway(settings) as gw_a, run_gateway(settings) as gw_b, \
                    httpx.AsyncClient(base_url=gw_a.url, timeout=BOUND_S) as client_a, \
                    httpx.AsyncClient(base_url=gw_b.url, timeout=BOUND_S) as client_b:
                services = [gw.app.state.webhooks for gw in (gw_a, gw_b)]

                async def shared_and_looked_at() -> bool:
                    if sorted(len(s.leases.held) for s in services) != [8, 8]:
                        return False
                    if not all(s.wake_connected for s in services):
                        return False
                    horizon = time.time() * 1000 + 300_000
                    scores = [await indexed(producer.redis, keys, t) for t in task_ids]
                    return all(s is not None and s > horizon for s in scores)

                # The second gateway gets its share within two lease ticks (~5 s each).
                await eventually(shared_and_looked_at,
                                 "two gateways holding 8 buckets each, every entry rescheduled",
                                 3 * BOUND_S)
                held = [set(s.leases.held) for s in services]

                finals = {}
                for number, task_id in enumerate(task_ids):
                    await producer.progress(task_id, 30)
                    if number % 3 == 2:
                        finals[task_id] = await producer.fail(task_id, "boom")
                    else:
                        finals[task_id] = await producer.complete(task_id, image_url=IMAGE)
                expected = {message_id(task) for task in finals.values()}
                await receiver.wait_until(
                    lambda: {r.webhook_id for r in receiver.requests("/c")} >= expected,
                    timeout=BOUND_S, what="every terminal message")

                async def settled() -> bool:
                    # Removed once delivered: no look after that sends anything.
                    scores = [await indexed(producer.redis, keys, t) for t in task_ids]
                    return all(s is None for s in scores)

                await eventually(settled, "every index entry removed", BOUND_S)
                held_after = [set(s.leases.held) for s in services]
                delivered = [await read_metric(client, DELIVERIES, outcome="delivered")
                             for client in (client_a, client_b)]
    finally:
        async with asyncio.timeout(BOUND_S):
            await producer.close()

    received = receiver.requests("/c")
    counts = collections.Counter(r.webhook_id for r in received)
    assert counts == {msg: 1 for msg in expected}, counts
    for request in received:
        payload = request.verify(SECRET)
        task = finals[request.data["task_id"]]
        assert payload["type"] == f"task.{task.status.value}"
        assert payload["data"] == task.to_dict()
    assert held_after == held  # nothing moved meanwhile: the split below is exact
    per_gateway = [sum(1 for t in task_ids if t % WEBHOOK_BUCKETS in buckets)
                   for buckets in held]
    assert delivered == per_gateway


# -- 4. SSRF refusals ---------------------------------------------------------------------------


@dataclass
class V6Listener:
    """A minimal HTTP listener on [::1]: counts connections, answers every request 204."""

    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length)
            self.requests.append(head + body)
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def v6_listener() -> AsyncIterator[V6Listener]:
    listener = V6Listener()
    server = await asyncio.start_server(listener.handle, "::1", 0)
    listener.port = int(server.sockets[0].getsockname()[1])
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def _localhost_is_ipv4_loopback_only() -> bool:
    infos = socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    return all(ipaddress.ip_address(info[4][0]) in ipaddress.ip_network("127.0.0.0/8")
               for info in infos)


TARGETS = ["loopback", "ipv6-loopback", "localhost", "private", "metadata"]
# What each allowlist lets through; every other target is refused.
ALLOWLISTS = [
    pytest.param("", set(), id="none"),
    pytest.param("127.0.0.1", {"loopback", "localhost"}, id="an-address"),
    pytest.param("localhost", {"localhost"}, id="a-host-name"),
    pytest.param(" 127.0.0.0/8 , [::1] ", {"loopback", "localhost", "ipv6-loopback"},
                 id="networks"),
]
MENTIONS = {"loopback": ["127.0.0.1"], "ipv6-loopback": ["::1"],
            "localhost": ["localhost", "127.0.0.1"], "private": ["10.1.2.3"],
            "metadata": ["169.254.169.254"]}


@pytest.mark.parametrize(("allowed", "delivered"), ALLOWLISTS)
async def test_non_public_targets_are_refused_without_a_connection_unless_allowed(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    allowed: str, delivered: set[str]
) -> None:
    """A completed task per target; the targets on loopback have a live listener behind them.
    Refused: no request (no connection, for [::1]) reaches a listener; the refusal is written
    before the request timeout (20 s) could end an attempt: a connection attempt to 10.1.2.3
    or 169.254.169.254 would end as a timeout or a connection error, retried, not refused.
    The record's webhook_last_error names the address, the message ends unretried, /metrics
    counts it "refused". Allowed by host, address or network: delivered."""
    if "localhost" in delivered and allowed != "localhost" and \
            not _localhost_is_ipv4_loopback_only():
        delivered = delivered - {"localhost"}  # resolves to ::1 as well here: not allowed
    keys = TaskKeys(prefix)
    settings = Settings(redis_url=redis_server.url, prefix=prefix, webhook_secret=SECRET,
                        webhook_allowed_hosts=allowed, webhook_timeout_s=REQUEST_TIMEOUT_S)
    async with Receiver() as receiver, v6_listener() as v6, run_gateway(settings) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as client:
        urls = {"loopback": receiver.url("/loopback"),
                "ipv6-loopback": f"http://[::1]:{v6.port}/ipv6",
                "localhost": f"http://localhost:{receiver.port}/localhost",
                "private": "http://10.1.2.3/hook",
                "metadata": "http://169.254.169.254/latest/meta-data"}
        finals = {}
        for name in TARGETS:
            task = await producer.create(webhook_url=urls[name])
            finals[name] = await producer.complete(task.task_id, image_url=IMAGE)

        async def all_ended() -> bool:
            """Each message delivered or refused, then the entry removed (finished)."""
            for task in finals.values():
                fields = await record(redis, keys, task.task_id)
                if fields.get("webhook_version") != str(task.version):
                    return False
            return all([await indexed(redis, keys, t.task_id) is None for t in finals.values()])

        await eventually(all_ended, "every message delivered or refused", REQUEST_TIMEOUT_S - 5)
        records = {name: await record(redis, keys, task.task_id)
                   for name, task in finals.items()}
        refused = await read_metric(client, DELIVERIES, outcome="refused")
        sent = await read_metric(client, DELIVERIES, outcome="delivered")
        failed = await read_metric(client, DELIVERIES, outcome="failed")

    for name in TARGETS:
        fields = records[name]
        assert "webhook_attempts" not in fields, (name, fields)  # never retried
        assert "webhook_state" not in fields, (name, fields)
        if name in delivered:
            assert "webhook_last_error" not in fields, (name, fields)
        else:
            error = fields.get("webhook_last_error", "")
            assert "not a public address" in error, (name, error)
            for mention in MENTIONS[name]:
                assert mention in error, (name, error)
    expected_paths = {"/" + name for name in delivered if name != "ipv6-loopback"}
    by_path = collections.Counter(r.path for r in receiver.requests())
    assert by_path == {path: 1 for path in expected_paths}, receiver.requests()
    for request in receiver.requests():
        name = request.path.strip("/")
        assert request.webhook_id == message_id(finals[name])
        assert request.verify(SECRET)["data"] == finals[name].to_dict()
        assert request.headers["host"] == urls[name].split("/")[2]
    if "ipv6-loopback" in delivered:
        assert v6.connections >= 1 and len(v6.requests) == 1
        assert message_id(finals["ipv6-loopback"]).encode() in v6.requests[0]
    else:
        assert v6.connections == 0 and v6.requests == []
    assert (refused or 0) == len(TARGETS) - len(delivered)
    assert (sent or 0) == len(delivered)
    assert (failed or 0) == 0


# -- TargetPolicy, without the network -----------------------------------------------------------


@pytest.mark.parametrize(("allowed", "address", "allows"), [
    ("", "8.8.8.8", True),
    ("", "2001:4860:4860::8888", True),
    ("", "127.0.0.1", False),
    ("", "127.255.0.9", False),
    ("", "::1", False),
    ("", "::ffff:127.0.0.1", False),
    ("", "::ffff:10.0.0.1", False),
    ("", "::ffff:8.8.8.8", True),
    ("", "10.1.2.3", False),
    ("", "172.16.0.1", False),
    ("", "192.168.1.1", False),
    ("", "169.254.169.254", False),
    ("", "fe80::1", False),
    ("", "fc00::1", False),
    ("", "100.64.0.1", False),
    ("", "0.0.0.0", False),
    ("", "::", False),
    ("", "224.0.0.1", False),
    ("", "255.255.255.255", False),
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.0.0.0/8", "11.1.2.3", True),
    ("10.0.0.0/8", "192.168.1.1", False),
    ("10.0.0.0/8", "::ffff:10.9.9.9", True),
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "::ffff:127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("127.0.0.1", "::1", False),
    ("[::1]", "::1", True),
    ("fd00::/8", "fd12::3", True),
    ("localhost", "127.0.0.1", False),  # a host name allows that name, not its addresses
    ("169.254.169.254/32, 10.0.0.0/8", "169.254.169.254", True),
])
def test_target_policy_allows_public_or_listed_addresses(
    allowed: str, address: str, allows: bool
) -> None:
    policy = TargetPolicy(allowed)
    assert policy.allows_address(ipaddress.ip_address(address)) is allows


@pytest.mark.parametrize(("allowed", "host", "refused"), [
    ("", "10.1.2.3", True),
    ("", "[::1]", True),
    ("", "169.254.169.254", True),
    ("", "8.8.8.8", False),
    ("10.0.0.0/8", "10.1.2.3", False),
    ("10.1.2.3", "10.1.2.3", False),
    ("[::1]", "[::1]", False),
    ("::1", "[::1]", False),
])
async def test_target_policy_check_of_address_literals(
    allowed: str, host: str, refused: bool
) -> None:
    """check() on an address literal decides without resolving (no network): refused with
    a message naming the address, or the address to connect to."""
    policy = TargetPolicy(allowed)
    if refused:
        with pytest.raises(TargetRefused) as info:
            await policy.check("http", host, 80, timeout_s=1.0)
        assert host.strip("[]") in str(info.value)
    else:
        target = await policy.check("http", host, 80, timeout_s=1.0)
        assert ipaddress.ip_address(target.address) == ipaddress.ip_address(host.strip("[]"))
