"""SSE delivery while things break: Redis killed, paused, its pub/sub connection dropped, events
lost, a client that stops reading, Redis down at connect time, and the gateway shutting down.

Each test has a redis-server of its own (`own_redis`) and a gateway with short intervals. The
clients do not reconnect: the hub promises that one connection sees every task through to its
terminal state however Redis misbehaves (hub.py's module docstring), so any stream that ends
early or stalls is a failure. (The one exception is a record that Redis lost: that stream ends
with `event: not_found` by design, and the test follows the client's reconnect to the 404.)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from taskcast.connection import connect, connect_sync
from taskcast.errors import StoreUnavailable, TransitionRejected
from taskcast.keys import TaskKeys
from taskcast.producer import Producer, SyncProducer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, run_gateway
from tests.sse_client import (
    Follower,
    Transcript,
    numsub,
    read_metric,
    read_stream,
    stalled_client,
    stream_problems,
    wait_for_metric,
)

FAST = {
    "resync_interval_s": 0.5,
    "redis_ping_deadline_s": 1.5,
    "redis_timeout_s": 0.5,
    "sse_keepalive_s": 0.5,
    "send_timeout_s": 1.0,
}
BOUND_S = 30  # only against hangs
TASK_IDS = list(range(1, 11))


@asynccontextmanager
async def gateway_on(server: RedisServer, prefix: str, **overrides: Any
                     ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    settings = Settings(redis_url=server.url, prefix=prefix, **{**FAST, **overrides})
    async with run_gateway(settings) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            yield gateway, client


@asynccontextmanager
async def producer_on(server: RedisServer, prefix: str) -> AsyncIterator[Producer]:
    producer = Producer(connect(server.url, timeout=0.5), prefix=prefix)
    try:
        yield producer
    finally:
        async with asyncio.timeout(5):
            await producer.close()


@dataclass
class Client:
    follower: Follower
    task_ids: list[int]
    multi: bool


def follow(http: httpx.AsyncClient, task_ids: list[int], *, per_task: int = 1, multi: int = 2,
           query: str = "") -> list[Client]:
    """`per_task` single-task streams for each task plus `multi` streams of all of them."""
    clients = [
        Client(Follower(http, f"/tasks/{task_id}/events{query}", expect=[task_id]).start(),
               [task_id], False)
        for task_id in task_ids for _ in range(per_task)
    ]
    ids = ",".join(str(task_id) for task_id in task_ids)
    sep = "&" if query else "?"
    clients += [
        Client(Follower(http, f"/events{query}{sep}task_id={ids}", expect=task_ids).start(),
               task_ids, True)
        for _ in range(multi)
    ]
    return clients


async def all_ready(clients: list[Client]) -> None:
    try:
        async with asyncio.timeout(BOUND_S):
            for client in clients:
                await client.follower.ready.wait()
    except TimeoutError:
        raise AssertionError("not following yet: " + "; ".join(
            c.follower.transcript.summary() for c in clients if not c.follower.ready.is_set()
        )) from None


async def all_terminal(clients: list[Client]) -> list[Transcript]:
    """Every client saw every one of its tasks through to the terminal state."""
    problems: list[str] = []
    transcripts = []
    for client in clients:
        transcript = await client.follower.result(BOUND_S)
        transcripts.append(transcript)
        problems += stream_problems(transcript, client.task_ids, multi=client.multi,
                                    retry_ms=None)
    assert problems == []
    return transcripts


class Driver:
    """Advances tasks round by round (progress, then completed; every fourth task fails),
    retrying writes that fail while Redis is away. Each write holds `lock`, so a test that takes
    the lock knows no write is in flight."""

    def __init__(self, producer: Producer, task_ids: list[int], *, rounds: int = 8,
                 pause_s: float = 0.05, image: bytes | None = None) -> None:
        self.producer = producer
        self.task_ids = task_ids
        self.rounds = rounds
        self.pause_s = pause_s
        self.image = image
        self.lock = asyncio.Lock()
        self.rounds_done = 0
        self.failed_writes = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Driver:
        self.task = asyncio.create_task(self._run(), name="driver")
        return self

    def expected_status(self, task_id: int) -> str:
        return "failed" if task_id % 4 == 0 else "completed"

    async def _run(self) -> None:
        for round_no in range(1, self.rounds + 1):
            for task_id in self.task_ids:
                progress = round_no * 100 // (self.rounds + 1)
                await self._write(lambda t=task_id, p=progress: self.producer.progress(t, p))
            self.rounds_done = round_no
            await asyncio.sleep(self.pause_s)
        for task_id in self.task_ids:
            if self.expected_status(task_id) == "failed":
                await self._write(lambda t=task_id: self.producer.fail(t, f"task {t} failed"))
            else:
                await self._write(lambda t=task_id: self.producer.complete(
                    t, image_url=f"https://cdn.example/{t}.png", image_base64=self.image))
        self.rounds_done = self.rounds + 1

    async def _write(self, change: Any) -> None:
        while True:
            async with self.lock:
                try:
                    async with asyncio.timeout(10):
                        await change()
                    return
                except StoreUnavailable:
                    self.failed_writes += 1
                except TransitionRejected as exc:
                    # A final change retried after its reply was lost had been applied.
                    if exc.reason != "TERMINAL":
                        raise
                    return
            await asyncio.sleep(0.1)

    async def reached(self, round_no: int) -> None:
        async with asyncio.timeout(BOUND_S):
            while self.rounds_done < round_no:
                assert self.task is not None
                if self.task.done():
                    self.task.result()
                await asyncio.sleep(0.01)

    async def finish(self) -> None:
        assert self.task is not None
        async with asyncio.timeout(BOUND_S):
            await self.task


def check_final_states(driver: Driver, transcripts: list[Transcript]) -> None:
    for transcript in transcripts:
        for task_id, states in transcript.by_task().items():
            assert states[-1]["status"] == driver.expected_status(task_id), transcript.summary()


def snapshot(server: RedisServer, prefix: str, task_ids: Iterable[int]) -> dict[int, dict[bytes,
                                                                                          bytes]]:
    """The records, read with a blocking client (no await: the gateway cannot run meanwhile)."""
    redis = connect_sync(server.url)
    try:
        return {task_id: redis.hgetall(TaskKeys(prefix).record(task_id)) for task_id in task_ids}
    finally:
        redis.close()


def restore(server: RedisServer, prefix: str, records: dict[int, dict[bytes, bytes]],
            version_bump: int) -> None:
    """Write the records back with plain HSETs (a producer that does not use the script may do
    that), each at a version above any the gateway has seen, and publish nothing."""
    redis = connect_sync(server.url)
    try:
        for task_id, record in records.items():
            assert record, f"no record for task {task_id}"
            fields = dict(record)
            fields[b"version"] = b"%d" % (int(record[b"version"]) + version_bump)
            redis.hset(TaskKeys(prefix).record(task_id), mapping=fields)
    finally:
        redis.close()


# --- (a) Redis SIGKILLed and restarted --------------------------------------------------------


async def test_redis_killed_and_restarted_mid_run(own_redis: RedisServer, prefix: str) -> None:
    async with gateway_on(own_redis, prefix) as (_, http), producer_on(own_redis, prefix) as prod:
        for task_id in TASK_IDS:
            await prod.create(task_id=task_id, type="txt2img")
        clients = follow(http, TASK_IDS)
        await all_ready(clients)
        driver = Driver(prod, TASK_IDS).start()
        await driver.reached(3)

        # Redis runs without persistence here, so a SIGKILL loses every record. We model a Redis
        # that comes back with its data (persistence, a promoted replica, or workers re-writing
        # their tasks): the records are read just before the kill, with no write in flight (the
        # driver's lock), and written back right after the restart with plain HSETs, no PUBLISH,
        # at a version 10 above the old one, so they are newer than anything a client saw.
        # start() and restore() block the event loop, so the gateway never sees the empty
        # Redis in between (that case is test_records_lost_with_redis_end_the_streams_with_404).
        async with driver.lock:
            records = snapshot(own_redis, prefix, TASK_IDS)
            own_redis.kill()
        await asyncio.sleep(1.5)  # the outage: the driver's writes fail, the gateway reconnects
        own_redis.start()
        restore(own_redis, prefix, records, version_bump=10)

        await driver.finish()
        transcripts = await all_terminal(clients)
        check_final_states(driver, transcripts)
        assert driver.failed_writes > 0  # the kill did hit the run
        for transcript in transcripts:  # the versions continued from the restored records
            for states in transcript.by_task().values():
                assert states[-1]["version"] > 10 + 3
        assert (await read_metric(http, "taskcast_redis_reconnects_total") or 0) > 0


async def test_records_lost_with_redis_end_the_streams_with_404(
    own_redis: RedisServer, prefix: str
) -> None:
    """The other reading of a restart without persistence: the records are gone. The streams
    end with `event: not_found`, and the client's reconnect ends in the 404 that stops it."""
    ids = TASK_IDS[:3]
    async with gateway_on(own_redis, prefix) as (_, http), producer_on(own_redis, prefix) as prod:
        for task_id in ids:
            await prod.create(task_id=task_id)
        clients = follow(http, ids, multi=1)
        await all_ready(clients)
        own_redis.kill()
        await asyncio.sleep(0.5)  # a restart takes a moment; the gateway sees its links drop
        own_redis.start()

        for client in clients:
            transcript = await client.follower.result(BOUND_S)
            assert transcript.ended, transcript.summary()
            last = transcript.frames[-1]
            assert (last.event, last.id) == ("not_found", None), transcript.summary()
            assert {int(part) for part in last.data.split(",")} == set(client.task_ids)
            assert [s["version"] for s in transcript.tasks()] == [1] * len(client.task_ids)

        for client in clients:
            # Reconnect like EventSource. Right after the restart a reconnect may get the
            # `not_found` stream once more instead of the 404.
            for _ in range(5):
                async with asyncio.timeout(BOUND_S):
                    response = await http.get(client.follower.path)
                if response.status_code != 200:
                    break
                names = ",".join(map(str, client.task_ids))
                assert response.text.endswith(f"event: not_found\ndata: {names}\n\n"), (
                    response.text)
            assert response.status_code == 404, response.text
            assert response.json() == {"code": 404, "msg": "task not found", "data": None}


async def test_first_requests_after_a_redis_restart_are_answered(
    own_redis: RedisServer, prefix: str
) -> None:
    async with gateway_on(own_redis, prefix) as (_, http):
        async def unknown_tasks(path: str) -> list[int]:
            async with asyncio.timeout(BOUND_S):
                responses = await asyncio.gather(*(http.get(path % i) for i in range(10, 20)))
            return [response.status_code for response in responses]

        # Concurrent requests leave several idle connections in the gateway's pool.
        assert await unknown_tasks("/tasks/%d") == [404] * 10
        own_redis.kill()
        await asyncio.sleep(0.5)
        own_redis.start()
        assert await unknown_tasks("/tasks/%d/events") == [404] * 10


# --- (b) Redis hung with SIGSTOP --------------------------------------------------------------


async def test_redis_paused_longer_than_the_ping_deadline(
    own_redis: RedisServer, prefix: str
) -> None:
    async with gateway_on(own_redis, prefix) as (_, http), producer_on(own_redis, prefix) as prod:
        for task_id in TASK_IDS:
            await prod.create(task_id=task_id)
        clients = follow(http, TASK_IDS)
        await all_ready(clients)
        driver = Driver(prod, TASK_IDS).start()
        await driver.reached(3)

        # The producers wait for the lock while Redis hangs, and finish after the resume.
        async with driver.lock:
            keepalives = [c.follower.transcript.keepalives() for c in clients]
            own_redis.pause()
            try:
                # Clients that connect to the hung Redis are taken in too.
                clients += follow(http, TASK_IDS[:2], multi=1)
                await asyncio.sleep(2 * FAST["redis_ping_deadline_s"])
            finally:
                own_redis.resume()
        # Meanwhile the streams stayed open, with keep-alives.
        for client, before in zip(clients, keepalives, strict=False):
            assert client.follower.transcript.keepalives() > before, (
                client.follower.transcript.summary())

        await driver.finish()
        check_final_states(driver, await all_terminal(clients))
        assert (await read_metric(http, "taskcast_redis_reconnects_total") or 0) > 0


# --- (c) the gateway's pub/sub connection killed ----------------------------------------------


async def test_pubsub_connection_killed_mid_run(own_redis: RedisServer, prefix: str) -> None:
    channel = TaskKeys(prefix).channel(TASK_IDS[0])
    async with gateway_on(own_redis, prefix) as (_, http), producer_on(own_redis, prefix) as prod:
        for task_id in TASK_IDS:
            await prod.create(task_id=task_id)
        clients = follow(http, TASK_IDS)
        await all_ready(clients)
        driver = Driver(prod, TASK_IDS, rounds=9).start()
        for round_no in (2, 4, 6, 8):
            await driver.reached(round_no)
            # Wait for the gateway to be subscribed again, so each kill hits a live connection.
            async with asyncio.timeout(BOUND_S):
                while numsub(own_redis.cli, [channel])[channel] == 0:
                    await asyncio.sleep(0.02)
            killed = own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub").strip()
            assert killed == "1", killed

        await driver.finish()
        check_final_states(driver, await all_terminal(clients))


# --- (d) a terminal state the gateway is never told about -------------------------------------


async def test_terminal_state_written_without_publish_arrives_by_periodic_resync(
    own_redis: RedisServer, prefix: str
) -> None:
    ids = TASK_IDS[:4]
    keys = TaskKeys(prefix)
    async with gateway_on(own_redis, prefix) as (_, http), producer_on(own_redis, prefix) as prod:
        for task_id in ids:
            await prod.create(task_id=task_id)
            await prod.progress(task_id, 50)
        clients = follow(http, ids)
        await all_ready(clients)
        before = await read_metric(http, "taskcast_resyncs_total", reason="periodic") or 0

        # A producer that writes the record with plain HSET and never publishes.
        now_ms = str(int(time.time() * 1000))
        for task_id in ids:
            own_redis.cli("HSET", keys.record(task_id), "status", "completed", "progress", "100",
                          "image_url", f"https://cdn.example/{task_id}.png", "version", "3",
                          "updated_at", now_ms)

        for client, transcript in zip(clients, await all_terminal(clients), strict=True):
            for states in transcript.by_task().values():
                assert (states[-1]["version"], states[-1]["status"]) == (3, "completed"), (
                    client.follower.path)
        after = await read_metric(http, "taskcast_resyncs_total", reason="periodic") or 0
        assert after > before


async def test_terminal_event_published_while_the_pubsub_connection_is_down(
    own_redis: RedisServer, prefix: str
) -> None:
    """The last event goes out while the gateway's pub/sub connection is dead, so nobody gets
    it. The periodic resync is made too slow to help: the re-read that follows the gateway's
    re-subscription must deliver it."""
    ids = TASK_IDS[:4]
    channels = [TaskKeys(prefix).channel(task_id) for task_id in ids]
    async with gateway_on(own_redis, prefix, resync_interval_s=600) as (_, http), \
            producer_on(own_redis, prefix) as prod:
        for task_id in ids:
            await prod.create(task_id=task_id)
            await prod.progress(task_id, 50)
        clients = follow(http, ids)
        await all_ready(clients)

        # No await from the kill to the last completion: the gateway cannot re-subscribe
        # in between, so every one of these PUBLISHes reaches no subscriber.
        assert own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub").strip() == "1"
        assert numsub(own_redis.cli, channels) == dict.fromkeys(channels, 0)
        sync_producer = SyncProducer(connect_sync(own_redis.url), prefix=prefix)
        try:
            for task_id in ids:
                sync_producer.complete(task_id, image_url=f"https://cdn.example/{task_id}.png")
        finally:
            sync_producer.close()

        for transcript in await all_terminal(clients):
            for states in transcript.by_task().values():
                assert (states[-1]["version"], states[-1]["status"]) == (3, "completed")


# --- (e) a client that stops reading ----------------------------------------------------------


async def test_a_client_that_stops_reading_does_not_hold_up_the_others(
    own_redis: RedisServer, prefix: str
) -> None:
    ids = list(range(1, 21))
    image = os.urandom(1_000_000)  # ~1.3 MB of base64 in every completion
    async with gateway_on(own_redis, prefix) as (gateway, http), \
            producer_on(own_redis, prefix) as prod:
        for task_id in ids:
            await prod.create(task_id=task_id)
        query = ",".join(map(str, ids))
        stalled = [stalled_client(gateway.port, f"/events?task_id={query}"),
                   stalled_client(gateway.port, f"/tasks/{ids[-1]}/events")]
        try:
            await wait_for_metric(http, "taskcast_open_connections", lambda v: v == 2,
                                  transport="sse")
            # Trimmed single-task streams plus two multi-task streams that take every image.
            clients = follow(http, ids, query="?image_base64=false", multi=0)
            clients += follow(http, ids, per_task=0, multi=2)
            await all_ready(clients)

            driver = Driver(prod, ids, rounds=2, pause_s=0.01, image=image).start()
            await driver.finish()
            transcripts = await all_terminal(clients)
            check_final_states(driver, transcripts)
            for client, transcript in zip(clients, transcripts, strict=True):
                last = transcript.by_task()[client.task_ids[-1]][-1]
                if client.multi and last["status"] == "completed":
                    assert len(last["image"]["image_base64"]) > 1_300_000

            # The stalled multi-task client is closed (its send times out); the stalled
            # single-task client only had one image to swallow, which fits its buffers.
            await wait_for_metric(http, "taskcast_slow_client_disconnects_total",
                                  lambda v: v >= 1, transport="sse")
            await wait_for_metric(http, "taskcast_open_connections", lambda v: v <= 1,
                                  transport="sse")
        finally:
            for sock in stalled:
                sock.close()
        await wait_for_metric(http, "taskcast_open_connections", lambda v: v == 0,
                              transport="sse")
        # Still serving.
        transcript = await read_stream(http, f"/tasks/{ids[0]}/events", timeout=BOUND_S)
        assert stream_problems(transcript, ids[:1], retry_ms=None) == []


# --- (f) Redis down when the client connects --------------------------------------------------


async def test_connect_while_redis_is_down_is_a_500_then_every_kind_of_connect_works(
    own_redis: RedisServer, prefix: str
) -> None:
    """Contract 8 (issue 12): a Redis error while the gateway looks a task up is a 500, never
    a stream that pretends the task is there (before, the connect got 200 and keep-alives, and
    a task that did not exist looked like one still being created). Once Redis is back, a
    plain connect streams, a reconnect with the terminal version gets 204, and a
    Last-Event-ID above any version starts from the current state and ends terminal."""
    done_id, open_id = 7, 5
    async with gateway_on(own_redis, prefix) as (_, http):
        async with producer_on(own_redis, prefix) as prod:
            await prod.create(task_id=done_id)
            final = await prod.complete(done_id, image_url="https://cdn.example/7.png")
            await prod.create(task_id=open_id)
            await prod.progress(open_id, 10)  # v2
        records = snapshot(own_redis, prefix, [done_id, open_id])
        own_redis.stop()
        connects = [
            (f"/tasks/{open_id}/events", {}),
            (f"/events?task_id={open_id}", {}),
            (f"/tasks/{done_id}/events", {"Last-Event-ID": str(final.version)}),
            (f"/tasks/{open_id}/events", {"Last-Event-ID": "50"}),
        ]
        async with asyncio.timeout(BOUND_S):
            for path, headers in connects:
                response = await http.get(path, headers=headers)
                assert response.status_code == 500, path
                assert response.json() == {"code": 500, "msg": "internal server error",
                                           "data": None}
        own_redis.start()
        restore(own_redis, prefix, records, version_bump=0)  # the same records, as before

        async with asyncio.timeout(BOUND_S):
            again = await http.get(f"/tasks/{done_id}/events",
                                   headers={"Last-Event-ID": str(final.version)})
        assert again.status_code == 204
        single = Follower(http, f"/tasks/{open_id}/events", expect=[open_id]).start()
        above = Follower(http, f"/tasks/{open_id}/events", expect=[open_id],
                         headers={"Last-Event-ID": "50"}).start()
        multi = Follower(http, f"/events?task_id={open_id}", expect=[open_id]).start()
        clients = [Client(single, [open_id], False), Client(above, [open_id], False),
                   Client(multi, [open_id], True)]
        await all_ready(clients)
        async with producer_on(own_redis, prefix) as prod:
            await prod.progress(open_id, 50)
            await prod.complete(open_id, image_url="https://cdn.example/5.png")  # v4
        for transcript in await all_terminal(clients):
            assert transcript.tasks()[0]["version"] == 2
            assert transcript.tasks()[-1]["status"] == "completed"


# --- (g) graceful shutdown --------------------------------------------------------------------


async def test_gateway_shutdown_ends_open_streams_cleanly(
    own_redis: RedisServer, prefix: str
) -> None:
    settings = Settings(redis_url=own_redis.url, prefix=prefix, **FAST)
    async with producer_on(own_redis, prefix) as prod, httpx.AsyncClient(timeout=30) as http:
        await prod.create(task_id=1)
        await prod.progress(1, 10)
        async with run_gateway(settings) as gateway:
            http.base_url = httpx.URL(gateway.url)
            clients = follow(http, [1], per_task=2, multi=1)
            await all_ready(clients)
            # Leaving the block stops uvicorn (should_exit) while the streams are open; the
            # HTTP client stays open, so whatever ends the streams is the server's doing.
        for client in clients:
            transcript = await client.follower.result(BOUND_S)
            assert transcript.ended and transcript.error is None, transcript.summary()
            assert [s["version"] for s in transcript.tasks()] == [2]
            assert transcript.frames[-1].event != "end"

        # The shutdown was this server's own: the next gateway in this process streams as usual.
        async with run_gateway(settings) as gateway:
            http.base_url = httpx.URL(gateway.url)
            follower = Follower(http, "/tasks/1/events", expect=[1]).start()
            async with asyncio.timeout(BOUND_S):
                await follower.ready.wait()
            await prod.complete(1, image_url="https://cdn.example/1.png")
            assert stream_problems(await follower.result(BOUND_S), [1], retry_ms=None) == []
