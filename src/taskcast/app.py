"""The application factory: routes, error handlers and the lifespan that owns the Redis client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from taskcast.broker import Broker, RedisPubSubBroker
from taskcast.broker_cluster import ShardedPubSubBroker
from taskcast.connection import connect, is_cluster_url
from taskcast.demo import SimulatedWorker, demo_routes
from taskcast.errors import CorruptRecord, StoreUnavailable
from taskcast.health import healthz, readyz
from taskcast.hub import Hub
from taskcast.keys import TaskKeys
from taskcast.metrics import Metrics, metrics_endpoint
from taskcast.openapi import openapi_json
from taskcast.producer import Producer
from taskcast.responses import envelope, internal_error
from taskcast.rest import get_task
from taskcast.settings import Settings
from taskcast.sse import many_task_events, task_events
from taskcast.static import browser_client
from taskcast.store import STORE_ERRORS, TaskStore
from taskcast.streams import OpenStreams
from taskcast.ws import many_tasks_socket, one_task_socket

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, demo: bool = False) -> Starlette:
    """The gateway; `demo` adds the demo page and a simulated worker (`taskcast demo`)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(settings.redis_url, timeout=settings.redis_timeout_s)
        pubsub_redis = redis
        keys = TaskKeys(settings.prefix)
        store = TaskStore(redis, keys)
        metrics = Metrics()
        broker: Broker
        if is_cluster_url(settings.redis_url):
            await _initialize_cluster(redis)
            broker = ShardedPubSubBroker(redis, keys,  # type: ignore[arg-type]
                                         ping_deadline_s=settings.redis_ping_deadline_s,
                                         node_timeout_s=settings.redis_timeout_s)
        else:
            # Its own client: a pub/sub connection must not be silently reconnected (see connect).
            pubsub_redis = connect(settings.redis_url, timeout=settings.redis_timeout_s,
                                   max_connections=4, retries=0, protocol=2)
            broker = RedisPubSubBroker(pubsub_redis, keys,
                                       ping_deadline_s=settings.redis_ping_deadline_s)
        hub = Hub(broker, store, metrics, resync_interval_s=settings.resync_interval_s)
        app.state.settings = settings
        app.state.store = store
        app.state.metrics = metrics
        app.state.hub = hub
        streams = app.state.streams = OpenStreams(metrics, settings.sse_keepalive_s,
                                                  settings.send_timeout_s)
        hub.start()
        streams.start()
        worker = None
        if demo:
            producer = Producer(redis, prefix=settings.prefix, retention_s=settings.retention_s,
                                sharded=is_cluster_url(settings.redis_url))
            worker = app.state.demo_worker = SimulatedWorker(producer, settings.demo_step_s)
        logger.info("taskcast serving tasks from %s (prefix %r)", _safe_url(settings.redis_url),
                    settings.prefix)
        try:
            yield
        finally:
            if worker is not None:
                await worker.close()
            await streams.close()
            await hub.close()
            await redis.aclose()
            if pubsub_redis is not redis:
                await pubsub_redis.aclose()

    routes = [
        Route("/tasks/{task_id}", get_task, methods=["GET"]),
        # An empty id still gets the 422 body rather than a bare 404.
        Route("/tasks/", get_task, methods=["GET"]),
        Route("/tasks/{task_id}/events", task_events, methods=["GET"]),
        Route("/events", many_task_events, methods=["GET"]),
        WebSocketRoute("/ws", many_tasks_socket),
        WebSocketRoute("/tasks/{task_id}/ws", one_task_socket),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/taskcast.js", browser_client, methods=["GET"]),
    ]
    if demo:
        routes = demo_routes() + routes
    middleware = []
    if settings.cors_origins:
        origins = [item.strip() for item in settings.cors_origins.split(",") if item.strip()]
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET"],
            allow_headers=["Last-Event-ID", "If-None-Match", "Cache-Control"],
            expose_headers=["ETag"], max_age=600,
        ))
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            StoreUnavailable: _store_unavailable,
            CorruptRecord: _corrupt_record,
            Exception: _unexpected_error,
        },
    )


async def _initialize_cluster(redis: object) -> None:
    """Load the slot map now: redis-py initializes a cluster client lazily, and a burst of
    concurrent first commands races inside that (AttributeError on a half-made connection)."""
    try:
        await redis.initialize()  # type: ignore[attr-defined]
    except STORE_ERRORS as exc:
        logger.warning("Redis Cluster not reachable at start-up (%s); will keep trying", exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return envelope(exc.status_code, msg, headers=exc.headers)


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: %s", request.scope.get("method", "WS"), request.url.path, exc)
    return internal_error()


async def _corrupt_record(request: Request, exc: Exception) -> Response:
    logger.error("%s %s: %s", request.scope.get("method", "WS"), request.url.path, exc)
    return internal_error()


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback after this handler; the client sees the seed's 500 body only.
    return internal_error()


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
