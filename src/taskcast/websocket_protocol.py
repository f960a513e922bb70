"""A lean RFC 6455 server connection for asyncio that speaks ASGI to the application.

Why our own: a gateway holds thousands of mostly idle sockets and writes the same frame to
many of them. uvicorn's WebSocket implementations keep a sans-I/O protocol object, parsed
request and response objects, an asyncio.Queue, events and per-socket ping timers per
connection: about 19 KiB per idle socket before the application holds anything
(bench/README.md), and every frame is serialized again for every client. This connection keeps
a few slots, shares one keep-alive ticker per event loop among all connections, and lets the
gateway write a frame it encoded once (`write_frames`) or close synchronously (`close_now`).

What it implements: the opening handshake (GET, HTTP/1.1, `Upgrade: websocket`,
`Sec-WebSocket-Version: 13`, a 16-byte key; 400, 426 or 431 otherwise), masked client frames,
fragmented messages, text (strict UTF-8, else 1007) and binary messages, ping/pong, the close
handshake, protocol errors (1002), messages over `max_size` (1009), keep-alive pings with a
deadline for the pong (1011), and graceful server shutdown (1012). No extensions are negotiated
(`permessage-deflate` would re-compress every frame per client), so reserved bits are errors.

ASGI (`websocket` scope, spec 2.4): `receive()` yields `websocket.connect`, then
`websocket.receive` and finally `websocket.disconnect`; `send()` takes `websocket.accept`,
`websocket.send` and `websocket.close` (before accept: an HTTP 403), and raises
ClientDisconnected (an OSError) once the client is gone. A send waits while the transport's
buffer is above its high-water mark.

Failing a connection follows RFC 6455 7.1.7: a close frame, then the server half-closes
(FIN) and keeps reading until the client closes, so unread client bytes never turn the close
into a reset that could destroy frames the client has not read yet.

It knows nothing of uvicorn; server.py binds it to uvicorn's protocol factory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from websockets.utils import accept_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]
Closer = Callable[[asyncio.Transport], None]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONNECTING, OPEN, CLOSING, CLOSED = range(4)
# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry); others are errors.
_VALID_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                1013, 1014}) | frozenset(range(3000, 5000))


class ClientDisconnected(OSError):
    """A send after the client went away (ASGI 2.4 asks for an OSError)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection allows its client, and how long it waits for it."""

    max_size: int = 1 << 20  # largest message a client may send; more: close 1009
    ping_interval: float | None = 20.0  # seconds between pings; None: no pings
    ping_timeout: float | None = 20.0  # how long a pong may take; more: close 1011
    close_timeout: float = 10.0  # how long to wait for the client's close frame
    max_handshake: int = 16_384  # bytes of the opening request
    max_queued: int = 64  # client messages the application has not received; more: pause reads


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x80 | opcode, size) + payload
    if size < 65_536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame around UTF-8 bytes (the caller's promise that they are UTF-8)."""
    return frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to at most 123 bytes, between characters."""
    cut = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return frame(OP_CLOSE, struct.pack("!H", code) + cut)


class KeepAlive:
    """One ticker per event loop for every connection's pings, pong deadlines and close
    deadlines, instead of timers per socket. It runs while connections are registered."""

    _by_loop: dict[asyncio.AbstractEventLoop, KeepAlive] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.members: set[WebSocketConnection] = set()
        self.period = 1.0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> KeepAlive:
        """The loop's ticker, made on first use."""
        keepalive = cls._by_loop.get(loop)
        if keepalive is None:
            keepalive = cls._by_loop[loop] = cls(loop)
        return keepalive

    def add(self, connection: WebSocketConnection, period: float) -> None:
        """Tick `connection` at least every `period` seconds until forget(): all members
        share one period, the shortest asked for since the ticker started."""
        self.members.add(connection)
        if period < self.period and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)  # tick now, then at the shorter period
        self.period = min(self.period, period)
        if self._task is None:
            self._task = self.loop.create_task(self._run(), name="taskcast-ws-keepalive")

    @classmethod
    def forget(cls, loop: asyncio.AbstractEventLoop, connection: WebSocketConnection) -> None:
        """No more ticks for `connection`; the ticker stops after its last member left."""
        keepalive = cls._by_loop.get(loop)
        if keepalive is not None:
            keepalive.members.discard(connection)

    async def _run(self) -> None:
        try:
            while self.members:
                wake = self._wake = self.loop.create_future()
                timer = self.loop.call_later(self.period, _resolve, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                now = time.monotonic()
                for connection in list(self.members):
                    connection.tick(now)
        finally:
            self._task = None
            if self._by_loop.get(self.loop) is self and not self.members:
                del self._by_loop[self.loop]


class WebSocketConnection(asyncio.Protocol):
    """One WebSocket connection: the RFC 6455 server side, and its ASGI interface.

    Three sides: asyncio calls the Protocol methods; the application gets receive() and
    send(), the only methods that wait; the gateway and the server call write_frame_if_idle,
    write_frames, close_now, abort and shutdown, which never wait and never raise for a
    connection that is gone (they return False or do nothing).
    """

    __slots__ = ("app", "limits", "root_path", "app_state", "connections", "tasks",
                 "transport", "state", "scope", "_buffer", "_fragments", "_fragment_opcode",
                 "_fragment_size", "_inbox", "_receiver", "_paused_reading", "_writable",
                 "_drain_waiter", "_disconnect", "_ping_payload", "_ping_sent", "_next_ping",
                 "_close_deadline", "_closer", "_later", "_failed", "_head", "_loop")

    def __init__(self, app: ASGIApp, *, limits: Limits = Limits(), root_path: str = "",
                 app_state: dict[str, Any] | None = None, connections: set[Any] | None = None,
                 tasks: set[asyncio.Task[None]] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.app = app
        self.limits = limits
        self.root_path = root_path
        self.app_state = app_state if app_state is not None else {}
        # The server's registries: it shuts down what is in `connections` and waits for `tasks`.
        self.connections = connections if connections is not None else set()
        self.tasks = tasks if tasks is not None else set()
        self.transport: asyncio.Transport | None = None
        self.state = CONNECTING
        self.scope: Message | None = None
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = OP_TEXT
        self._fragment_size = 0
        self._inbox: list[Message] = []
        self._receiver: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._writable = True
        self._drain_waiter: asyncio.Future[None] | None = None
        self._disconnect: Message | None = None  # set once: what receive() ends with
        self._ping_payload: bytes | None = None
        self._ping_sent = 0.0
        self._next_ping = 0.0
        self._close_deadline = 0.0
        self._closer: Closer | None = None
        self._later: Callable[[Callable[[], None]], None] | None = None
        self._failed = False  # after a protocol error, frame boundaries are lost: read nothing
        self._head = b""  # the 101 response, until the first write takes it along
        self._loop = loop or asyncio.get_event_loop()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio.Protocol: register with the server, which shuts down what it holds."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio.Protocol: receive() ends with a disconnect (1006 unless a close came
        first), and a send waiting for the buffer raises ClientDisconnected."""
        self.connections.discard(self)
        KeepAlive.forget(self._loop, self)
        self.state = CLOSED
        self._disconnected(1006)
        self._wake_receiver()  # now, even if a graceful close deferred it
        self._wake_writer()

    def eof_received(self) -> bool | None:
        """asyncio.Protocol: the client half-closed, which ends the connection; receive()
        gives 1006 unless a close came first."""
        if self.state == CONNECTING:
            self.state = CLOSED  # the application must not answer a client that left
        self._disconnected(1006)
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        """asyncio.Protocol: the buffer is over its high-water mark; send() waits."""
        self._writable = False

    def resume_writing(self) -> None:
        """asyncio.Protocol: the buffer drained; waiting sends go on."""
        self._writable = True
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        """asyncio.Protocol: the opening handshake, then client frames (see the module
        docstring). Reading pauses once `max_queued` messages wait for receive(), and
        resumes when a quarter of that is left."""
        if self._failed:
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self.state == OPEN or self.state == CLOSING:
            self._read_frames(data)
        elif self.state == CONNECTING:
            if self.scope is None:
                self._handshake(data)
            elif len(data) <= self.limits.max_size + 14:
                self._buffer = data  # a client that does not wait for the 101: read at accept
            else:
                self.abort()

    # -- the opening handshake ------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        end = data.find(b"\r\n\r\n")
        if end == -1:
            if len(data) > self.limits.max_handshake:
                self._reject(431, "request header fields too large")
            else:
                self._buffer = data
            return
        lines = data[:end].split(b"\r\n")
        rest = data[end + 4:]
        method, _, rest_of_line = lines[0].partition(b" ")
        target, _, version = rest_of_line.partition(b" ")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                self._reject(400, "malformed header line")
                return
            headers.append((name.lower(), value.strip()))
        fields = dict(headers)
        if method != b"GET" or version != b"HTTP/1.1":
            self._reject(400, "a WebSocket handshake is a GET over HTTP/1.1")
            return
        if (b"websocket" not in fields.get(b"upgrade", b"").lower()
                or b"upgrade" not in fields.get(b"connection", b"").lower()):
            self._reject(400, "missing Upgrade: websocket")
            return
        if fields.get(b"sec-websocket-version") != b"13":
            self._reject(426, "unsupported WebSocket version",
                         extra=b"sec-websocket-version: 13\r\n")
            return
        key = fields.get(b"sec-websocket-key", b"")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except binascii.Error:
            valid_key = False
        if not valid_key:
            self._reject(400, "missing or malformed Sec-WebSocket-Key")
            return
        self.scope = self._build_scope(target, headers, fields)
        self._inbox.append({"type": "websocket.connect"})
        task = self._loop.create_task(self._run_asgi())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if rest:
            self._buffer = rest  # frames that raced the 101 wait until it has been sent

    def _build_scope(self, target: bytes, headers: list[tuple[bytes, bytes]],
                     fields: dict[bytes, bytes]) -> Message:
        assert self.transport is not None
        raw_path, _, query = target.partition(b"?")
        path = raw_path.decode("ascii", "replace")
        # The header may be repeated (RFC 6455 11.3.4): every line counts.
        protocols = b",".join(value for name, value in headers
                              if name == b"sec-websocket-protocol").decode("latin-1")
        return {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if self.transport.get_extra_info("sslcontext") else "ws",
            "server": _address(self.transport.get_extra_info("sockname")),
            "client": _address(self.transport.get_extra_info("peername")),
            "root_path": self.root_path,
            "path": self.root_path + (unquote(path) if "%" in path else path),
            "raw_path": self.root_path.encode("ascii") + raw_path,
            "query_string": query,
            "headers": headers,
            "subprotocols": [item.strip() for item in protocols.split(",") if item.strip()],
            "state": self.app_state.copy(),
            "extensions": {},
        }

    def _reject(self, status: int, reason: str, extra: bytes = b"") -> None:
        assert self.transport is not None
        body = reason.encode() + b"\n"
        phrase = {400: b"Bad Request", 403: b"Forbidden", 426: b"Upgrade Required",
                  431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
                  503: b"Service Unavailable"}
        self.transport.write(
            b"HTTP/1.1 %d %b\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n%b\r\n%b"
            % (status, phrase.get(status, b""), len(body), extra, body))
        self.state = CLOSED
        self._disconnected(1006)
        self.transport.close()

    # -- frames from the client -----------------------------------------------------------------

    def _read_frames(self, data: bytes) -> None:
        offset, size = 0, len(data)
        while size - offset >= 2 and self.state != CLOSED:
            first, second = data[offset], data[offset + 1]
            opcode, length, head = first & 0x0F, second & 0x7F, 2
            if first & 0x70:
                return self._fail(1002, "reserved bits set")
            if not second & 0x80:
                return self._fail(1002, "client frames must be masked")
            if length == 126:
                if size - offset < 4:
                    break
                length, head = int.from_bytes(data[offset + 2:offset + 4], "big"), 4
            elif length == 127:
                if size - offset < 10:
                    break
                length, head = int.from_bytes(data[offset + 2:offset + 10], "big"), 10
            if opcode >= OP_CLOSE:
                if length > 125 or not first & 0x80:
                    return self._fail(1002, "control frames are short and unfragmented")
            elif self._fragment_size + length > self.limits.max_size:
                return self._fail(1009, "message too big")
            end = offset + head + 4 + length
            if size < end:
                break
            mask = data[offset + head:offset + head + 4]
            payload = apply_mask(data[offset + head + 4:end], mask)
            offset = end
            self._frame(bool(first & 0x80), opcode, payload)
        if offset < size and self.state != CLOSED:
            self._buffer = data[offset:]

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if self.state == CLOSING and opcode != OP_CLOSE:
            return  # after our close frame only the client's close frame matters
        if opcode == OP_CONT:
            if self._fragments is None:
                return self._fail(1002, "continuation without a message")
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if fin:
                payload = b"".join(self._fragments)
                self._fragments, self._fragment_size = None, 0
                self._message(self._fragment_opcode, payload)
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                return self._fail(1002, "new message inside a fragmented one")
            if fin:
                self._message(opcode, payload)
            else:
                self._fragments, self._fragment_opcode = [payload], opcode
                self._fragment_size = len(payload)
        elif opcode == OP_PING:
            self._write(frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            if self._ping_payload is not None and payload == self._ping_payload:
                self._ping_payload = None
                if self.limits.ping_interval is not None:
                    self._next_ping = time.monotonic() + self.limits.ping_interval
        elif opcode == OP_CLOSE:
            self._client_close(payload)
        else:
            self._fail(1002, f"unknown opcode {opcode}")

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                return self._fail(1007, "invalid UTF-8 in a text message")
            self._deliver({"type": "websocket.receive", "text": text})
        else:
            self._deliver({"type": "websocket.receive", "bytes": payload})
        if len(self._inbox) >= self.limits.max_queued and not self._paused_reading:
            assert self.transport is not None
            self._paused_reading = True
            self.transport.pause_reading()

    def _client_close(self, payload: bytes) -> None:
        code, reason = 1005, ""
        if len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                return self._fail(1007, "invalid UTF-8 in the close reason")
            if code not in _VALID_CLOSE_CODES:
                return self._fail(1002, f"invalid close code {code}")
        elif payload:
            return self._fail(1002, "a close payload of one byte")
        assert self.transport is not None
        if self.state == CLOSING:
            self._finish_close()  # the client answered our close frame
            return
        # The client closes: echo its code, then the server closes TCP first (RFC 6455 7.1.1).
        self._write(close_frame(code if code != 1005 else 1000))
        self.state = CLOSED
        self._disconnected(code, reason, graceful=True)
        self._close_deadline = time.monotonic() + self.limits.close_timeout
        if self._closer is not None:
            self.transport.pause_reading()
            self._closer(self.transport)
        else:
            self.transport.close()  # once the echo is out; a client that stops reading: tick()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection: close frame, FIN, then read until the client closes."""
        assert self.transport is not None
        logger.debug("failing a WebSocket connection: %d %s", code, reason)
        self._failed = True
        self._buffer = b""
        if self.state == CLOSING:
            return  # failed (or closing) already: keep its deadline
        if self.state in (CONNECTING, OPEN):
            self._write(close_frame(code, reason))
        self.state = CLOSING
        self._closer = None
        self._disconnected(code, reason)
        self._close_deadline = time.monotonic() + self.limits.close_timeout
        self._watch()
        if self._paused_reading:  # the client's FIN must get through
            self._paused_reading = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:  # pragma: no cover - TLS transports cannot half-close
            self.transport.close()

    # -- the application's side -----------------------------------------------------------------

    async def _run_asgi(self) -> None:
        assert self.scope is not None
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                logger.error("Exception in ASGI application", exc_info=exc)
            if self.state == CONNECTING:
                self._reject(500, "internal server error")
            elif self.state == OPEN:
                self.close_now(1011, "internal error")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if self.state == CONNECTING:
            logger.error("ASGI application returned without accepting the WebSocket")
            self._reject(500, "internal server error")
        elif self.state == OPEN:
            self.close_now(1000)

    async def receive(self) -> Message:
        """The next ASGI event, waiting for it: `websocket.connect`, then each client message
        as `websocket.receive`, exactly once and in the order received, then
        `websocket.disconnect` with the close code, which every later call returns again.
        Messages that arrived before the end still come first. Raises nothing of its own."""
        while not self._inbox:
            if self._disconnect is not None:
                return self._disconnect
            self._receiver = self._loop.create_future()
            try:
                await self._receiver
            finally:
                self._receiver = None
        message = self._inbox.pop(0)
        if self._paused_reading and len(self._inbox) <= self.limits.max_queued // 4:
            self._paused_reading = False
            if self.transport is not None and self.state != CLOSED:
                self.transport.resume_reading()
        return message

    async def send(self, message: Message) -> None:
        """Carry out one ASGI event. Before accept: `websocket.accept`, or `websocket.close`
        (the upgrade gets an HTTP 403). While open: `websocket.send` writes one frame, after
        waiting while the buffer is over its high-water mark, and returns once the transport
        has it, not the client; `websocket.close` starts the closing handshake. Once closed
        or closing, by either side: `websocket.close` does nothing, anything else raises
        ClientDisconnected. A message that is not valid here raises RuntimeError."""
        kind = message["type"]
        if self.state == CONNECTING:
            if kind == "websocket.accept":
                self._accept(message.get("subprotocol"), message.get("headers") or ())
            elif kind == "websocket.close":
                self._reject(403, "forbidden")
            else:
                raise RuntimeError(f"Expected websocket.accept or websocket.close, got {kind!r}")
            return
        if self.state != OPEN:
            if kind == "websocket.close":
                return  # closed already, by either side
            raise ClientDisconnected()
        if kind == "websocket.send":
            data = message.get("bytes")
            text = message.get("text")
            if data is not None:
                payload = frame(OP_BINARY, bytes(data))
            elif text is not None:
                payload = frame(OP_TEXT, text.encode())
            else:
                raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            while not self._writable and self.state == OPEN:
                await self._drain()
            if self.state != OPEN:
                raise ClientDisconnected()
            self._write(payload)
        elif kind == "websocket.close":
            self.close_now(message.get("code") or 1000, message.get("reason") or "")
        else:
            raise RuntimeError(f"Expected 'websocket.send' or 'websocket.close', got {kind!r}")

    def _accept(self, subprotocol: str | None, headers: Iterable[tuple[bytes, bytes]]) -> None:
        assert self.transport is not None and self.scope is not None
        key = dict(self.scope["headers"])[b"sec-websocket-key"]
        lines = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                 b"connection: Upgrade\r\nsec-websocket-accept: ",
                 accept_key(key.decode()).encode(), b"\r\n"]
        if subprotocol:
            lines.append(b"sec-websocket-protocol: %b\r\n" % subprotocol.encode())
        for name, value in headers:
            lines.append(b"%b: %b\r\n" % (name, value))
        lines.append(b"\r\n")
        # Sent with the first frame if one follows in this turn of the loop (one write, not
        # two: a gateway accepts thousands of sockets at once), else on its own.
        self._head = b"".join(lines)
        self._loop.call_soon(self._flush_head)
        self.state = OPEN
        self._watch()
        if self._buffer:  # frames the client sent right behind its handshake
            pending, self._buffer = self._buffer, b""
            self._read_frames(pending)

    async def _drain(self) -> None:
        """Wait until the transport takes writes again; every waiting send shares one future
        (shielded: a cancelled send must not cancel the others' wait)."""
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        await asyncio.shield(waiter)

    # -- what the gateway calls directly --------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Accepted, and no close begun by either side: frames can still be written."""
        return self.state == OPEN

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def write_frame_if_idle(self, data: bytes) -> bool:
        """Write one whole, already-encoded frame if the socket is open and nothing is
        buffered; else False."""
        transport = self.transport
        if (self.state != OPEN or transport is None or transport.get_write_buffer_size()
                or transport.is_closing()):
            return False
        if self._head:
            transport.writelines([self._take_head(), data])
        else:
            transport.write(data)
        return True

    def write_frames(self, frames: Sequence[bytes]) -> bool:
        """Write whole, already-encoded server frames now; False once the socket is not open."""
        transport = self.transport
        if self.state != OPEN or transport is None or transport.is_closing():
            return False
        if self._head:
            transport.writelines([self._take_head(), *frames])
        elif len(frames) == 1:
            transport.write(frames[0])
        else:
            transport.writelines(frames)
        return True

    def close_now(self, code: int = 1000, reason: str = "", closer: Closer | None = None,
                  before: Sequence[bytes] = ()) -> bool:
        """Start the closing handshake now (after `before`, frames to write first in the same
        write). The application's receive() then gives `websocket.disconnect` with the code.
        Once the client answers, the TCP connection is handed to `closer` (or closed)."""
        transport = self.transport
        if self.state != OPEN or transport is None or transport.is_closing():
            return False
        transport.writelines([self._take_head(), *before, close_frame(code, reason)])
        self.state = CLOSING
        if closer is not None:
            self._closer = closer
        self._disconnected(code, reason, graceful=True)
        self._close_deadline = time.monotonic() + self.limits.close_timeout
        self._watch()
        if self._paused_reading:  # the client's close frame must get through
            self._paused_reading = False
            transport.resume_reading()
        return True

    def defer_to(self, closer: Closer, later: Callable[[Callable[[], None]], None]) -> None:
        """For graceful closes (either side's closing handshake): hand the TCP connection to
        `closer` instead of closing it, and tell the application (receive()'s
        websocket.disconnect) through `later`. A gateway uses this to keep many sockets
        closing together from delaying the deliveries of the moment."""
        self._closer, self._later = closer, later

    def abort(self) -> None:
        """Drop the connection at once, discarding whatever is buffered for the client."""
        if self.transport is not None:
            self.transport.abort()

    # -- server hooks -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server stops: 1012 (service restart) to open sockets, and close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.state == OPEN:
            self._write(close_frame(1012, "server shutting down"))
            self._disconnected(1012)
        elif self.state == CONNECTING and self.scope is not None:
            self._reject(503, "server shutting down")
            return
        self.state = CLOSED
        self._close_deadline = time.monotonic() + self.limits.close_timeout
        self._watch()
        transport.close()

    def tick(self, now: float) -> None:
        """Called by KeepAlive: ping, enforce the pong and close deadlines."""
        transport = self.transport
        if transport is None:
            return
        if self._close_deadline and now >= self._close_deadline:
            # The client never finished the closing handshake, or never took the last bytes.
            transport.abort()
            return
        if self.state != OPEN or transport.is_closing() or self.limits.ping_interval is None:
            return
        if self._ping_payload is not None:
            timeout = self.limits.ping_timeout
            if timeout is not None and now - self._ping_sent >= timeout:
                self._fail(1011, "keepalive ping timeout")
        elif now >= self._next_ping:
            self._ping_payload = random.getrandbits(32).to_bytes(4, "big")
            self._ping_sent = now
            self._write(frame(OP_PING, self._ping_payload))

    # -- helpers --------------------------------------------------------------------------------

    def _watch(self) -> None:
        period = min(value for value in (self.limits.ping_interval, self.limits.ping_timeout,
                                         self.limits.close_timeout, 4.0) if value)
        if self.limits.ping_interval is not None and not self._next_ping:
            self._next_ping = time.monotonic() + self.limits.ping_interval
        KeepAlive.of(self._loop).add(self, max(0.05, period / 4))

    def _finish_close(self) -> None:
        assert self.transport is not None
        closer, self._closer = self._closer, None
        self.state = CLOSED
        if closer is not None:
            self.transport.pause_reading()
            closer(self.transport)
        else:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._take_head() + data if self._head else data)

    def _take_head(self) -> bytes:
        head, self._head = self._head, b""
        return head

    def _flush_head(self) -> None:
        if self._head:
            self._write(b"")

    def _deliver(self, message: Message) -> None:
        self._inbox.append(message)
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)

    def _disconnected(self, code: int, reason: str = "", graceful: bool = False) -> None:
        """Record (once) how the connection ended; receive() returns it after the inbox."""
        if self._disconnect is None:
            self._disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
            if graceful and self._later is not None:
                self._later(self._wake_receiver)
            else:
                self._wake_receiver()

    def _wake_receiver(self) -> None:
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _address(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None
