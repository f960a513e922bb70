"""RFC 6455 and ASGI conformance of taskcast's own WebSocket connection (websocket_protocol.py).

The connection runs behind a real uvicorn on a free port (bound to it by server.TaskcastWebSocket,
as the gateway runs it) and, where a limit only the standalone class takes is needed, on a bare
asyncio server. The applications are tiny ASGI apps defined here; the clients are the websockets
library (well-behaved) and RawClient (frames by hand, for the misbehaving cases).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from taskcast.server import TaskcastWebSocket, websocket_link
from taskcast.websocket_protocol import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ASGIApp,
    ClientDisconnected,
    Limits,
    Message,
    WebSocketConnection,
    frame,
    text_frame,
)

BOUND_S = 5.0
MAX_SIZE = 100_000  # ws_max_size of the servers here: 65536-byte messages fit, 100_001 do not
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NO_PINGS = Limits(max_size=MAX_SIZE, ping_interval=None, ping_timeout=None)

Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# -- applications ---------------------------------------------------------------------------------


async def echo_app(scope: Message, receive: Receive, send: Send) -> None:
    """Accept, then send every message back until the client goes."""
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        if message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": message["text"]})


async def close_before_accept_app(scope: Message, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "websocket.close", "code": 1008})


async def raise_before_accept_app(scope: Message, receive: Receive, send: Send) -> None:
    await receive()
    raise RuntimeError("the application fails before accepting")


async def return_without_accept_app(scope: Message, receive: Receive, send: Send) -> None:
    await receive()


class Probe:
    """An ASGI app for one connection that the test drives: it accepts (unless told not to),
    records everything receive() returns until websocket.disconnect (echoing messages if asked),
    and hands the test its scope, its ASGI `send` and the connection object under it."""

    def __init__(self, *, accept: bool = True, echo: bool = False, subprotocol: str | None = None,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.accept = accept
        self.echo = echo
        self.subprotocol = subprotocol
        self.headers = list(headers)
        self.scope: Message | None = None
        self.received: list[Message] = []
        self.started = asyncio.Event()
        self.accepted = asyncio.Event()
        self.ended = asyncio.Event()
        self._send: Send | None = None
        self.connection: WebSocketConnection | None = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.scope, self._send, self.connection = scope, send, websocket_link(send)
        self.received.append(await receive())
        self.started.set()
        if self.accept:
            await send({"type": "websocket.accept", "subprotocol": self.subprotocol,
                        "headers": self.headers})
            self.accepted.set()
        while True:
            message = await receive()
            self.received.append(message)
            if message["type"] == "websocket.disconnect":
                self.ended.set()
                return
            if self.echo:
                reply = {"type": "websocket.send", "bytes": message.get("bytes"),
                         "text": message.get("text")}
                with contextlib.suppress(OSError):
                    await send(reply)

    async def wait_accepted(self) -> WebSocketConnection:
        async with asyncio.timeout(BOUND_S):
            await self.accepted.wait()
        assert self.connection is not None, "the send callable is not a WebSocketConnection's"
        return self.connection

    async def wait_ended(self) -> Message:
        """The websocket.disconnect message receive() ended with."""
        async with asyncio.timeout(BOUND_S):
            await self.ended.wait()
        return self.received[-1]

    async def send(self, message: Message) -> None:
        assert self._send is not None
        async with asyncio.timeout(BOUND_S):
            await self._send(message)


ROUTES: dict[str, ASGIApp] = {"echo": echo_app}
_route_ids = itertools.count()


async def router(scope: Message, receive: Receive, send: Send) -> None:
    """The uvicorn servers' application: the first path segment names the test's app."""
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    app = ROUTES.get(scope["path"].split("/")[1])
    if app is None:
        await receive()
        await send({"type": "websocket.close"})
        return
    await app(scope, receive, send)


@pytest.fixture
def route() -> Iterator[Callable[[ASGIApp], str]]:
    """Register an app under a fresh path on every server of this module; returns the path."""
    names: list[str] = []

    def add(app: ASGIApp) -> str:
        name = f"r{next(_route_ids)}"
        ROUTES[name] = app
        names.append(name)
        return f"/{name}"

    yield add
    for name in names:
        ROUTES.pop(name, None)


# -- servers --------------------------------------------------------------------------------------


@dataclass
class Running:
    port: int
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None
    connections: set[Any] = field(default_factory=set)  # standalone: those still open

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def serve_uvicorn(**options: Any) -> AsyncIterator[Running]:
    """A real uvicorn on 127.0.0.1 serving `router` with TaskcastWebSocket, in this loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(router, ws=TaskcastWebSocket, http="httptools", lifespan="off",
                            log_level="warning", timeout_graceful_shutdown=2, **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(BOUND_S):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during start-up")
                await asyncio.sleep(0.01)
        yield Running(port=int(sock.getsockname()[1]), server=server, task=task)
    finally:
        server.should_exit = True
        async with asyncio.timeout(BOUND_S):
            await task
        sock.close()


@asynccontextmanager
async def serve_standalone(app: ASGIApp, limits: Limits = NO_PINGS,
                           app_state: dict[str, Any] | None = None) -> AsyncIterator[Running]:
    """The protocol class on a bare asyncio server, without uvicorn."""
    loop = asyncio.get_running_loop()
    connections: set[Any] = set()
    tasks: set[asyncio.Task[None]] = set()
    server = await loop.create_server(
        lambda: WebSocketConnection(app, limits=limits, app_state=app_state,
                                    connections=connections, tasks=tasks),
        "127.0.0.1", 0)
    try:
        yield Running(port=int(server.sockets[0].getsockname()[1]), connections=connections)
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(connections):
            connection.abort()
        await asyncio.sleep(0)
        await server.wait_closed()


@pytest.fixture(scope="module")
async def plain() -> AsyncIterator[Running]:
    """uvicorn without keep-alive pings."""
    async with serve_uvicorn(ws_max_size=MAX_SIZE, ws_ping_interval=None,
                             ws_ping_timeout=None) as running:
        yield running


@pytest.fixture(scope="module")
async def pinging() -> AsyncIterator[Running]:
    """uvicorn that pings every 0.2 s and wants the pong within 0.2 s."""
    async with serve_uvicorn(ws_max_size=MAX_SIZE, ws_ping_interval=0.2,
                             ws_ping_timeout=0.2) as running:
        yield running


def ws_client(url: str, **options: Any) -> Any:
    """The websockets library's client: no proxy, no size limit, no pings of its own."""
    options.setdefault("max_size", None)
    options.setdefault("ping_interval", None)
    return connect(url, proxy=None, open_timeout=BOUND_S, close_timeout=BOUND_S, **options)


async def bounded(awaitable: Awaitable[Any], bound_s: float = BOUND_S) -> Any:
    async with asyncio.timeout(bound_s):
        return await awaitable


async def wait_for(condition: Callable[[], bool], bound_s: float = BOUND_S) -> None:
    async with asyncio.timeout(bound_s):
        while not condition():
            await asyncio.sleep(0.01)


# -- a raw client ---------------------------------------------------------------------------------


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                 masked: bool = True) -> bytes:
    """A client frame with the shortest length encoding, masked unless told otherwise."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 65_536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask_bytes(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


@dataclass
class Response:
    status_line: str
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    head: bytes  # the header bytes as sent: first byte, length byte, extended length


class RawClient:
    """A WebSocket client on a bare TCP connection: requests and frames built by hand. With a
    small `rcvbuf` and no reads, the server's writes back up quickly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.key = ""

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, rcvbuf: int | None = None) -> AsyncIterator[RawClient]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            async with asyncio.timeout(BOUND_S):
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        client = cls(reader, writer)
        try:
            yield client
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(BOUND_S):
                    await writer.wait_closed()

    async def request(self, path: str = "/", *, headers: Mapping[str, str | None] | None = None,
                      lines: Sequence[str] = (), request_line: str | None = None) -> Response:
        """Send an opening handshake (the standard one, `headers` changing fields, None
        dropping one, `lines` added as they are) and read the server's answer."""
        self.key = base64.b64encode(os.urandom(16)).decode()
        fields: dict[str, str | None] = {
            "Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": self.key, "Sec-WebSocket-Version": "13", **(headers or {})}
        head = [request_line or f"GET {path} HTTP/1.1"]
        head += [f"{name}: {value}" for name, value in fields.items() if value is not None]
        head += [*lines, "", ""]
        await self.send("\r\n".join(head).encode("latin-1"))
        return await self.read_response()

    async def read_response(self) -> Response:
        async with asyncio.timeout(BOUND_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            status = int(status_line.split(" ")[1])
            body = b""
            if status != 101 and "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
        return Response(status_line, status, headers, body)

    async def handshake(self, path: str, **options: Any) -> Response:
        response = await self.request(path, **options)
        assert response.status == 101, response
        assert response.headers["sec-websocket-accept"] == accept_for(self.key), response
        return response

    async def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))
        async with asyncio.timeout(BOUND_S):
            await self.writer.drain()

    async def read_frame(self, bound_s: float = BOUND_S) -> Frame:
        async with asyncio.timeout(bound_s):
            head = await self.reader.readexactly(2)
            assert not head[1] & 0x80, "server frames are never masked"
            assert not head[0] & 0x70, "no extension: no reserved bits"
            size = head[1] & 0x7F
            if size == 126:
                extended = await self.reader.readexactly(2)
                size, head = struct.unpack("!H", extended)[0], head + extended
            elif size == 127:
                extended = await self.reader.readexactly(8)
                size, head = struct.unpack("!Q", extended)[0], head + extended
            payload = await self.reader.readexactly(size)
        return Frame(bool(head[0] & 0x80), head[0] & 0x0F, payload, head)

    async def read_close(self, bound_s: float = BOUND_S
                         ) -> tuple[int | None, bytes, list[Frame]]:
        """Read up to the server's close frame: (code, raw reason, the frames before it)."""
        before: list[Frame] = []
        async with asyncio.timeout(bound_s):
            while (received := await self.read_frame()).opcode != OP_CLOSE:
                before.append(received)
        payload = received.payload
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        return code, payload[2:], before

    async def read_eof(self, bound_s: float = BOUND_S) -> bytes:
        """Everything up to the end of the connection (an abort's reset counts as the end)."""
        async with asyncio.timeout(bound_s):
            try:
                return await self.reader.read()
            except ConnectionResetError:
                return b""

    async def reply_close(self, code: int = 1000) -> None:
        with contextlib.suppress(OSError):
            await self.send(client_frame(OP_CLOSE, close_payload(code)))


# -- the opening handshake ------------------------------------------------------------------------


async def test_the_handshake_answers_101_with_the_right_sec_websocket_accept(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        response = await client.request(route(probe))
        assert response.status_line.startswith("HTTP/1.1 101 "), response
        assert response.headers["sec-websocket-accept"] == accept_for(client.key)
        assert response.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in response.headers["connection"].lower()
        assert "sec-websocket-protocol" not in response.headers
        assert "sec-websocket-extensions" not in response.headers
        await probe.wait_accepted()
        await client.reply_close()
        code, _, _ = await client.read_close()
        assert code == 1000
        assert await client.read_eof() == b""


async def test_a_subprotocol_the_app_accepts_is_echoed(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe(subprotocol="chat.v2")
    async with ws_client(plain.url(route(probe)), subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "chat.v2"
    assert probe.scope is not None and probe.scope["subprotocols"] == ["chat.v1", "chat.v2"]


async def test_headers_the_app_adds_to_its_accept_are_sent(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe(headers=[(b"x-taskcast", b"yes"), (b"set-cookie", b"session=1")])
    async with ws_client(plain.url(route(probe))) as ws:
        assert ws.response.headers["X-Taskcast"] == "yes"
        assert ws.response.headers["Set-Cookie"] == "session=1"


async def test_no_extension_is_negotiated_when_the_client_offers_permessage_deflate(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    path = route(Probe(echo=True))
    async with ws_client(plain.url(path), compression="deflate") as ws:
        offered = ws.request.headers["Sec-WebSocket-Extensions"]
        assert "permessage-deflate" in offered
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []
        text = "compressible " * 1000
        await ws.send(text)
        assert await bounded(ws.recv()) == text  # uncompressed frames both ways
    async with RawClient.open(plain.port) as client:
        response = await client.handshake(path, headers={
            "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
        assert "sec-websocket-extensions" not in response.headers


@pytest.mark.parametrize("version", ["8", "12", "14"])
async def test_a_wrong_sec_websocket_version_gets_426_with_version_13(
    plain: Running, route: Callable[[ASGIApp], str], version: str
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        response = await client.request(route(probe), headers={"Sec-WebSocket-Version": version})
        assert response.status == 426, response
        assert response.headers["sec-websocket-version"] == "13"
        assert await client.read_eof() == b""
    assert probe.scope is None, "the app never sees a refused handshake"


@pytest.mark.parametrize("key", [
    None, "", "not base64 at all!", base64.b64encode(bytes(15)).decode(),
    base64.b64encode(bytes(17)).decode(), base64.b64encode(bytes(16)).decode().rstrip("="),
], ids=["missing", "empty", "not-base64", "15-bytes", "17-bytes", "no-padding"])
async def test_a_missing_or_malformed_key_gets_400(
    plain: Running, route: Callable[[ASGIApp], str], key: str | None
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        response = await client.request(route(probe), headers={"Sec-WebSocket-Key": key})
        assert response.status == 400, response
        assert await client.read_eof() == b""
    assert probe.scope is None


async def test_the_scope_describes_the_request(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    path = route(probe)
    url = plain.url(f"{path}/a%20b/caf%C3%A9?x=1&y=%20z")
    async with ws_client(url, subprotocols=["p1", "p2"],
                         additional_headers={"X-Custom": "Value"}) as ws:
        await probe.wait_accepted()
        client_address = ws.local_address[:2]
    scope = probe.scope
    assert scope is not None
    assert scope["type"] == "websocket"
    assert scope["asgi"]["version"] == "3.0"
    assert scope["http_version"] == "1.1"
    assert scope["scheme"] == "ws"
    assert scope["path"] == f"{path}/a b/café"
    assert scope["raw_path"] == f"{path}/a%20b/caf%C3%A9".encode()
    assert scope["query_string"] == b"x=1&y=%20z"
    assert scope["root_path"] == ""
    assert (b"x-custom", b"Value") in scope["headers"]
    assert all(name == name.lower() for name, _ in scope["headers"])
    assert dict(scope["headers"])[b"host"] == f"127.0.0.1:{plain.port}".encode()
    assert scope["subprotocols"] == ["p1", "p2"]
    assert scope["client"] == tuple(client_address)
    assert scope["server"] == ("127.0.0.1", plain.port)
    assert scope["state"] == {}


async def test_the_scope_state_is_a_copy_of_the_app_state() -> None:
    app_state: dict[str, Any] = {"shared": 1}
    probes = [Probe(), Probe()]
    apps = iter(probes)

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await next(apps)(scope, receive, send)

    async with serve_standalone(app, app_state=app_state) as running:
        for probe in probes:
            async with ws_client(running.url("/")):
                await probe.wait_accepted()
                assert probe.scope is not None
                assert probe.scope["state"] == {"shared": 1}
                probe.scope["state"]["mine"] = True
    assert app_state == {"shared": 1}
    assert probes[0].scope is not None and probes[1].scope is not None
    assert probes[0].scope["state"] is not probes[1].scope["state"]


# -- before accept --------------------------------------------------------------------------------


async def test_an_app_that_closes_before_accept_gets_http_403(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_client(plain.url(route(close_before_accept_app))):
            pass
    assert info.value.response.status_code == 403


async def test_an_app_that_raises_before_accept_gets_http_500(
    plain: Running, route: Callable[[ASGIApp], str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="taskcast.websocket_protocol"):
        with pytest.raises(InvalidStatus) as info:
            async with ws_client(plain.url(route(raise_before_accept_app))):
                pass
    assert info.value.response.status_code == 500
    assert any("Exception in ASGI application" in record.getMessage()
               for record in caplog.records)


async def test_an_app_that_returns_without_accepting_gets_http_500(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_client(plain.url(route(return_without_accept_app))):
            pass
    assert info.value.response.status_code == 500


async def test_an_app_that_never_accepts_keeps_the_handshake_pending_until_the_client_goes(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe(accept=False)
    path = route(probe)
    async with RawClient.open(plain.port) as client:
        await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          f"Sec-WebSocket-Key: {base64.b64encode(bytes(16)).decode()}\r\n\r\n"
                          .encode())
        async with asyncio.timeout(BOUND_S):
            await probe.started.wait()
        with pytest.raises(TimeoutError):  # no answer while the app decides
            async with asyncio.timeout(0.2):
                await client.reader.read(1)
    assert await probe.wait_ended() == {"type": "websocket.disconnect", "code": 1006,
                                        "reason": ""}
    assert [message["type"] for message in probe.received] == [
        "websocket.connect", "websocket.disconnect"]


# -- messages -------------------------------------------------------------------------------------


SIZES = [0, 1, 125, 126, 65_535, 65_536]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_text_and_binary_messages_are_echoed(plain: Running, kind: str, size: int) -> None:
    message: str | bytes = "é" * (size // 2) + "x" * (size % 2) if kind == "text" else (
        os.urandom(size))
    async with ws_client(plain.url("/echo")) as ws:
        await ws.send(message)
        assert await bounded(ws.recv()) == message


@pytest.mark.parametrize(("size", "encoding"), [
    (0, b"\x00"), (125, b"\x7d"), (126, b"\x7e\x00\x7e"), (65_535, b"\x7e\xff\xff"),
    (65_536, b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
async def test_each_payload_length_encoding_is_read_and_written(
    plain: Running, size: int, encoding: bytes
) -> None:
    payload = os.urandom(size)
    async with RawClient.open(plain.port) as client:
        await client.handshake("/echo")
        await client.send(client_frame(OP_BINARY, payload))
        echoed = await client.read_frame()
        assert echoed.head == bytes([0x80 | OP_BINARY]) + encoding
        assert (echoed.fin, echoed.payload) == (True, payload)


async def test_a_large_message_from_the_app_arrives_whole(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    data, text = os.urandom(3 << 20), "ü" * (1 << 20)
    async with ws_client(plain.url(route(probe))) as ws:
        await probe.wait_accepted()
        await probe.send({"type": "websocket.send", "bytes": data})
        await probe.send({"type": "websocket.send", "text": text})
        assert await bounded(ws.recv()) == data
        assert await bounded(ws.recv()) == text


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
async def test_a_fragmented_message_is_delivered_as_one(
    plain: Running, route: Callable[[ASGIApp], str], opcode: int
) -> None:
    probe = Probe(echo=True)
    whole = "Hello, wörld".encode()
    parts = [whole[:3], whole[3:8], b"", whole[8:9], whole[9:]]  # "ö" split between frames
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        await client.send(client_frame(opcode, parts[0], fin=False),
                          client_frame(OP_CONT, parts[1], fin=False),
                          client_frame(OP_PING, b"between"),  # control frames may interleave
                          client_frame(OP_CONT, parts[2], fin=False),
                          client_frame(OP_CONT, parts[3], fin=False),
                          client_frame(OP_CONT, parts[4]))
        pong = await client.read_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"between")
        echoed = await client.read_frame()
        assert (echoed.fin, echoed.opcode, echoed.payload) == (True, opcode, whole)
    key = "text" if opcode == OP_TEXT else "bytes"
    assert probe.received[1] == {"type": "websocket.receive",
                                 key: whole.decode() if opcode == OP_TEXT else whole}


async def test_frames_split_across_tcp_segments_are_reassembled(plain: Running) -> None:
    stream = (client_frame(OP_TEXT, b"x" * 300) + client_frame(OP_PING, b"p")
              + client_frame(OP_BINARY, b"y" * 70_000))
    async with RawClient.open(plain.port) as client:
        await client.handshake("/echo")
        for start in range(0, 400, 1):  # the first frames byte by byte
            await client.send(stream[start:start + 1])
        await client.send(stream[400:])
        received = [await client.read_frame() for _ in range(3)]
    # The pong is written at once; the echoes go through the app, so they may come after it.
    pongs = [(item.opcode, item.payload) for item in received if item.opcode == OP_PONG]
    assert pongs == [(OP_PONG, b"p")]
    assert [(item.opcode, item.payload) for item in received if item.opcode != OP_PONG] == [
        (OP_TEXT, b"x" * 300), (OP_BINARY, b"y" * 70_000)]


async def test_a_message_of_exactly_max_size_is_delivered(plain: Running) -> None:
    payload = os.urandom(MAX_SIZE)
    async with RawClient.open(plain.port) as client:
        await client.handshake("/echo")
        await client.send(client_frame(OP_BINARY, payload))
        assert (await client.read_frame()).payload == payload
        await client.send(client_frame(OP_BINARY, payload[:50_000], fin=False),
                          client_frame(OP_CONT, payload[50_000:]))
        assert (await client.read_frame()).payload == payload


async def test_receive_gives_connect_then_messages_then_the_clients_close(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with ws_client(plain.url(route(probe))) as ws:
        await probe.wait_accepted()
        await ws.send("first")
        await ws.send(b"second")
        await ws.send("")
        await ws.close(4001, "bye now")
    assert await probe.wait_ended() == {"type": "websocket.disconnect", "code": 4001,
                                        "reason": "bye now"}
    assert probe.received == [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "first"},
        {"type": "websocket.receive", "bytes": b"second"},
        {"type": "websocket.receive", "text": ""},
        {"type": "websocket.disconnect", "code": 4001, "reason": "bye now"},
    ]


# -- protocol errors ------------------------------------------------------------------------------


def _error_cases() -> list[Any]:
    big = bytes(MAX_SIZE + 1)
    part = bytes(40_000)
    cases: list[tuple[str, list[bytes], int]] = [
        ("unmasked", [client_frame(OP_TEXT, b"hi", masked=False)], 1002),
        ("rsv1", [client_frame(OP_TEXT, b"hi", rsv=0x40)], 1002),
        ("rsv2", [client_frame(OP_BINARY, b"hi", rsv=0x20)], 1002),
        ("rsv3", [client_frame(OP_PING, b"hi", rsv=0x10)], 1002),
        ("opcode-3", [client_frame(0x3, b"x")], 1002),
        ("opcode-0xb", [client_frame(0xB, b"x")], 1002),
        ("continuation-without-start", [client_frame(OP_CONT, b"x")], 1002),
        ("text-inside-fragmented", [client_frame(OP_TEXT, b"a", fin=False),
                                    client_frame(OP_TEXT, b"b")], 1002),
        ("binary-inside-fragmented", [client_frame(OP_BINARY, b"a", fin=False),
                                      client_frame(OP_BINARY, b"b")], 1002),
        ("ping-over-125", [client_frame(OP_PING, bytes(126))], 1002),
        ("close-over-125", [client_frame(OP_CLOSE, close_payload(1000, b"r" * 124))], 1002),
        ("fragmented-ping", [client_frame(OP_PING, b"x", fin=False)], 1002),
        ("fragmented-close", [client_frame(OP_CLOSE, close_payload(1000), fin=False)], 1002),
        ("invalid-utf8", [client_frame(OP_TEXT, b"ok \xff")], 1007),
        ("utf8-surrogate", [client_frame(OP_TEXT, b"\xed\xa0\x80")], 1007),
        ("truncated-utf8", [client_frame(OP_TEXT, "é".encode()[:1])], 1007),
        ("invalid-utf8-in-fragments", [client_frame(OP_TEXT, b"a\xc3", fin=False),
                                       client_frame(OP_CONT, b"(")], 1007),
        ("binary-over-max-size", [client_frame(OP_BINARY, big)], 1009),
        ("text-over-max-size", [client_frame(OP_TEXT, big)], 1009),
        ("over-max-size-in-fragments", [client_frame(OP_BINARY, part, fin=False),
                                        client_frame(OP_CONT, part, fin=False),
                                        client_frame(OP_CONT, part)], 1009),
        ("close-payload-of-one-byte", [client_frame(OP_CLOSE, b"\x03")], 1002),
        ("close-reason-invalid-utf8", [client_frame(OP_CLOSE, close_payload(1000, b"\xff"))],
         1007),
    ]
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        cases.append((f"close-code-{code}", [client_frame(OP_CLOSE, close_payload(code))], 1002))
    return [pytest.param(frames, code, id=name) for name, frames, code in cases]


@pytest.mark.parametrize(("frames", "expected"), _error_cases())
async def test_a_protocol_error_gets_a_close_frame_with_its_code_then_the_connection_ends(
    plain: Running, route: Callable[[ASGIApp], str], frames: list[bytes], expected: int
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        await probe.wait_accepted()
        await client.send(*frames)
        code, reason, before = await client.read_close()
        assert (code, before) == (expected, []), reason
        reason.decode()  # a valid UTF-8 reason
        assert await client.read_eof() == b"", "the server half-closes after its close frame"
    disconnect = await probe.wait_ended()
    assert (disconnect["type"], disconnect["code"]) == ("websocket.disconnect", expected)
    assert probe.received[1:] == [disconnect], "nothing of a failing message is delivered"


async def test_a_websockets_client_sending_over_max_size_gets_1009(plain: Running) -> None:
    async with ws_client(plain.url("/echo")) as ws:
        await ws.send(b"x" * (MAX_SIZE + 1))
        with pytest.raises(ConnectionClosed) as info:
            await bounded(ws.recv())
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# -- ping and pong --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
async def test_a_ping_from_the_client_gets_a_pong_with_its_payload(
    plain: Running, payload: bytes
) -> None:
    async with RawClient.open(plain.port) as client:
        await client.handshake("/echo")
        await client.send(client_frame(OP_PONG, b"unsolicited"))  # ignored, as RFC 6455 allows
        await client.send(client_frame(OP_PING, payload))
        pong = await client.read_frame()
        assert (pong.fin, pong.opcode, pong.payload) == (True, OP_PONG, payload)
        await client.send(client_frame(OP_TEXT, b"still open"))
        assert (await client.read_frame()).payload == b"still open"


async def test_the_server_pings_every_ping_interval_and_a_client_that_answers_stays_open(
    pinging: Running
) -> None:
    async with RawClient.open(pinging.port) as client:
        await client.handshake("/echo")
        times: list[float] = []
        for _ in range(4):  # answered at once, each time
            ping = await client.read_frame()
            times.append(time.monotonic())
            assert ping.opcode == OP_PING and 0 < len(ping.payload) <= 125
            await client.send(client_frame(OP_PONG, ping.payload))
        # (the first may come late: test_a_connection_with_a_shorter_period_is_ticked_in_time)
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(0.15 <= gap < 1.0 for gap in gaps), gaps
        await client.send(client_frame(OP_TEXT, b"alive"))
        while (received := await client.read_frame()).opcode == OP_PING:
            await client.send(client_frame(OP_PONG, received.payload))
        assert (received.opcode, received.payload) == (OP_TEXT, b"alive")


async def test_a_websockets_client_answering_pings_stays_open(pinging: Running) -> None:
    async with ws_client(pinging.url("/echo")) as ws:
        await asyncio.sleep(1.0)  # about four pings
        assert ws.protocol.state is State.OPEN
        await ws.send("after a while")
        assert await bounded(ws.recv()) == "after a while"


@pytest.mark.parametrize("answer", ["never", "wrong-payload"])
async def test_a_client_that_does_not_answer_pings_is_closed_with_1011_after_ping_timeout(
    pinging: Running, route: Callable[[ASGIApp], str], answer: str
) -> None:
    probe = Probe()
    async with RawClient.open(pinging.port) as client:
        await client.handshake(route(probe))
        start = time.monotonic()
        ping = await client.read_frame()
        assert ping.opcode == OP_PING
        if answer == "wrong-payload":
            await client.send(client_frame(OP_PONG, ping.payload + b"?"))
        code, _, before = await client.read_close()
        elapsed = time.monotonic() - start
        assert code == 1011
        assert all(item.opcode == OP_PING for item in before)
        assert 0.3 <= elapsed < 2.0, elapsed
        assert await client.read_eof() == b""
    assert (await probe.wait_ended())["code"] == 1011


# -- the closing handshake ------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "echoed", "disconnect"), [
    (close_payload(4001, b"bye"), 4001, {"code": 4001, "reason": "bye"}),
    (close_payload(1000), 1000, {"code": 1000, "reason": ""}),
    (close_payload(1001, "au revoir ☺".encode()), 1001,
     {"code": 1001, "reason": "au revoir ☺"}),
    (b"", 1000, {"code": 1005, "reason": ""}),
], ids=["4001", "1000", "1001-utf8-reason", "empty"])
async def test_a_client_close_is_echoed_with_its_code_and_the_server_closes_tcp(
    plain: Running, route: Callable[[ASGIApp], str], payload: bytes, echoed: int,
    disconnect: dict[str, Any]
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        await client.send(client_frame(OP_CLOSE, payload))
        code, _, before = await client.read_close()
        assert (code, before) == (echoed, [])
        assert await client.read_eof() == b"", "the server closes TCP first"
    assert await probe.wait_ended() == {"type": "websocket.disconnect", **disconnect}
    assert not connection.is_open
    with pytest.raises(ClientDisconnected):
        await probe.send({"type": "websocket.send", "text": "late"})
    await probe.send({"type": "websocket.close", "code": 1000})  # closed already: a no-op


async def test_a_server_close_sends_the_frame_then_disconnects_the_app_and_ends_on_the_reply(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        await probe.send({"type": "websocket.close", "code": 4002, "reason": "done"})
        assert await probe.wait_ended() == {"type": "websocket.disconnect", "code": 4002,
                                            "reason": "done"}
        await probe.send({"type": "websocket.close", "code": 4003})  # a second close: no-op
        with pytest.raises(ClientDisconnected):
            await probe.send({"type": "websocket.send", "text": "after close"})
        code, reason, before = await client.read_close()
        assert (code, reason, before) == (4002, b"done", [])
        await asyncio.sleep(0.05)
        assert connection.transport is not None and not connection.transport.is_closing(), (
            "TCP stays open until the client answers")
        await client.send(client_frame(OP_TEXT, b"ignored while closing"))
        await client.reply_close(4002)
        assert await client.read_eof() == b"", "one close frame only, then the server closes"
    assert probe.received[-1]["type"] == "websocket.disconnect"
    assert len(probe.received) == 2


async def test_a_websockets_client_completes_a_server_close_at_once(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with ws_client(plain.url(route(probe))) as ws:
        await probe.wait_accepted()
        start = time.monotonic()
        await probe.send({"type": "websocket.close", "code": 1001, "reason": "going away"})
        with pytest.raises(ConnectionClosed) as info:
            await bounded(ws.recv())
        await bounded(ws.wait_closed())
        assert time.monotonic() - start < 1.0
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "going away")
    assert info.value.rcvd_then_sent is True


async def test_a_client_that_never_answers_our_close_is_cut_off_after_close_timeout() -> None:
    probe = Probe()
    limits = Limits(ping_interval=None, ping_timeout=None, close_timeout=0.3)
    async with serve_standalone(probe, limits) as running, RawClient.open(running.port) as client:
        await client.handshake("/")
        await probe.wait_accepted()
        start = time.monotonic()
        await probe.send({"type": "websocket.close", "code": 1000})
        code, _, _ = await client.read_close()
        assert code == 1000
        assert await client.read_eof() == b""
        elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < 2.5, elapsed  # not the 10 s default (a tick may be late)
        await wait_for(lambda: not running.connections)


async def test_an_app_that_returns_after_accept_closes_with_1000(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})

    async with RawClient.open(plain.port) as client:
        await client.handshake(route(app))
        code, _, _ = await client.read_close()
        assert code == 1000
        await client.reply_close()
        assert await client.read_eof() == b""


async def test_an_app_that_raises_after_accept_closes_with_1011(
    plain: Running, route: Callable[[ASGIApp], str], caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        raise RuntimeError("the application fails after accepting")

    with caplog.at_level(logging.ERROR, logger="taskcast.websocket_protocol"):
        async with RawClient.open(plain.port) as client:
            await client.handshake(route(app))
            code, _, _ = await client.read_close()
            assert code == 1011
            await client.reply_close()
            assert await client.read_eof() == b""
    assert any("Exception in ASGI application" in record.getMessage()
               for record in caplog.records)


# -- what the gateway calls directly --------------------------------------------------------------


async def test_close_now_writes_before_frames_then_close_and_hands_tcp_to_the_closer(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    handed: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    def closer(transport: asyncio.Transport) -> None:
        handed.set_result(transport)
        transport.close()

    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        transport = connection.transport
        assert connection.close_now(4003, "now", closer=closer,
                                    before=[text_frame(b"one"), frame(OP_BINARY, b"two")])
        assert not connection.is_open
        assert connection.write_frames([text_frame(b"late")]) is False
        assert connection.write_frame_if_idle(text_frame(b"late")) is False
        assert connection.close_now(1000) is False
        received = [await client.read_frame() for _ in range(3)]
        assert [(item.opcode, item.payload) for item in received] == [
            (OP_TEXT, b"one"), (OP_BINARY, b"two"), (OP_CLOSE, close_payload(4003, b"now"))]
        assert await probe.wait_ended() == {"type": "websocket.disconnect", "code": 4003,
                                            "reason": "now"}
        await asyncio.sleep(0.05)
        assert not handed.done(), "the closer waits for the client's close frame"
        await client.reply_close(4003)
        assert await bounded(handed) is transport
        assert await client.read_eof() == b""


async def test_defer_to_hands_a_client_close_to_the_closer_and_tells_the_app_later(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    handed: list[asyncio.Transport] = []
    deferred: list[Callable[[], None]] = []
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        connection.defer_to(handed.append, deferred.append)
        await client.reply_close(4001)  # the client closes first
        received = await client.read_frame()
        assert (received.opcode, received.payload) == (OP_CLOSE, close_payload(4001, b""))
        await asyncio.sleep(0.05)
        assert handed == [connection.transport] and not handed[0].is_closing()
        assert len(deferred) == 1 and not probe.ended.is_set()  # the app is told later ...
        deferred[0]()
        assert await probe.wait_ended() == {"type": "websocket.disconnect", "code": 4001,
                                            "reason": ""}  # ... when the gateway says so
        handed[0].close()
        assert await client.read_eof() == b""


async def test_write_frames_and_write_frame_if_idle_write_whole_frames_while_open(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        assert connection.write_frames([text_frame(b"a")]) is True
        assert connection.write_frames([text_frame(b"b"), frame(OP_BINARY, b"c")]) is True
        assert connection.write_frame_if_idle(text_frame(b"d")) is True
        received = [await client.read_frame() for _ in range(4)]
        assert [item.payload for item in received] == [b"a", b"b", b"c", b"d"]


async def test_write_frame_if_idle_is_false_while_bytes_are_buffered_and_abort_drops_the_socket(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    big = frame(OP_BINARY, bytes(1 << 20))
    async with RawClient.open(plain.port, rcvbuf=4096) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        assert connection.buffered == 0
        written = 0
        while not connection.buffered and written < 64:  # the client does not read
            assert connection.write_frames([big])
            written += 1
        assert connection.buffered > 0
        assert connection.write_frame_if_idle(text_frame(b"dropped")) is False

        async def read_all() -> list[bytes]:
            return [(await client.read_frame()).payload for _ in range(written + 1)]

        reading = asyncio.create_task(read_all())
        try:
            await wait_for(lambda: connection.buffered == 0)
            assert connection.write_frame_if_idle(text_frame(b"idle")) is True
            payloads = await bounded(reading)
        finally:
            reading.cancel()
        assert payloads[-1] == b"idle"
        assert all(len(payload) == 1 << 20 for payload in payloads[:-1])

        connection.abort()
        assert await client.read_eof() == b""
    assert (await probe.wait_ended())["code"] == 1006
    assert connection.write_frames([text_frame(b"x")]) is False
    assert connection.write_frame_if_idle(text_frame(b"x")) is False


# -- sends after the client left, flow control ----------------------------------------------------


async def test_a_send_after_the_client_disconnected_raises_client_disconnected(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with ws_client(plain.url(route(probe))):
        await probe.wait_accepted()
    await probe.wait_ended()
    for message in ({"type": "websocket.send", "text": "x"},
                    {"type": "websocket.send", "bytes": b"x"}):
        with pytest.raises(OSError) as info:
            await probe.send(message)
        assert isinstance(info.value, ClientDisconnected)
    await probe.send({"type": "websocket.close"})  # a no-op once closed


async def send_until_over_high_water(probe: Probe, connection: WebSocketConnection,
                                     payload: bytes) -> int:
    """ASGI sends to a client that does not read until the transport's buffer is above its
    high-water mark (64 KiB by default; the kernel takes a few MiB first); how many."""
    for count in range(1, 33):
        await probe.send({"type": "websocket.send", "bytes": payload})
        if connection.buffered > 64 * 1024:
            return count
    raise AssertionError("the write buffer never filled")


async def test_a_send_waits_while_the_buffer_is_over_the_high_water_mark(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    payload = os.urandom(1 << 20)
    async with RawClient.open(plain.port, rcvbuf=4096) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        sent = await send_until_over_high_water(probe, connection, payload)
        last = asyncio.create_task(probe.send({"type": "websocket.send", "bytes": payload}))
        try:
            await asyncio.sleep(0.2)
            assert not last.done(), "the send waits for the client to read"
            first = await client.read_frame()
            await bounded(last)
        finally:
            last.cancel()
        assert first.payload == payload
        for _ in range(sent):
            assert (await client.read_frame()).payload == payload


async def test_a_send_waiting_for_the_buffer_raises_client_disconnected_when_the_client_goes(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    payload = bytes(1 << 20)
    async with RawClient.open(plain.port, rcvbuf=4096) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        await send_until_over_high_water(probe, connection, payload)
        last = asyncio.create_task(probe.send({"type": "websocket.send", "bytes": payload}))
        await asyncio.sleep(0.1)
        assert not last.done()
    with pytest.raises(ClientDisconnected):
        await bounded(last)


async def test_concurrent_sends_waiting_for_the_buffer_all_complete_once_the_client_reads(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    payload = bytes(1 << 20)
    async with RawClient.open(plain.port, rcvbuf=4096) as client:
        await client.handshake(route(probe))
        connection = await probe.wait_accepted()
        sent = await send_until_over_high_water(probe, connection, payload)
        senders = [asyncio.create_task(probe.send({"type": "websocket.send", "bytes": payload}))
                   for _ in range(2)]

        async def read_all() -> list[bytes]:
            return [(await client.read_frame()).payload for _ in range(sent + 2)]

        reading: asyncio.Task[list[bytes]] | None = None
        try:
            await asyncio.sleep(0.1)
            assert not any(task.done() for task in senders), "both wait for the client"
            reading = asyncio.create_task(read_all())
            done, _ = await asyncio.wait(senders, timeout=1.0)
            assert len(done) == 2, "a send never returned"
            assert await bounded(reading) == [payload] * (sent + 2)
        finally:
            tasks = [*senders, *([reading] if reading else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# -- shutdown -------------------------------------------------------------------------------------


async def test_a_server_shutdown_closes_open_sockets_with_1012(
    route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    path = route(probe)
    async with serve_uvicorn(ws_max_size=MAX_SIZE, ws_ping_interval=None) as running:
        assert running.server is not None and running.task is not None
        async with ws_client(running.url(path)) as ws:
            await probe.wait_accepted()
            running.server.should_exit = True
            with pytest.raises(ConnectionClosed) as info:
                await bounded(ws.recv())
            assert info.value.rcvd is not None and info.value.rcvd.code == 1012
            assert await probe.wait_ended() == {"type": "websocket.disconnect", "code": 1012,
                                                "reason": ""}
        await bounded(running.task)


async def test_a_server_shutdown_answers_a_pending_handshake_with_503(
    route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe(accept=False)
    path = route(probe)
    async with serve_uvicorn(ws_max_size=MAX_SIZE, ws_ping_interval=None) as running:
        assert running.server is not None and running.task is not None
        async with RawClient.open(running.port) as client:
            client.writer.write(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                f"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {'A' * 22}==\r\n\r\n"
                .encode())
            async with asyncio.timeout(BOUND_S):
                await probe.started.wait()
            running.server.should_exit = True
            response = await client.read_response()
            assert response.status == 503, response
            assert await client.read_eof() == b""
        assert (await probe.wait_ended())["type"] == "websocket.disconnect"
        await bounded(running.task)


# -- many connections -----------------------------------------------------------------------------


async def test_200_concurrent_echo_clients_all_get_their_answers(plain: Running) -> None:
    async def one(index: int) -> tuple[str, bytes]:
        ws: ClientConnection
        async with ws_client(plain.url("/echo")) as ws:
            await ws.send(f"client {index}")
            await ws.send(index.to_bytes(4, "big"))
            text, data = await ws.recv(), await ws.recv()
            assert isinstance(text, str) and isinstance(data, bytes)
            return text, data

    async with asyncio.timeout(15):
        answers = await asyncio.gather(*(one(index) for index in range(200)))
    assert answers == [(f"client {index}", index.to_bytes(4, "big")) for index in range(200)]


# -- standalone, without uvicorn ------------------------------------------------------------------


async def test_the_protocol_class_serves_standalone_without_uvicorn() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: WebSocketConnection(echo_app, limits=Limits(max_size=1 << 16)), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with ws_client(f"ws://127.0.0.1:{port}/standalone") as ws:
            await ws.send("standalone")
            assert await bounded(ws.recv()) == "standalone"
            await ws.send(b"\x00" * 65_536)
            assert await bounded(ws.recv()) == b"\x00" * 65_536
            await ws.send(b"\x00" * 65_537)
            with pytest.raises(ConnectionClosed) as info:
                await bounded(ws.recv())
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    finally:
        server.close()
        await server.wait_closed()


async def test_frames_sent_right_behind_the_handshake_are_read_after_accept() -> None:
    async with serve_standalone(echo_app) as running, RawClient.open(running.port) as client:
        key = base64.b64encode(os.urandom(16)).decode()
        await client.send(
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode(),
            client_frame(OP_TEXT, b"eager"), client_frame(OP_BINARY, b"client"))
        response = await client.read_response()
        assert response.status == 101
        assert response.headers["sec-websocket-accept"] == accept_for(key)
        assert [(await client.read_frame()).payload for _ in range(2)] == [b"eager", b"client"]


@pytest.mark.parametrize("request_line", [
    "POST / HTTP/1.1", "GET / HTTP/1.0", "PUT / HTTP/1.1",
])
async def test_a_request_that_is_not_a_get_over_http_1_1_gets_400(request_line: str) -> None:
    probe = Probe()
    async with serve_standalone(probe) as running, RawClient.open(running.port) as client:
        response = await client.request(request_line=request_line)
        assert response.status == 400, response
        assert await client.read_eof() == b""
    assert probe.scope is None


@pytest.mark.parametrize("headers", [
    {"Upgrade": None}, {"Upgrade": "h2c"}, {"Connection": None}, {"Connection": "keep-alive"},
], ids=["no-upgrade", "upgrade-h2c", "no-connection", "connection-keep-alive"])
async def test_a_request_without_the_upgrade_fields_gets_400(
    headers: dict[str, str | None]
) -> None:
    async with serve_standalone(echo_app) as running, RawClient.open(running.port) as client:
        response = await client.request(headers=headers)
        assert response.status == 400, response


async def test_a_handshake_over_max_handshake_bytes_gets_431() -> None:
    limits = Limits(ping_interval=None, max_handshake=4096)
    async with serve_standalone(echo_app, limits) as running, RawClient.open(
            running.port) as client:
        await client.send(b"GET / HTTP/1.1\r\nX-Padding: " + b"a" * 5000)
        response = await client.read_response()
        assert response.status == 431, response


# max_queued below 4 once paused reading for good (resume waited for fewer than max_queued // 4).
@pytest.mark.parametrize("max_queued", [8, 2])
async def test_a_slow_app_receives_every_message_in_order_while_reads_pause_and_resume(
    max_queued: int
) -> None:
    probe = Probe()
    release = asyncio.Event()

    async def slow(scope: Message, receive: Receive, send: Send) -> None:
        async def gated() -> Message:
            if probe.accepted.is_set():
                await release.wait()
            return await receive()
        await probe(scope, gated, send)

    limits = Limits(ping_interval=None, max_queued=max_queued)
    async with serve_standalone(slow, limits) as running, RawClient.open(running.port) as client:
        await client.handshake("/")
        connection = await probe.wait_accepted()
        assert connection.transport is not None
        transport = connection.transport
        await client.send(*(client_frame(OP_TEXT, str(index).encode()) for index in range(50)))
        await wait_for(lambda: not transport.is_reading())
        # sent while reads pause: read once the app has caught up
        await client.send(*(client_frame(OP_TEXT, str(index).encode())
                            for index in range(50, 100)))
        await asyncio.sleep(0.05)
        assert len(probe.received) == 1
        release.set()
        await wait_for(lambda: len(probe.received) == 101)
        assert [message["text"] for message in probe.received[1:]] == [
            str(index) for index in range(100)]
        assert transport.is_reading()
        await client.reply_close()
        await probe.wait_ended()


# -- bugs -----------------------------------------------------------------------------------------


async def test_a_close_reason_over_123_bytes_is_cut_at_a_character_boundary(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe))
        await probe.wait_accepted()
        await probe.send({"type": "websocket.close", "code": 4000, "reason": "é" * 70})
        code, reason, _ = await client.read_close()
        await client.reply_close()
        assert code == 4000
        assert len(reason) <= 123
        assert ("é" * 70).startswith(reason.decode())


async def test_repeated_sec_websocket_protocol_lines_are_all_offered(
    plain: Running, route: Callable[[ASGIApp], str]
) -> None:
    probe = Probe()
    async with RawClient.open(plain.port) as client:
        await client.handshake(route(probe), lines=["Sec-WebSocket-Protocol: a",
                                                    "Sec-WebSocket-Protocol: b, c"])
        await probe.wait_accepted()
        await client.reply_close()
        await client.read_close()
    assert probe.scope is not None
    assert probe.scope["subprotocols"] == ["a", "b", "c"]


async def fill_buffer(connection: WebSocketConnection) -> None:
    """Write to a client that does not read until bytes stay buffered."""
    big = frame(OP_BINARY, bytes(1 << 20))
    for _ in range(64):
        if connection.buffered:
            return
        connection.write_frames([big])
    raise AssertionError("the write buffer never filled")


async def test_a_client_that_closes_and_stops_reading_is_dropped_after_close_timeout() -> None:
    probe = Probe()
    limits = Limits(ping_interval=None, ping_timeout=None, close_timeout=0.2)
    async with serve_standalone(probe, limits) as running, RawClient.open(
            running.port, rcvbuf=4096) as client:
        await client.handshake("/")
        connection = await probe.wait_accepted()
        try:
            await fill_buffer(connection)
            await client.send(client_frame(OP_CLOSE, close_payload(1000)))
            await probe.wait_ended()
            await wait_for(lambda: connection not in running.connections, bound_s=1.5)
        finally:
            connection.abort()


async def test_shutdown_drops_a_client_that_does_not_read_after_close_timeout() -> None:
    probe = Probe()
    limits = Limits(ping_interval=None, ping_timeout=None, close_timeout=0.2)
    async with serve_standalone(probe, limits) as running, RawClient.open(
            running.port, rcvbuf=4096) as client:
        await client.handshake("/")
        connection = await probe.wait_accepted()
        try:
            await fill_buffer(connection)
            connection.shutdown()
            assert (await probe.wait_ended())["code"] == 1012
            await wait_for(lambda: connection not in running.connections, bound_s=1.5)
        finally:
            connection.abort()


async def test_bytes_after_a_protocol_error_do_not_postpone_the_close_deadline() -> None:
    probe = Probe()
    limits = Limits(ping_interval=None, ping_timeout=None, close_timeout=0.2)
    async with serve_standalone(probe, limits) as running, RawClient.open(running.port) as client:
        await client.handshake("/")
        connection = await probe.wait_accepted()
        try:
            await client.send(client_frame(OP_TEXT, b"x", masked=False))
            code, _, _ = await client.read_close()
            assert code == 1002
            start = time.monotonic()
            while connection in running.connections and time.monotonic() - start < 1.5:
                with contextlib.suppress(OSError):
                    await client.send(b"\xff\xff")  # reserved bits: another failure
                await asyncio.sleep(0.05)
            assert connection not in running.connections, "still open after 7 close_timeouts"
        finally:
            connection.abort()


async def test_an_app_that_returns_when_the_client_left_before_accept_logs_no_error(
    plain: Running, route: Callable[[ASGIApp], str], caplog: pytest.LogCaptureFixture
) -> None:
    disconnected = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        assert (await receive())["type"] == "websocket.disconnect"
        disconnected.set()

    with caplog.at_level(logging.ERROR, logger="taskcast.websocket_protocol"):
        async with RawClient.open(plain.port) as client:
            await client.send(
                f"GET {route(app)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {'A' * 22}==\r\n\r\n".encode())
            await asyncio.sleep(0.05)
        async with asyncio.timeout(BOUND_S):
            await disconnected.wait()
        await asyncio.sleep(0.05)
    assert [record.getMessage() for record in caplog.records] == []


def test_a_connection_with_a_shorter_period_is_ticked_in_time() -> None:
    async def first_ping_after() -> float:
        slow, fast = Probe(), Probe()
        async with serve_standalone(slow, Limits(ping_interval=None)) as slow_server, \
                serve_standalone(fast, Limits(ping_interval=0.1, ping_timeout=1.0)) as fast_server:
            async with RawClient.open(slow_server.port) as slow_client, \
                    RawClient.open(fast_server.port) as fast_client:
                await slow_client.handshake("/")  # starts the ticker: 1 s period
                await slow.wait_accepted()
                await fast_client.handshake("/")
                start = time.monotonic()
                assert (await fast_client.read_frame()).opcode == OP_PING
                return time.monotonic() - start

    loop = asyncio.new_event_loop()  # a loop of its own: a new KeepAlive, no earlier period
    try:
        elapsed = loop.run_until_complete(first_ping_after())
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    assert elapsed < 0.5, f"first ping after {elapsed:.2f} s with ping_interval=0.1"
