"""WebSocket transport (contract section 6): `/ws` for many tasks, `/tasks/{task_id}/ws` for one.

This module reads client frames and frames bytes; delivery is the delivery layer's
(delivery.py). A task state is encoded once per version as a whole WebSocket frame and written
to every idle socket that follows the task, from the hub's callback, with no task per socket:
each connection is its request task, which keeps reading client frames (pings, ops, the close).
Under a server without taskcast's WebSocket connection (server.py) the same happens through
ASGI, with a sender task per socket.

A client that stops reading: once a write has waited `send_timeout_s` for it, its TCP
connection is aborted (a close frame could not get past the full buffer anyway). Such a client
sees its connection reset after it has read what had reached its side, as an abnormal closure
(1006), never a clean close; it reconnects, subscribes again and resumes from the records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from functools import partial
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from taskcast import server
from taskcast.access import Gate
from taskcast.close_codes import CloseCode, ErrorCode
from taskcast.delivery import Connections, End, Item, Session
from taskcast.errors import CorruptRecord, InvalidParameter, StoreUnavailable
from taskcast.hub import TaskState
from taskcast.ids import parse_task_id, parse_task_id_value
from taskcast.models import Task
from taskcast.rest import image_base64_flag
from taskcast.settings import Settings
from taskcast.tokens import Grant, TokenRefused
from taskcast.websocket_protocol import WebSocketConnection, text_frame

logger = logging.getLogger(__name__)

# Control messages waiting for a client that does not read; this far behind, it is flooding.
MAX_QUEUED_REPLIES = 64


def task_message(include_image_base64: bool, state: TaskState) -> bytes:
    """The state's `{"type":"task","data":...}` message as UTF-8 JSON."""
    return b'{"type":"task","data":' + state.json(include_image_base64) + b"}"


def task_frame(message: Callable[[TaskState], bytes], state: TaskState) -> bytes:
    """The message as a whole text frame, for direct writes."""
    return text_frame(state.encoded(message))


def task_text(message: Callable[[TaskState], bytes], state: TaskState) -> str:
    """The message as text, for an ASGI `websocket.send`."""
    return state.encoded(message).decode()


# Encodings for TaskState.encoded (built once per version, shared by every socket), one per
# `image_base64` choice; a partial is its own cache key.
MESSAGE = {include: partial(task_message, include) for include in (True, False)}
FRAME = {include: partial(task_frame, MESSAGE[include]) for include in (True, False)}
TEXT = {include: partial(task_text, MESSAGE[include]) for include in (True, False)}
_CLOSES = {End.DONE: (CloseCode.NORMAL, "task finished"),
           End.MISSING: (CloseCode.TASK_NOT_FOUND, "task not found"),
           End.SHUTDOWN: (CloseCode.SERVICE_RESTART, "server shutting down"),
           End.TOKEN_EXPIRED: (CloseCode.UNAUTHORIZED, "token expired"),
           End.RETIRED: (CloseCode.SERVICE_RESTART, "connection lifetime reached: reconnect")}


class TokenBucket:
    """A rate limit: `rate` per second sustained, `burst` at once (it starts full)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        """Spend one token: True if there was one, else False and nothing is spent."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Abuse(Exception):
    """A client over one of the socket's limits: the socket is closed with `code`."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class WsSession(Session):
    """One WebSocket: states and replies as text frames, the end as a close code."""

    transport = "ws"

    __slots__ = ("_asgi_send", "_link", "per_task", "_frame", "_text", "grant")

    def __init__(self, conns: Connections, include_image_base64: bool, send: Send,
                 link: WebSocketConnection | None, per_task: bool) -> None:
        super().__init__(conns, ends_when_done=per_task)
        self._asgi_send = send
        self._link = link
        self.per_task = per_task  # one task, task frames only, closed after its end
        self._frame, self._text = FRAME[include_image_base64], TEXT[include_image_base64]
        self.grant: Grant | None = None  # the token's, with access control on

    def authorize(self, grant: Grant) -> None:
        """Take a (new) token: the socket ends when it expires, and subscriptions it does not
        name end (an `unsubscribed` frame lists them)."""
        self.grant = grant
        self.expire_at(grant.expires_at)
        dropped = grant.uncovered(sorted(self.watching))
        if dropped:
            self.unwatch(dropped)
            self.reply({"type": "unsubscribed", "task_ids": dropped})

    def reply(self, frame: dict[str, Any] | bytes) -> None:
        """Queue a server frame (an object, or its JSON) behind what is queued (see
        Session.send_control). Raises Abuse (4429) instead when MAX_QUEUED_REPLIES frames
        already wait for this client."""
        if self.backlog >= MAX_QUEUED_REPLIES:
            raise Abuse(CloseCode.RATE_LIMITED, "too many requests in flight")
        self.send_control(frame if isinstance(frame, bytes) else orjson.dumps(frame))

    def error(self, code: ErrorCode, msg: str, **extra: Any) -> None:
        """reply() an error frame; the socket stays open. Raises Abuse as reply() does."""
        self.reply({"type": "error", "code": int(code), "msg": msg, **extra})

    def close(self, code: CloseCode, reason: str) -> None:
        """Close with `code` once what was collected is written (Session.finish)."""
        self.finish(End.CLOSED, (code, reason))

    # -- Session hooks

    def _frames(self, items: list[Item]) -> list[bytes]:
        return [text_frame(item) if isinstance(item, bytes) else item.encoded(self._frame)
                for item in items]

    def _writable(self) -> bool:
        link = self._link
        return link is not None and link.is_open and not link.buffered

    def _write_state(self, state: TaskState) -> bool:
        link = self._link
        return link is not None and link.write_frame_if_idle(state.encoded(self._frame))

    def _write_now(self, items: list[Item]) -> bool:
        return self._link is not None and self._link.write_frames(self._frames(items))

    async def _send(self, items: list[Item]) -> None:
        for item in items:
            text = item.decode() if isinstance(item, bytes) else item.encoded(self._text)
            await self._asgi_send({"type": "websocket.send", "text": text})

    def _close_code(self) -> tuple[int, str]:
        if self.end is End.CLOSED and isinstance(self.end_detail, tuple):
            return int(self.end_detail[0]), str(self.end_detail[1])
        if self.end is End.TOKEN_EXPIRED and isinstance(self.end_detail, str):
            return int(CloseCode.UNAUTHORIZED), self.end_detail
        code, reason = _CLOSES.get(self.end or End.DONE, (CloseCode.NORMAL, ""))
        return int(code), reason

    def _finish_now(self, items: list[Item]) -> bool:
        if not self._writable():
            return False
        code, reason = self._close_code()
        assert self._link is not None
        return self._link.close_now(code, reason, before=self._frames(items))

    async def _finish(self, items: list[Item]) -> None:
        await self._send(items)
        code, reason = self._close_code()
        await self._asgi_send({"type": "websocket.close", "code": code, "reason": reason})

    def _vanished(self, task_ids: list[int], items: list[Item]) -> None:
        if self.per_task:
            self.end = End.MISSING
            return
        self.unwatch(task_ids)
        items.append(orjson.dumps({"type": "error", "code": int(ErrorCode.NOT_FOUND),
                                   "msg": "task not found", "task_ids": task_ids}))

    def _needs_pump_task(self) -> bool:
        return True

    def _abort(self) -> bool:
        if self._link is None:
            return server.abort_connection(self._asgi_send)
        self._link.abort()
        return True


def origin_allowed(headers: Headers, settings: Settings) -> bool:
    """Cross-site WebSocket hijacking guard: browsers always send Origin, and cookies ride
    along with the upgrade, so only listed origins (or the same host) may connect."""
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser: nothing to hijack
    return _origin_allowed(origin, headers.get("host", ""), settings)


def _origin_allowed(origin: str, host: str, settings: Settings) -> bool:
    allowed = {item.strip().rstrip("/") for item in settings.allowed_origins.split(",")
               if item.strip()}
    if "*" in allowed or origin.rstrip("/") in allowed:
        return True
    return origin.split("://", 1)[-1].rstrip("/") == host


async def _handle_frame(session: WsSession, message: MutableMapping[str, Any]) -> None:
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
    if op == "auth":
        _authenticate(session, frame.get("token"))
        return
    if op not in ("subscribe", "unsubscribe"):
        session.error(ErrorCode.UNKNOWN_OP, "op must be subscribe, unsubscribe, auth or ping",
                      op=op)
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
        await _subscribe(session, task_ids)
    else:
        session.unwatch(task_ids)
        session.reply({"type": "unsubscribed", "task_ids": list(dict.fromkeys(task_ids))})


def _authenticate(session: WsSession, token: object) -> None:
    """The `auth` op: a valid token replaces the socket's (refresh); an invalid one gets an
    error frame and changes nothing. With access control off there is nothing to check."""
    gate: Gate | None = session.conns.gate
    if gate is None:
        session.reply({"type": "authenticated", "exp": None})
        return
    try:
        grant = gate.verify(token, "ws")
    except TokenRefused as refusal:
        session.error(ErrorCode.UNAUTHORIZED, f"unauthorized: {refusal.description}")
        return
    # Formatted by hand: a token may carry an exp beyond 64 bits, which orjson refuses.
    session.reply(b'{"type":"authenticated","exp":%d}' % grant.exp)
    session.authorize(grant)


async def _subscribe(session: WsSession, task_ids: list[int]) -> None:
    gate: Gate | None = session.conns.gate
    if gate is not None:
        if session.grant is None:
            gate.refused("ws", "missing")
            session.error(ErrorCode.UNAUTHORIZED,
                          "unauthorized: send {\"op\":\"auth\",\"token\":...} first",
                          task_ids=list(dict.fromkeys(task_ids)))
            return
        forbidden = session.grant.uncovered(task_ids)
        if forbidden:
            gate.refused("ws", "forbidden")
            session.error(ErrorCode.FORBIDDEN, "forbidden", task_ids=forbidden)
            refused = set(forbidden)
            task_ids = [task_id for task_id in task_ids if task_id not in refused]
            if not task_ids:
                return
    limit = session.conns.settings.ws_max_subscriptions
    new = [task_id for task_id in dict.fromkeys(task_ids) if task_id not in session.watching]
    if len(session.watching) + len(new) > limit:
        raise Abuse(CloseCode.TOO_MANY_SUBSCRIPTIONS, f"more than {limit} subscriptions")
    try:
        # Existence in one pipelined read without images; the states follow from the hub.
        found = await session.hub.find_many(new)
    except StoreUnavailable as exc:
        # Contract 8: an error frame 500, never a wrong "subscribed" or "not found".
        logger.warning("subscribing to %d tasks: %s", len(new), exc)
        session.error(ErrorCode.INTERNAL, "internal server error: the store is unavailable",
                      task_ids=new)
        return
    unknown, broken = [], []
    for task_id in new:
        result = found[task_id]
        if result is None:
            unknown.append(task_id)
        elif isinstance(result, CorruptRecord):
            logger.error("%s", result)
            broken.append(task_id)
    if unknown:
        session.error(ErrorCode.NOT_FOUND, "task not found", task_ids=unknown)
    if broken:
        session.error(ErrorCode.INTERNAL, "task record is malformed", task_ids=broken)
    refused = set(unknown) | set(broken)
    session.reply({"type": "subscribed",
                   "task_ids": [task_id for task_id in task_ids if task_id not in refused]})
    session.watch((task_id, task) for task_id in new if task_id not in refused
                  for task in [found[task_id]] if isinstance(task, Task))


async def _read_frames(session: WsSession, receive: Receive) -> None:
    """Read client frames until the client leaves (reading also keeps pongs and the closing
    handshake flowing); a per-task socket takes no ops."""
    settings = session.conns.settings
    bucket = TokenBucket(settings.ws_ops_per_s, settings.ws_ops_burst)
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            session.client_left()
            return
        if session.per_task or session.end is not None:
            continue
        try:
            if not bucket.take():
                raise Abuse(CloseCode.RATE_LIMITED, "too many messages: slow down")
            await _handle_frame(session, message)
        except Abuse as exc:
            session.close(exc.code, exc.reason)


async def refuse(send: Send, code: CloseCode, reason: str) -> None:
    """Accept, then close with a code: browsers hide the HTTP status of a refused upgrade."""
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": int(code), "reason": reason})


async def serve(scope: Scope, receive: Receive, send: Send, path_params: dict[str, str]
                ) -> None:
    """`/ws` (no path parameters) or `/tasks/{task_id}/ws`."""
    state = scope["app"].state
    conns: Connections = state.connections
    if (await receive())["type"] != "websocket.connect":
        return
    # Most clients are not browsers: build Headers only when there is an Origin to check.
    if any(name == b"origin" for name, _ in scope["headers"]) and not origin_allowed(
            Headers(scope=scope), conns.settings):
        await send({"type": "websocket.close", "code": int(CloseCode.POLICY_VIOLATION)})
        return  # before accept: HTTP 403
    per_task = "task_id" in path_params
    gate = conns.gate
    grant: Grant | None = None
    if gate is not None:
        try:
            # /ws may also get its token later, in an `auth` frame.
            grant = gate.authenticate(scope, "ws", required=per_task)
        except TokenRefused as refusal:
            await refuse(send, CloseCode.UNAUTHORIZED, f"unauthorized: {refusal.description}")
            return
    try:
        task_id = parse_task_id(path_params["task_id"]) if per_task else 0
        include = image_base64_flag(scope)
    except InvalidParameter as exc:
        await refuse(send, CloseCode.INVALID_TASK_ID, str(exc)[:120])
        return
    if per_task and gate is not None and grant is not None and not grant.covers(task_id):
        gate.refused("ws", "forbidden")
        await refuse(send, CloseCode.FORBIDDEN, "forbidden")
        return
    current: Task | None = None
    if per_task:
        try:
            current = await conns.hub.lookup(task_id)
            if current is None:
                await refuse(send, CloseCode.TASK_NOT_FOUND, "task not found")
                return
        except StoreUnavailable as exc:
            # Contract 8: an error, never a socket that pretends the task is there or not.
            logger.warning("%s: %s", scope["path"], exc)
            await refuse(send, CloseCode.INTERNAL_ERROR, "internal server error")
            return
        except CorruptRecord as exc:
            logger.error("%s", exc)
            await refuse(send, CloseCode.INTERNAL_ERROR, "task record is malformed")
            return
    support: server.ServerSupport = state.server_support
    link = server.websocket_link(send) if support.websocket_protocol else None
    if link is not None:
        # Closing handshakes, which come in bursts when many tasks finish, wait for the
        # deliveries of the moment: the close of the TCP connection and our own teardown.
        link.defer_to(conns.closer.add, conns.closer.later)
    await send({"type": "websocket.accept"})
    session = WsSession(conns, include, send, link, per_task)
    if grant is not None and per_task:
        session.expire_at(grant.expires_at)  # nothing to narrow later: the grant is not kept
    elif grant is not None:
        session.authorize(grant)
    elif gate is not None:
        session.expire_at(time.time() + conns.settings.ws_auth_timeout_s,
                          "no valid token in time", reason="no_token_in_time")
    try:
        if per_task:
            session.watch([(task_id, current)])
        await _read_frames(session, receive)
    except OSError:
        pass  # the client went away
    finally:
        session.release()
