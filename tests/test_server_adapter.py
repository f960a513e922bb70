"""The server adapter (server.py) against the real uvicorn it is pinned to.

What the gateway relies on, checked on real connections: HttpLink's direct chunk writes, its
idle check, the disconnect flag, the close take-over and abort, its whole-response write
(respond: pipelining, Connection: close, what it leaves to ASGI); the shutdown notice; and the
start-up check, whose other side is pinned too: under a uvicorn without taskcast's protocol
classes the gateway warns once, says so in /metrics, and still serves every transport."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect as ws_connect

from taskcast import server
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, run_gateway
from tests.sse_client import read_metric, read_stream, stream_problems

BOUND_S = 20  # only against hangs
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


@asynccontextmanager
async def serving(app: ASGIApp, **options: Any) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    """`app` under uvicorn with taskcast's options (protocol classes included), on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server.uvicorn_config(app, Settings(), **{"log_level": "warning", **options})
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(BOUND_S):
            while not instance.started:
                assert not task.done(), "uvicorn stopped during start-up"
                await asyncio.sleep(0.01)
        yield instance, port
    finally:
        instance.should_exit = True
        async with asyncio.timeout(BOUND_S):
            await task
        sock.close()


class LinkApp:
    """An ASGI app that answers `GET /` with a chunked response head and hands its HttpLink
    to the test (the lifespan records the server support the adapter finds)."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[server.HttpLink | None] = asyncio.Queue()
        self.release = asyncio.Event()
        self.ended_directly = False  # the test ended the body with HttpLink.end_now
        self.support: server.ServerSupport | None = None
        self.shutdowns = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.support = server.server_support(send)
            server.on_server_shutdown(scope, self._shutdown)
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"connection", b"close")]})
        link = server.http_link(send)
        if link is not None:
            link.keep_open_after_body()
        await self.links.put(link)
        await self.release.wait()
        if not self.ended_directly:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _shutdown(self) -> None:
        self.shutdowns += 1
        self.release.set()


async def raw_get(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
    async with asyncio.timeout(BOUND_S):
        await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def test_the_adapter_finds_everything_it_needs_in_taskcasts_uvicorn_setup() -> None:
    app = LinkApp()
    async with serving(app):
        assert app.support is not None
        assert app.support.problems == ()
        assert app.support.features() == dict.fromkeys(server.FEATURES, True)


@pytest.mark.parametrize(("options", "missing"), [
    ({"http": "h11"}, {"direct_http_writes", "shutdown_notice"}),
    ({"http": "httptools"}, {"direct_http_writes", "shutdown_notice"}),
    ({"ws": "websockets-sansio"}, {"websocket_protocol"}),
])
async def test_a_uvicorn_with_other_protocol_classes_is_reported_feature_by_feature(
    options: dict[str, str], missing: set[str]
) -> None:
    app = LinkApp()
    async with serving(app, **options):
        assert app.support is not None
        off = {name for name, available in app.support.features().items() if not available}
        assert off == missing
        assert len(app.support.problems) == 1


async def test_a_server_that_is_not_uvicorn_is_reported_as_unknown() -> None:
    async def send(message: Any) -> None:  # no uvicorn configuration behind it
        pass

    support = server.server_support(send)
    assert support.server == "unknown" and not any(support.features().values())


async def test_a_direct_write_is_one_http_chunk_on_the_wire() -> None:
    app = LinkApp()
    async with serving(app) as (_, port):
        reader, writer = await raw_get(port)
        link = await app.links.get()
        assert link is not None and link.writable
        data = b"id: 3\ndata: {}\n\n"
        assert link.write_if_idle(server.http_chunk(data))
        link.write([server.http_chunk(b"a"), server.http_chunk(b"bc")])
        expected = b"%x\r\n%b\r\n" % (len(data), data) + b"1\r\na\r\n2\r\nbc\r\n"
        async with asyncio.timeout(BOUND_S):
            assert await reader.readexactly(len(expected)) == expected
        app.release.set()
        writer.close()


async def test_end_now_writes_the_last_chunk_and_the_end_of_the_body_at_once() -> None:
    app = LinkApp()
    async with serving(app) as (_, port):
        reader, writer = await raw_get(port)
        link = await app.links.get()
        assert link is not None
        assert link.end_now(b"last")  # done when it returns: no await in between
        app.ended_directly = True
        async with asyncio.timeout(BOUND_S):
            assert await reader.readuntil(b"0\r\n\r\n") == b"4\r\nlast\r\n0\r\n\r\n"
        assert not link.end_now(b"again")  # the response is complete
        app.release.set()
        link.transport.close()  # the connection was taken over: ours to close
        writer.close()


async def test_nothing_is_written_directly_while_bytes_wait_for_the_client() -> None:
    app = LinkApp()
    async with serving(app) as (_, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        link = await app.links.get()
        assert link is not None
        filler = server.http_chunk(b"x" * 1_000_000)
        async with asyncio.timeout(BOUND_S):
            while link.writable:  # the kernel's buffers fill up, then asyncio's
                link.write([filler])
                await asyncio.sleep(0)
        assert not link.write_if_idle(server.http_chunk(b"late"))
        assert not link.end_now(b"late")  # uvicorn's send would wait for the client
        link.abort()  # a slow client's buffered megabytes go at once
        async with asyncio.timeout(BOUND_S):
            while not link.disconnected:
                await asyncio.sleep(0.01)
        app.release.set()
        sock.close()


async def test_the_disconnect_flag_rises_when_the_client_leaves() -> None:
    app = LinkApp()
    async with serving(app) as (_, port):
        _, writer = await raw_get(port)
        link = await app.links.get()
        assert link is not None and not link.disconnected
        writer.close()
        async with asyncio.timeout(BOUND_S):
            while not link.disconnected:
                await asyncio.sleep(0.01)
        assert not link.writable
        app.release.set()


async def test_after_the_close_take_over_the_connection_outlives_its_body() -> None:
    app = LinkApp()
    async with serving(app) as (_, port):
        reader, writer = await raw_get(port)
        link = await app.links.get()
        assert link is not None
        app.release.set()  # the body ends ...
        async with asyncio.timeout(BOUND_S):
            assert await reader.readuntil(b"0\r\n\r\n")
        await asyncio.sleep(0.2)
        assert not link.transport.is_closing()  # ... and the connection is ours to close
        link.transport.close()
        async with asyncio.timeout(BOUND_S):
            assert await reader.read() == b""
        writer.close()


async def test_the_shutdown_notice_comes_before_uvicorn_waits_for_open_connections() -> None:
    app = LinkApp()
    async with serving(app, timeout_graceful_shutdown=30) as (instance, port):
        reader, writer = await raw_get(port)
        await app.links.get()
        instance.should_exit = True  # with an open response: uvicorn would wait 30 s
        async with asyncio.timeout(5):  # the notice ends it instead
            assert await reader.readuntil(b"0\r\n\r\n")
        assert app.shutdowns >= 1
        writer.close()


async def test_a_link_is_only_found_under_uvicorns_httptools_protocol() -> None:
    app = LinkApp()
    async with serving(app, http="h11") as (_, port):
        _, writer = await raw_get(port)
        assert await app.links.get() is None
        app.release.set()
        writer.close()


# -- the gateway on a uvicorn without taskcast's protocol classes ------------------------------


@asynccontextmanager
async def portable_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with run_gateway(settings, http="h11", ws="websockets-sansio") as gateway:
        yield gateway


async def test_without_the_fast_paths_the_gateway_warns_once_and_says_so_in_metrics(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskcast.app"):
        async with portable_gateway(settings) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
                for feature in server.FEATURES:
                    value = await read_metric(http, "taskcast_server_feature", feature=feature)
                    assert value == 0.0, feature
    warnings = [record for record in caplog.records if "slower plain-ASGI path" in record.message]
    assert len(warnings) == 1
    assert "h11_impl" in warnings[0].message
    assert "websockets_sansio_impl" in warnings[0].message


async def test_with_the_fast_paths_every_feature_is_1_in_metrics(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        for feature in server.FEATURES:
            assert await read_metric(http, "taskcast_server_feature", feature=feature) == 1.0


async def test_without_the_fast_paths_sse_and_websockets_still_deliver_everything(
    settings: Settings, producer: Producer
) -> None:
    first, second = await producer.create(), await producer.create()
    async with portable_gateway(settings) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http, \
                ws_connect(gateway.ws_url + "/ws", proxy=None) as many, \
                ws_connect(gateway.ws_url + f"/tasks/{first.task_id}/ws", proxy=None) as one:
            await many.send(f'{{"op":"subscribe","task_ids":[{first.task_id},'
                            f'{second.task_id}]}}')
            single = asyncio.create_task(read_stream(http, f"/tasks/{first.task_id}/events"))
            multi = asyncio.create_task(read_stream(
                http, f"/events?task_id={first.task_id},{second.task_id}"))
            await asyncio.sleep(0.2)
            for progress in (10, 50, 90):
                await producer.progress(first.task_id, progress)
                await producer.progress(second.task_id, progress)
            await producer.complete(first.task_id, image_url="https://cdn.example/1.png")
            await producer.fail(second.task_id, "out of memory")
            async with asyncio.timeout(BOUND_S):
                transcripts = await asyncio.gather(single, multi)
                frames = []
                while sum('"status":"completed"' in f or '"status":"failed"' in f
                          for f in frames) < 2:
                    frames.append(str(await many.recv()))
                per_task = []
                async for frame in one:
                    per_task.append(str(frame))
            assert one.close_code == 1000 and '"status":"completed"' in per_task[-1]
        assert stream_problems(transcripts[0], [first.task_id]) == []
        assert stream_problems(transcripts[1], [first.task_id, second.task_id], multi=True) == []


async def test_a_send_that_waits_after_all_is_reported_not_left_half_done() -> None:
    """end_now's promise rests on uvicorn's send not waiting when its flow control is not
    paused; if a uvicorn ever did, the caller gets FastPathBroken (and falls back to ASGI)
    instead of a send left suspended halfway."""
    finished = []

    async def waits() -> None:
        await asyncio.sleep(0)
        finished.append(True)

    with pytest.raises(server.FastPathBroken):
        server._run_now(waits())
    await asyncio.sleep(0.01)
    assert finished == []


class RespondApp:
    """An ASGI app that answers every request with HttpLink.respond when it can (a 200 with
    the path as body, or a 304 for /not-modified), else through ASGI's send; it records
    which way each request went."""

    def __init__(self) -> None:
        self.answered: list[tuple[str, str]] = []  # (path, "respond" | "asgi")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/not-modified":
            status, headers, body = 304, [(b"etag", b'"7"')], b""
        else:
            body = path.encode()
            status, headers = 200, [(b"content-length", str(len(body)).encode()),
                                    (b"content-type", b"text/plain")]
        link = server.http_link(send)
        if link is not None and link.respond(status, headers, body):
            assert not link.respond(status, headers, body)  # one response per request
            self.answered.append((path, "respond"))
            return
        self.answered.append((path, "asgi"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers and body (content-length bodies only) of one response."""
    async with asyncio.timeout(BOUND_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head[:-4].split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines)
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def test_respond_answers_pipelined_requests_whole_on_a_kept_connection() -> None:
    app = RespondApp()
    async with serving(app) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Three requests in one write: uvicorn starts each after the previous response
        # completed, which respond() must signal as its own send would.
        writer.write(b"GET /first HTTP/1.1\r\nhost: t\r\n\r\n"
                     b"GET /not-modified HTTP/1.1\r\nhost: t\r\n\r\n"
                     b"GET /third HTTP/1.1\r\nhost: t\r\n\r\n")
        answers = [await read_response(reader) for _ in range(3)]
        assert [(status, body) for status, _, body in answers] == [
            (b"HTTP/1.1 200 OK", b"/first"), (b"HTTP/1.1 304 Not Modified", b""),
            (b"HTTP/1.1 200 OK", b"/third")]
        for _, headers, _ in answers:
            assert headers[b"server"] == b"uvicorn" and b"date" in headers  # uvicorn's own
            assert b"connection" not in headers
        assert answers[1][1][b"etag"] == b'"7"'
        writer.write(b"GET /later HTTP/1.1\r\nhost: t\r\n\r\n")  # the connection stays open
        assert (await read_response(reader))[2] == b"/later"
        assert app.answered == [(path, "respond") for path in
                                ("/first", "/not-modified", "/third", "/later")]
        writer.close()


async def test_respond_honours_connection_close() -> None:
    app = RespondApp()
    async with serving(app) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /bye HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, body, headers[b"connection"]) == (b"HTTP/1.1 200 OK", b"/bye", b"close")
        async with asyncio.timeout(BOUND_S):
            assert await reader.read() == b""  # closed by the server
        assert app.answered == [("/bye", "respond")]
        writer.close()


@pytest.mark.parametrize(("method", "options"), [("HEAD", {}), ("GET", {"access_log": True})])
async def test_respond_leaves_head_requests_and_access_logging_to_asgi(
    method: str, options: dict[str, Any]
) -> None:
    """A HEAD's body must be dropped and an access log line written, both in uvicorn's send:
    respond() declines, and the ASGI path answers."""
    app = RespondApp()
    async with serving(app, **options) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{method} /path HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        async with asyncio.timeout(BOUND_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head
        if method == "GET":
            assert await reader.readexactly(5) == b"/path"
        assert app.answered == [("/path", "asgi")]
        writer.close()
