"""REST polling served from memory (issue 15): soft watches, freshness against the streams,
expiry and re-join, the bounds, access control before the cache, and what Redis is asked.

Real parts throughout: a redis-server of each test's own (its command statistics and
PUBSUB NUMSUB are the evidence of what the gateway asked Redis), a real uvicorn, httpx, an SSE
stream and a WebSocket.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from taskcast.connection import connect
from taskcast.keys import TaskKeys
from taskcast.poll_cache import ENTRY_OVERHEAD_BYTES
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, eventually, run_gateway
from tests.sse_client import iter_frames, metric, numsub
from tests.test_large_images import commandstat_calls
from tests.test_ws import recv, subscribe, ws_connect

BOUND_S = 10.0
SECRET = "p" * 64


@asynccontextmanager
async def polling(redis: RedisServer, prefix: str, **changes: Any
                  ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient, Producer]]:
    """A gateway on `redis` (auth off unless a key is given), a client and a producer."""
    settings = Settings(redis_url=redis.url, prefix=prefix, auth="off", redis_timeout_s=1.0,
                        redis_ping_deadline_s=1.5).with_changes(**changes)
    producer = Producer(connect(redis.url), prefix=prefix)
    try:
        async with run_gateway(settings) as gateway, httpx.AsyncClient(
                base_url=gateway.url, timeout=BOUND_S) as client:
            yield gateway, client, producer
    finally:
        await producer.close()


async def poll(client: httpx.AsyncClient, task_id: int, **headers: str) -> httpx.Response:
    async with asyncio.timeout(BOUND_S):
        return await client.get(f"/tasks/{task_id}",
                                headers={k.replace("_", "-"): v for k, v in headers.items()})


async def polled_version(client: httpx.AsyncClient, task_id: int) -> int:
    response = await poll(client, task_id)
    assert response.status_code == 200, response.text
    version: int = response.json()["data"]["version"]
    return version


async def counters(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    names = {
        "hit": ("taskcast_poll_cache_requests_total", {"result": "hit"}),
        "miss": ("taskcast_poll_cache_requests_total", {"result": "miss"}),
        "tasks": ("taskcast_poll_cache_tasks", {}),
        "bytes": ("taskcast_poll_cache_bytes", {}),
        "limit_tasks": ("taskcast_poll_cache_limit_tasks", {}),
        "limit_bytes": ("taskcast_poll_cache_limit_bytes", {}),
        "expired": ("taskcast_poll_cache_evictions_total", {"reason": "expired"}),
        "over_tasks": ("taskcast_poll_cache_evictions_total", {"reason": "tasks"}),
        "over_bytes": ("taskcast_poll_cache_evictions_total", {"reason": "bytes"}),
    }
    found = {}
    for key, (name, labels) in names.items():
        value = metric(text, name, **labels)
        assert value is not None, f"{name} {labels} missing from /metrics"
        found[key] = value
    return found


async def record_reads(redis: RedisServer) -> int:
    """HMGET calls the server has answered: every read of a record (whole, or its version)."""
    client = aioredis.Redis.from_url(redis.url)
    try:
        return await commandstat_calls(client, "hmget")
    finally:
        await client.aclose()


async def subscribers(redis: RedisServer, prefix: str, task_id: int) -> int:
    channel = TaskKeys(prefix).channel(task_id)
    return (await asyncio.to_thread(numsub, redis.cli, [channel]))[channel]


async def settled(check: Callable[[], Awaitable[bool]], what: str) -> None:
    await eventually(check, what, bound_s=BOUND_S)


# -- served from memory --------------------------------------------------------------------------


async def test_polls_after_the_first_are_answered_from_memory_without_asking_redis(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=3600) as (_, client, producer):
        await producer.create(task_id=1)
        await producer.progress(1, 40)
        first = await poll(client, 1)
        assert first.status_code == 200
        # The soft watch subscribes; its confirmation makes the hub re-read the version once.
        await settled(lambda: _eq(subscribers(own_redis, prefix, 1), 1), "subscribed")
        await asyncio.sleep(0.3)
        reads = await record_reads(own_redis)
        before = await counters(client)
        answers = [await poll(client, 1) for _ in range(50)]
        answers += [await poll(client, 1, if_none_match=first.headers["etag"])
                    for _ in range(20)]
        assert await record_reads(own_redis) == reads  # not one read of Redis
        after = await counters(client)
        assert after["hit"] - before["hit"] == 70
        assert after["miss"] == before["miss"]
        assert all(a.content == first.content and a.headers["etag"] == '"2"'
                   for a in answers[:50])
        assert all(a.status_code == 304 and a.content == b"" for a in answers[50:])
        assert after["tasks"] == 1


async def test_with_the_cache_off_every_poll_reads_redis_and_nothing_is_subscribed(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, poll_watch_s=0) as (_, client, producer):
        await producer.create(task_id=1)
        reads = await record_reads(own_redis)
        for _ in range(10):
            assert (await poll(client, 1)).status_code == 200
        assert await record_reads(own_redis) - reads == 10
        assert await subscribers(own_redis, prefix, 1) == 0
        text = (await client.get("/metrics")).text
        assert metric(text, "taskcast_poll_cache_tasks") is None


async def test_concurrent_first_polls_of_one_task_share_one_read(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=3600) as (_, client, producer):
        await producer.create(task_id=5)
        async with connected_clients(client.base_url, 30) as clients:
            monitor_lines: list[str] = []
            async with monitoring(own_redis, monitor_lines):
                answers = await asyncio.gather(*(poll(c, 5) for c in clients))
            assert {a.status_code for a in answers} == {200}
        whole_reads = [line for line in monitor_lines
                       if line.upper().startswith("HMGET ") and "image_base64" in line.split()]
        assert len(whole_reads) == 1, whole_reads


async def test_a_fresh_request_reads_redis_and_sees_the_write_before_it(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=3600) as (_, client, producer):
        await producer.create(task_id=8)
        assert await polled_version(client, 8) == 1
        for progress in range(10, 100, 10):
            written = await producer.progress(8, progress)
            reads = await record_reads(own_redis)
            response = await poll(client, 8, cache_control="no-cache")
            assert response.json()["data"]["version"] == written.version
            assert await record_reads(own_redis) > reads


# -- never staler than the streams -------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_poll_right_after_each_pushed_version_is_never_older(
    own_redis: RedisServer, prefix: str, transport: str
) -> None:
    async with polling(own_redis, prefix) as (gateway, client, producer):
        await producer.create(task_id=3)
        assert await polled_version(client, 3) == 1  # the task is held in memory from here
        async with pushed_versions(gateway, client, transport, 3) as next_version:
            assert await next_version() == 1
            for step in range(1, 21):
                if step < 20:
                    await producer.progress(3, step * 5)
                else:
                    await producer.complete(3, image_url="https://cdn.example/3.png")
                pushed = await next_version()
                assert pushed == step + 1
                # At once, before anything else happens: never older than the push.
                assert await polled_version(client, 3) >= pushed
        stats = await counters(client)
        assert stats["hit"] >= 20  # these polls were answered from memory


async def test_a_change_whose_event_is_lost_is_repaired_by_the_resync(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=0.3) as (_, client, producer):
        await producer.create(task_id=4)
        await producer.progress(4, 10)
        assert await polled_version(client, 4) == 2
        # A change that reaches the record but whose event is lost (written without the
        # script's PUBLISH, as a dropped pub/sub message looks to the gateway).
        raw = aioredis.Redis.from_url(own_redis.url)
        try:
            await raw.hset(TaskKeys(prefix).record(4),
                           mapping={"progress": "60", "version": "3"})
        finally:
            await raw.aclose()
        await settled(lambda: _eq(polled_version(client, 4), 3), "the resync repairs the cache")
        assert (await poll(client, 4)).json()["data"]["progress"] == 60


async def test_changes_while_the_pubsub_connection_is_down_are_seen_after_it(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=3600) as (gateway, client, producer):
        await producer.create(task_id=6)
        assert await polled_version(client, 6) == 1
        broker = gateway.app.state.hub.broker
        admin = aioredis.Redis.from_url(own_redis.url)
        try:
            for round_ in range(3):
                await settled(lambda: _true(broker.connected), "pub/sub connected")
                await admin.client_kill_filter(_type="pubsub")
                written = await producer.progress(6, 10 * (round_ + 1))
                # Whether the event was lost or not, the poll converges on the record; and
                # while the connection is down, polls read Redis rather than memory.
                await settled(lambda version=written.version: _eq(polled_version(client, 6),
                                                                   version),
                              "the poll reaches the version written during the break")
        finally:
            await admin.aclose()


async def test_a_redis_restart_that_lost_the_task_is_followed_by_the_poll(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=0.3) as (gateway, client, producer):
        await producer.create(task_id=7)
        await producer.progress(7, 50)
        assert await polled_version(client, 7) == 2
        own_redis.kill()
        own_redis.start()  # no persistence: the record is gone
        await settled(lambda: _eq(_status(poll(client, 7)), 404), "the lost task is a 404")
        fresh = Producer(connect(own_redis.url), prefix=prefix)
        try:
            await fresh.create(task_id=7)
            done = await fresh.complete(7, image_url="https://cdn.example/7.png")
        finally:
            await fresh.close()
        await settled(lambda: _eq(_status(poll(client, 7)), 200), "the re-created task")
        assert (await poll(client, 7)).json()["data"] == done.to_dict()


# -- soft watches: expiry, re-join, no negative cache --------------------------------------------


async def test_a_soft_watch_ends_when_polling_stops_and_a_later_poll_rejoins(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, poll_watch_s=0.6) as (_, client, producer):
        await producer.create(task_id=9)
        assert await polled_version(client, 9) == 1
        await settled(lambda: _eq(subscribers(own_redis, prefix, 9), 1), "subscribed")
        # Polling keeps it: 1.5 s of polls, each well within the watch time.
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            assert await polled_version(client, 9) == 1
            await asyncio.sleep(0.1)
        assert await subscribers(own_redis, prefix, 9) == 1
        # Polling stops: released, the subscription too.
        await settled(lambda: _eq(subscribers(own_redis, prefix, 9), 0), "released")
        stats = await counters(client)
        assert stats["tasks"] == 0 and stats["expired"] >= 1 and stats["bytes"] == 0
        # A change while nobody follows it, then a poll: read from Redis, and followed again.
        await producer.progress(9, 70)
        assert await polled_version(client, 9) == 2
        await settled(lambda: _eq(subscribers(own_redis, prefix, 9), 1), "subscribed again")
        await producer.progress(9, 80)
        await settled(lambda: _eq(polled_version(client, 9), 3), "kept current again")


async def test_an_unknown_id_holds_nothing_and_a_task_created_after_a_404_is_found_at_once(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix) as (_, client, producer):
        assert (await poll(client, 11)).status_code == 404
        assert (await counters(client))["tasks"] == 0
        await producer.create(task_id=11)
        assert await polled_version(client, 11) == 1  # no negative cache
        await settled(lambda: _eq(subscribers(own_redis, prefix, 11), 1), "subscribed")
        assert await subscribers(own_redis, prefix, 12) == 0


async def test_a_polled_finished_task_whose_record_expires_becomes_a_404(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, resync_interval_s=0.3) as (_, client, _producer):
        short = Producer(connect(own_redis.url), prefix=prefix, retention_s=1)
        try:
            await short.create(task_id=13)
            await short.complete(13, image_url="https://cdn.example/13.png")
        finally:
            await short.close()
        assert (await poll(client, 13)).status_code == 200
        started = time.monotonic()
        await settled(lambda: _eq(_status(poll(client, 13)), 404), "expired: a 404")
        # The retention (1 s) plus at most one resync interval, with room for a slow machine.
        assert time.monotonic() - started < 5


# -- bounded memory -----------------------------------------------------------------------------


async def test_beyond_the_task_limit_the_least_recently_polled_goes_first(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, poll_cache_tasks=3) as (_, client, producer):
        for task_id in range(21, 26):
            await producer.create(task_id=task_id)
        for task_id in (21, 22, 23, 21, 24):  # 22 is now the least recently polled
            assert (await poll(client, task_id)).status_code == 200
        for gone in (22,):
            await settled(lambda g=gone: _eq(subscribers(own_redis, prefix, g), 0), "evicted")
        for kept in (21, 23, 24):
            await settled(lambda k=kept: _eq(subscribers(own_redis, prefix, k), 1), "kept")
        stats = await counters(client)
        assert stats["tasks"] == 3 and stats["limit_tasks"] == 3 and stats["over_tasks"] == 1
        # An evicted task is still served, from Redis, and joins again.
        before = stats["miss"]
        assert (await poll(client, 22)).status_code == 200
        stats = await counters(client)
        assert stats["miss"] == before + 1 and stats["tasks"] == 3 and stats["over_tasks"] == 2


async def test_images_count_by_size_and_a_completion_is_charged_before_anyone_polls_it(
    own_redis: RedisServer, prefix: str
) -> None:
    image = base64.b64encode(os.urandom(30_000)).decode()  # 40,000 characters
    limit = 3 * ENTRY_OVERHEAD_BYTES + 2 * len(image) + 1000  # 3 tasks and one image, not two
    async with polling(own_redis, prefix, poll_cache_bytes=limit) as (_, client, producer):
        for task_id in (31, 32, 33):
            await producer.create(task_id=task_id)
            assert (await poll(client, task_id)).status_code == 200
        stats = await counters(client)
        assert stats["bytes"] == 3 * ENTRY_OVERHEAD_BYTES and stats["limit_bytes"] == limit
        await producer.complete(31, image_base64=image)  # charged when the event arrives
        await settled(lambda: _eq(_counter(client, "bytes"),
                                  3 * ENTRY_OVERHEAD_BYTES + 2 * len(image)), "charged")
        await producer.complete(32, image_base64=image)  # over the limit: 31 goes (LRU)
        await settled(lambda: _eq(_counter(client, "over_bytes"), 1), "evicted by bytes")
        stats = await counters(client)
        assert stats["tasks"] == 2 and stats["bytes"] == 2 * ENTRY_OVERHEAD_BYTES + 2 * len(image)
        await settled(lambda: _eq(subscribers(own_redis, prefix, 31), 0), "31 released")
        body = (await poll(client, 32)).json()["data"]
        assert body["image"]["image_base64"] == image


def _held_bytes(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot,
                packages: tuple[str, ...] = ("taskcast", "redis")) -> int:
    """Python memory allocated between the snapshots and still held by the gateway's code
    and redis-py's (this process also runs the test's HTTP client, and pytest)."""
    gateway = [tracemalloc.Filter(True, f"*{os.sep}{package}{os.sep}*") for package in packages]
    return sum(stat.size_diff for stat in after.filter_traces(gateway).compare_to(
        before.filter_traces(gateway), "filename"))


async def test_what_a_polled_task_is_charged_covers_what_the_gateway_holds_for_it(
    own_redis: RedisServer, prefix: str
) -> None:
    """The byte limit is only a bound if the charge is not less than the memory: measured
    with tracemalloc over 200 polled tasks, and over one completed with a 100 KB image
    (held twice: the task and the 200 body; orjson's over-allocated output, ~4 KiB per task
    and ~10x a large image, must not be kept)."""
    image = base64.b64encode(os.urandom(75_000)).decode()  # 100,000 characters
    async with polling(own_redis, prefix, resync_interval_s=3600) as (_, client, producer):
        for task_id in range(1000, 1240):
            await producer.create(task_id=task_id)
        await producer.create(task_id=99)
        await producer.complete(99, image_base64=image)
        for task_id in range(1200, 1240):  # every code path warmed, pools filled
            for _ in range(2):
                assert (await poll(client, task_id)).status_code == 200
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            # 200 tasks: the 240 topics and the image task's stay clear of a resize of the
            # hub's and redis-py's tables (at 341 entries), which one task would pay for.
            for task_id in range(1000, 1200):
                for _ in range(2):  # the miss, then a hit
                    assert (await poll(client, task_id)).status_code == 200
            gc.collect()
            middle = tracemalloc.take_snapshot()
            for _ in range(2):
                assert (await poll(client, 99)).json()["data"]["image"]["image_base64"] == image
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        per_task = _held_bytes(before, middle) / 200
        assert 0 < per_task <= ENTRY_OVERHEAD_BYTES, per_task
        charged = (await counters(client))["bytes"] - 240 * ENTRY_OVERHEAD_BYTES
        assert charged == ENTRY_OVERHEAD_BYTES + 2 * len(image)
        # taskcast's allocations only: redis-py's subscription table grows in steps (a dict
        # resize of ~9 KiB) that any one task may happen to pay for.
        assert 2 * len(image) <= _held_bytes(middle, after, ("taskcast",)) <= charged


# -- access control stays before the cache ------------------------------------------------------


async def test_refusals_come_before_the_cache_and_never_count_as_polls(
    own_redis: RedisServer, prefix: str
) -> None:
    async with polling(own_redis, prefix, auth="on", jwt_secret=SECRET) as (_, client, producer):
        await producer.create(task_id=41)
        mine = token([41])
        ok = await poll(client, 41, authorization=f"Bearer {mine}")
        assert ok.status_code == 200
        ok = await poll(client, 41, authorization=f"Bearer {mine}")  # from memory now
        before = await counters(client)
        assert before["hit"] >= 1
        refused = [
            await poll(client, 41),
            await poll(client, 41, authorization="Bearer not-a-token"),
            await poll(client, 41, authorization=f"Bearer {token([42])}"),
            await poll(client, 41, if_none_match=ok.headers["etag"]),
        ]
        assert [r.status_code for r in refused] == [401, 401, 403, 401]
        assert all(r.headers.get("etag") is None and b'"task_id"' not in r.content
                   for r in refused)
        after = await counters(client)
        assert (after["hit"], after["miss"]) == (before["hit"], before["miss"])


# -- the fast path keeps the old answers ----------------------------------------------------------


async def test_head_and_the_image_flag_and_cors_keep_their_answers(
    own_redis: RedisServer, prefix: str
) -> None:
    origin = "https://app.example"
    async with polling(own_redis, prefix, cors_origins=origin) as (_, client, producer):
        await producer.create(task_id=51)
        image = base64.b64encode(b"png!" * 100).decode()
        await producer.complete(51, image_base64=image)
        for _ in range(2):  # a miss, then from memory: the same answers
            full = await poll(client, 51, origin=origin)
            trimmed = await client.get("/tasks/51?image_base64=false", headers={"origin": origin})
            head = await client.head("/tasks/51")
            bad_flag = await client.get("/tasks/51?image_base64=maybe", headers={"origin": origin})
            assert full.headers["etag"] == '"2"'
            assert full.json()["data"]["image"]["image_base64"] == image
            assert trimmed.headers["etag"] == '"2-no-image-base64"'
            assert trimmed.json()["data"]["image"]["image_base64"] == ""
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == full.headers["content-length"]
            assert bad_flag.status_code == 422
            for response in (full, trimmed, bad_flag):
                assert response.headers["access-control-allow-origin"] == origin
                assert response.headers["content-type"] == "application/json"
            assert full.headers["cache-control"] == "no-cache"
            not_modified = await poll(client, 51, if_none_match='"2"', origin=origin)
            assert not_modified.status_code == 304
            assert not_modified.headers["access-control-allow-origin"] == origin


# -- helpers ------------------------------------------------------------------------------------


def token(tasks: list[int]) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 60, "tasks": tasks}, SECRET, algorithm="HS256")


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _true(value: bool) -> bool:
    return value


async def _status(response: Awaitable[httpx.Response]) -> int:
    return (await response).status_code


async def _counter(client: httpx.AsyncClient, name: str) -> float:
    return (await counters(client))[name]


@asynccontextmanager
async def connected_clients(base_url: httpx.URL, count: int
                            ) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` clients, each with a kept-alive connection made before the test's burst."""
    clients = [httpx.AsyncClient(base_url=base_url, timeout=BOUND_S) for _ in range(count)]
    try:
        await asyncio.gather(*(c.get("/healthz") for c in clients))
        yield clients
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


@asynccontextmanager
async def monitoring(redis: RedisServer, lines: list[str]) -> AsyncIterator[None]:
    """Redis's MONITOR output while the block runs (and a moment after, for stragglers)."""
    client = aioredis.Redis.from_url(redis.url)
    monitor = client.monitor()
    async with monitor:
        async def collect() -> None:
            while True:
                info = await monitor.next_command()
                lines.append(str(info["command"]))

        collector = asyncio.create_task(collect())
        try:
            await asyncio.sleep(0.1)
            yield
            await asyncio.sleep(0.3)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
    await client.aclose()


@asynccontextmanager
async def pushed_versions(gateway: Gateway, client: httpx.AsyncClient, transport: str,
                          task_id: int) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """A stream of the task over SSE or a WebSocket: yields a function returning the version
    of its next task state."""
    if transport == "sse":
        async with client.stream("GET", f"/tasks/{task_id}/events") as response:
            frames = iter_frames(response)

            async def next_sse() -> int:
                async with asyncio.timeout(BOUND_S):
                    async for frame in frames:
                        if frame.data_lines:
                            version: int = orjson.loads("\n".join(frame.data_lines))["version"]
                            return version
                raise AssertionError("the stream ended")

            yield next_sse
        return
    async with ws_connect(gateway) as ws:
        await subscribe(ws, [task_id])

        async def next_ws() -> int:
            frame = await recv(ws)
            assert frame["type"] == "task", frame
            version: int = frame["data"]["version"]
            return version

        yield next_ws
