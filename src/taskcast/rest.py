"""`GET /tasks/{task_id}`: the seed's polling endpoint (contract section 2), plus ETag/304 and
an opt-out of `image_base64` so pollers do not re-download a multi-megabyte image."""

from __future__ import annotations

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from taskcast.access import http_forbidden, http_grant
from taskcast.errors import InvalidParameter
from taskcast.ids import parse_task_id
from taskcast.responses import JSON, not_found, task_body, validation_error
from taskcast.store import TaskStore

_FALSE = ("false", "0", "no", "off")
_TRUE = ("true", "1", "yes", "on")


def etag_for(version: int, include_image_base64: bool) -> str:
    """The ETag of a version: `"<version>"`, or `"<version>-no-image-base64"`."""
    # The trimmed body is a different representation of the same version: it needs its own tag.
    return f'"{version}"' if include_image_base64 else f'"{version}-no-image-base64"'


def image_base64_flag(request: HTTPConnection) -> bool:
    """`?image_base64=false` leaves the field empty; anything but a boolean is a 422."""
    raw = request.query_params.get("image_base64")
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


def _matches(if_none_match: str, etag: str) -> bool:
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


async def get_task(request: Request) -> Response:
    """`GET /tasks/{task_id}`: 200 with the task and its ETag, 304 when If-None-Match has
    that ETag, 404, or 422 for a malformed id or flag. StoreUnavailable and CorruptRecord
    propagate to the app's handlers (500); a corrupt record is never a 304. With access
    control on: 401 without a valid token, then 422, then 403 for an id the token does not
    name, all before Redis is read."""
    state = request.app.state
    store: TaskStore = state.store
    grant = http_grant(state.gate, request.scope, "rest")
    if isinstance(grant, Response):
        return grant
    try:
        task_id = parse_task_id(request.path_params.get("task_id", ""))
        include = image_base64_flag(request)
    except InvalidParameter as exc:
        return validation_error([exc.detail])
    refusal = http_forbidden(state.gate, grant, [task_id], "rest")
    if refusal is not None:
        return refusal

    if_none_match = request.headers.get("if-none-match")
    task = None
    if if_none_match:
        # Validate the whole record (minus the image) before promising "not modified":
        # a corrupt record must be a 500 on every path.
        task = await store.get(task_id, include_image_base64=False)
        if task is not None and _matches(if_none_match, etag_for(task.version, include)):
            return Response(status_code=304, headers=_cache_headers(task.version, include))
    if task is None or include:
        task = await store.get(task_id, include_image_base64=include)
    if task is None:
        return not_found()
    return Response(
        task_body(task.to_json()),
        media_type=JSON,
        headers=_cache_headers(task.version, include),
    )


def _cache_headers(version: int, include: bool) -> dict[str, str]:
    # no-cache: caches may keep the body but must revalidate, which our 304 makes cheap.
    return {"ETag": etag_for(version, include), "Cache-Control": "no-cache"}
