"""The uvicorn configuration taskcast runs with, shared by the CLI and the tests."""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp

from taskcast.settings import Settings


def uvicorn_config(app: ASGIApp, settings: Settings, **overrides: object) -> uvicorn.Config:
    options = uvicorn_options(settings)
    options.update(overrides)
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


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
