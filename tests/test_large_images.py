"""Large images (issue 12, "Large images stall Redis"), over real redis-servers and a real gateway.

What is checked, finding by finding:

* the whole image used to cross pub/sub: a staged image (or any image over 64 KiB) now leaves
  the event small, marked `"image_base64_omitted": true`, and every client kind (SSE,
  `/ws`, `/tasks/{id}/ws`, REST) still gets the whole image, unless it opted out;
* gateways read such an image from the record once per process and version, however many
  watchers the task has;
* a burst of 200 concurrent `Producer.complete` calls failed with `StoreUnavailable: No
  connection available`: the producer now waits (bounded) for its turn, and when the bound is
  reached it says that nothing was sent;
* the script used to JSON-decode the image: base64 text over 64 KiB given to the producer is
  staged too (raw bytes SET under an upload key, moved by the script), a small one stays inline;
* a burst must not cost the gateway its pub/sub connection: a stall of the gateway's own event
  loop (which a burst of 4 MiB frames causes, bench/README.md "Issue 12") must not be taken for
  a hung Redis.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from taskcast.connection import connect
from taskcast.errors import StoreUnavailable
from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.script import script_source
from taskcast.settings import Settings
from tests.channels import subscribed
from tests.servers import Gateway, RedisServer, run_gateway
from tests.sse_client import Follower, Transcript, read_metric, stream_problems
from tests.test_ws import close_code, recv, subscribe, wait_numsub, ws_connect

BOUND_S = 30.0
MIB = 1024 * 1024
INLINE_LIMIT = 65_536  # base64 bytes; larger images are staged and left out of events


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def rest_task(gateway: Gateway, task_id: int, query: str = "") -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gateway.url) as client, asyncio.timeout(BOUND_S):
        response = await client.get(f"/tasks/{task_id}{query}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert (body["code"], body["msg"]) == (200, "success")
    data: dict[str, Any] = body["data"]
    return data


async def commandstat_calls(client: aioredis.Redis, command: str) -> int:
    """`calls` of one command in INFO commandstats (0 before its first call)."""
    stats = await client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


async def wait_ready(followers: list[Follower]) -> None:
    async with asyncio.timeout(BOUND_S):
        for follower in followers:
            await follower.ready.wait()


async def final_task(transcript: Transcript, task_id: int) -> dict[str, Any]:
    problems = stream_problems(transcript, [task_id])
    assert not problems, problems
    last: dict[str, Any] = transcript.tasks()[-1]
    return last


@asynccontextmanager
async def producer_on(url: str, prefix: str, **options: Any) -> AsyncIterator[Producer]:
    client = connect(url, **{k: options.pop(k) for k in ("max_connections", "pool_timeout")
                             if k in options})
    try:
        yield Producer(client, prefix=prefix, **options)
    finally:
        await client.aclose()


# -- every client kind gets the whole image; pub/sub carries none of it -----------------------


async def test_a_4_mib_staged_image_reaches_every_client_kind_and_stays_off_pub_sub(
    gateway: Gateway, producer: Producer, redis: aioredis.Redis, prefix: str,
    redis_server: RedisServer,
) -> None:
    """Issue 12, large images: "the whole image then crosses pub/sub" and "clients still
    receive the full image (unless they opted out)". A 4 MiB image (3 MiB raw) completed
    through Producer.complete reaches an SSE watcher, a /ws subscriber, a per-task socket and
    REST whole; `?image_base64=false` gives "" on each; the event on the channel is small and
    marked `image_base64_omitted`."""
    keys = TaskKeys(prefix)
    raw = os.urandom(3 * MIB)
    image = b64(raw)
    assert len(image) == 4 * MIB
    task = await producer.create(type="txt2img")
    task_id = task.task_id

    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http, \
            subscribed(redis, [keys.channel(task_id)], BOUND_S) as published, \
            ws_connect(gateway) as many, ws_connect(gateway, "/ws?image_base64=false") as lean, \
            ws_connect(gateway, f"/tasks/{task_id}/ws") as single, \
            ws_connect(gateway, f"/tasks/{task_id}/ws?image_base64=false") as single_lean:
        sse = Follower(http, f"/tasks/{task_id}/events", expect=[task_id]).start()
        sse_lean = Follower(http, f"/tasks/{task_id}/events?image_base64=false",
                            expect=[task_id]).start()
        for ws in (many, lean):
            await subscribe(ws, [task_id])
        for ws in (many, lean, single, single_lean):
            first = await recv(ws)
            assert (first["type"], first["data"]["version"]) == ("task", 1), first
        await wait_ready([sse, sse_lean])
        await wait_numsub(redis_server, prefix, task_id, 2)  # the gateway and this test

        done = await producer.complete(task_id, image_url="https://cdn.example/a.png",
                                       image_base64=raw)
        assert done.image_base64 == image, "Producer.complete returns the image it sent"
        assert done.version == 2

        # SSE
        full = await final_task(await sse.result(BOUND_S), task_id)
        trimmed = await final_task(await sse_lean.result(BOUND_S), task_id)
        # /ws and /tasks/{id}/ws
        ws_full = await recv(many)
        ws_trimmed = await recv(lean)
        single_full = await recv(single)
        single_trimmed = await recv(single_lean)
        assert await close_code(single) == 1000
        assert await close_code(single_lean) == 1000
        # REST
        rest_full = await rest_task(gateway, task_id)
        rest_trimmed = await rest_task(gateway, task_id, "?image_base64=false")
        events = await published.drain()

    expected = done.to_dict()
    assert expected["image"] == {"image_base64": image, "image_url": "https://cdn.example/a.png"}
    lean_expected = done.to_dict(include_image_base64=False)
    for name, got in [("sse", full), ("/ws", ws_full["data"]),
                      ("/tasks/{id}/ws", single_full["data"]), ("rest", rest_full)]:
        assert got["status"] == "completed", name
        assert got["image"]["image_base64"] == image, f"{name}: the image is not whole"
        assert got == expected, name
    for name, got in [("sse", trimmed), ("/ws", ws_trimmed["data"]),
                      ("/tasks/{id}/ws", single_trimmed["data"]), ("rest", rest_trimmed)]:
        assert got == lean_expected, name
        assert got["image"]["image_base64"] == "", name

    # Pub/sub: one small event without the image bytes, marked as such.
    assert len(events) == 1, [event[:200] for event in events]
    assert len(events[0]) < 4096, f"the event is {len(events[0])} bytes"
    event = orjson.loads(events[0])
    assert event["image_base64_omitted"] is True
    assert event["image"] == {"image_base64": "", "image_url": "https://cdn.example/a.png"}
    assert (event["task_id"], event["status"], event["version"]) == (task_id, "completed", 2)

    # The record holds no base64, only the length; the bytes are in the image key, the upload
    # key is gone.
    record = await redis.hgetall(keys.record(task_id))
    assert record[b"image_base64"] == b""
    assert record[b"image_bytes"] == str(len(raw)).encode()
    assert await redis.get(keys.image(task_id)) == raw
    assert [key async for key in redis.scan_iter(match=f"{keys.record(task_id)}:upload:*")] == []


# -- one read per process and version ---------------------------------------------------------


async def test_twenty_watchers_of_one_task_cost_the_gateway_one_read_of_the_image(
    own_redis: RedisServer, prefix: str,
) -> None:
    """Issue 12, large images: "Gateways then read the image from the record once per process
    and version". 20 SSE watchers of one task on one gateway; after a completion with a 1 MiB
    image, Redis counted exactly one GET (the image key: nothing else in this Redis is read with
    GET), and all 20 received the whole image. own_redis: no other test's commands in the
    counter."""
    settings = Settings(redis_url=own_redis.url, prefix=prefix)
    raw = os.urandom(MIB)
    image = b64(raw)
    observer = connect(own_redis.url)
    try:
        async with producer_on(own_redis.url, prefix) as producer, \
                run_gateway(settings) as gateway, \
                httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S,
                                  limits=httpx.Limits(max_connections=40)) as http:
            task = await producer.create()
            followers = [Follower(http, f"/tasks/{task.task_id}/events",
                                  expect=[task.task_id]).start() for _ in range(20)]
            await wait_ready(followers)
            await wait_numsub(own_redis, prefix, task.task_id, 1)
            gets_before = await commandstat_calls(observer, "get")

            await producer.complete(task.task_id, image_base64=raw)
            finals = [await final_task(await f.result(BOUND_S), task.task_id)
                      for f in followers]
            gets = await commandstat_calls(observer, "get") - gets_before
    finally:
        await observer.aclose()
    assert [f["image"]["image_base64"] == image for f in finals] == [True] * 20
    assert gets == 1, f"the gateway read the image {gets} times for 20 watchers of one version"


# -- bursts: the producer waits for its turn --------------------------------------------------


async def test_a_burst_of_200_completions_with_1_mib_images_all_succeed(
    own_redis: RedisServer, prefix: str,
) -> None:
    """Issue 12, large images: "The same burst through Producer.complete with 200 concurrent
    calls failed with StoreUnavailable: No connection available instead of waiting for a
    connection". One Producer(max_concurrency=10, wait_s=30) over a client of 10 connections
    whose pool waits only 0.1 s for a free one: without the producer's own queue, 190 of the
    calls would meet an exhausted pool and fail as before; with it, all 200 complete."""
    keys = TaskKeys(prefix)
    raw = os.urandom(MIB)
    async with producer_on(own_redis.url, prefix, max_connections=10, pool_timeout=0.1,
                           max_concurrency=10, wait_s=30) as producer:
        task_ids = [(await producer.create()).task_id for _ in range(200)]

        async def complete(task_id: int) -> tuple[str, int]:
            done = await producer.complete(task_id, image_base64=raw)
            return done.status.value, len(done.image_base64)

        async with asyncio.timeout(BOUND_S * 2):
            results = await asyncio.gather(*(complete(task_id) for task_id in task_ids),
                                           return_exceptions=True)
        failures = [repr(r) for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} of 200 failed, e.g. {failures[:3]}"
        assert set(results) == {("completed", len(b64(raw)))}
        async with producer.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hmget(keys.record(task_id), ["status", "image_bytes"])
                pipe.strlen(keys.image(task_id))
            replies = await pipe.execute()
    assert replies == [[b"completed", str(MIB).encode()], MIB] * 200


async def test_a_call_that_waits_past_wait_s_for_its_turn_fails_without_sending_anything(
    own_redis: RedisServer, prefix: str,
) -> None:
    """Issue 12, large images: "The producer library waits for a connection, bounded and
    documented". Producer(max_concurrency=1, wait_s=0.05): the first completion holds the only
    turn while its upload (SET of 1 MiB) sits at a Redis paused with CLIENT PAUSE WRITE (own
    Redis, so no other test is paused); we know it holds the turn once Redis shows a client
    with the pending 1 MiB argument (CLIENT LIST argv-mem). The second call then raises
    StoreUnavailable saying nothing was sent, and once Redis is unpaused its task is
    untouched while the first one completes."""
    keys = TaskKeys(prefix)
    raw = os.urandom(MIB)
    admin = connect(own_redis.url)
    try:
        async with producer_on(own_redis.url, prefix, max_concurrency=1,
                               wait_s=0.05) as producer:
            first = (await producer.create()).task_id  # also loads the script: not paused
            second = (await producer.create()).task_id
            await admin.client_pause(10_000, all=False)  # WRITE: CLIENT LIST still answers
            try:
                holder = asyncio.create_task(producer.complete(first, image_base64=raw))
                async with asyncio.timeout(BOUND_S):
                    while not any(int(c.get("argv-mem", 0)) >= MIB
                                  for c in await admin.client_list()):
                        await asyncio.sleep(0.01)
                with pytest.raises(StoreUnavailable) as refused:
                    async with asyncio.timeout(BOUND_S):
                        await producer.complete(second, image_url="https://cdn.example/b.png")
                assert "nothing was sent" in str(refused.value)
                assert not holder.done()
            finally:
                await admin.client_unpause()
            async with asyncio.timeout(BOUND_S):
                done = await holder
        assert done.status.value == "completed"
        untouched = await admin.hmget(keys.record(second), ["status", "version", "image_url"])
        assert untouched == [b"submitted", b"1", b""]
        assert await admin.hget(keys.record(first), "image_bytes") == str(MIB).encode()
    finally:
        await admin.aclose()


# -- base64 text: staged above 64 KiB, inline up to it ----------------------------------------


async def test_base64_text_over_64_kib_is_staged_and_up_to_64_kib_stays_inline(
    producer: Producer, redis: aioredis.Redis, prefix: str,
) -> None:
    """Issue 12, large images: "The script JSON-decodes the change, image included". An image
    given as base64 text (str) over 64 KiB is staged like raw bytes (the record has image_bytes
    and no base64, the bytes are in the image key, the event leaves them out); one of exactly
    64 KiB of base64 stays inline in the record and in the event."""
    keys = TaskKeys(prefix)
    big_raw = os.urandom(INLINE_LIMIT // 4 * 3 + 3)  # 65,540 bytes of base64
    small_raw = os.urandom(INLINE_LIMIT // 4 * 3)  # exactly 65,536 bytes of base64
    big, small = b64(big_raw), b64(small_raw)
    assert (len(big), len(small)) == (INLINE_LIMIT + 4, INLINE_LIMIT)
    staged_id = (await producer.create()).task_id
    inline_id = (await producer.create()).task_id

    async with subscribed(redis, [keys.channel(staged_id), keys.channel(inline_id)],
                          BOUND_S) as published:
        staged = await producer.complete(staged_id, image_base64=big)
        inline = await producer.complete(inline_id, image_base64=small)
        events = [orjson.loads(e) for e in await published.drain()]

    assert (staged.image_base64, inline.image_base64) == (big, small)
    record = await redis.hgetall(keys.record(staged_id))
    assert (record[b"image_base64"], record[b"image_bytes"]) == (b"", str(len(big_raw)).encode())
    assert await redis.get(keys.image(staged_id)) == big_raw
    record = await redis.hgetall(keys.record(inline_id))
    assert record[b"image_base64"] == small.encode()
    assert b"image_bytes" not in record
    assert await redis.exists(keys.image(inline_id)) == 0

    by_id = {e["task_id"]: e for e in events}
    assert by_id[staged_id]["image"]["image_base64"] == ""
    assert by_id[staged_id]["image_base64_omitted"] is True
    assert by_id[inline_id]["image"]["image_base64"] == small
    assert "image_base64_omitted" not in by_id[inline_id]


async def test_an_inline_image_over_64_kib_sent_straight_to_the_script_is_served_whole(
    gateway: Gateway, producer: Producer, redis: aioredis.Redis, prefix: str,
    redis_server: RedisServer,
) -> None:
    """Issue 12, large images: "The event published for a change whose image is above 64 KiB
    carries no image bytes". A producer in another language that EVALSHAs the shipped script
    with a 200 KiB image inline in the change (the slow path, still accepted): the record keeps
    the base64, the event leaves it out, and an SSE watcher gets it whole from the record."""
    keys = TaskKeys(prefix)
    image = b64(os.urandom(150 * 1024))
    task_id = (await producer.create()).task_id
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http, \
            subscribed(redis, [keys.channel(task_id)], BOUND_S) as published:
        sse = Follower(http, f"/tasks/{task_id}/events", expect=[task_id]).start()
        await wait_ready([sse])
        await wait_numsub(redis_server, prefix, task_id, 2)  # the gateway and this test
        change = orjson.dumps({"op": "update", "task_id": str(task_id), "status": "completed",
                               "image_base64": image})
        reply = await redis.eval(script_source(), 2, keys.record(task_id),
                                 keys.channel(task_id), change)
        final = await final_task(await sse.result(BOUND_S), task_id)
        events = await published.drain()
    assert orjson.loads(reply)["image_base64_omitted"] is True
    assert final["image"]["image_base64"] == image
    assert len(events) == 1 and len(events[0]) < 4096
    assert orjson.loads(events[0])["image_base64_omitted"] is True
    assert await redis.hget(keys.record(task_id), "image_base64") == image.encode()


# -- a burst of large images must not cost the gateway its pub/sub connection -------------------


async def test_a_stall_of_the_gateways_own_event_loop_is_not_taken_for_a_hung_redis(
    redis_server: RedisServer, prefix: str,
) -> None:
    """Issue 12, large images: "A burst of 200 completions with 4 MiB images ... delivers every
    image with no pub/sub disconnect". In bench/large_images.py the gateway's event loop stalled
    for seconds while it encoded and wrote 4 MiB frames for a batch of refreshed tasks, and in
    one run its pub/sub watchdog then declared a healthy Redis hung and rebuilt the connection
    twice (taskcast_redis_reconnects_total 2, a resync of everything). Here the stall is made
    directly: the gateway shares this test's event loop, so a blocking sleep longer than
    redis_ping_deadline_s stalls it while Redis answers every PING at once. The PONG is then
    waiting in the socket; the watchdog must read it before it judges, so no reconnect."""
    settings = Settings(redis_url=redis_server.url, prefix=prefix, redis_ping_deadline_s=2.5)
    async with run_gateway(settings) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        async with asyncio.timeout(BOUND_S):
            while (await http.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # a PING/PONG round trip or two on the new connection
        before = await read_metric(http, "taskcast_redis_reconnects_total") or 0.0
        time.sleep(3.0)  # the point: the gateway's loop does nothing for 3 s
        await asyncio.sleep(1.5)  # the loop runs again: reader and watchdog get their turns
        after = await read_metric(http, "taskcast_redis_reconnects_total") or 0.0
    assert before == 0.0
    assert after == 0.0, f"{after} pub/sub reconnects after a 3 s stall of the gateway's loop"
