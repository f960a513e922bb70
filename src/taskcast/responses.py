"""JSON responses in the seed's envelope, encoded with orjson."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from taskcast.errors import CorruptRecord, StoreUnavailable

JSON = "application/json"


class JSONBody(Response):
    """A response whose body is `content` as JSON (orjson: compact, UTF-8)."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        """Starlette's hook: `content` encoded with orjson."""
        return orjson.dumps(content)


def envelope(code: int, msg: str, data: Any = None, headers: Mapping[str, str] | None = None
             ) -> Response:
    """The seed's `{"code", "msg", "data"}` body, with `code` as the HTTP status too."""
    return JSONBody({"code": code, "msg": msg, "data": data}, status_code=code, headers=headers)


def not_found(msg: str = "task not found") -> Response:
    """The seed's 404 body."""
    return envelope(404, msg)


def internal_error() -> Response:
    """The seed's 500 body; it names no cause (that goes to the log)."""
    return envelope(500, "internal server error")


def failure(exc: Exception, what: str, log: logging.Logger) -> Response:
    """The 500 for an error that reached the top of a request (`what`: e.g. "GET /tasks/1"),
    logged in one line for Redis unavailable (a warning) or a corrupt record (an error, no
    traceback: the message says what is wrong), with its traceback for anything else."""
    if isinstance(exc, StoreUnavailable):
        log.warning("%s: %s", what, exc)
    elif isinstance(exc, CorruptRecord):
        log.error("%s: %s", what, exc)
    else:
        log.error("%s failed", what, exc_info=exc)
    return internal_error()


def validation_error(details: list[dict[str, Any]]) -> Response:
    """422 with a FastAPI-style `{"detail": [...]}` body."""
    return JSONBody({"detail": details}, status_code=422)


def task_body(task_json: bytes) -> bytes:
    """The 200 body around an already-encoded task object, without decoding it again."""
    return b'{"code":200,"msg":"success","data":' + task_json + b"}"
