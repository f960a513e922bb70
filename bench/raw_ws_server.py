"""A raw ceiling server for `bench/sse_load.py --server raw`: what a minimal server costs.

It serves the three live endpoints of the taskcast gateway, for the bench client only, with
the same bytes on the wire, and nothing else:

* `GET /tasks/{id}/events` (SSE): `200`, chunked, a `retry: 2000` block, then
  `id: <version>\\ndata: <task JSON>\\n\\n` per state: the current state first, then every newer
  one; after the terminal state the body ends (zero chunk) and the server closes the
  connection (`Connection: close`, as the gateway does). Unknown task: 404.
* `GET /tasks/{id}/ws` (WebSocket): `{"type":"task","data":<task JSON>}` text frames, the current
  state then every newer one; close 1000 after the terminal state (the client's echo then makes
  the server close TCP). Unknown task: close 4404.
* `GET /ws` (WebSocket): `{"op":"subscribe","task_ids":[...]}` -> (an error frame 404 for unknown
  ids,) `{"type":"subscribed","task_ids":[...]}`, then each task's current state and newer
  ones; a task is dropped after its terminal state and the socket stays open. `unsubscribe`
  and `{"op":"ping"}` are answered too.
* `GET /healthz`, `GET /readyz`: 200; `GET /metrics`: only the gauges
  `taskcast_open_connections{transport}` (SSE streams and WebSockets past their head) and
  `taskcast_redis_subscriptions`, which the churn mode of the load generator waits on.

How it gets the states, as the gateway does: one pub/sub connection per process SUBSCRIBEs to a
task's channel `PREFIX:task:{ID}:events` when its first watcher arrives (and UNSUBSCRIBEs when the
last one leaves); once Redis has confirmed the subscription, the current state is read with
HMGET of the record `PREFIX:task:{ID}` (redis-py asyncio with hiredis, a bounded pool) and
encoded in the gateway's field order (`taskcast.models.Task.to_dict`). A published event is the
task object JSON exactly as the producer's script published it: it is decoded once (for
`version` and `status`), each output frame (SSE chunk, WebSocket frame) is built once, and the
same bytes are written to every watcher. Per watcher (socket and task) only versions newer than
the last one sent are written.

What it leaves out, on purpose (it is a ceiling, not a gateway): no resync of lost pub/sub
messages, no reconnects (a lost Redis connection stops the server), no slow-client handling
(writes are buffered without bound, no send timeouts, no conflation), no keep-alives or
protocol pings, no `Last-Event-ID`, no `?image_base64=false`, no Origin check, no limits on
frames, subscriptions or op rates, no REST. The pub/sub connection is a raw asyncio protocol
with `hiredis.Reader` (no redis-py on the event path); the HTTP/1.1 and RFC 6455 handling is
hand-made on `asyncio.Protocol`; no framework, no WebSocket library; uvloop runs it; and the
garbage collector is tuned as `taskcast serve` tunes it (`taskcast.cli._tune_gc`), so a
comparison shows the framework's cost rather than GC settings.

    .venv/bin/python bench/raw_ws_server.py --redis-url redis://127.0.0.1:6379/0 \\
        --prefix taskcast --port 8000

It takes the flags of `taskcast serve` that the load generator passes (`--redis-url`,
`--prefix`, `--port`, `--host`, and `--log-level`, which only sets the log level of its own
messages).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import logging
import re
import signal
import sys
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import orjson
import redis.asyncio as aioredis

logger = logging.getLogger("raw_ws_server")

# HMGET fields, in this order (the record's `P:task:{ID}` fields the task object needs).
FIELDS = ("task_id", "status", "progress", "type", "angle", "image_url", "image_base64",
          "error_message", "version", "updated_at")
TERMINAL = ("completed", "failed")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEAD = 16384
HMGET_POOL = 16  # connections for record reads (the gateway's blocking pool holds up to 50)

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-store\r\nx-accel-buffering: no\r\nconnection: close\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
SSE_RETRY = b"retry: 2000\n\n"
SSE_PREAMBLE = SSE_HEAD + b"%x\r\n%b\r\n" % (len(SSE_RETRY), SSE_RETRY)
SSE_END = b"0\r\n\r\n"

TASK_EVENTS = re.compile(rb"/tasks/(\d{1,19})/events")
TASK_WS = re.compile(rb"/tasks/(\d{1,19})/ws")


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def ws_close(code: int, reason: bytes = b"") -> bytes:
    return ws_frame(OP_CLOSE, code.to_bytes(2, "big") + reason)


def unmask(payload: bytes, key: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        size, "little")


def plain_response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status.encode(), content_type, len(body))) + body


def resp_command(*args: bytes) -> bytes:
    """One Redis command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


class Event:
    """One task state and its frames, built once and shared by every watcher."""

    __slots__ = ("version", "terminal", "data", "_sse", "_ws")

    def __init__(self, version: int, terminal: bool, data: bytes) -> None:
        self.version = version
        self.terminal = terminal
        self.data = data  # the task object JSON
        self._sse: bytes | None = None
        self._ws: bytes | None = None

    def sse_chunk(self) -> bytes:
        chunk = self._sse
        if chunk is None:
            frame = b"id: %d\ndata: %b\n\n" % (self.version, self.data)
            chunk = self._sse = b"%x\r\n%b\r\n" % (len(frame), frame)
        return chunk

    def ws_frame(self) -> bytes:
        frame = self._ws
        if frame is None:
            frame = self._ws = ws_frame(OP_TEXT, b'{"type":"task","data":' + self.data + b"}")
        return frame


def event_from_record(task_id: int, values: Sequence[bytes | None]) -> Event | None:
    """The task object from an HMGET reply (FIELDS order) in the gateway's field order, or None
    when the record does not exist."""
    if all(value is None for value in values):
        return None

    def text(index: int) -> str:
        value = values[index]
        return "" if value is None else value.decode("utf-8", "replace")

    def integer(index: int) -> int:
        value = values[index]
        return 0 if value is None else int(value)

    status = text(1) or "submitted"
    version = integer(8)
    task = {
        "task_id": task_id,
        "status": status,
        "progress": integer(2),
        "type": text(3),
        "angle": text(4),
        "image": {"image_base64": text(6), "image_url": text(5)},
        "error_message": text(7),
        "version": version,
        "updated_at": integer(9),
    }
    return Event(version, status in TERMINAL, orjson.dumps(task))


class Watch:
    """One connection watching one task: what was sent, and a slot for a state that arrived
    before the connection could send anything (while its current state was being read)."""

    __slots__ = ("conn", "task_id", "last_version", "active", "pending")

    def __init__(self, conn: Conn, task_id: int) -> None:
        self.conn = conn
        self.task_id = task_id
        self.last_version = 0
        self.active = False
        self.pending: Event | None = None


class Topic:
    __slots__ = ("task_id", "channel", "watches", "ready")

    def __init__(self, task_id: int, channel: bytes, ready: asyncio.Future[None]) -> None:
        self.task_id = task_id
        self.channel = channel
        self.watches: dict[Watch, None] = {}
        self.ready = ready


class PubSub(asyncio.Protocol):
    """The one pub/sub connection: RESP out, hiredis in."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        hub = self.hub
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if isinstance(reply, list) and len(reply) == 3:
                kind = reply[0]
                if kind == b"message":
                    hub.on_message(reply[1], reply[2])
                elif kind == b"subscribe":
                    hub.on_subscribed(reply[1])
            elif isinstance(reply, Exception):
                logger.error("Redis pub/sub error: %s", reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.hub.fatal(f"Redis pub/sub connection lost ({exc})")

    def send(self, *args: bytes) -> None:
        if self.transport is not None:
            self.transport.write(resp_command(*args))


class Hub:
    """Topics by channel; subscription on the first watcher; fan-out of shared frames."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", ""):
            raise SystemExit(f"raw_ws_server: only redis:// URLs are supported, not {redis_url}")
        self.redis_host = parts.hostname or "127.0.0.1"
        self.redis_port = parts.port or 6379
        self.redis_password = parts.password
        self.prefix = prefix
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=HMGET_POOL)
        self.redis = aioredis.Redis.from_pool(pool)
        self.pubsub: PubSub | None = None
        self.topics: dict[bytes, Topic] = {}
        self.confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self.open = {"sse": 0, "ws": 0}
        self.malformed = 0
        self.stopped: asyncio.Future[str] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        await self.redis.ping()
        _, protocol = await loop.create_connection(lambda: PubSub(self), self.redis_host,
                                                   self.redis_port)
        self.pubsub = protocol
        if self.redis_password:
            protocol.send(b"AUTH", self.redis_password.encode())

    def fatal(self, reason: str) -> None:
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(reason)

    def channel(self, task_id: int) -> bytes:
        return b"%s:task:{%d}:events" % (self.prefix.encode(), task_id)

    def record(self, task_id: int) -> str:
        return f"{self.prefix}:task:{{{task_id}}}"

    # watchers -------------------------------------------------------------------------------

    async def watch(self, watch: Watch) -> None:
        """Add a (not yet active) watch; return once Redis has confirmed its subscription."""
        channel = self.channel(watch.task_id)
        topic = self.topics.get(channel)
        if topic is None:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            topic = self.topics[channel] = Topic(watch.task_id, channel, ready)
            self.confirms.setdefault(channel, deque()).append(ready)
            assert self.pubsub is not None
            self.pubsub.send(b"SUBSCRIBE", channel)
        topic.watches[watch] = None
        if not topic.ready.done():
            await asyncio.shield(topic.ready)

    def unwatch(self, watch: Watch) -> None:
        channel = self.channel(watch.task_id)
        topic = self.topics.get(channel)
        if topic is None or watch not in topic.watches:
            return
        del topic.watches[watch]
        if not topic.watches:
            del self.topics[channel]
            if self.pubsub is not None:
                self.pubsub.send(b"UNSUBSCRIBE", channel)

    async def read(self, task_ids: list[int]) -> list[Event | None]:
        """Current states, in one round trip."""
        if len(task_ids) == 1:
            values = await self.redis.hmget(self.record(task_ids[0]), FIELDS)
            return [event_from_record(task_ids[0], cast(list[bytes | None], values))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hmget(self.record(task_id), FIELDS)
            replies = await pipe.execute()
        return [event_from_record(task_id, values)
                for task_id, values in zip(task_ids, replies, strict=True)]

    # pub/sub ---------------------------------------------------------------------------------

    def on_subscribed(self, channel: bytes) -> None:
        waiting = self.confirms.get(channel)
        if waiting:
            ready = waiting.popleft()
            if not waiting:
                del self.confirms[channel]
            if not ready.done():
                ready.set_result(None)

    def on_message(self, channel: bytes, data: bytes) -> None:
        topic = self.topics.get(channel)
        if topic is None:
            return
        try:
            task = orjson.loads(data)
            event = Event(int(task["version"]), task["status"] in TERMINAL, data)
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        watches: Iterable[Watch] = tuple(topic.watches) if event.terminal else topic.watches
        for watch in watches:
            if watch.active:
                watch.conn.deliver(watch, event)
            elif watch.pending is None or event.version > watch.pending.version:
                watch.pending = event

    def metrics(self) -> bytes:
        return ("# TYPE taskcast_open_connections gauge\n"
                f'taskcast_open_connections{{transport="sse"}} {self.open["sse"]}\n'
                f'taskcast_open_connections{{transport="ws"}} {self.open["ws"]}\n'
                "# TYPE taskcast_redis_subscriptions gauge\n"
                f"taskcast_redis_subscriptions {len(self.topics)}\n"
                "# TYPE taskcast_events_malformed_total counter\n"
                f"taskcast_events_malformed_total {self.malformed}\n").encode()


class Conn(asyncio.Protocol):
    """One client connection: the request head, then SSE, a per-task WebSocket or /ws."""

    __slots__ = ("hub", "transport", "buf", "mode", "watches", "counted", "close_sent",
                 "jobs")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.mode = ""  # "" (reading the head), "sse", "ws1", "ws", "done"
        self.watches: dict[int, Watch] = {}
        self.counted = ""  # the gauge this connection is counted in
        self.close_sent = False
        self.jobs: set[asyncio.Task[None]] = set()

    # asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.mode:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.respond(plain_response("431 Request Header Fields Too Large", b""))
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            self.route(head)
        if self.mode in ("ws1", "ws") and buf:
            self.ws_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.mode = "done"
        for watch in self.watches.values():
            self.hub.unwatch(watch)
        self.watches.clear()
        if self.counted:
            self.hub.open[self.counted] -= 1
            self.counted = ""
        for job in self.jobs:
            job.cancel()

    # request routing ---------------------------------------------------------------------

    def route(self, head: bytes) -> None:
        request_line, _, header_block = head.partition(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or parts[0] != b"GET":
            self.respond(plain_response("405 Method Not Allowed", b""))
            return
        path = parts[1].partition(b"?")[0]
        headers: dict[bytes, bytes] = {}
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if path in (b"/healthz", b"/readyz"):
            self.respond(plain_response("200 OK", b'{"status":"ok"}'))
            return
        if path == b"/metrics":
            self.respond(plain_response("200 OK", self.hub.metrics(),
                                        b"text/plain; version=0.0.4"))
            return
        match = TASK_EVENTS.fullmatch(path)
        if match is not None:
            self.mode = "sse"
            self.spawn(self.start_one(int(match[1])))
            return
        ws_path = path == b"/ws" or TASK_WS.fullmatch(path) is not None
        if ws_path and headers.get(b"upgrade", b"").lower() == b"websocket":
            key = headers.get(b"sec-websocket-key")
            if not key:
                self.respond(plain_response("400 Bad Request", b""))
                return
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            self.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                       b"connection: Upgrade\r\nsec-websocket-accept: %b\r\n\r\n" % accept)
            self.count("ws")
            if path == b"/ws":
                self.mode = "ws"
            else:
                match = TASK_WS.fullmatch(path)
                assert match is not None
                self.mode = "ws1"
                self.spawn(self.start_one(int(match[1])))
            return
        self.respond(plain_response("404 Not Found", b'{"detail":"not found"}'))

    def respond(self, raw: bytes) -> None:
        self.mode = "done"
        if self.transport is not None:
            self.transport.write(raw)
            self.transport.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def count(self, transport: str) -> None:
        self.counted = transport
        self.hub.open[transport] += 1

    def spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(job)
        self.jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self.jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("connection job failed: %r", task.exception())
            if self.transport is not None:
                self.transport.abort()

    # watching ----------------------------------------------------------------------------

    async def start_one(self, task_id: int) -> None:
        """SSE or a per-task WebSocket: subscribe, read the current state, send it."""
        watch = self.watches[task_id] = Watch(self, task_id)
        await self.hub.watch(watch)
        if self.transport is None:
            return
        event = (await self.hub.read([task_id]))[0]
        if self.transport is None:
            return
        if event is None:
            if self.mode == "sse":
                self.respond(plain_response("404 Not Found",
                                            b'{"code":404,"msg":"task not found","data":null}'))
            else:
                self.send_close(4404, b"task not found")
            return
        if self.mode == "sse":
            self.write(SSE_PREAMBLE)
            self.count("sse")
        self.activate(watch, event)

    async def subscribe(self, task_ids: list[int]) -> None:
        """`/ws` subscribe op: (error frame,) subscribed, then the current states."""
        new = [Watch(self, task_id) for task_id in dict.fromkeys(task_ids)
               if task_id not in self.watches]
        for watch in new:
            self.watches[watch.task_id] = watch
        await asyncio.gather(*(self.hub.watch(watch) for watch in new))
        if self.transport is None:
            return
        events = await self.hub.read([watch.task_id for watch in new]) if new else []
        if self.transport is None:
            return
        unknown = [watch.task_id for watch, event in zip(new, events, strict=True)
                   if event is None]
        if unknown:
            for task_id in unknown:
                self.hub.unwatch(self.watches.pop(task_id))
            self.write(ws_frame(OP_TEXT, orjson.dumps(
                {"type": "error", "code": 404, "msg": "task not found", "task_ids": unknown})))
        accepted = [task_id for task_id in task_ids if task_id not in unknown]
        self.write(ws_frame(OP_TEXT, orjson.dumps({"type": "subscribed",
                                                   "task_ids": accepted})))
        for watch, event in zip(new, events, strict=True):
            if event is not None and self.watches.get(watch.task_id) is watch:
                self.activate(watch, event)

    def activate(self, watch: Watch, current: Event) -> None:
        """Send the current state, then a newer one that arrived meanwhile; from now on the hub
        delivers straight to the connection."""
        watch.active = True
        self.deliver(watch, current)
        pending, watch.pending = watch.pending, None
        if pending is not None and watch.active:
            self.deliver(watch, pending)

    def deliver(self, watch: Watch, event: Event) -> None:
        if event.version <= watch.last_version or self.transport is None:
            return
        watch.last_version = event.version
        mode = self.mode
        if mode == "sse":
            self.transport.write(event.sse_chunk())
            if event.terminal:
                self.transport.write(SSE_END)
                self.drop(watch)
                self.mode = "done"
                self.transport.close()
        else:
            self.transport.write(event.ws_frame())
            if event.terminal:
                self.drop(watch)
                if mode == "ws1":
                    self.send_close(1000, b"task finished")

    def drop(self, watch: Watch) -> None:
        watch.active = False
        if self.watches.get(watch.task_id) is watch:
            del self.watches[watch.task_id]
        self.hub.unwatch(watch)

    def send_close(self, code: int, reason: bytes) -> None:
        if not self.close_sent:
            self.close_sent = True
            self.write(ws_close(code, reason))

    # WebSocket client frames ---------------------------------------------------------------

    def ws_frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2 and self.transport is not None:
            b0, b1 = buf[0], buf[1]
            length, start = b1 & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, start = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, start = int.from_bytes(buf[2:10], "big"), 10
            if not b1 & 0x80:
                self.send_close(1002, b"client frames must be masked")
                self.transport.close()
                return
            end = start + 4 + length
            if len(buf) < end:
                return
            payload = unmask(bytes(buf[start + 4 : end]), bytes(buf[start : start + 4]))
            del buf[:end]
            self.on_ws_frame(b0 & 0x0F, payload)

    def on_ws_frame(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            if self.mode == "ws":
                self.op(payload)
        elif opcode == OP_CLOSE:
            # The client's close, or its answer to ours: the handshake is done either way.
            self.send_close(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000,
                            b"")
            if self.transport is not None:
                self.transport.close()
        elif opcode == OP_PING:
            self.write(ws_frame(OP_PONG, payload))

    def op(self, payload: bytes) -> None:
        try:
            frame = orjson.loads(payload)
            op = frame["op"]
        except (ValueError, KeyError, TypeError):
            self.write(ws_frame(OP_TEXT, b'{"type":"error","code":400,"msg":"bad frame"}'))
            return
        if op == "ping":
            self.write(ws_frame(OP_TEXT, b'{"type":"pong"}'))
            return
        task_ids = frame.get("task_ids")
        if (op not in ("subscribe", "unsubscribe") or not isinstance(task_ids, list)
                or not task_ids or not all(type(t) is int and t >= 0 for t in task_ids)):
            self.write(ws_frame(OP_TEXT, b'{"type":"error","code":422,"msg":"bad op"}'))
            return
        if op == "subscribe":
            self.spawn(self.subscribe(task_ids))
        else:
            for task_id in dict.fromkeys(task_ids):
                watch = self.watches.get(task_id)
                if watch is not None:
                    self.drop(watch)
            self.write(ws_frame(OP_TEXT, orjson.dumps({"type": "unsubscribed",
                                                       "task_ids": task_ids})))


def tune_gc() -> None:
    """As `taskcast.cli._tune_gc` (the gateway's CLI) does it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


async def serve(args: argparse.Namespace) -> int:
    hub = Hub(args.redis_url, args.prefix)
    await hub.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(hub), args.host, args.port, backlog=4096)
    assert hub.stopped is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, hub.fatal, "")
    tune_gc()
    logger.info("raw ceiling server on %s:%d (prefix %s)", args.host, args.port, args.prefix)
    reason = await hub.stopped
    server.close()
    with contextlib.suppress(Exception):
        await hub.redis.aclose()
    if reason:
        logger.error("%s", reason)
        return 1
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="taskcast")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
