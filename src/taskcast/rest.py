"""`GET /tasks/{task_id}`: the seed's polling endpoint (contract section 2), plus ETag/304 and
an opt-out of `image_base64` so pollers do not re-download a multi-megabyte image.

Polled tasks are answered from memory (poll_cache.py) when the poll cache is on: the 200 body
and headers are encoded once per version and `image_base64` choice, and shared by every poll
and every gateway client. GatewayApp hands a GET straight to `serve` (plain ASGI, no Starlette
routing or middleware on the way, the same reason the push transports skip them), which on
uvicorn writes the answer in one piece (server.HttpLink.respond); HEAD and an app run without
GatewayApp take the Starlette route `get_task`. Both answer through `reply`.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from taskcast import server
from taskcast.access import http_forbidden, http_grant
from taskcast.cors import add_cors_headers
from taskcast.errors import InvalidParameter
from taskcast.hub import TaskState
from taskcast.ids import parse_task_id
from taskcast.poll_cache import PollCache
from taskcast.responses import failure, not_found, task_body, validation_error
from taskcast.store import TaskStore

logger = logging.getLogger(__name__)

_FALSE = ("false", "0", "no", "off")
_TRUE = ("true", "1", "yes", "on")
_PREFIX = "/tasks/"

Headers = list[tuple[bytes, bytes]]
# A task answer: status (200 or 304), headers and body; anything else is a Response.
Answer = tuple[int, Headers, bytes]


def etag_for(version: int, include_image_base64: bool) -> str:
    """The ETag of a version: `"<version>"`, or `"<version>-no-image-base64"`."""
    # The trimmed body is a different representation of the same version: it needs its own tag.
    return f'"{version}"' if include_image_base64 else f'"{version}-no-image-base64"'


def image_base64_flag(scope: Scope) -> bool:
    """`?image_base64=false` leaves the field empty; anything but a boolean is a 422. The
    last value wins, as with Starlette's query_params."""
    query: bytes = scope.get("query_string", b"")
    if not query:
        return True
    raw = None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "image_base64":
            raw = value
    if raw is None or raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise InvalidParameter(
        raw,
        {
            "type": "bool_parsing",
            "loc": ["query", "image_base64"],
            "msg": "Input should be a valid boolean, unable to interpret input",
            "input": raw,
        },
    )


def _conditions(scope: Scope) -> tuple[str | None, bool]:
    """If-None-Match (the first one), and whether the request asks for a fresh read:
    `Cache-Control: no-cache` or `max-age=0` reads Redis even for a task held in memory."""
    if_none_match = None
    fresh = False
    for key, value in scope["headers"]:
        if key == b"if-none-match":
            if if_none_match is None:
                if_none_match = str(value.decode("latin-1"))
        elif key == b"cache-control":
            directives = value.lower()
            fresh = fresh or b"no-cache" in directives or b"max-age=0" in directives
    return if_none_match, fresh


def _matches(if_none_match: str, etag: str) -> bool:
    if if_none_match == etag:
        return True
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


# The encodings of a state, made once per version (TaskState.encoded tells them apart by
# identity). no-cache: caches may keep the body but must revalidate, which a 304 makes cheap.

def _ok(state: TaskState, include: bool) -> Answer:
    # Not kept: the body is its own copy, so a polled task holds its image twice (the task
    # and this body), as poll_cache.state_bytes charges, not three times.
    body = task_body(state.json(include, keep=False))
    return 200, [(b"etag", etag_for(state.version, include).encode()),
                 (b"cache-control", b"no-cache"),
                 (b"content-length", str(len(body)).encode()),
                 (b"content-type", b"application/json")], body


def _ok_with_image(state: TaskState) -> Answer:
    return _ok(state, True)


def _ok_without_image(state: TaskState) -> Answer:
    return _ok(state, False)


def _not_modified(state: TaskState, include: bool) -> Answer:
    return 304, [(b"etag", etag_for(state.version, include).encode()),
                 (b"cache-control", b"no-cache")], b""


def _not_modified_with_image(state: TaskState) -> Answer:
    return _not_modified(state, True)


def _not_modified_without_image(state: TaskState) -> Answer:
    return _not_modified(state, False)


def _answer(state: TaskState, include: bool, if_none_match: str | None) -> Answer:
    if if_none_match and _matches(if_none_match, etag_for(state.version, include)):
        return state.encoded(_not_modified_with_image if include
                             else _not_modified_without_image)
    return state.encoded(_ok_with_image if include else _ok_without_image)


async def reply(app_state: Any, scope: Scope) -> Answer | Response:
    """The answer to a GET of a task: 200 with the task and its ETag, 304 when If-None-Match
    has that ETag, 404, 422 for a malformed id or flag, 500 when Redis fails or the record is
    corrupt (never a 304 then: StoreUnavailable and CorruptRecord propagate, to `serve` or the
    app's handlers). With access control on: 401 without a valid token, then 422, then 403
    for an id the token does not name, all before any cache or Redis is read."""
    grant = http_grant(app_state.gate, scope, "rest")
    if isinstance(grant, Response):
        return grant
    path_params = scope.get("path_params")
    raw_id = path_params.get("task_id", "") if path_params else scope["path"][len(_PREFIX):]
    try:
        task_id = parse_task_id(raw_id)
        include = image_base64_flag(scope)
    except InvalidParameter as exc:
        return validation_error([exc.detail])
    refusal = http_forbidden(app_state.gate, grant, [task_id], "rest")
    if refusal is not None:
        return refusal
    if_none_match, fresh = _conditions(scope)
    cache: PollCache | None = app_state.poll_cache
    if cache is not None:
        state = (None if fresh else cache.cached(task_id)) or await cache.read(
            task_id, fresh=fresh)
    else:
        state = await _read_store(app_state.store, task_id, include, if_none_match)
    if state is None:
        return not_found()
    return _answer(state, include, if_none_match)


async def _read_store(store: TaskStore, task_id: int, include: bool,
                      if_none_match: str | None) -> TaskState | None:
    """Without the poll cache: every poll reads Redis (a 304 without the image bytes)."""
    task = None
    if if_none_match:
        # Validate the whole record (minus the image) before promising "not modified":
        # a corrupt record must be a 500 on every path.
        task = await store.get(task_id, include_image_base64=False)
        if task is not None and _matches(if_none_match, etag_for(task.version, include)):
            return TaskState(task)
    if task is None or include:
        task = await store.get(task_id, include_image_base64=include)
    return TaskState(task) if task is not None else None


async def serve(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /tasks/{task_id} as plain ASGI (GatewayApp's fast path), with the CORS headers
    the app's middleware would have added."""
    app_state = scope["app"].state
    try:
        answer = await reply(app_state, scope)
    except Exception as exc:
        answer = failure(exc, f"GET {scope['path']}", logger)
    if isinstance(answer, Response):
        await add_cors_headers(answer, scope)
        await answer(scope, receive, send)
        return
    status, headers, body = answer
    cors = app_state.cors
    if cors is not None:
        headers = headers + await cors.response_headers(scope)
    if app_state.server_support.direct_http_writes:
        link = server.http_link(send)
        if link is not None and link.respond(status, headers, body):
            return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def get_task(request: Request) -> Response:
    """The Starlette route of the same answer (HEAD, and an app run without GatewayApp)."""
    answer = await reply(request.app.state, request.scope)
    if isinstance(answer, Response):
        return answer
    status, headers, body = answer
    response = Response(body, status_code=status)
    response.raw_headers = list(headers)  # content-length included; Starlette's HEAD drops
    return response                         # the body and keeps it
