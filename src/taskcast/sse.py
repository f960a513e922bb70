"""Server-Sent Events (contract section 5): `/tasks/{task_id}/events` and `/events?task_id=`.

Frames are encoded once per task version by the hub (TaskState.sse_frame) and written as the
same bytes to every client. sse-starlette runs the response (headers, disconnect detection,
send timeouts, graceful shutdown); its own ping task is off because the stream below writes
its keep-alive comments itself, which saves one task per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from taskcast.errors import InvalidParameter, StoreUnavailable
from taskcast.hub import Hub, Watcher
from taskcast.ids import parse_task_id
from taskcast.models import Task
from taskcast.responses import not_found, validation_error
from taskcast.rest import image_base64_flag
from taskcast.server import abort_connection
from taskcast.settings import Settings

logger = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
# The id of the closing event of a multi-task stream: a reconnect that carries it gets 204.
STREAM_DONE_ID = "done"


class _ShutdownSignal:
    """Quacks like the anyio.Event sse-starlette sets on server shutdown: closes the watcher,
    so the stream ends cleanly (clients then reconnect, possibly to another replica)."""

    __slots__ = ("watcher",)

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def set(self) -> None:
        self.watcher.close("shutdown")


class TaskEventStream(EventSourceResponse):
    """Counts the connection, and turns a client that stopped reading into a clean close."""

    def __init__(self, content: AsyncIterator[bytes], watcher: Watcher, hub: Hub,
                 settings: Settings) -> None:
        super().__init__(
            content,
            ping=0,
            send_timeout=settings.send_timeout_s,
            shutdown_event=_ShutdownSignal(watcher),  # type: ignore[arg-type]
            shutdown_grace_period=1.0,
        )
        self.watcher = watcher
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gauge = self.hub.metrics.connections.labels("sse")
        gauge.inc()
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self.hub.metrics.slow_disconnects.labels("sse").inc()
            self.hub.metrics.dropped.inc(len(self.watcher.pending))
            # Closing politely would wait for the client to read its full buffer first.
            abort_connection(scope)
            logger.info("dropped an SSE client that stopped reading")
        finally:
            gauge.dec()


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else 0


async def _stream(hub: Hub, watcher: Watcher, task_ids: list[int], current: list[Task | None],
                  include: bool, settings: Settings, end_id: bool) -> AsyncIterator[bytes]:
    metrics = hub.metrics.deliveries.labels("sse")
    unfinished = set(task_ids)
    try:
        for task_id, task in zip(task_ids, current, strict=True):
            hub.watch(watcher, task_id, task)
        yield b"retry: %d\n\n" % settings.sse_retry_ms
        while unfinished and not watcher.closed:
            batch = await watcher.next_batch(settings.sse_keepalive_s)
            for state in batch:
                yield state.sse_frame(include)
                if state.task.is_terminal:
                    unfinished.discard(state.task.task_id)
            if batch:
                metrics.inc(len(batch))
            # A client may already hold a terminal state (Last-Event-ID) that the hub learns
            # only now, e.g. after Redis came back: nothing newer will come for it.
            unfinished.difference_update(
                task_id for task_id in list(unfinished) if hub.holds_terminal(watcher, task_id)
            )
            watcher.missing &= unfinished
            if watcher.missing:
                # The record vanished (expired, or never existed while Redis was down at
                # connect time). End the stream: the reconnect gets the 404 that stops it.
                names = ",".join(str(task_id) for task_id in sorted(watcher.missing))
                yield b"event: not_found\ndata: %s\n\n" % names.encode()
                return
            if not batch and unfinished and not watcher.closed:
                yield KEEPALIVE
        if not unfinished and end_id:
            yield b"event: end\nid: %s\ndata: {}\n\n" % STREAM_DONE_ID.encode()
    finally:
        hub.unwatch(watcher, task_ids)


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
    return TaskEventStream(_stream(hub, watcher, [task_id], [task], include, settings, False),
                           watcher, hub, settings)


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
    return TaskEventStream(_stream(hub, watcher, task_ids, found, include, settings, True),
                           watcher, hub, settings)
