"""CORS for browser clients on other origins (`TASKCAST_CORS_ORIGINS`), one policy for every path.

REST and the service endpoints go through Starlette's CORSMiddleware. The SSE streams skip the
middleware stack (see app.GatewayApp), because a middleware wraps `send`, and a wrapped `send`
hides the server's connection that direct writes need. So a stream asks the very same
middleware which headers it would add to its response (`response_headers`), and sends them
itself: the policy is Starlette's in both places, not a copy of it.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise RuntimeError("this CORSMiddleware only computes headers")


class CorsPolicy:
    """The CORS rules: GET from the listed origins, with Authorization, Last-Event-ID and
    If-None-Match allowed in and ETag and WWW-Authenticate exposed; the same options for the
    middleware and the streams."""

    def __init__(self, origins: list[str]) -> None:
        self.options: dict[str, Any] = {
            "allow_origins": origins,
            "allow_methods": ["GET"],
            "allow_headers": ["Authorization", "Last-Event-ID", "If-None-Match", "Cache-Control"],
            "expose_headers": ["ETag", "WWW-Authenticate"],
            "max_age": 600,
        }
        self._middleware = CORSMiddleware(_no_app, **self.options)

    @classmethod
    def from_setting(cls, value: str) -> CorsPolicy | None:
        """From the comma-separated setting; None (CORS off) when it lists no origin."""
        origins = [item.strip() for item in value.split(",") if item.strip()]
        return cls(origins) if origins else None

    def middleware(self) -> Middleware:
        """Starlette's CORSMiddleware with these options, for the app's middleware stack."""
        return Middleware(CORSMiddleware, **self.options)

    async def response_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The headers CORSMiddleware adds to a response to this (non-preflight) request."""
        start: Message = {"type": "http.response.start", "status": 200, "headers": []}
        sent: list[Message] = []

        async def capture(message: Message) -> None:
            sent.append(message)

        await self._middleware.send(start, send=capture, request_headers=Headers(scope=scope))
        return list(sent[0]["headers"])


async def add_cors_headers(response: Response, scope: Scope) -> None:
    """Give a response answered outside the middleware stack (a refused or failed stream)
    the CORS headers the app's policy would add; nothing when CORS is off."""
    cors: CorsPolicy | None = getattr(scope["app"].state, "cors", None)
    if cors is not None:
        response.raw_headers.extend(await cors.response_headers(scope))
