"""The uvicorn configuration taskcast runs with, shared by the CLI and the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from taskcast.settings import Settings

ABORT_KEY = "taskcast.abort"

# Serves a request without Starlette's middleware stack, or returns False to pass it on.
FastPath = Callable[[Starlette, Scope, Receive, Send], Awaitable[bool]]


class AbortableConnections:
    """Outermost ASGI layer: puts a way to abort the TCP connection into each scope.

    ASGI has no "abort": a response can only be closed politely, and with uvicorn that waits
    until the client has read everything already buffered, which a client that stopped reading
    never does. uvicorn's own `send` is a method of an object holding the transport; read
    here, before any middleware wraps `send`, it gives transport.abort(). Under another
    server the key is simply absent and slow clients are closed the polite way.
    """

    def __init__(self, app: Starlette, fast_path: FastPath | None = None) -> None:
        self.app = app
        self.fast_path = fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        abort = getattr(transport, "abort", None)
        if abort is not None and scope["type"] in ("http", "websocket"):
            scope[ABORT_KEY] = abort
        if self.fast_path is not None and await self.fast_path(self.app, scope, receive, send):
            return
        await self.app(scope, receive, send)


def abort_connection(scope: MutableMapping[str, Any]) -> bool:
    abort: Callable[[], None] | None = scope.get(ABORT_KEY)
    if abort is None:
        return False
    abort()
    return True


def served(app: Starlette) -> AbortableConnections:
    """The app as uvicorn runs it: SSE streams take the fast path (see sse.serve_stream)."""
    from taskcast.sse import serve_stream

    return AbortableConnections(app, serve_stream)


def create_served_app() -> AbortableConnections:
    """The factory uvicorn's worker processes import (`--workers`): settings from TASKCAST_*."""
    from taskcast.app import create_app

    return served(create_app())


def uvicorn_config(app: Starlette, settings: Settings, **overrides: object) -> uvicorn.Config:
    options = uvicorn_options(settings)
    options.update(overrides)
    asgi: ASGIApp = served(app)
    return uvicorn.Config(asgi, **options)  # type: ignore[arg-type]


def uvicorn_options(settings: Settings) -> dict[str, object]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "lifespan": "on",
        "access_log": False,
        # A frame over this size closes the socket with 1009: clients only send small ops.
        "ws_max_size": settings.ws_max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
        # Compression would re-encode every frame per client (a multi-megabyte base64 image
        # included), undoing encode-once; base64 also compresses poorly.
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
        "backlog": 4096,
    }
