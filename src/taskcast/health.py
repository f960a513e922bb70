"""Liveness and readiness probes for orchestrators and load balancers."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from taskcast.responses import envelope
from taskcast.store import TaskStore


async def healthz(request: Request) -> Response:
    """The process is up and its event loop answers; says nothing about Redis."""
    return envelope(200, "ok")


async def readyz(request: Request) -> Response:
    """Ready when Redis answers PING; 503 tells a load balancer to route elsewhere."""
    store: TaskStore = request.app.state.store
    if await store.ping():
        return envelope(200, "ready", {"redis": "ok"})
    return envelope(503, "redis unavailable", {"redis": "unavailable"})
