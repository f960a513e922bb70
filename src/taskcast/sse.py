"""Server-Sent Events (contract section 5): `/tasks/{task_id}/events` and `/events?task_id=`.

This module parses the request and frames bytes; delivery (what to send when, slow clients,
the end of a stream) is the delivery layer's (delivery.py). Each state is framed once per
version (`id: <version>` and `data: <task object>`) and, for direct writes, once more as an
HTTP/1.1 chunk; every client of the task gets the same bytes.

A stream is its request task plus, only under servers without a disconnect flag, a task that
waits for `http.disconnect`. The response says `Connection: close`: a stream's end is its
connection's end, and under uvicorn the gateway closes finished connections itself, between
deliveries (delivery.DeferredCloser).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from sse_starlette.event import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from taskcast import server
from taskcast.access import http_forbidden, http_grant
from taskcast.cors import CorsPolicy, add_cors_headers
from taskcast.delivery import Connections, End, Item, Session
from taskcast.errors import CorruptRecord, InvalidParameter
from taskcast.hub import TaskState
from taskcast.ids import parse_task_id
from taskcast.models import Task
from taskcast.responses import failure, not_found, validation_error
from taskcast.rest import image_base64_flag

logger = logging.getLogger(__name__)

# A comment line without the blank line that would end a block: EventSource ignores comment
# lines either way, but a generic parser (httpx-sse) turns a comment-only block after an event
# into an event with empty data (it keeps the last id), which breaks `json.loads(event.data)`.
# The comment still moves bytes, which is all a keep-alive is for.
KEEPALIVE = b": keep-alive\n"
# The id of the closing event of a multi-task stream: a reconnect that carries it gets 204.
STREAM_DONE_ID = "done"
STREAM_END = ServerSentEvent(data="{}", event="end", id=STREAM_DONE_ID, sep="\n").encode()
# The token's time is up (contract 7): the client reconnects with a fresh one.
TOKEN_EXPIRED = ServerSentEvent(data="{}", event="token_expired", sep="\n").encode()
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    # One response per connection: the stream's end is the connection's end, so no client
    # sends a next request on it while the server is about to close it (see DeferredCloser).
    (b"connection", b"close"),
]


def sse_event(include_image_base64: bool, state: TaskState) -> bytes:
    """The state as one SSE event: `id:` its version, `data:` the task object."""
    return b"id: %d\ndata: %b\n\n" % (state.version, state.json(include_image_base64))


def sse_chunk(event: Callable[[TaskState], bytes], state: TaskState) -> bytes:
    """The event as one HTTP/1.1 body chunk, for direct writes (server.HttpLink)."""
    return server.http_chunk(state.encoded(event))


# Encodings for TaskState.encoded (built once per version, shared by every stream), one per
# `image_base64` choice; a partial is its own cache key.
EVENT = {include: partial(sse_event, include) for include in (True, False)}
CHUNK = {include: partial(sse_chunk, EVENT[include]) for include in (True, False)}


class SseSession(Session):
    """One SSE response: states as events, control messages as comments or named events."""

    transport = "sse"
    keepalive = KEEPALIVE
    drop_finished = False

    __slots__ = ("_asgi_send", "_link", "_task", "_multi", "_event", "_chunk", "_retry")

    def __init__(self, conns: Connections, include_image_base64: bool, send: Send,
                 link: server.HttpLink | None, multi: bool) -> None:
        super().__init__(conns, ends_when_done=True)
        self._asgi_send = send
        self._link = link
        self._task = asyncio.current_task()
        self._multi = multi  # a multi-task stream ends with `event: end`
        self._event, self._chunk = EVENT[include_image_base64], CHUNK[include_image_base64]
        # The reconnect hint rides in the first event's block: a block of its own (no data)
        # is an empty event to generic parsers such as httpx-sse's.
        self._retry: bytes | None = b"retry: %d\n" % conns.settings.sse_retry_ms

    def _payload(self, item: Item) -> bytes:
        if isinstance(item, bytes):
            return item
        if self._retry is not None:
            hint, self._retry = self._retry, None
            return hint + item.encoded(self._event)
        return item.encoded(self._event)

    def _writable(self) -> bool:
        return self._link is not None and self._link.writable

    def _write_state(self, state: TaskState) -> bool:
        link = self._link
        if self._retry is not None:
            return False  # the first event carries the hint: not the shared bytes alone
        return link is not None and link.write_if_idle(state.encoded(self._chunk))

    def _write_now(self, items: list[Item]) -> bool:
        link = self._link
        if link is None or not link.writable:
            return False
        chunks = []
        for item in items:
            if isinstance(item, bytes):
                chunks.append(server.http_chunk(item))
                continue
            if self._retry is not None:
                chunks.append(server.http_chunk(self._retry))  # same event block, next chunk
                self._retry = None
            chunks.append(item.encoded(self._chunk))
        link.write(chunks)
        return True

    async def _send(self, items: list[Item]) -> None:
        body = b"".join([self._payload(item) for item in items])
        await self._asgi_send({"type": "http.response.body", "body": body, "more_body": True})

    def _last_body(self, items: list[Item]) -> bytes:
        body = b"".join([self._payload(item) for item in items])
        if self.end is End.DONE and self._multi:
            body += STREAM_END
        elif self.end is End.TOKEN_EXPIRED:
            body += TOKEN_EXPIRED
        elif self.end is End.MISSING:
            # The record vanished (expired, or never existed while Redis was down at connect
            # time). The reconnect gets the 404 that stops EventSource.
            assert isinstance(self.end_detail, list)
            names = ",".join(str(task_id) for task_id in self.end_detail)
            body += ServerSentEvent(data=names, event="not_found", sep="\n").encode()
        return body

    def _finish_now(self, items: list[Item]) -> bool:
        """The last states and the end of the body in one write, from the hub's callback:
        when many streams end together, no terminal state waits for other streams' teardown."""
        link = self._link
        if link is None or not link.writable:
            return False
        try:
            ended = link.end_now(self._last_body(items))
        except server.FastPathBroken:
            _fast_path_failed(self.conns)
            return False
        if ended:
            self._closing(link)
        return ended

    async def _finish(self, items: list[Item]) -> None:
        body = self._last_body(items)
        await self._asgi_send({"type": "http.response.body", "body": body, "more_body": False})
        if self._link is not None:
            self._closing(self._link)

    def _closing(self, link: server.HttpLink) -> None:
        # The client's FIN now waits for the closer instead of being handled (read, close,
        # bookkeeping) in the middle of other streams' deliveries.
        link.transport.pause_reading()
        self.conns.closer.add(link.transport)

    def _abort(self) -> bool:
        if self._link is None:
            return server.abort_connection(self._asgi_send)
        self._link.abort()
        return True

    def _cancel_stuck_writer(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def disconnected(self) -> bool:
        """uvicorn's word that the client left; always False without a direct link (then
        a task waiting for `http.disconnect` reports it instead)."""
        return self._link is not None and self._link.disconnected


def _fast_path_failed(conns: Connections) -> None:
    conns.metrics.fast_path_failures.labels("sse_end_now").inc()
    logger.error("an SSE stream could not end on the direct path (uvicorn changed?); "
                 "ending it through ASGI", exc_info=True)


class EventStream:
    """The ASGI response of one SSE connection."""

    def __init__(self, conns: Connections, task_ids: list[int], current: list[Task | None],
                 include: bool, multi: bool, last_seen: int = 0,
                 expires_at: float | None = None) -> None:
        self.conns = conns
        self.expires_at = expires_at  # the token's expiry (Unix seconds): the stream ends then
        self.task_ids = task_ids
        self.current = current
        self.include = include
        self.multi = multi
        self.last_seen = last_seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """200 with the SSE headers (and CORS ones), then the session's events (the first
        carries the `retry:` hint) until it ends or the client leaves; a HEAD gets the
        headers only. A client that went away ends it quietly; the session is released on
        every way out."""
        cors: CorsPolicy | None = scope["app"].state.cors
        headers = HEADERS + (await cors.response_headers(scope) if cors else [])
        if scope["method"] == "HEAD":  # headers only: a HEAD must not open a stream
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        support: server.ServerSupport = scope["app"].state.server_support
        link = server.http_link(send) if support.direct_http_writes else None
        session = SseSession(self.conns, self.include, send, link, self.multi)
        listener = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if link is not None:
                link.keep_open_after_body()
            else:
                listener = asyncio.get_running_loop().create_task(
                    _until_disconnect(receive, session))
            if self.expires_at is not None:
                session.expire_at(self.expires_at)
            session.watch(zip(self.task_ids, self.current, strict=True), self.last_seen)
            await session.pump()
        except OSError:
            pass  # the client went away (servers on ASGI 2.4 raise on a send after that)
        finally:
            session.release()
            if listener is not None:
                listener.cancel()


async def _until_disconnect(receive: Receive, session: Session) -> None:
    message: Message = {}
    while message.get("type") != "http.disconnect":
        message = await receive()
    session.client_left()


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else 0


async def task_events(request: Request) -> Response:
    """`GET /tasks/{task_id}/events`: one task's states, then the end of the stream. Access
    control as for REST (401, 422, 403, all before Redis is read)."""
    state = request.app.state
    conns: Connections = state.connections
    grant = http_grant(state.gate, request.scope, "sse")
    if isinstance(grant, Response):
        return grant
    try:
        task_id = parse_task_id(request.path_params["task_id"])
        include = image_base64_flag(request.scope)
    except InvalidParameter as exc:
        return validation_error([exc.detail])
    refusal = http_forbidden(state.gate, grant, [task_id], "sse")
    if refusal is not None:
        return refusal
    last_seen = _last_event_id(request)
    # One read, image included (it is the first event). A Redis error propagates: a 500
    # (contract 8), never a stream that pretends the task is there or not.
    task = await conns.hub.lookup(task_id)
    if task is None:
        return not_found()
    if last_seen > task.version:
        last_seen = 0  # not a version this task ever had: start from the current state
    if task.is_terminal and last_seen >= task.version:
        return Response(status_code=204)
    return EventStream(conns, [task_id], [task], include,  # type: ignore[return-value]
                       multi=False, last_seen=last_seen,
                       expires_at=grant.expires_at if grant is not None else None)


async def many_task_events(request: Request) -> Response:
    """`GET /events?task_id=1&task_id=2`: many tasks on one connection (browsers allow six
    HTTP/1.1 connections per origin). Ends with `event: end` (id `done`) once all are finished.
    Access control: 401, then 422, then 403 unless the token names every id."""
    state = request.app.state
    conns: Connections = state.connections
    settings = conns.settings
    grant = http_grant(state.gate, request.scope, "sse")
    if isinstance(grant, Response):
        return grant
    raw_ids = [part for value in request.query_params.getlist("task_id")
               for part in value.split(",")]
    try:
        include = image_base64_flag(request.scope)
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
    refusal = http_forbidden(state.gate, grant, task_ids, "sse")
    if refusal is not None:
        return refusal
    if request.headers.get("last-event-id") == STREAM_DONE_ID:
        return Response(status_code=204)
    # Existence in one pipelined read without images (Hub.find_many); a Redis error
    # propagates: a 500 (contract 8).
    results = await conns.hub.find_many(task_ids)
    found: list[Task | None] = []
    for task_id in task_ids:
        result = results[task_id]
        if isinstance(result, CorruptRecord):
            raise result
        if result is None:
            return not_found()
        found.append(result)
    return EventStream(conns, task_ids, found, include,  # type: ignore[return-value]
                       multi=True, expires_at=grant.expires_at if grant is not None else None)


async def serve(scope: Scope, receive: Receive, send: Send, path_params: dict[str, str]
                ) -> None:
    """The SSE endpoints without Starlette's middleware stack (see app.GatewayApp): a stream
    lives for minutes, and every middleware layer keeps a coroutine frame per connection and
    wraps every write. Errors are answered here exactly as the app's handlers would, with the
    CORS headers the middleware would add."""
    endpoint = task_events if path_params else many_task_events
    scope["path_params"] = path_params
    try:
        response = await endpoint(Request(scope, receive))
    except Exception as exc:
        response = failure(exc, f"GET {scope['path']}", logger)
    if not isinstance(response, EventStream):  # a stream sends its CORS headers itself
        await add_cors_headers(response, scope)
    await response(scope, receive, send)
