"""Issue 12, "Ids and lookups", "Records" and "Operations" (/readyz), against real parts: a real
redis-server (watched with MONITOR, or reached through a small TCP proxy in this file that
records every command and reply and can cut pub/sub connections), a real gateway on uvicorn,
and real HTTP, SSE and WebSocket clients.

What is checked, by finding:
* "/events and WebSocket subscribe read up to 1000 records one by one, image included": the
  existence check is one pipelined HMGET per id without `image_base64`, and clients still get
  the whole image (test_lookups_check_existence_in_one_pipeline_without_images).
* "When the Redis pool runs out, the errors are swallowed" (contract 8): a Redis error is a 500
  or an error frame 500, never a not-found or "subscribed"
  (test_redis_errors_are_500s_never_a_wrong_answer, with Redis stopped or killed;
  test_an_exhausted_redis_pool_is_a_500_never_a_wrong_answer); unknown ids are still 404
  (test_unknown_ids_are_still_404_and_known_ones_subscribe).
* "The per-task socket reads its record twice" (test_the_per_task_socket_reads_its_record_once).
* "The gateway serves a hand-written record with progress -40"
  (test_a_record_that_breaks_the_contract_is_a_500_never_served,
  test_a_watcher_keeps_the_last_good_state_while_the_record_is_garbage).
* "/readyz stays 200 while the pub/sub connection is down or the cluster reports
  cluster_state:fail" (test_readyz_reports_the_pubsub_connection_and_redis,
  test_readyz_reports_a_failed_cluster).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from taskcast.connection import connect
from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisClusterNodes, RedisServer, run_gateway
from tests.sse_client import Follower, Frame, Transcript, stream_problems, wait_for_metric
from tests.test_ws import close_code, frames_before_pong, recv, send, ws_connect

BOUND_S = 10.0
REDIS_TIMEOUT_S = 0.5
INTERNAL_ERROR_BODY = b'{"code":500,"msg":"internal server error","data":null}'
NOT_FOUND = {"code": 404, "msg": "task not found", "data": None}
READY = {"code": 200, "msg": "ready", "data": {"redis": "ok", "pubsub": "ok"}}
PUBSUB_DOWN = {"code": 503, "msg": "pubsub not ready",
               "data": {"redis": "ok", "pubsub": "disconnected"}}
REDIS_DOWN = {"code": 503, "msg": "redis unavailable", "data": {"redis": "unavailable"}}
CLUSTER_READY = {"code": 200, "msg": "ready",
                 "data": {"redis": "ok", "pubsub": "ok", "cluster": "ok"}}
CLUSTER_FAILED = {"code": 503, "msg": "cluster not ready",
                  "data": {"redis": "ok", "pubsub": "ok", "cluster": "fail"}}
BIG_IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 800  # ~200 KiB: staged by the producer
SMALL_IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 12  # 3 KiB: inline in the record
MID_IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 120  # 30 KiB: inline, 40 KiB of base64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Answer:
    """A response's status, content type and body; the body of an event stream is not read
    (a stream held open where a 500 is due would hang the test instead of failing it)."""

    status_code: int
    content_type: str
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


async def get(client: httpx.AsyncClient, path: str, **options: Any) -> Answer:
    async with asyncio.timeout(BOUND_S), client.stream("GET", path, **options) as response:
        content_type = response.headers.get("content-type", "")
        stream = content_type.startswith("text/event-stream")
        body = b"<an event stream>" if stream else await response.aread()
        return Answer(response.status_code, content_type, body)


def assert_internal_error(response: Answer) -> None:
    """The seed's 500 body, byte for byte: no cause, no traceback, no address."""
    assert response.status_code == 500, (response.status_code, response.content[:300])
    assert response.content_type == "application/json"
    assert response.content == INTERNAL_ERROR_BODY


@asynccontextmanager
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as client:
        yield client


async def poll_readyz(client: httpx.AsyncClient, done: Callable[[httpx.Response], bool],
                      bound_s: float = 15.0) -> httpx.Response:
    """GET /readyz until `done` holds (what a load balancer does); fails with the last answer."""
    response: httpx.Response | None = None
    try:
        async with asyncio.timeout(bound_s):
            while True:
                response = await client.get("/readyz")
                if done(response):
                    return response
                await asyncio.sleep(0.05)
    except TimeoutError:
        last = None if response is None else (response.status_code, response.text)
        raise AssertionError(f"/readyz never got there; last answer {last}") from None


def answered(expected: Mapping[str, Any]) -> Callable[[httpx.Response], bool]:
    return lambda response: (response.status_code == expected["code"]
                             and response.json() == expected)


async def until_watched(client: httpx.AsyncClient, count: int) -> None:
    """The gateway's hub watches `count` tasks (0: every client left and was released)."""
    await wait_for_metric(client, "taskcast_watched_tasks", lambda value: value == count,
                          timeout=BOUND_S)


@asynccontextmanager
async def producer_on(server: RedisServer, prefix: str) -> AsyncIterator[Producer]:
    """A producer on a fresh client (the connections of an older one died with the server)."""
    producer = Producer(connect(server.url), prefix=prefix)
    try:
        yield producer
    finally:
        async with asyncio.timeout(BOUND_S):
            await producer.close()


# -- MONITOR -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command as MONITOR reported it: the client ("127.0.0.1:port", or "lua" for a
    command inside a script) and the arguments, the command name first."""

    client: str
    args: tuple[bytes, ...]

    @property
    def name(self) -> bytes:
        return self.args[0].upper()


_MONITOR_LINE = re.compile(rb"^\+\d+\.\d+ \[\d+ ([^\]]*)\] (.*)$", re.DOTALL)
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b"}
_marks = itertools.count()


def monitor_args(text: bytes) -> tuple[bytes, ...]:
    """The quoted arguments of a MONITOR line (Redis's sdscatrepr: \\xHH and C escapes)."""
    args: list[bytes] = []
    i = 0
    while i < len(text):
        if text[i] != ord('"'):
            i += 1
            continue
        i += 1
        arg = bytearray()
        while text[i] != ord('"'):
            if text[i] == ord("\\"):
                escaped = text[i + 1]
                if escaped == ord("x"):
                    arg.append(int(text[i + 2 : i + 4], 16))
                    i += 4
                else:
                    arg += _ESCAPES.get(escaped, bytes([escaped]))
                    i += 2
            else:
                arg.append(text[i])
                i += 1
        args.append(bytes(arg))
        i += 1
    return tuple(args)


class Monitor:
    """MONITOR on a raw connection of its own: every command Redis runs, in the order it ran
    them. mark() puts a marker command in that order, so a test can cut out what Redis ran
    between two points of the test, without any timing."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.commands: list[Command] = []
        self._new = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._marker_client: aioredis.Redis | None = None

    async def __aenter__(self) -> Monitor:
        # A large line limit: a staged image passes by as one SET of ~4 characters per byte.
        self._reader, self._writer = await asyncio.open_connection(
            "127.0.0.1", self.server.port, limit=1 << 27)
        self._writer.write(b"MONITOR\r\n")
        async with asyncio.timeout(BOUND_S):
            assert await self._reader.readline() == b"+OK\r\n"
        self._task = asyncio.create_task(self._read(self._reader))
        self._marker_client = connect(self.server.url)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            await asyncio.gather(self._writer.wait_closed(), return_exceptions=True)
        if self._marker_client is not None:
            await self._marker_client.aclose()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            match = _MONITOR_LINE.match(line.rstrip(b"\r\n"))
            if match is not None:
                self.commands.append(Command(match[1].decode(), monitor_args(match[2])))
                self._new.set()

    async def wait_for(self, found: Callable[[Command], bool], start: int = 0) -> int:
        """The index of the first command from `start` on for which `found` holds."""
        index = start
        try:
            async with asyncio.timeout(BOUND_S):
                while True:
                    while index < len(self.commands):
                        if found(self.commands[index]):
                            return index
                        index += 1
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError("MONITOR never showed the command waited for") from None

    async def mark(self) -> int:
        """The index of a marker that Redis ran after every command it ran before this call."""
        marker = f"test-lookups-mark-{next(_marks)}".encode()
        assert self._marker_client is not None
        await self._marker_client.echo(marker)
        return await self.wait_for(lambda c: c.name == b"ECHO" and c.args[1:] == (marker,))


def hmgets_of(commands: Sequence[Command], key: str) -> list[Command]:
    return [c for c in commands if c.name == b"HMGET" and c.args[1] == key.encode()]


def with_image_field(command: Command) -> bool:
    return b"image_base64" in command.args[2:]


def first_subscribe(commands: Sequence[Command], channels: Sequence[str]) -> int:
    """Where the gateway first subscribed to any of `channels` (SUBSCRIBE may batch them)."""
    wanted = {channel.encode() for channel in channels}
    for index, command in enumerate(commands):
        if command.name in (b"SUBSCRIBE", b"SSUBSCRIBE") and wanted & set(command.args[1:]):
            return index
    raise AssertionError(f"the gateway never subscribed to {channels}")


# -- a TCP proxy between the gateway and redis-server --------------------------------------------


class RespCommands:
    """The commands in what a client sends: RESP arrays of bulk strings, as redis-py writes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, ...]]:
        self.buffer += data
        commands = []
        while (command := self._next()) is not None:
            commands.append(command)
        return commands

    def _next(self) -> tuple[bytes, ...] | None:
        buf = self.buffer
        if not buf:
            return None
        assert buf[:1] == b"*", f"not a RESP array: {bytes(buf[:40])!r}"
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        args = []
        pos = end + 2
        for _ in range(int(buf[1:end])):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            assert buf[pos : pos + 1] == b"$", f"not a bulk string: {bytes(buf[pos:pos + 40])!r}"
            start = end + 2
            stop = start + int(buf[pos + 1 : end])
            if len(buf) < stop + 2:
                return None
            args.append(bytes(buf[start:stop]))
            pos = stop + 2
        del buf[:pos]
        return tuple(args)


@dataclass(frozen=True)
class ProxyEvent:
    """On connection `link`: a command the client sent (`command`), or reply bytes that Redis
    sent back (`command` None), in the order the proxy passed them on."""

    link: int
    command: tuple[bytes, ...] | None


SUBSCRIBING = (b"SUBSCRIBE", b"SSUBSCRIBE", b"PSUBSCRIBE")


class _Link:
    def __init__(self, number: int, client: asyncio.StreamWriter) -> None:
        self.number = number
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.subscriber = False  # it has sent a (S|P)SUBSCRIBE: a pub/sub connection

    def close(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()


class RedisProxy:
    """Forwards TCP connections to a redis-server and logs every command and reply chunk.

    block_subscribers() closes every connection that has sent a SUBSCRIBE, and from then on
    closes any connection as soon as it sends one (nothing of it is forwarded), while plain
    commands pass: the pub/sub connection is down, PING still works. unblock() lifts it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.events: list[ProxyEvent] = []
        self.blocking = False
        self.refused = 0  # connections closed for a SUBSCRIBE while blocking
        self.port = 0
        self._links: dict[int, _Link] = {}
        self._numbers = itertools.count()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links.values()):
            link.close()
        async with asyncio.timeout(BOUND_S):
            await self._server.wait_closed()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def subscribers(self) -> int:
        """Open connections that have subscribed to something."""
        return sum(link.subscriber for link in self._links.values())

    def block_subscribers(self) -> None:
        self.blocking = True
        for link in list(self._links.values()):
            if link.subscriber:
                link.close()

    def unblock(self) -> None:
        self.blocking = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        link = _Link(next(self._numbers), writer)
        self._links[link.number] = link
        try:
            try:
                upstream_reader, link.upstream = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port)
            except OSError:
                return  # Redis is down: the client sees its connection closed
            replies = asyncio.create_task(self._replies(link, upstream_reader))
            try:
                await self._commands(link, reader, link.upstream)
            finally:
                replies.cancel()
                await asyncio.gather(replies, return_exceptions=True)
        except OSError:
            pass
        finally:
            del self._links[link.number]
            link.close()
            self._handlers.discard(task)

    async def _commands(self, link: _Link, reader: asyncio.StreamReader,
                        upstream: asyncio.StreamWriter) -> None:
        parser = RespCommands()
        while data := await reader.read(65536):
            for command in parser.feed(data):
                self.events.append(ProxyEvent(link.number, command))
                if command[0].upper() in SUBSCRIBING:
                    link.subscriber = True
            if link.subscriber and self.blocking:
                self.refused += 1
                return
            upstream.write(data)
            await upstream.drain()

    async def _replies(self, link: _Link, upstream: asyncio.StreamReader) -> None:
        try:
            while data := await upstream.read(65536):
                self.events.append(ProxyEvent(link.number, None))
                link.client.write(data)
                await link.client.drain()
        except OSError:
            pass
        link.client.close()  # Redis closed the connection: so does the proxy, to the client


def pipeline_problems(events: Sequence[ProxyEvent], keys: Sequence[str]) -> list[str]:
    """Whether the first HMGET of each record in `keys` went out as one pipeline: all on one
    connection, with no reply passed back on it between the first and the last of them.
    Causal, not timed: a client that waits for each reply before sending the next command
    cannot send the next one before the proxy has passed that reply on."""
    first: dict[bytes, int] = {}
    for index, event in enumerate(events):
        command = event.command
        if command is not None and command[0].upper() == b"HMGET" and command[1] not in first:
            first[command[1]] = index
    wanted = {key.encode() for key in keys}
    if not wanted <= first.keys():
        return [f"no HMGET of {sorted(wanted - first.keys())}"]
    indexes = sorted(first[key] for key in wanted)
    links = {events[index].link for index in indexes}
    if len(links) != 1:
        return [f"the HMGETs went over {len(links)} connections"]
    (link,) = links
    replies = [index for index in range(indexes[0], indexes[-1])
               if events[index].link == link and events[index].command is None]
    if replies:
        return [f"replies at {replies} came back between the HMGETs at {indexes}: one by one"]
    problems = []
    for index in indexes:
        command = events[index].command
        assert command is not None
        if b"image_base64" in command[2:]:
            problems.append(f"{command[1]!r} was read with image_base64")
    return problems


# -- 1. lookups: one pipelined read, without images ------------------------------------------


async def test_lookups_check_existence_in_one_pipeline_without_images(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Issue 12, "Ids and lookups": `/events` and WebSocket subscribe checked existence by
    reading the records one by one, image included. Now: one pipelined HMGET per id without
    `image_base64` (MONITOR shows what was read before the gateway subscribed; the proxy shows
    that no reply came back between the HMGETs), then a whole read of the completed ones only,
    and clients still get the whole image."""
    keys = TaskKeys(prefix)
    a, b, c = 1201, 1202, 1203
    for task_id in (a, b, c):
        await producer.create(task_id=task_id, type="txt2img", angle="front")
    await producer.progress(a, 50)
    done_a = await producer.complete(a, image_url="https://cdn.example/a.png",
                                     image_base64=BIG_IMAGE)
    await producer.progress(b, 70)
    done_b = await producer.complete(b, image_base64=SMALL_IMAGE)
    state_c = await producer.progress(c, 30)
    # The premise: a's image is staged (its own key), b's is inline in the record.
    assert await redis.hget(keys.record(a), "image_bytes") == str(len(BIG_IMAGE)).encode()
    assert await redis.hget(keys.record(b), "image_base64") == b64(SMALL_IMAGE).encode()
    expected = {a: done_a.to_dict(), b: done_b.to_dict(), c: state_c.to_dict()}
    assert expected[a]["image"]["image_base64"] == b64(BIG_IMAGE)
    records = [keys.record(task_id) for task_id in (a, b, c)]
    channels = [keys.channel(task_id) for task_id in (a, b, c)]

    def check_lookup(commands: Sequence[Command]) -> None:
        # The existence check is the first read of each record, without the image. Only the
        # completed tasks (a, b), whose image is their current state, are then read whole,
        # once, and a's staged image once; the processing one (c) is not read again.
        before = commands[: first_subscribe(commands, channels)]
        for record, completed in zip(records, (True, True, False), strict=True):
            reads = hmgets_of(before, record)
            assert len(reads) == (2 if completed else 1), (record, reads)
            assert not with_image_field(reads[0]), reads[0]
            if completed:
                assert with_image_field(reads[1]), reads[1]
        image_reads = [cmd.args[1] for cmd in before
                       if cmd.name == b"GET" and cmd.args[1].endswith(b":image")]
        assert image_reads == [keys.image(a).encode()]

    async with RedisProxy(redis_server.port) as proxy, Monitor(redis_server) as monitor:
        settings = Settings(redis_url=proxy.url, prefix=prefix)
        async with run_gateway(settings) as gateway, http(gateway) as client:
            # -- /events?task_id=a&task_id=b&task_id=c
            start, since = await monitor.mark(), len(proxy.events)

            def all_seen(frame: Frame, transcript: Transcript) -> bool:
                return {task["task_id"] for task in transcript.tasks()} >= {a, b, c}

            follower = Follower(client, f"/events?task_id={a}&task_id={b}&task_id={c}",
                                stop_when=all_seen)
            transcript = await follower.start().result(BOUND_S)
            end = await monitor.mark()
            assert transcript.status == 200, transcript.summary()
            assert transcript.frames[0].retry is not None
            assert {task["task_id"]: task for task in transcript.tasks()} == expected
            assert len(transcript.tasks()) == 3, transcript.summary()
            check_lookup(monitor.commands[start:end])
            assert pipeline_problems(proxy.events[since:], records) == []

            # -- WebSocket subscribe to the three, once nothing watches them any more
            await until_watched(client, 0)
            start, since = await monitor.mark(), len(proxy.events)
            async with ws_connect(gateway) as ws:
                await send(ws, {"op": "subscribe", "task_ids": [a, b, c]})
                assert await recv(ws) == {"type": "subscribed", "task_ids": [a, b, c]}
                frames = [await recv(ws) for _ in range(3)]
                assert await frames_before_pong(ws) == []
            end = await monitor.mark()
            assert [frame["type"] for frame in frames] == ["task"] * 3, frames
            assert {frame["data"]["task_id"]: frame["data"] for frame in frames} == expected
            check_lookup(monitor.commands[start:end])
            assert pipeline_problems(proxy.events[since:], records) == []


# -- 2. Redis errors: a 500, never a wrong answer ---------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_redis_errors_are_500s_never_a_wrong_answer(
    own_redis: RedisServer, prefix: str, how: str
) -> None:
    """Issue 12, "Lookups swallow Redis errors" (contract 8): with Redis gone, `/events` and
    `/tasks/{id}/events` are the seed's 500, WebSocket subscribe is an error frame 500 listing
    the ids and no "subscribed", and the per-task socket closes 1011; the same gateway (and the
    same socket) works again once Redis is back. Task 1 exists, task 2 never does: with Redis
    down neither may come out as "not found"."""
    async with producer_on(own_redis, prefix) as producer:
        await producer.create(task_id=1, type="txt2img", angle="front")
    settings = Settings(redis_url=own_redis.url, prefix=prefix, redis_timeout_s=REDIS_TIMEOUT_S)
    async with run_gateway(settings) as gateway, http(gateway) as client, \
            ws_connect(gateway) as ws:
        await poll_readyz(client, lambda response: response.status_code == 200)
        assert await frames_before_pong(ws) == []  # the socket is open before the outage

        own_redis.stop() if how == "stop" else own_redis.kill()

        assert_internal_error(await get(client, "/events?task_id=1"))
        assert_internal_error(await get(client, "/events?task_id=1&task_id=2"))
        assert_internal_error(await get(client, "/tasks/1/events"))
        assert_internal_error(await get(client, "/tasks/2/events"))
        await send(ws, {"op": "subscribe", "task_ids": [1, 2]})
        frames = await frames_before_pong(ws)
        assert len(frames) == 1, frames  # no "subscribed", no 404
        assert frames[0]["type"] == "error" and frames[0]["code"] == 500, frames
        assert frames[0]["task_ids"] == [1, 2]
        assert isinstance(frames[0]["msg"], str) and frames[0]["msg"]
        for task_id in (1, 2):
            async with ws_connect(gateway, f"/tasks/{task_id}/ws") as per_task:
                assert await close_code(per_task) == 1011

        own_redis.start()  # no persistence: the record is gone, so it is made again
        async with producer_on(own_redis, prefix) as producer:
            await producer.create(task_id=1, type="txt2img", angle="front")
            final = (await producer.complete(1, image_base64=SMALL_IMAGE)).to_dict()

        transcript = await Follower(client, "/events?task_id=1").start().result(BOUND_S)
        assert stream_problems(transcript, [1], multi=True) == []
        assert transcript.tasks() == [final]
        transcript = await Follower(client, "/tasks/1/events").start().result(BOUND_S)
        assert stream_problems(transcript, [1]) == []
        assert transcript.tasks() == [final]
        # A real "not found" is one again.
        missing = await get(client, "/events?task_id=1&task_id=2")
        assert (missing.status_code, missing.json()) == (404, NOT_FOUND)
        # The socket that got the error frame subscribes now.
        await send(ws, {"op": "subscribe", "task_ids": [1]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [1]}
        assert await recv(ws) == {"type": "task", "data": final}
        async with ws_connect(gateway, "/tasks/1/ws") as per_task:
            assert await recv(per_task) == {"type": "task", "data": final}
            assert await close_code(per_task) == 1000
        await poll_readyz(client, answered(READY))


async def subscribe_frames(ws: Any, task_ids: list[int]) -> list[dict[str, Any]]:
    await send(ws, {"op": "subscribe", "task_ids": task_ids})
    return await frames_before_pong(ws)


async def test_an_exhausted_redis_pool_is_a_500_never_a_wrong_answer(
    own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12, "When the Redis pool runs out, the errors are swallowed: unknown ids got a 200
    stream with event: not_found instead of 404, and WebSocket answered "subscribed" for tasks
    that do not exist" (contract 8). With Redis hung (SIGSTOP), 60 concurrent `/events`
    requests and 10 WebSocket subscribes want more than the gateway's 50 pooled connections:
    each is a 500 or an error frame 500, none a 404, a stream or a "subscribed"."""
    async with producer_on(own_redis, prefix) as producer:
        await producer.create(task_id=1, type="txt2img", angle="front")
    settings = Settings(redis_url=own_redis.url, prefix=prefix, redis_timeout_s=REDIS_TIMEOUT_S)
    async with run_gateway(settings) as gateway, http(gateway) as client, AsyncExitStack() as stack:
        await poll_readyz(client, lambda response: response.status_code == 200)
        sockets = [await stack.enter_async_context(ws_connect(gateway)) for _ in range(10)]
        own_redis.pause()
        try:
            async with asyncio.timeout(30):
                responses, replies = await asyncio.gather(
                    asyncio.gather(*(get(client, "/events?task_id=1&task_id=2")
                                     for _ in range(60))),
                    asyncio.gather(*(subscribe_frames(ws, [1, 2]) for ws in sockets)))
        finally:
            own_redis.resume()
        for response in responses:
            assert_internal_error(response)
        for frames in replies:
            assert [(f["type"], f.get("code"), f.get("task_ids")) for f in frames] == [
                ("error", 500, [1, 2])], frames
        # The premise: some lookups found no free connection in the pool.
        assert any("No connection available" in record.getMessage()
                   for record in caplog.records), caplog.text[-2000:]
        # Once Redis answers, the same sockets subscribe.
        for ws in sockets[:2]:
            frames = await subscribe_frames(ws, [1, 2])
            assert [(f["type"], f["task_ids"]) for f in frames[:2]] == [
                ("error", [2]), ("subscribed", [1])], frames


# -- 3. unknown ids: still 404 ---------------------------------------------------------------


async def test_unknown_ids_are_still_404_and_known_ones_subscribe(
    gateway: Gateway, producer: Producer
) -> None:
    """Issue 12, "Ids and lookups" (regression guard for the new existence check): an unknown
    id is a 404 on SSE, an error frame 404 on /ws (the known ids subscribe) and a 4404 close on
    the per-task socket."""
    known, unknown = 1301, 1302
    await producer.create(task_id=known, type="txt2img", angle="front")
    state = (await producer.progress(known, 10)).to_dict()
    async with http(gateway) as client:
        for path in (f"/events?task_id={known}&task_id={unknown}", f"/events?task_id={unknown}",
                     f"/tasks/{unknown}/events"):
            response = await get(client, path)
            assert (response.status_code, response.json()) == (404, NOT_FOUND), path
        follower = Follower(client, f"/events?task_id={known}",
                            stop_when=lambda frame, transcript: frame.is_task)
        transcript = await follower.start().result(BOUND_S)
        assert transcript.status == 200
        assert transcript.tasks() == [state]
    async with ws_connect(gateway) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [unknown, known]})
        error = await recv(ws)
        assert (error["type"], error["code"], error["task_ids"]) == ("error", 404, [unknown])
        assert await recv(ws) == {"type": "subscribed", "task_ids": [known]}
        assert await recv(ws) == {"type": "task", "data": state}
    async with ws_connect(gateway, f"/tasks/{unknown}/ws") as per_task:
        assert await close_code(per_task) == 4404


# -- 4. the per-task socket reads its record once --------------------------------------------


@pytest.mark.parametrize("finished", [True, False], ids=["completed", "processing"])
async def test_the_per_task_socket_reads_its_record_once(
    redis_server: RedisServer, producer: Producer, prefix: str, finished: bool
) -> None:
    """Issue 12, "The per-task socket reads its record twice": MONITOR sees exactly one HMGET
    with `image_base64` of the record while a client opens /tasks/{id}/ws, gets the state and
    leaves. For an unfinished task the client stays until the hub's check after subscribing
    has run (an HMGET of the record after the SUBSCRIBE): that check may read the version and
    status, not the record again."""
    keys = TaskKeys(prefix)
    task_id = 1401
    await producer.create(task_id=task_id, type="txt2img", angle="front")
    current = await producer.progress(task_id, 40)
    if finished:
        current = await producer.complete(task_id, image_base64=MID_IMAGE)
        assert current.image_base64 == b64(MID_IMAGE)
    record, channel = keys.record(task_id), keys.channel(task_id)
    async with Monitor(redis_server) as monitor, \
            run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway, \
            http(gateway) as client:
        start = await monitor.mark()
        async with ws_connect(gateway, f"/tasks/{task_id}/ws") as ws:
            assert await recv(ws) == {"type": "task", "data": current.to_dict()}
            if finished:
                assert await close_code(ws) == 1000
            else:
                subscribed = await monitor.wait_for(
                    lambda c: c.name == b"SUBSCRIBE" and channel.encode() in c.args, start)
                await monitor.wait_for(
                    lambda c: c.name == b"HMGET" and c.args[1] == record.encode(), subscribed)
        await until_watched(client, 0)
        end = await monitor.mark()
    reads = hmgets_of(monitor.commands[start:end], record)
    assert len([read for read in reads if with_image_field(read)]) == 1, reads


# -- 5. strict records ------------------------------------------------------------------------


def valid_record(task_id: int) -> dict[str, bytes]:
    """A record as a plain-HSET producer would write it (contract section 3)."""
    return {"task_id": str(task_id).encode(), "status": b"processing", "progress": b"40",
            "type": b"txt2img", "angle": b"front", "image_url": b"", "image_base64": b"",
            "error_message": b"", "version": b"1", "created_at": b"1700000000000",
            "updated_at": b"1700000000000"}


CORRUPTIONS: dict[str, dict[str, bytes]] = {
    "progress -40": {"progress": b"-40"},
    "progress 140": {"progress": b"140"},
    "completed at 50": {"status": b"completed", "progress": b"50"},
    "version x": {"version": b"x"},
    "another task's id": {"task_id": b"999"},
    "type not UTF-8": {"type": b"\xff"},
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
async def test_a_record_that_breaks_the_contract_is_a_500_never_served(
    gateway: Gateway, redis: aioredis.Redis, prefix: str, corruption: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 12, "The gateway serves a hand-written record with progress -40": such a record is
    the seed's 500 on REST and SSE, an error frame 500 on /ws and a 1011 close on the per-task
    socket; the log says why in one line per request, with no traceback."""
    task_id = 1501
    fields: dict[Any, Any] = {**valid_record(task_id), **corruption}
    await redis.hset(TaskKeys(prefix).record(task_id), mapping=fields)
    async with http(gateway) as client:
        for path in (f"/tasks/{task_id}", f"/tasks/{task_id}?image_base64=false",
                     f"/tasks/{task_id}/events", f"/events?task_id={task_id}"):
            assert_internal_error(await get(client, path))
        assert_internal_error(await get(client, f"/tasks/{task_id}",
                                        headers={"If-None-Match": '"1"'}))
    async with ws_connect(gateway) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [task_id]})
        frames = await frames_before_pong(ws)
        assert [(f["type"], f.get("code"), f["task_ids"]) for f in frames] == [
            ("error", 500, [task_id]), ("subscribed", None, [])], frames
    async with ws_connect(gateway, f"/tasks/{task_id}/ws") as per_task:
        assert await close_code(per_task) == 1011
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) >= 7, [record.getMessage() for record in errors]
    for record in errors:
        assert f"task {task_id} has a malformed record" in record.getMessage()
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    assert "Traceback" not in caplog.text


async def test_a_watcher_keeps_the_last_good_state_while_the_record_is_garbage(
    gateway: Gateway, redis: aioredis.Redis, producer: Producer, prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 12, "Records": on a stream a corrupt record is logged and treated as a lost event.
    A watcher of a healthy task whose record is overwritten by hand with garbage (a newer
    version, progress -40) gets nothing of it; once a valid newer version is written, that
    arrives, and then the end."""
    keys = TaskKeys(prefix)
    task_id = 1601
    record, channel = keys.record(task_id), keys.channel(task_id)
    await producer.create(task_id=task_id, type="txt2img", angle="front")
    await producer.progress(task_id, 20)  # v2
    async with http(gateway) as client:
        follower = Follower(client, f"/tasks/{task_id}/events", expect=[task_id]).start()
        try:
            async with asyncio.timeout(BOUND_S):
                await follower.ready.wait()

            await redis.hset(record, mapping={"progress": b"-40", "version": b"3"})
            # A malformed event makes the hub re-read the record (as would its periodic resync).
            await redis.publish(channel, b"poke: re-read the record")
            try:
                async with asyncio.timeout(BOUND_S):
                    while not any(f"task {task_id} has a malformed record" in r.getMessage()
                                  for r in caplog.records if r.levelno >= logging.ERROR):
                        await asyncio.sleep(0.02)
            except TimeoutError:
                raise AssertionError(f"the garbage was not refused when re-read: "
                                     f"{follower.transcript.summary()}") from None
            assert_internal_error(await get(client, f"/tasks/{task_id}"))

            await redis.hset(record, mapping={"progress": b"60", "version": b"4"})
            await redis.publish(channel, b"poke: re-read the record")
            async with asyncio.timeout(BOUND_S):
                while not any(t["version"] >= 4 for t in follower.transcript.tasks()):
                    await asyncio.sleep(0.02)
            final = await producer.complete(task_id, image_url="https://cdn.example/x.png")
            transcript = await follower.result(BOUND_S)
        finally:
            await follower.stop()
    assert [(t["version"], t["status"], t["progress"]) for t in transcript.tasks()] == [
        (2, "processing", 20), (4, "processing", 60), (final.version, "completed", 100)]
    assert transcript.tasks()[-1] == final.to_dict()
    assert stream_problems(transcript, [task_id]) == []


# -- 6. /readyz: the pub/sub connection and Redis ----------------------------------------------


async def test_readyz_reports_the_pubsub_connection_and_redis(
    own_redis: RedisServer, prefix: str
) -> None:
    """Issue 12, "/readyz stays 200 while the pub/sub connection is down": through a proxy that
    cuts the gateway's pub/sub connection and refuses new SUBSCRIBEs while plain commands (PING)
    pass, /readyz turns 503 with "pubsub": "disconnected", stays so while the reconnects are
    refused, and is 200 again once they are allowed; with Redis stopped it is 503
    {"redis": "unavailable"}."""
    async with RedisProxy(own_redis.port) as proxy:
        settings = Settings(redis_url=proxy.url, prefix=prefix, redis_timeout_s=REDIS_TIMEOUT_S)
        async with run_gateway(settings) as gateway, http(gateway) as client:
            await poll_readyz(client, answered(READY))
            assert proxy.subscribers >= 1

            proxy.block_subscribers()
            await poll_readyz(client, answered(PUBSUB_DOWN))
            refused = proxy.refused
            async with asyncio.timeout(15):  # the broker's backoff is capped at 5 s
                while proxy.refused <= refused:
                    await asyncio.sleep(0.05)
            # A reconnect was refused: still not ready.
            still = await get(client, "/readyz")
            assert (still.status_code, still.json()) == (503, PUBSUB_DOWN)
            assert (await get(client, "/healthz")).status_code == 200

            proxy.unblock()
            await poll_readyz(client, answered(READY))

            own_redis.stop()
            response = await poll_readyz(client, lambda r: r.status_code == 503)
            assert response.json() == REDIS_DOWN
            own_redis.start()
            await poll_readyz(client, answered(READY))


# -- 7. /readyz: cluster_state:fail -------------------------------------------------------------


async def test_readyz_reports_a_failed_cluster(tmp_path: Path, prefix: str) -> None:
    """Issue 12, "/readyz stays 200 while ... the cluster reports cluster_state:fail": on a
    three-primary cluster without replicas (cluster-node-timeout 2 s), killing one primary
    leaves slots uncovered; /readyz turns 503 with "cluster": "fail", and 200 again once the
    node is back."""
    cluster = RedisClusterNodes(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        settings = Settings(redis_url=cluster.url, prefix=prefix, redis_timeout_s=REDIS_TIMEOUT_S,
                            redis_ping_deadline_s=1.5)
        async with run_gateway(settings) as gateway, http(gateway) as client:
            await poll_readyz(client, answered(CLUSTER_READY))
            victim = cluster.nodes[1]  # not the node the URL names
            victim.kill()
            await poll_readyz(client, answered(CLUSTER_FAILED), bound_s=30)
            await asyncio.to_thread(victim.start)  # same port and dir: nodes.conf rejoins it
            await asyncio.to_thread(cluster.wait_ok, 30)
            await poll_readyz(client, answered(CLUSTER_READY), bound_s=30)
    finally:
        await asyncio.to_thread(cluster.stop)
