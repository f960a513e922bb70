"""How SSE connections end. The response says `Connection: close`; the server closes every
connection itself once its stream is over, after the deliveries of the moment (DeferredCloser in
streams.py); and an HTTP client that pools connections is never handed one that is about to be
closed. The raw clients here never close first: the EOF they wait for is the server's close."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from taskcast.delivery import DeferredCloser
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import (
    Gateway,
    RedisServer,
    free_port,
    kill,
    loopback_connections,
    run_gateway,
    start_serve,
    wait_until_answering,
)
from tests.sse_client import read_stream, stream_problems

BOUND_S = 20  # only against hangs


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """uvicorn would close an idle connection after its keep-alive timeout (5 s by default);
    set far beyond BOUND_S here, only the gateway's own close can end these connections."""
    async with run_gateway(settings, timeout_keep_alive=3600) as running:
        yield running


async def open_stream(port: int, path: str, connection: str | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Connection: {connection}\r\n" if connection else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Accept: text/event-stream\r\n{extra}\r\n".encode())
    return reader, writer


async def read_head(reader: asyncio.StreamReader) -> str:
    async with asyncio.timeout(BOUND_S):
        return (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()


async def until_server_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                              ) -> bytes:
    """The rest of what the server sends, up to its close."""
    try:
        async with asyncio.timeout(BOUND_S):
            return await reader.read()  # up to EOF; this side never closes or half-closes
    finally:
        writer.close()


def task_states(body: bytes) -> list[dict[str, object]]:
    return [json.loads(line[len(b"data: "):]) for line in body.split(b"\n")
            if line.startswith(b"data: {")]


def assert_stream_head(head: str) -> None:
    assert head.startswith("http/1.1 200")
    assert "\r\nconnection: close\r\n" in head
    assert "\r\ntransfer-encoding: chunked\r\n" in head


def assert_ends_with_terminal(body: bytes, task_id: int, status: str) -> None:
    assert body.endswith(b"\r\n0\r\n\r\n"), body[-80:]  # the body ended, then the close
    states = task_states(body)
    assert states and states[-1]["task_id"] == task_id and states[-1]["status"] == status


@pytest.mark.parametrize("connection", [None, "keep-alive", "close"])
async def test_server_closes_the_connection_of_a_finished_stream(
    gateway: Gateway, producer: Producer, connection: str | None
) -> None:
    task = await producer.create()
    await producer.complete(task.task_id, image_url="https://cdn.example/x.png")

    reader, writer = await open_stream(gateway.port, f"/tasks/{task.task_id}/events",
                                       connection)

    assert_stream_head(await read_head(reader))
    assert_ends_with_terminal(await until_server_closes(reader, writer), task.task_id,
                              "completed")


async def test_many_streams_ending_together_are_all_closed_by_the_server(
    gateway: Gateway, producer: Producer
) -> None:
    tasks = [await producer.create() for _ in range(30)]
    streams = [await open_stream(gateway.port, f"/tasks/{tasks[i % 30].task_id}/events")
               for i in range(300)]
    for reader, _ in streams:  # the head comes once the stream watches its task
        assert_stream_head(await read_head(reader))

    await asyncio.gather(*(producer.fail(task.task_id, "out of memory") for task in tasks))
    bodies = await asyncio.gather(*(until_server_closes(*stream) for stream in streams))

    for i, body in enumerate(bodies):
        assert_ends_with_terminal(body, tasks[i % 30].task_id, "failed")
    assert len(gateway.app.state.connections.closer) == 0


async def test_a_pooling_client_gets_a_fresh_connection_after_a_stream(
    gateway: Gateway, producer: Producer
) -> None:
    """Without `Connection: close` a pool would send its next request over the finished stream's
    connection, which the server no longer reads and is about to close."""
    task = await producer.create()
    await producer.complete(task.task_id, image_url="https://cdn.example/x.png")
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=gateway.url, limits=one_connection,
                                 timeout=BOUND_S) as client:
        for _ in range(5):
            transcript = await read_stream(client, f"/tasks/{task.task_id}/events",
                                           timeout=BOUND_S)
            assert stream_problems(transcript, [task.task_id]) == []
            for _ in range(3):
                response = await client.get(f"/tasks/{task.task_id}")
                assert response.status_code == 200
                assert response.json()["data"]["status"] == "completed"
            assert transcript.headers is not None
            assert transcript.headers["connection"] == "close"


# --- the same under `taskcast serve` (uvloop, httptools), as deployed --------------------------


@pytest.fixture
def serve_log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "serve.log"


@pytest.fixture
async def served_port(redis_server: RedisServer, prefix: str, serve_log: Path
                      ) -> AsyncIterator[int]:
    port = free_port()
    process = start_serve(["--port", str(port), "--redis-url", redis_server.url,
                           "--prefix", prefix], serve_log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_until_answering(client, process, serve_log, "/healthz", BOUND_S)
        yield port
    finally:
        kill(process, BOUND_S)


async def test_taskcast_serve_closes_finished_streams_itself(
    served_port: int, producer: Producer, serve_log: Path
) -> None:
    live = await producer.create()
    done = await producer.create()
    await producer.complete(done.task_id, image_url="https://cdn.example/x.png")
    live_reader, live_writer = await open_stream(served_port, f"/tasks/{live.task_id}/events")
    assert_stream_head(await read_head(live_reader))

    reader, writer = await open_stream(served_port, f"/tasks/{done.task_id}/events")
    assert_stream_head(await read_head(reader))
    assert_ends_with_terminal(await until_server_closes(reader, writer), done.task_id,
                              "completed")

    await producer.progress(live.task_id, 40)
    await producer.fail(live.task_id, "worker lost")
    body = await until_server_closes(live_reader, live_writer)
    assert_ends_with_terminal(body, live.task_id, "failed")
    assert [state["progress"] for state in task_states(body)][:2] == [0, 40]
    assert "Traceback" not in serve_log.read_text(errors="replace")


# --- DeferredCloser on its own, over real sockets --------------------------------------------


@pytest.fixture
async def connections() -> AsyncIterator[list[asyncio.Transport]]:
    """Server-side transports of five real loopback connections."""
    async with loopback_connections(5, BOUND_S) as pairs:
        yield [transport for transport, _ in pairs]


@asynccontextmanager
async def running(closer: DeferredCloser) -> AsyncIterator[DeferredCloser]:
    runner = asyncio.create_task(closer.run())
    try:
        yield closer
    finally:
        runner.cancel()


async def test_closer_closes_what_waited_too_long_even_without_a_budget(
    connections: list[asyncio.Transport]
) -> None:
    async with running(DeferredCloser(per_tick=0, tick_s=0.01, max_delay_s=0.05)) as closer:
        for transport in connections:
            closer.add(transport)
        async with asyncio.timeout(BOUND_S):
            while not all(transport.is_closing() for transport in connections):
                await asyncio.sleep(0.01)
        assert len(closer) == 0


async def test_closer_keeps_connections_while_it_has_no_budget_and_no_deadline(
    connections: list[asyncio.Transport]
) -> None:
    async with running(DeferredCloser(per_tick=0, tick_s=0.01, max_delay_s=3600)) as closer:
        for transport in connections:
            closer.add(transport)
        await asyncio.sleep(0.1)  # ten ticks
        assert len(closer) == 5 and not any(t.is_closing() for t in connections)
        closer.close_all()  # shutdown: everything at once, and from now on at once
        assert len(closer) == 0 and all(t.is_closing() for t in connections)


async def test_closer_after_shutdown_closes_at_once_and_skips_closed_ones(
    connections: list[asyncio.Transport]
) -> None:
    closer = DeferredCloser()
    connections[0].close()
    closer.add(connections[0])
    assert len(closer) == 0
    closer.close_all()
    closer.add(connections[1])
    assert connections[1].is_closing() and len(closer) == 0
    assert not connections[2].is_closing()

