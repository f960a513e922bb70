"""Liveness and readiness probes for orchestrators and load balancers."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from taskcast.hub import Hub
from taskcast.responses import envelope
from taskcast.store import STORE_ERRORS, TaskStore


async def healthz(request: Request) -> Response:
    """The process is up and its event loop answers; says nothing about Redis."""
    return envelope(200, "ok")


async def readyz(request: Request) -> Response:
    """Ready when Redis answers PING, the pub/sub connection(s) are up, and on a Redis
    Cluster when the cluster reports `cluster_state:ok`; 503 tells a load balancer to route
    elsewhere, and `data` says which part failed."""
    store: TaskStore = request.app.state.store
    hub: Hub = request.app.state.hub
    if not await store.ping():
        return envelope(503, "redis unavailable", {"redis": "unavailable"})
    parts = {"redis": "ok", "pubsub": "ok" if hub.broker.connected else "disconnected"}
    if request.app.state.cluster:
        parts["cluster"] = await _cluster_state(store.redis)
    failing = [name for name, state in parts.items() if state != "ok"]
    if failing:
        return envelope(503, f"{' and '.join(failing)} not ready", parts)
    return envelope(200, "ready", parts)


async def _cluster_state(cluster: Any) -> str:
    """`cluster_state` of CLUSTER INFO as one node sees it ("ok" or "fail"), "unavailable"
    when no node answers."""
    try:
        info = await cluster.cluster_info()
    except STORE_ERRORS:
        return "unavailable"
    state = info.get("cluster_state") if isinstance(info, dict) else None
    return str(state) if state else "unavailable"
