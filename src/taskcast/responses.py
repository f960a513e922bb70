"""JSON responses in the seed's envelope, encoded with orjson."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

JSON = "application/json"


class JSONBody(Response):
    media_type = JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def envelope(code: int, msg: str, data: Any = None, headers: Mapping[str, str] | None = None
             ) -> Response:
    return JSONBody({"code": code, "msg": msg, "data": data}, status_code=code, headers=headers)


def not_found(msg: str = "task not found") -> Response:
    return envelope(404, msg)


def internal_error() -> Response:
    return envelope(500, "internal server error")


def validation_error(details: list[dict[str, Any]]) -> Response:
    return JSONBody({"detail": details}, status_code=422)


def task_body(task_json: bytes) -> bytes:
    """The 200 body around an already-encoded task object, without decoding it again."""
    return b'{"code":200,"msg":"success","data":' + task_json + b"}"
