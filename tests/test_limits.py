"""Per-process limits (issue 12, item 6): TASKCAST_MAX_CONNECTIONS refuses task reads beyond it
(503 with Retry-After, or a WebSocket close 1013) and never the service endpoints;
TASKCAST_MAX_STREAM_S ends SSE streams cleanly (the client resumes with Last-Event-ID) and
closes WebSockets with 1012. Real redis-server, uvicorn, HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import run_gateway
from tests.sse_client import Follower, read_stream
from tests.test_ws import ws_connect

BOUND_S = 10.0
BUSY = {"code": 503, "msg": "server busy", "data": None}


async def close_code(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(BOUND_S):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


async def test_task_reads_beyond_max_connections_are_refused_and_room_comes_back(
    settings: Settings, producer: Producer
) -> None:
    task = await producer.create()
    async with run_gateway(settings.with_changes(max_connections=2)) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        streams = [Follower(http, f"/tasks/{task.task_id}/events").start() for _ in range(2)]
        async with asyncio.timeout(BOUND_S):
            while not all(stream.transcript.tasks() for stream in streams):
                await asyncio.sleep(0.02)

        for path in (f"/tasks/{task.task_id}", f"/tasks/{task.task_id}/events",
                     f"/events?task_id={task.task_id}"):
            refused = await http.get(path)
            assert refused.status_code == 503, (path, refused.text)
            assert refused.json() == BUSY
            assert refused.headers["retry-after"] == "5"
        for path in ("/ws", f"/tasks/{task.task_id}/ws"):
            async with ws_connect(gateway, path) as ws:
                assert await close_code(ws) == (1013, "server busy: try again later")
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/taskcast.js"):
            assert (await http.get(path)).status_code == 200, path

        await streams[0].stop()
        async with asyncio.timeout(BOUND_S):  # the gateway notices the stream is gone
            while (await http.get(f"/tasks/{task.task_id}")).status_code != 200:
                await asyncio.sleep(0.05)
        await streams[1].stop()


async def test_no_cap_when_max_connections_is_0(settings: Settings, producer: Producer) -> None:
    task = await producer.create()
    async with run_gateway(settings.with_changes(max_connections=0)) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        streams = [Follower(http, f"/tasks/{task.task_id}/events").start() for _ in range(3)]
        try:
            assert (await http.get(f"/tasks/{task.task_id}")).status_code == 200
        finally:
            for stream in streams:
                await stream.stop()


async def test_an_sse_stream_past_max_stream_s_ends_cleanly_and_resumes(
    settings: Settings, producer: Producer
) -> None:
    task = await producer.create()
    async with run_gateway(settings.with_changes(max_stream_s=1.0)) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        first = await read_stream(http, f"/tasks/{task.task_id}/events", timeout=BOUND_S)
        assert first.status == 200 and first.ended, first.summary()
        assert [state["version"] for state in first.tasks()] == [1]
        assert all(frame.event is None for frame in first.frames)  # no end or error event

        await producer.progress(task.task_id, 50)
        resumed = await read_stream(http, f"/tasks/{task.task_id}/events", timeout=BOUND_S,
                                    headers={"Last-Event-ID": first.frames[-1].id or ""})
        assert [state["version"] for state in resumed.tasks()] == [2]  # only what is newer

        many = await read_stream(http, f"/events?task_id={task.task_id}", timeout=BOUND_S)
        assert many.ended and [frame.event for frame in many.frames if frame.event] == []


async def test_websockets_past_max_stream_s_close_with_1012(
    settings: Settings, producer: Producer
) -> None:
    task = await producer.create()
    async with run_gateway(settings.with_changes(max_stream_s=1.0)) as gateway:
        async with ws_connect(gateway, "/ws") as many, \
                ws_connect(gateway, f"/tasks/{task.task_id}/ws") as one:
            await many.send(orjson.dumps({"op": "subscribe", "task_ids": [task.task_id]}))
            for ws in (many, one):
                assert await close_code(ws) == (1012, "connection lifetime reached: reconnect")
