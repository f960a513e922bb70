"""taskcast.client (contract section 9, issue 13 item 5) against a real gateway and a real
redis-server: every transport forced and "auto", the asyncio and the blocking client; a gateway
restarted and one SIGKILLed mid-watch, a Redis restart, a proxy that buffers the SSE body,
unknown tasks, a gateway that cannot be reached or never answers, and tokens (expired and
renewed by the callable, refused, not naming the task).

What every finished watch must show (`watch_problems`): each watched task and no other; per
task, versions strictly increasing (each at most once, in order), exactly one terminal state
and it is the last, and it is the state the producer ended the task with.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskcast.client import (
    AccessRefused,
    AsyncClient,
    Client,
    GatewayUnreachable,
    TaskNotFound,
    Transport,
)
from taskcast.connection import connect_sync
from taskcast.errors import StoreUnavailable
from taskcast.models import Task, TaskStatus
from taskcast.producer import Producer, SyncProducer
from taskcast.settings import Settings
from taskcast.tokens import issue
from tests.servers import (
    Gateway,
    RedisServer,
    free_port,
    kill,
    run_gateway,
    start_serve,
    wait_until_answering,
)
from tests.test_sse_failures import FAST as FAST_GATEWAY
from tests.test_sse_failures import producer_on, restore, snapshot

BOUND_S = 20.0  # only against hangs
TRANSPORTS: list[Transport] = ["sse", "ws", "poll", "auto"]
FORCED: list[Transport] = ["sse", "ws", "poll"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
SECRET = "client-tests-" + "s" * 40  # HS256 wants 32 bytes or more
OTHER_SECRET = "another-key-" + "o" * 40
# Short backoffs and a fast poll, so reconnects do not dominate the runtime.
FAST: dict[str, Any] = {"poll_interval_s": 0.05, "min_backoff_s": 0.05, "max_backoff_s": 0.3,
                        "give_up_after_s": 30.0}


# -- driving tasks and checking watches ------------------------------------------------------------


async def create(producer: Producer, count: int) -> list[int]:
    return [(await producer.create(type="txt2img")).task_id for _ in range(count)]


async def step(producer: Producer, task_ids: Iterable[int], progress: int) -> None:
    for task_id in task_ids:
        await producer.progress(task_id, progress)


async def drive(producer: Producer, task_ids: Sequence[int], *,
                steps: Sequence[int] = (20, 40, 60, 80), pause_s: float = 0.05
                ) -> dict[int, Task]:
    """Progress steps for every task, then the end: the last of several tasks fails, the others
    complete with an image. Returns each task's final state as the producer left it."""
    for progress in steps:
        await step(producer, task_ids, progress)
        await asyncio.sleep(pause_s)
    finals = {}
    for task_id in task_ids:
        if len(task_ids) > 1 and task_id == task_ids[-1]:
            finals[task_id] = await producer.fail(task_id, f"worker lost task {task_id}")
        else:
            finals[task_id] = await producer.complete(
                task_id, image_url=f"https://cdn.example/{task_id}.png", image_base64=PNG)
    return finals


def by_task(states: Iterable[Task]) -> dict[int, list[Task]]:
    grouped: dict[int, list[Task]] = defaultdict(list)
    for state in states:
        grouped[state.task_id].append(state)
    return grouped


def watch_problems(states: Sequence[Task], finals: dict[int, Task], *,
                   image_base64: bool = True, records_lost: bool = False) -> list[str]:
    """Everything wrong with a finished watch of the tasks in `finals` (see the module).
    `records_lost`: Redis lost the records and they were created again, so the terminal state
    may have a lower version than the states before it (it must still arrive, and last)."""
    problems = []
    grouped = by_task(states)
    if set(grouped) != set(finals):
        problems.append(f"tasks {sorted(grouped)}, expected {sorted(finals)}")
    for task_id, seen in grouped.items():
        versions = [state.version for state in seen]
        if records_lost:
            versions = versions[:-1]
        if any(later <= earlier for earlier, later in itertools.pairwise(versions)):
            problems.append(f"task {task_id}: versions {versions}")
        terminal = [index for index, state in enumerate(seen) if state.is_terminal]
        if terminal != [len(seen) - 1]:
            problems.append(f"task {task_id}: terminal states at {terminal} of {len(seen)}")
        final, last = finals.get(task_id), seen[-1]
        if final is None:
            continue
        got = (last.status, last.version, last.progress, last.error_message, last.image_url)
        want = (final.status, final.version, final.progress, final.error_message,
                final.image_url)
        if got != want:
            problems.append(f"task {task_id}: ended with {got}, expected {want}")
        image = PNG if image_base64 and final.status == TaskStatus.COMPLETED else None
        if last.image_data() != image:
            problems.append(f"task {task_id}: image {last.image_base64[:20]!r}...")
        if not image_base64 and any(state.image_base64 for state in seen):
            problems.append(f"task {task_id}: an image with image_base64=False")
    return problems


async def until(check: Callable[[], bool], what: str,
                running: asyncio.Task[Any] | None = None, bound_s: float = BOUND_S) -> None:
    """Wait (bounded) until `check()` holds; a background task that ends first raises its
    error or fails the test."""
    try:
        async with asyncio.timeout(bound_s):
            while not check():
                if running is not None and running.done():
                    running.result()
                    raise AssertionError(f"ended before {what}")
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {bound_s} s: {what}") from None


class Watcher:
    """`client.watch(task_ids, **options)` running in the background, recording its states."""

    def __init__(self, client: AsyncClient, task_ids: Sequence[int], **options: Any) -> None:
        self.task_ids = set(task_ids)
        self.states: list[Task] = []
        self.task = asyncio.create_task(self._run(client, list(task_ids), options))

    async def _run(self, client: AsyncClient, task_ids: list[int], options: dict[str, Any]
                   ) -> None:
        async for state in client.watch(task_ids, **options):
            self.states.append(state)

    def seen(self, check: Callable[[Task], bool] = lambda state: True) -> set[int]:
        return {state.task_id for state in self.states if check(state)}

    async def following(self, bound_s: float = BOUND_S) -> None:
        """Until the first state of every task arrived: the watch is live."""
        await until(lambda: self.seen() == self.task_ids, "a state of every task", self.task,
                    bound_s)

    async def result(self) -> list[Task]:
        """The states, once the watch ended by itself."""
        async with asyncio.timeout(BOUND_S):
            await self.task
        return self.states


@asynccontextmanager
async def watching(client: AsyncClient, task_ids: Sequence[int], **options: Any
                   ) -> AsyncIterator[Watcher]:
    watcher = Watcher(client, task_ids, **options)
    try:
        yield watcher
    finally:
        watcher.task.cancel()
        await asyncio.gather(watcher.task, return_exceptions=True)


async def drain(states: AsyncIterator[Task]) -> list[Task]:
    async with asyncio.timeout(BOUND_S):
        return [state async for state in states]


# -- 1. every transport, asyncio and blocking --------------------------------------------------


@pytest.mark.parametrize("image_base64", [True, False], ids=["images", "no-images"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_watch_yields_newer_versions_and_ends_after_every_terminal_state(
    gateway: Gateway, producer: Producer, transport: Transport, image_base64: bool
) -> None:
    task_ids = await create(producer, 3)
    async with AsyncClient(gateway.url, **FAST) as client, \
            watching(client, task_ids, transport=transport, image_base64=image_base64) as watcher:
        await watcher.following()
        finals = await drive(producer, task_ids)
        states = await watcher.result()
    assert watch_problems(states, finals, image_base64=image_base64) == []
    for seen in by_task(states).values():  # followed from the first state, not only the end
        assert seen[0].version == 1 and seen[0].status == TaskStatus.SUBMITTED
    if not image_base64:
        assert all(state.image_data() is None for state in states)
        assert {state.image_url for state in states if state.status == "completed"} == {
            f"https://cdn.example/{task_id}.png" for task_id in task_ids[:-1]}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_get_returns_the_current_state_and_wait_the_terminal_one(
    gateway: Gateway, producer: Producer, transport: Transport
) -> None:
    [task_id] = await create(producer, 1)
    await producer.progress(task_id, 30)
    async with AsyncClient(gateway.url, **FAST) as client:
        current = await client.get(task_id)
        assert (current.task_id, current.status, current.progress, current.version) == (
            task_id, TaskStatus.PROCESSING, 30, 2)
        waiting = asyncio.create_task(client.wait(task_id, timeout=BOUND_S, transport=transport))
        done = await producer.complete(task_id, image_url="https://cdn.example/x.png",
                                       image_base64=PNG)
        terminal = await waiting
        assert (terminal.status, terminal.version) == (TaskStatus.COMPLETED, done.version)
        assert terminal.image_data() == PNG
        assert (await client.get(task_id)).image_data() == PNG
        without = await client.get(task_id, image_base64=False)
        assert (without.image_base64, without.image_url) == ("", "https://cdn.example/x.png")
        assert (await client.wait(task_id, transport=transport, image_base64=False)
                ).image_data() is None  # an already finished task: at once


async def test_wait_raises_timeout_error_when_the_task_does_not_finish_in_time(
    gateway: Gateway, producer: Producer
) -> None:
    [task_id] = await create(producer, 1)
    async with AsyncClient(gateway.url, **FAST) as client:
        with pytest.raises(TimeoutError):
            await client.wait(task_id, timeout=0.3)


def blocking_watch(url: str, task_ids: list[int], transport: Transport, into: list[Task]) -> None:
    with Client(url, **FAST) as client:
        for state in client.watch(task_ids, transport=transport):
            into.append(state)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_blocking_client_watch_in_a_thread(gateway: Gateway, producer: Producer,
                                                 transport: Transport) -> None:
    """Client (no asyncio in the caller) in a thread of its own; the gateway and the producer
    run in the test's event loop meanwhile."""
    task_ids = await create(producer, 2)
    states: list[Task] = []
    thread = asyncio.create_task(asyncio.to_thread(blocking_watch, gateway.url, task_ids,
                                                   transport, states))
    await until(lambda: {state.task_id for state in states} == set(task_ids),
                "a state of every task", thread)
    finals = await drive(producer, task_ids)
    async with asyncio.timeout(BOUND_S):
        await thread
    assert watch_problems(states, finals) == []


async def test_blocking_client_get_and_wait(gateway: Gateway, producer: Producer) -> None:
    [task_id] = await create(producer, 1)
    await producer.progress(task_id, 40)

    def get() -> Task:
        with Client(gateway.url, **FAST) as client:
            return client.get(task_id)

    def wait() -> Task:
        with Client(gateway.url, **FAST) as client:
            return client.wait(task_id, timeout=BOUND_S)

    current = await asyncio.to_thread(get)
    assert (current.status, current.progress, current.version) == ("processing", 40, 2)
    waiting = asyncio.create_task(asyncio.to_thread(wait))
    done = await producer.fail(task_id, "out of memory")
    async with asyncio.timeout(BOUND_S):
        terminal = await waiting
    assert (terminal.status, terminal.version, terminal.error_message) == (
        TaskStatus.FAILED, done.version, "out of memory")


async def test_an_sse_watch_outlives_keep_alive_comments(settings: Settings, producer: Producer,
                                                       ) -> None:
    """A quiet stream carries keep-alive comments. As comment-only blocks (as they were when
    this test was written) they reached httpx-sse as events with empty data once any event had
    had an `id:` (it keeps the last event id across blocks), and the watch failed on decoding
    them. The gateway now sends them as comment lines that end no block, and the client skips
    an event without data anyway."""
    async with run_gateway(settings.with_changes(sse_keepalive_s=0.1)) as gateway:
        task_ids = await create(producer, 1)
        async with AsyncClient(gateway.url, **FAST) as client, \
                watching(client, task_ids, transport="sse") as watcher:
            await watcher.following()
            await asyncio.sleep(0.5)  # about five keep-alives after the first state
            finals = await drive(producer, task_ids, steps=(50,))
            states = await watcher.result()
    assert watch_problems(states, finals) == []


# -- 2. the gateway restarted mid-watch --------------------------------------------------------


@pytest.mark.parametrize("transport", FORCED)
async def test_watch_resumes_across_a_gateway_restart_on_the_same_port(
    settings: Settings, producer: Producer, transport: Transport
) -> None:
    """The gateway shuts down while the watch is open, the tasks move on while none runs, and
    a new gateway comes up on the same port: the watch carries on to the terminal states."""
    port, settings = free_port(), settings.with_changes(sse_retry_ms=100)
    task_ids = await create(producer, 2)
    async with AsyncClient(f"http://127.0.0.1:{port}", **FAST) as client, \
            watching(client, task_ids, transport=transport) as watcher:
        async with run_gateway(settings, port):
            await watcher.following()
            await step(producer, task_ids, 30)
            await until(lambda: watcher.seen(lambda state: state.progress == 30)
                        == set(task_ids), "progress 30 of every task", watcher.task)
        await step(producer, task_ids, 50)  # while no gateway runs
        await asyncio.sleep(0.3)  # the client meets the closed port
        async with run_gateway(settings, port):
            finals = await drive(producer, task_ids, steps=(70,))
            states = await watcher.result()
    assert watch_problems(states, finals) == []


async def test_watches_of_every_transport_resume_after_the_gateway_process_is_killed(
    redis_server: RedisServer, producer: Producer, prefix: str, tmp_path: Path
) -> None:
    """`taskcast serve` SIGKILLed (connections cut without any goodbye) and started again on
    the same port, with an SSE, a WebSocket and a polling watch open."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--port", str(port), "--redis-url", redis_server.url, "--prefix", prefix,
            "--sse-retry-ms", "100", "--log-level", "warning"]
    task_ids = await create(producer, 2)
    logs = [tmp_path / "serve-1.log", tmp_path / "serve-2.log"]
    process = start_serve(args, logs[0])
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http, \
                AsyncClient(url, **FAST) as client, \
                watching(client, task_ids, transport="sse") as sse, \
                watching(client, task_ids, transport="ws") as ws, \
                watching(client, task_ids, transport="poll") as poll:
            watchers = [sse, ws, poll]
            await wait_until_answering(http, process, logs[0], "/readyz", BOUND_S)
            for watcher in watchers:
                await watcher.following()
            await step(producer, task_ids, 30)
            process.kill()
            process.wait(10)
            await step(producer, task_ids, 50)
            process = start_serve(args, logs[1])
            await wait_until_answering(http, process, logs[1], "/readyz", BOUND_S)
            finals = await drive(producer, task_ids, steps=(70,))
            for watcher in watchers:
                assert watch_problems(await watcher.result(), finals) == []
    finally:
        kill(process, 10)


# -- 3. Redis restarted mid-watch ----------------------------------------------------------------


async def retrying(change: Callable[[], Awaitable[Task]]) -> Task:
    """A producer call, again while Redis is coming back (StoreUnavailable)."""
    async with asyncio.timeout(BOUND_S):
        while True:
            try:
                return await change()
            except StoreUnavailable:
                await asyncio.sleep(0.1)


def complete(producer: Producer, task_id: int) -> Callable[[], Awaitable[Task]]:
    return lambda: producer.complete(task_id, image_url=f"https://cdn.example/{task_id}.png",
                                     image_base64=PNG)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_watch_ends_with_the_terminal_state_across_a_redis_restart(
    own_redis: RedisServer, prefix: str, transport: Transport
) -> None:
    """Redis stops (SIGTERM, no persistence) and starts again; its records come back (read
    just before, written back with plain HSETs at a higher version before the gateway can look,
    as persistence or a replica would) and the tasks finish after the restart."""
    settings = Settings(redis_url=own_redis.url, prefix=prefix, sse_retry_ms=100
                        ).with_changes(**FAST_GATEWAY)
    async with run_gateway(settings) as gateway, producer_on(own_redis, prefix) as producer:
        task_ids = await create(producer, 2)
        async with AsyncClient(gateway.url, **FAST) as client, \
                watching(client, task_ids, transport=transport) as watcher:
            await watcher.following()
            await step(producer, task_ids, 30)
            records = snapshot(own_redis, prefix, task_ids)
            own_redis.stop()
            await asyncio.sleep(1.0)  # the outage
            own_redis.start()
            restore(own_redis, prefix, records, version_bump=10)
            finals = {task_id: await retrying(complete(producer, task_id))
                      for task_id in task_ids}
            states = await watcher.result()
    assert watch_problems(states, finals) == []
    assert all(final.version > 10 for final in finals.values())


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_watch_ends_with_the_terminal_state_of_records_created_again_after_redis_lost_them(
    own_redis: RedisServer, prefix: str, transport: Transport
) -> None:
    """Redis restarts empty and the workers create their tasks again (version 1) and finish
    them (version 2), below the versions the watch has seen: the module's guarantee ("the
    terminal state always arrives") holds, older non-terminal states are not yielded."""
    settings = Settings(redis_url=own_redis.url, prefix=prefix, sse_retry_ms=100
                        ).with_changes(**FAST_GATEWAY)
    async with run_gateway(settings) as gateway, producer_on(own_redis, prefix) as producer:
        task_ids = await create(producer, 2)
        async with AsyncClient(gateway.url, **FAST) as client, \
                watching(client, task_ids, transport=transport) as watcher:
            await watcher.following()
            await step(producer, task_ids, 30)
            await step(producer, task_ids, 40)
            await until(lambda: watcher.seen(lambda state: state.progress == 40)
                        == set(task_ids), "progress 40 of every task", watcher.task)
            own_redis.stop()
            await asyncio.sleep(1.0)  # the outage
            own_redis.start()
            # Blocking calls: the gateway cannot look in between and find no record (that case
            # ends the watch with TaskNotFound, as the contract says).
            redis = connect_sync(own_redis.url)
            try:
                again = SyncProducer(redis, prefix=prefix)
                assert [again.create(task_id=task_id).version for task_id in task_ids] == [1, 1]
            finally:
                redis.close()
            finals = {task_id: await retrying(complete(producer, task_id))
                      for task_id in task_ids}
            states = await watcher.result()
    assert watch_problems(states, finals, records_lost=True) == []
    for seen in by_task(states).values():
        assert seen[-1].version == 2 and seen[-2].version == 3, seen


# -- 4. a proxy that buffers the SSE body --------------------------------------------------------


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()


async def _body(reader: asyncio.StreamReader, status: int, head: bytes) -> AsyncIterator[bytes]:
    """The pieces of one HTTP/1.1 response body (`head` in lower case)."""
    if status in (204, 304) or status < 200:
        return
    if b"\r\ntransfer-encoding: chunked" in head:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            yield size_line + await reader.readexactly(size + 2)
            if size == 0:
                return
    length = re.search(rb"\r\ncontent-length: *(\d+)", head)
    if length:
        yield await reader.readexactly(int(length[1]))
        return
    while data := await reader.read(65536):
        yield data


class BufferingProxy:
    """An HTTP/1.1 relay in front of the gateway that, like a proxy with response buffering on
    (and deaf to `X-Accel-Buffering: no`), passes every response through except an event
    stream's body, which it holds back until that body has ended (the last chunk). With
    `hold_head`, the event stream's status line and headers wait too. With `refuse_websockets`,
    upgrade requests get a 400, as from a proxy that does not do WebSocket. `paths` lists the
    requests' paths in order; `held` counts the event streams it held back."""

    def __init__(self, target_port: int, *, hold_head: bool = False,
                 refuse_websockets: bool = False) -> None:
        self.target_port = target_port
        self.hold_head = hold_head
        self.refuse_websockets = refuse_websockets
        self.paths: list[str] = []
        self.held = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def requests(self, path_prefix: str) -> int:
        return sum(path.startswith(path_prefix) for path in self.paths)

    async def __aenter__(self) -> BufferingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # the pumps see the end and the links finish
            writer.close()
        async with asyncio.timeout(BOUND_S):
            await asyncio.gather(*self._links, return_exceptions=True)
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = asyncio.current_task()
        assert link is not None
        self._links.add(link)
        self._writers.add(writer)
        pumps: list[asyncio.Task[None]] = []
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            pumps = [asyncio.create_task(self._requests(reader, up_writer, writer)),
                     asyncio.create_task(self._responses(up_reader, writer))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for end in (writer, up_writer):
                if end is not None:
                    end.close()
                    self._writers.discard(end)
            self._links.discard(link)

    async def _requests(self, client: asyncio.StreamReader, upstream: asyncio.StreamWriter,
                        answer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await client.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            self.paths.append(head.split(b" ", 2)[1].decode())
            upgrade = b"\r\nupgrade: websocket" in head.lower()
            if upgrade and self.refuse_websockets:
                answer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
                await answer.drain()
                return
            upstream.write(head)  # GETs only: no request body
            await upstream.drain()
            if upgrade:
                await _pipe(client, upstream)
                return

    async def _responses(self, upstream: asyncio.StreamReader,
                         client: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await upstream.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            status, lower = int(head.split(b" ", 2)[1]), head.lower()
            if status == 101:
                client.write(head)
                await _pipe(upstream, client)
                return
            stream = b"\r\ncontent-type: text/event-stream" in lower
            held = [head] if stream and self.hold_head else []
            if not held:
                client.write(head)
            self.held += stream
            async for piece in _body(upstream, status, lower):
                if stream:
                    held.append(piece)
                else:
                    client.write(piece)
                    await client.drain()
            if stream:
                client.write(b"".join(held))
            await client.drain()


@pytest.mark.parametrize("refuse_websockets", [False, True], ids=["to-ws", "to-poll"])
async def test_auto_falls_back_when_a_proxy_buffers_the_event_stream(
    gateway: Gateway, producer: Producer, refuse_websockets: bool
) -> None:
    """No first event within first_event_timeout_s: "auto" moves on to the WebSocket (or, when
    the proxy refuses upgrades, to polling) and the watch completes through the proxy."""
    task_ids = await create(producer, 2)
    async with BufferingProxy(gateway.port, refuse_websockets=refuse_websockets) as proxy, \
            AsyncClient(proxy.url, first_event_timeout_s=0.5, **FAST) as client, \
            watching(client, task_ids, transport="auto") as watcher:
        await watcher.following()
        finals = await drive(producer, task_ids)
        states = await watcher.result()
    assert watch_problems(states, finals) == []
    assert proxy.paths[0].startswith("/events?") and proxy.held >= 1
    assert proxy.requests("/ws") == 1
    if refuse_websockets:
        assert proxy.requests("/tasks/") > 0
    else:
        assert proxy.requests("/tasks/") == 0


async def test_auto_falls_back_when_a_proxy_holds_the_whole_event_stream_response(
    gateway: Gateway, producer: Producer
) -> None:
    """A proxy that holds back the event stream's headers too (it answers nothing until the
    body has ended) is no first state within first_event_timeout_s all the same."""
    task_ids = await create(producer, 2)
    async with BufferingProxy(gateway.port, hold_head=True) as proxy, \
            AsyncClient(proxy.url, first_event_timeout_s=0.5, **FAST) as client, \
            watching(client, task_ids, transport="auto") as watcher:
        await watcher.following(bound_s=5)
        finals = await drive(producer, task_ids)
        states = await watcher.result()
    assert watch_problems(states, finals) == []
    assert proxy.requests("/ws") == 1


async def test_forced_sse_behind_a_buffering_proxy_keeps_retrying_then_ends_with_the_tasks(
    gateway: Gateway, producer: Producer
) -> None:
    """transport="sse" has nothing to fall back to. It does not hang on one held stream: each
    attempt gives up after first_event_timeout_s and it connects again (the gateway answers,
    so give_up_after_s does not end it). Nothing gets through while the tasks run; once they
    have ended, the gateway's stream of them ends at once, the proxy lets it through whole,
    and the watch ends with every terminal state."""
    task_ids = await create(producer, 2)
    async with BufferingProxy(gateway.port) as proxy, \
            AsyncClient(proxy.url, first_event_timeout_s=0.3, **{**FAST, "give_up_after_s": 1.0}
                        ) as client, \
            watching(client, task_ids, transport="sse") as watcher:
        await step(producer, task_ids, 30)
        await until(lambda: proxy.requests("/events") >= 4, "four attempts", watcher.task)
        assert watcher.states == [] and proxy.paths == ["/events?" + "&".join(
            f"task_id={task_id}" for task_id in task_ids)] * len(proxy.paths)
        finals = await drive(producer, task_ids, steps=(60,))
        states = await watcher.result()
    assert watch_problems(states, finals) == []


# -- 5. unknown tasks, no gateway, tokens --------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_task_raises_task_not_found(gateway: Gateway, producer: Producer,
                                                  transport: Transport) -> None:
    [known] = await create(producer, 1)
    unknown = known + 1_000_000
    async with AsyncClient(gateway.url, **FAST) as client:
        with pytest.raises(TaskNotFound) as alone:
            await drain(client.watch([unknown], transport=transport))
        assert alone.value.task_id == unknown
        with pytest.raises(TaskNotFound) as among:
            await drain(client.watch([known, unknown], transport=transport))
        assert among.value.task_id == unknown
        with pytest.raises(TaskNotFound) as by_get:
            await client.get(unknown)
        assert by_get.value.task_id == unknown


async def test_bad_arguments_raise_value_error_before_any_request() -> None:
    """Nothing listens at that address: an error other than ValueError would mean a request."""
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", give_up_after_s=0.5) as client:
        with pytest.raises(ValueError, match="transport"):
            await drain(client.watch([1], transport="pigeon"))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await drain(client.watch([1, -2]))
        with pytest.raises(ValueError):
            await client.get(2**63)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_nothing_listening_raises_gateway_unreachable(transport: Transport) -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", give_up_after_s=0.5,
                           min_backoff_s=0.05, max_backoff_s=0.1) as client:
        with pytest.raises(GatewayUnreachable):
            await drain(client.watch([1, 2], transport=transport))
        with pytest.raises(GatewayUnreachable):
            async with asyncio.timeout(BOUND_S):
                await client.get(1)


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A listener that accepts connections and reads, but never answers: a hung gateway (a
    stopped process, a black-holed route behind a proxy)."""
    readers: list[asyncio.Task[Any]] = []
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        readers.append(task)
        writers.append(writer)
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        async with asyncio.timeout(BOUND_S):
            await asyncio.gather(*readers, return_exceptions=True)
            await server.wait_closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_gateway_that_never_answers_raises_gateway_unreachable(
    transport: Transport
) -> None:
    """GatewayUnreachable is "no answer from the gateway for give_up_after_s": that includes
    a gateway that accepts the connection and then says nothing."""
    async with silent_server() as url, \
            AsyncClient(url, timeout_s=0.5, first_event_timeout_s=0.5, give_up_after_s=1.0,
                        min_backoff_s=0.05, max_backoff_s=0.1) as client:
        with pytest.raises(GatewayUnreachable):
            async with asyncio.timeout(3):
                await drain(client.watch([1], transport=transport))


async def test_get_from_a_gateway_that_never_answers_raises_gateway_unreachable() -> None:
    async with silent_server() as url, \
            AsyncClient(url, timeout_s=0.5, give_up_after_s=1.0, min_backoff_s=0.05,
                        max_backoff_s=0.1) as client:
        with pytest.raises(GatewayUnreachable):
            async with asyncio.timeout(3):
                await client.get(1)


@pytest.fixture
async def keyed_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """A gateway that wants tokens, with no leeway on `exp` (tokens here live 1-2 s)."""
    keyed = settings.with_changes(jwt_secret=SECRET, jwt_leeway_s=0, sse_retry_ms=100)
    async with run_gateway(keyed) as gateway:
        yield gateway


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_expired_token_is_renewed_by_the_callable_and_the_watch_goes_on(
    keyed_gateway: Gateway, producer: Producer, transport: Transport
) -> None:
    """Tokens that live 1-2 s: the gateway ends the stream (token_expired), closes the socket
    (4401) or answers 401, the client calls the token function again and resumes. "auto"
    gets an async token function."""
    task_ids = await create(producer, 2)
    issued: list[str] = []

    def fresh() -> str:
        issued.append(issue(SECRET, task_ids, ttl_s=1))
        return issued[-1]

    async def fresh_async() -> str:
        return fresh()

    token = fresh_async if transport == "auto" else fresh
    async with AsyncClient(keyed_gateway.url, token=token, **FAST) as client, \
            watching(client, task_ids, transport=transport) as watcher:
        await watcher.following()
        await until(lambda: len(issued) >= 2, "a second token", watcher.task)
        finals = await drive(producer, task_ids, steps=(30,))
        states = await watcher.result()
    assert watch_problems(states, finals) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_string_token_raises_access_refused_401(
    keyed_gateway: Gateway, producer: Producer, transport: Transport
) -> None:
    task_ids = await create(producer, 1)
    for token in (issue(OTHER_SECRET, task_ids, ttl_s=60), None):  # badly signed; none at all
        async with AsyncClient(keyed_gateway.url, token=token, **FAST) as client:
            with pytest.raises(AccessRefused) as refused:
                await drain(client.watch(task_ids, transport=transport))
            assert refused.value.status == 401
            with pytest.raises(AccessRefused) as by_get:
                await client.get(task_ids[0])
            assert by_get.value.status == 401


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_token_callable_whose_tokens_are_all_refused_raises_access_refused_401(
    keyed_gateway: Gateway, producer: Producer, transport: Transport
) -> None:
    """AccessRefused(401) is "refused, and a new token did not help": a function that only
    ever returns refused tokens must end the watch, after a few calls, not spin."""
    task_ids = await create(producer, 1)
    calls: list[str] = []

    def bad() -> str:
        calls.append(issue(OTHER_SECRET, task_ids, ttl_s=60))
        return calls[-1]

    refused: AccessRefused | None = None
    async with AsyncClient(keyed_gateway.url, token=bad, **FAST) as client:
        try:
            async with asyncio.timeout(3):
                await drain(client.watch(task_ids, transport=transport))
        except AccessRefused as exc:
            refused = exc
        except TimeoutError:
            pass
    assert refused is not None and refused.status == 401, (
        f"no AccessRefused in 3 s; the token function was called {len(calls)} times")
    assert 2 <= len(calls) <= 5, len(calls)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_token_not_naming_the_task_raises_access_refused_403(
    keyed_gateway: Gateway, producer: Producer, transport: Transport
) -> None:
    named, other = await create(producer, 2)
    async with AsyncClient(keyed_gateway.url, token=issue(SECRET, [named], ttl_s=60),
                           **FAST) as client:
        for task_ids in ([other], [named, other]):
            with pytest.raises(AccessRefused) as refused:
                await drain(client.watch(task_ids, transport=transport))
            assert refused.value.status == 403 and other in refused.value.task_ids
        with pytest.raises(AccessRefused) as by_get:
            await client.get(other)
        assert (by_get.value.status, by_get.value.task_ids) == (403, [other])
        assert (await client.get(named)).task_id == named  # the token itself is good

