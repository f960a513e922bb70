"""WebSocket transport (contract section 6): `/ws` for many tasks, `/tasks/{task_id}/ws` for one.

Each connection runs two coroutines: the endpoint's own task reads client frames (it must keep
reading, or uvicorn's sans-I/O WebSocket stops processing pongs and closes with 1011), and a
sender task writes everything else: control replies first, then task states from the hub
watcher, each write bounded by `send_timeout_s`. A client too slow for that is closed with
1013 (try again later) and resumes from the record when it reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from taskcast.close_codes import CloseCode, ErrorCode
from taskcast.errors import CorruptRecord, InvalidParameter, StoreUnavailable
from taskcast.hub import Hub, Watcher
from taskcast.ids import parse_task_id, parse_task_id_value
from taskcast.models import Task
from taskcast.rest import image_base64_flag
from taskcast.server import abort_connection
from taskcast.settings import Settings

logger = logging.getLogger(__name__)

# Control replies waiting for the sender; a client that outpaces them this far is flooding.
MAX_QUEUED_REPLIES = 64


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Abuse(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def origin_allowed(connection: HTTPConnection, settings: Settings) -> bool:
    """Cross-site WebSocket hijacking guard: browsers always send Origin, and cookies ride
    along with the upgrade, so only listed origins (or the same host) may connect."""
    origin = connection.headers.get("origin")
    if origin is None:
        return True  # not a browser: nothing to hijack
    allowed = {item.strip().rstrip("/") for item in settings.allowed_origins.split(",")
               if item.strip()}
    if "*" in allowed or origin.rstrip("/") in allowed:
        return True
    host = connection.headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


class Session:
    """One WebSocket connection's state, shared by its reader and its sender."""

    def __init__(self, websocket: WebSocket, hub: Hub, settings: Settings,
                 include_image_base64: bool) -> None:
        self.websocket = websocket
        self.hub = hub
        self.settings = settings
        self.include = include_image_base64
        self.watcher = Watcher(hub.metrics)
        self.subscribed: set[int] = set()
        self.replies: deque[str] = deque()
        self.close_after_terminal = False
        self.closing: tuple[int, str] | None = None

    def reply(self, frame: dict[str, Any]) -> None:
        if len(self.replies) >= MAX_QUEUED_REPLIES:
            raise Abuse(CloseCode.RATE_LIMITED, "too many requests in flight")
        self.replies.append(orjson.dumps(frame).decode())
        self.watcher.poke()

    def error(self, code: ErrorCode, msg: str, **extra: Any) -> None:
        self.reply({"type": "error", "code": int(code), "msg": msg, **extra})

    def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
        self.watcher.close(reason)

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, task_ids: list[int]) -> None:
        new = [task_id for task_id in dict.fromkeys(task_ids) if task_id not in self.subscribed]
        if len(self.subscribed) + len(new) > self.settings.ws_max_subscriptions:
            raise Abuse(CloseCode.TOO_MANY_SUBSCRIPTIONS,
                        f"more than {self.settings.ws_max_subscriptions} subscriptions")
        found = await asyncio.gather(*(self.hub.lookup(task_id) for task_id in new),
                                     return_exceptions=True)
        unknown, broken = [], []
        current: dict[int, Task] = {}
        for task_id, result in zip(new, found, strict=True):
            if isinstance(result, Task):
                current[task_id] = result
            elif result is None:
                unknown.append(task_id)
            elif isinstance(result, CorruptRecord):
                broken.append(task_id)
            elif isinstance(result, BaseException) and not isinstance(result, StoreUnavailable):
                raise result
            # StoreUnavailable: watch anyway; the hub delivers once Redis answers again.
        if unknown:
            self.error(ErrorCode.NOT_FOUND, "task not found", task_ids=unknown)
        if broken:
            self.error(ErrorCode.INTERNAL, "task record is malformed", task_ids=broken)
        unknown += broken
        if not self.close_after_terminal:  # a per-task socket carries task frames only
            accepted = [task_id for task_id in task_ids if task_id not in unknown]
            self.reply({"type": "subscribed", "task_ids": accepted})
        for task_id in new:
            if task_id not in unknown:
                self.subscribed.add(task_id)
                self.hub.watch(self.watcher, task_id, current.get(task_id))

    def unsubscribe(self, task_ids: list[int]) -> None:
        self._drop([task_id for task_id in dict.fromkeys(task_ids) if task_id in self.subscribed])
        self.reply({"type": "unsubscribed", "task_ids": list(dict.fromkeys(task_ids))})

    def _drop(self, task_ids: list[int]) -> None:
        """Stop following tasks: release their Redis subscriptions and forget what was sent,
        so that subscribing again starts from the current state."""
        self.hub.unwatch(self.watcher, task_ids)
        for task_id in task_ids:
            self.subscribed.discard(task_id)
            self.watcher.forget(task_id)

    def release(self) -> None:
        self.hub.unwatch(self.watcher, self.subscribed)
        self.subscribed.clear()

    # -- sender -----------------------------------------------------------------------------

    async def send_loop(self) -> None:
        """Writes replies and task states until closed; a write that takes too long closes."""
        delivered = self.hub.metrics.delivered
        while not self.watcher.closed:
            batch = await self.watcher.next_batch()
            while self.replies:
                await self._send(self.replies.popleft())
            for state in batch:
                await self._send(state.ws_frame(self.include))
                delivered["ws"] += 1
                if state.terminal:  # nothing can follow it
                    self._drop([state.task_id])
                    if self.close_after_terminal:
                        self.close(CloseCode.NORMAL, "task finished")
            if self.watcher.missing:
                missing = sorted(self.watcher.missing)
                self.watcher.missing.clear()
                if self.close_after_terminal:
                    self.close(CloseCode.TASK_NOT_FOUND, "task not found")
                else:
                    self._drop(missing)
                    await self._send(orjson.dumps({"type": "error",
                                                   "code": int(ErrorCode.NOT_FOUND),
                                                   "msg": "task not found",
                                                   "task_ids": missing}).decode())

    async def _send(self, text: str) -> None:
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):
                await self.websocket.send_text(text)
        except TimeoutError:
            self.hub.metrics.slow_disconnects.labels("ws").inc()
            self.hub.metrics.dropped.inc(len(self.watcher.pending))
            self.close(CloseCode.TRY_AGAIN_LATER, "too slow: reconnect")
            # A close frame cannot pass a full send buffer either; drop the connection so its
            # buffered megabytes are freed now rather than whenever the client reads again.
            abort_connection(self.websocket.scope)
            raise


async def _handle_frame(session: Session, message: MutableMapping[str, Any]) -> None:
    if message.get("text") is None:
        session.error(ErrorCode.BAD_FRAME, "binary frames are not supported; send JSON text")
        return
    try:
        frame = orjson.loads(message["text"])
    except orjson.JSONDecodeError:
        session.error(ErrorCode.BAD_FRAME, "frame is not valid JSON")
        return
    if not isinstance(frame, dict):
        session.error(ErrorCode.BAD_FRAME, "frame must be a JSON object")
        return
    op = frame.get("op")
    if op == "ping":
        session.reply({"type": "pong"})
        return
    if op not in ("subscribe", "unsubscribe"):
        session.error(ErrorCode.UNKNOWN_OP, "op must be subscribe, unsubscribe or ping", op=op)
        return
    raw_ids = frame.get("task_ids")
    if not isinstance(raw_ids, list) or not raw_ids:
        detail: dict[str, Any]
        if "task_ids" not in frame:
            detail = {"type": "missing", "loc": ["task_ids"], "msg": "Field required",
                      "input": None}
        elif not isinstance(raw_ids, list):
            detail = {"type": "list_type", "loc": ["task_ids"],
                      "msg": "Input should be a valid list", "input": raw_ids}
        else:
            detail = {"type": "too_short", "loc": ["task_ids"],
                      "msg": "List should have at least 1 item after validation, not 0",
                      "input": raw_ids, "ctx": {"field_type": "List", "min_length": 1,
                                                "actual_length": 0}}
        session.error(ErrorCode.INVALID, "task_ids must be a non-empty list of task ids", op=op,
                      detail=[detail])
        return
    try:
        task_ids = [parse_task_id_value(value, ("task_ids", index))
                    for index, value in enumerate(raw_ids)]
    except InvalidParameter as exc:
        session.error(ErrorCode.INVALID, "task_ids must be non-negative int64 integers", op=op,
                      detail=[exc.detail])
        return
    if op == "subscribe":
        await session.subscribe(task_ids)
    else:
        session.unsubscribe(task_ids)


async def _run(session: Session, first: list[int] | None) -> None:
    """Accept, start the sender, then read frames until the client leaves or is closed."""
    websocket, settings = session.websocket, session.settings
    await websocket.accept()
    gauge = session.hub.metrics.connections.labels("ws")
    gauge.inc()
    sender = asyncio.create_task(session.send_loop())
    bucket = TokenBucket(settings.ws_ops_per_s, settings.ws_ops_burst)
    try:
        if first is not None:
            session.close_after_terminal = True
            await session.subscribe(first)
        while session.closing is None:
            receive = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break  # the sender stopped: closed or too slow
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                session.watcher.close("client left")
                return
            if first is not None:
                continue  # a per-task socket takes no ops; reading keeps pongs flowing
            if not bucket.take():
                raise Abuse(CloseCode.RATE_LIMITED, "too many messages: slow down")
            await _handle_frame(session, message)
    except Abuse as exc:
        session.close(exc.code, exc.reason)
    except WebSocketDisconnect:
        session.watcher.close("client left")
    finally:
        session.watcher.close("done")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sender, timeout=settings.send_timeout_s)
        session.release()
        gauge.dec()
        await _close(session)


async def _close(session: Session) -> None:
    if session.closing is None or session.websocket.application_state != WebSocketState.CONNECTED:
        return
    code, reason = session.closing
    with contextlib.suppress(Exception):
        # A client that stopped reading blocks close() too.
        async with asyncio.timeout(session.settings.send_timeout_s):
            await session.websocket.close(code, reason)


async def _refuse(websocket: WebSocket, code: CloseCode, reason: str) -> None:
    """Accept, then close with a code: browsers hide the HTTP status of a refused upgrade."""
    await websocket.accept()
    await websocket.close(code, reason)


async def many_tasks_socket(websocket: WebSocket) -> None:
    """`/ws`: subscribe / unsubscribe / ping over one socket."""
    hub: Hub = websocket.app.state.hub
    settings: Settings = websocket.app.state.settings
    if not origin_allowed(websocket, settings):
        await websocket.close(CloseCode.POLICY_VIOLATION)  # before accept: HTTP 403
        return
    try:
        include = image_base64_flag(websocket)
    except InvalidParameter:
        await _refuse(websocket, CloseCode.INVALID_TASK_ID, "image_base64 must be a boolean")
        return
    await _run(Session(websocket, hub, settings, include), None)


async def one_task_socket(websocket: WebSocket) -> None:
    """`/tasks/{task_id}/ws`: one task's states; close 1000 after the terminal one."""
    hub: Hub = websocket.app.state.hub
    settings: Settings = websocket.app.state.settings
    if not origin_allowed(websocket, settings):
        await websocket.close(CloseCode.POLICY_VIOLATION)
        return
    try:
        task_id = parse_task_id(websocket.path_params["task_id"])
        include = image_base64_flag(websocket)
    except InvalidParameter as exc:
        await _refuse(websocket, CloseCode.INVALID_TASK_ID, str(exc)[:120])
        return
    try:
        if await hub.lookup(task_id) is None:
            await _refuse(websocket, CloseCode.TASK_NOT_FOUND, "task not found")
            return
    except StoreUnavailable:
        pass  # keep the socket; the hub delivers once Redis answers again
    except CorruptRecord as exc:
        logger.error("%s", exc)
        await _refuse(websocket, CloseCode.INTERNAL_ERROR, "task record is malformed")
        return
    await _run(Session(websocket, hub, settings, include), [task_id])
