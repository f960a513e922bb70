"""Server-Sent Events (contract section 5): `/tasks/{task_id}/events` and `/events?task_id=`.

Frames are encoded once per task version by the hub (TaskState.sse_frame) and written as the
same bytes to every client; the frames of one wake-up go out in one write. On a single-task
stream under uvicorn, a state that finds the stream idle is written by the hub on the spot, as
a ready-made HTTP chunk (OpenStream.push), without waking the stream's task.

The stream is a lean ASGI response of our own rather than sse-starlette's EventSourceResponse:
measured on this project's benchmark, that response's per-connection machinery (an anyio task
group with three tasks, a lock, events, and a cancel scope around every write) cost about
40 KiB per idle connection and most of the CPU per delivery (bench/README.md). Here a stream
is its request task plus one task waiting for the disconnect; keep-alives, slow-client
detection and graceful shutdown are shared by all streams (streams.py). sse-starlette still
serves where it is cheap: its process-wide shutdown detection, and its encoder for the few
control events.
"""

from __future__ import annotations

import asyncio
import logging

from sse_starlette.event import ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from taskcast.errors import CorruptRecord, InvalidParameter, StoreUnavailable
from taskcast.hub import Hub, Watcher
from taskcast.ids import parse_task_id
from taskcast.models import Task
from taskcast.responses import internal_error, not_found, validation_error
from taskcast.rest import image_base64_flag
from taskcast.settings import Settings
from taskcast.streams import OpenStream, OpenStreams

logger = logging.getLogger(__name__)

KEEPALIVE = ServerSentEvent(comment="keep-alive", sep="\n").encode()
# The id of the closing event of a multi-task stream: a reconnect that carries it gets 204.
STREAM_DONE_ID = "done"
STREAM_END = ServerSentEvent(data="{}", event="end", id=STREAM_DONE_ID, sep="\n").encode()
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    # One response per connection: the stream's end is the connection's end, so no client
    # sends a next request on it while the server is about to close it (see DeferredCloser).
    (b"connection", b"close"),
]


class TaskEventStream:
    """The ASGI response of one SSE connection: watches its tasks and writes their frames.

    The loop runs in the request's own task (no generator layer between a wake-up and its
    write); see streams.py for how a departed client is noticed.
    """

    def __init__(self, hub: Hub, streams: OpenStreams, settings: Settings, watcher: Watcher,
                 task_ids: list[int], current: list[Task | None], include: bool,
                 end_event: bool) -> None:
        self.hub = hub
        self.streams = streams
        self.settings = settings
        self.watcher = watcher
        self.task_ids = task_ids
        self.current = current
        self.include = include
        self.end_event = end_event  # the multi-task stream ends with `event: end`

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":  # headers only: a HEAD must not open a stream
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        # Unwrapped, uvicorn's `send` belongs to an object with a `disconnected` flag that the
        # sweeper polls; otherwise a task waits for the disconnect message.
        cycle = getattr(send, "__self__", None)
        if not isinstance(getattr(cycle, "disconnected", None), bool):
            cycle = None
        stream = OpenStream(self.watcher, scope, asyncio.current_task(), cycle)
        listener = None if cycle else loop.create_task(self._until_disconnect(receive))
        gauge = self.hub.metrics.connections.labels("sse")
        gauge.inc()
        self.streams.add(stream)
        for task_id, task in zip(self.task_ids, self.current, strict=True):
            self.hub.watch(self.watcher, task_id, task)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            stream.take_over_close()
            if len(self.task_ids) == 1:
                # One task: a state that finds the stream idle is written on the spot (see
                # OpenStream.push). Multi-task streams keep batching the states of one wake-up
                # into one write.
                stream.write_directly(self.include, self.hub.metrics.delivered)
            last = await self._pump(send, stream, loop)
            if not stream.aborted:
                transport = stream.transport
                if transport is not None:
                    # The client's FIN now waits for DeferredCloser instead of being handled
                    # (read, close, bookkeeping) in the middle of other streams' deliveries.
                    transport.pause_reading()
                # The last frames and the end of the body in one write.
                await self._write(send, stream, loop, last, more_body=False)
                if transport is not None:
                    self.streams.closer.add(transport)
                # Let the other streams woken by the same terminal state write theirs before
                # this one spends time on its teardown.
                await asyncio.sleep(0)
        except OSError:
            pass  # the client went away (servers on ASGI 2.4 raise on a send after that)
        finally:
            self.hub.unwatch(self.watcher, self.task_ids)
            if listener is not None:
                listener.cancel()
            self.streams.discard(stream)
            gauge.dec()

    async def _pump(self, send: Send, stream: OpenStream, loop: asyncio.AbstractEventLoop
                    ) -> bytes:
        """Write states until every task is finished or the stream is closed; returns what
        the last write carries: the terminal frames (and `event: end`), a closing event, or
        nothing."""
        hub, watcher, include = self.hub, self.watcher, self.include
        delivered = hub.metrics.delivered
        unfinished = set(self.task_ids)
        await self._write(send, stream, loop,
                          ServerSentEvent(retry=self.settings.sse_retry_ms, sep="\n").encode())
        while unfinished and not watcher.closed and not stream.aborted:
            batch = await watcher.next_batch()
            if batch:
                for state in batch:
                    if state.terminal:
                        unfinished.discard(state.task_id)
                frames = b"".join([state.sse_frame(include) for state in batch])
                delivered["sse"] += len(batch)
                if not unfinished:  # the stream's last write also ends it (see __call__)
                    return frames + STREAM_END if self.end_event else frames
                await self._write(send, stream, loop, frames)
            if watcher.claimed:
                # A client may already hold a terminal state (Last-Event-ID) that the hub
                # learns only now, e.g. after Redis came back: nothing newer will come for it.
                unfinished.difference_update(
                    [task_id for task_id in unfinished if hub.holds_terminal(watcher, task_id)]
                )
            watcher.missing &= unfinished
            if watcher.missing:
                # The record vanished (expired, or never existed while Redis was down at
                # connect time). End the stream: the reconnect gets the 404 that stops it.
                names = ",".join(str(task_id) for task_id in sorted(watcher.missing))
                return ServerSentEvent(data=names, event="not_found", sep="\n").encode()
            if not batch and unfinished and not watcher.closed:
                await self._write(send, stream, loop, KEEPALIVE)
        return STREAM_END if not unfinished and self.end_event else b""

    @staticmethod
    async def _write(send: Send, stream: OpenStream, loop: asyncio.AbstractEventLoop,
                     chunk: bytes, more_body: bool = True) -> None:
        # The sweeper in streams.py reads sending_since to find writes that never return.
        stream.sending_since = loop.time()
        await send({"type": "http.response.body", "body": chunk, "more_body": more_body})
        stream.sending_since = 0.0
        stream.active = True

    async def _until_disconnect(self, receive: Receive) -> None:
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self.watcher.close("client left")


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else 0


async def task_events(request: Request) -> Response:
    """`GET /tasks/{task_id}/events`: one task's states, then the end of the stream."""
    hub: Hub = request.app.state.hub
    settings: Settings = request.app.state.settings
    try:
        task_id = parse_task_id(request.path_params["task_id"])
        include = image_base64_flag(request)
    except InvalidParameter as exc:
        return validation_error([exc.detail])
    last_seen = _last_event_id(request)
    try:
        task = await hub.lookup(task_id)
        if task is None:
            return not_found()
    except StoreUnavailable:
        task = None  # Hold the stream open: EventSource gives up for good on a non-200 answer.
    if task is not None and last_seen > task.version:
        last_seen = 0  # not a version this task ever had: start from the current state
    if task is not None and task.is_terminal and last_seen >= task.version:
        return Response(status_code=204)
    watcher = Watcher(hub.metrics)
    if last_seen:
        watcher.claim(task_id, last_seen)
    return TaskEventStream(hub, request.app.state.streams, settings, watcher,  # type: ignore[return-value]
                           [task_id], [task], include, end_event=False)


async def many_task_events(request: Request) -> Response:
    """`GET /events?task_id=1&task_id=2`: many tasks on one connection (browsers allow six
    HTTP/1.1 connections per origin). Ends with `event: end` (id `done`) once all are finished."""
    hub: Hub = request.app.state.hub
    settings: Settings = request.app.state.settings
    raw_ids = [part for value in request.query_params.getlist("task_id")
               for part in value.split(",")]
    try:
        include = image_base64_flag(request)
        if not raw_ids:
            raise InvalidParameter("", {"type": "missing", "loc": ["query", "task_id"],
                                        "msg": "Field required", "input": None})
        task_ids = list(dict.fromkeys(
            parse_task_id(raw, ("query", "task_id", index)) for index, raw in enumerate(raw_ids)
        ))
        if len(task_ids) > settings.max_tasks_per_stream:
            raise InvalidParameter(str(len(task_ids)), {
                "type": "too_long", "loc": ["query", "task_id"],
                "msg": f"List should have at most {settings.max_tasks_per_stream} items",
                "input": len(task_ids), "ctx": {"max_length": settings.max_tasks_per_stream}})
    except InvalidParameter as exc:
        return validation_error([exc.detail])
    if request.headers.get("last-event-id") == STREAM_DONE_ID:
        return Response(status_code=204)
    found: list[Task | None] = [None] * len(task_ids)
    try:
        found = list(await asyncio.gather(*(hub.lookup(task_id) for task_id in task_ids)))
        if any(task is None for task in found):
            return not_found()
    except StoreUnavailable:
        pass  # hold the stream open; the hub reads the records once Redis answers
    watcher = Watcher(hub.metrics)
    return TaskEventStream(hub, request.app.state.streams, settings, watcher,  # type: ignore[return-value]
                           task_ids, found, include, end_event=True)


async def serve_stream(app: Starlette, scope: Scope, receive: Receive, send: Send) -> bool:
    """The SSE endpoints without Starlette's middleware stack.

    A stream lives for minutes, and every middleware layer keeps a coroutine frame per
    connection and wraps every write (~7 % of the CPU per delivery and several KiB per idle
    connection in the benchmark). Errors are answered here exactly as the app's handlers
    would. With CORS configured, requests take the ordinary path through CORSMiddleware.
    """
    if scope["type"] != "http" or scope["method"] != "GET":
        return False
    path: str = scope["path"]
    if path == "/events":
        endpoint, params = many_task_events, {}
    elif path.startswith("/tasks/") and path.endswith("/events") and path.count("/") == 3:
        task_id = path[len("/tasks/") : -len("/events")]
        if not task_id:
            return False
        endpoint, params = task_events, {"task_id": task_id}
    else:
        return False
    settings: Settings | None = getattr(app.state, "settings", None)
    if settings is None or settings.cors_origins:
        return False
    scope["app"] = app
    scope["path_params"] = params
    try:
        response = await endpoint(Request(scope, receive))
    except CorruptRecord as exc:
        logger.error("GET %s: %s", path, exc)
        response = internal_error()
    except Exception:
        logger.exception("GET %s failed", path)
        response = internal_error()
    await response(scope, receive, send)
    return True
