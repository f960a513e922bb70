"""The application: the Starlette app with its routes and lifespan, and GatewayApp, which
uvicorn runs and which hands the push endpoints straight to their transports.

From a Redis message to bytes on a socket: broker.py (or broker_cluster.py) reads the pub/sub
message and hands it to hub.Hub, which keeps the newest state per watched task and offers it
to each watcher (a client's mailbox); delivery.Session turns what arrives in a mailbox into
writes, framed by sse.py or ws.py, and written through server.py's direct link or through ASGI.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from taskcast import access, busy, redaction, rest, server, sse, ws
from taskcast.broker import RedisPubSubBroker
from taskcast.broker_cluster import ShardedPubSubBroker
from taskcast.connection import connect, initialize_cluster, is_cluster_url, safe_url
from taskcast.cors import CorsPolicy
from taskcast.delivery import Connections
from taskcast.demo import SimulatedWorker, demo_routes
from taskcast.demo_webhooks import Inbox, demo_webhook_routes
from taskcast.errors import CorruptRecord, StoreUnavailable
from taskcast.health import healthz, readyz
from taskcast.hub import Broker, Hub
from taskcast.keys import TaskKeys
from taskcast.metrics import Metrics, metrics_endpoint, metrics_server
from taskcast.openapi import openapi_json
from taskcast.poll_cache import PollCache, PollCacheCollector
from taskcast.producer import Producer
from taskcast.responses import envelope, failure, internal_error
from taskcast.settings import Settings
from taskcast.static import browser_client
from taskcast.store import TaskStore
from taskcast.timeouts import TimeoutSweeper
from taskcast.webhook_setup import webhook_service
from taskcast.webhook_signing import WebhookSigner

logger = logging.getLogger(__name__)

# A transport's entry point: sse.serve or ws.serve, with the path parameters of its route.
PushHandler = Callable[[Scope, Receive, Send, dict[str, str]], Awaitable[None]]


class PushEndpoint:
    """A transport's `serve` as a Starlette route's ASGI endpoint (when the app runs without
    GatewayApp in front of it)."""

    def __init__(self, serve: PushHandler) -> None:
        self.serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The transport's `serve` with the route's path parameters."""
        await self.serve(scope, receive, send, dict(scope.get("path_params") or {}))


class GatewayApp:
    """The ASGI application uvicorn runs: SSE and WebSocket requests go straight to their
    transports, skipping Starlette's middleware and routing (a push connection lives for
    minutes, and each layer would keep a coroutine frame per connection and wrap every write),
    and so does a GET of a task (a poll answered from memory costs less than those layers);
    everything else goes through the Starlette app."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.open = 0  # task reads under way: REST requests, SSE streams, WebSockets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI. The lifespan is the Starlette app's, after recording what the server
        offers (server_support) and asking to hear of its shutdown; a GET or HEAD of an SSE
        path and a WebSocket on /ws or /tasks/{id}/ws go to their transport, a GET of
        /tasks/{id} to rest.serve; all else to the app. Task reads beyond `max_connections`
        are refused (busy.py)."""
        kind = scope["type"]
        if kind == "lifespan":
            self.app.state.server_support = server.server_support(send)
            server.on_server_shutdown(scope, self._server_shutdown)
            await self.app(scope, receive, send)
            return
        route = _route(kind, scope)
        if route is None and not (kind == "http" and scope["path"].startswith("/tasks/")):
            await self.app(scope, receive, send)  # the service endpoints are never refused
            return
        scope["app"] = self.app
        settings: Settings | None = getattr(self.app.state, "settings", None)
        if settings is not None and settings.max_connections and (
                self.open >= settings.max_connections):
            await busy.refuse(scope, receive, send)
            return
        self.open += 1
        try:
            if route is not None:
                await route[0](scope, receive, send, route[1])
            else:
                await self.app(scope, receive, send)
        finally:
            self.open -= 1

    def _server_shutdown(self) -> None:
        connections: Connections | None = getattr(self.app.state, "connections", None)
        if connections is not None:
            connections.shutdown()


async def _poll(scope: Scope, receive: Receive, send: Send, path_params: dict[str, str]
                ) -> None:
    await rest.serve(scope, receive, send)


def _route(kind: str, scope: Scope) -> tuple[PushHandler, dict[str, str]] | None:
    """The handler that takes this request past Starlette: a push transport, or a GET of a
    task (the REST poll, plain ASGI for speed); None for the Starlette app."""
    path: str = scope["path"]
    if kind == "http":
        if scope["method"] not in ("GET", "HEAD"):  # HEAD: clients probing why a stream failed
            return None
        if scope["method"] == "GET" and path.count("/") == 2 and path.startswith("/tasks/"):
            return _poll, {}
        if path == "/events":
            return sse.serve, {}
        suffix, handler = "/events", sse.serve
    elif kind == "websocket":
        if path == "/ws":
            return ws.serve, {}
        suffix, handler = "/ws", ws.serve
    else:
        return None
    if path.startswith("/tasks/") and path.endswith(suffix) and path.count("/") == 3:
        task_id = path[len("/tasks/"):-len(suffix)]
        if task_id:
            return handler, {"task_id": task_id}
    return None


def create_served_app() -> GatewayApp:
    """The factory uvicorn's worker processes import (`--workers`): settings from TASKCAST_*."""
    return GatewayApp(create_app())


def create_app(settings: Settings | None = None, *, demo: bool = False) -> Starlette:
    """The gateway; `demo` adds the demo page and a simulated worker (`taskcast demo`)."""
    settings = settings or Settings.from_env()
    cors = CorsPolicy.from_setting(settings.cors_origins)
    verifier = access.verifier_for(settings)  # a key that cannot work fails here, not later

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redaction.install()  # after the server has configured its loggers
        redis = connect(settings.redis_url, timeout=settings.redis_timeout_s)
        pubsub_redis = redis
        keys = TaskKeys(settings.prefix)
        store = TaskStore(redis, keys)
        metrics = Metrics()
        broker: Broker
        if is_cluster_url(settings.redis_url):
            await initialize_cluster(redis)
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
        support = getattr(app.state, "server_support", None) or server.ServerSupport(
            "unknown", problems=("the app is not served through taskcast.app.GatewayApp",))
        _report_support(support, metrics)
        app.state.settings = settings
        app.state.store = store
        app.state.cluster = is_cluster_url(settings.redis_url)
        app.state.metrics = metrics
        app.state.hub = hub
        app.state.cors = cors
        gate = app.state.gate = (access.Gate(verifier, metrics) if verifier is not None
                                 else None)
        app.state.server_support = support
        connections = app.state.connections = Connections(hub, metrics, settings, gate)
        poll_cache = app.state.poll_cache = None
        if settings.poll_watch_s > 0 and settings.poll_cache_tasks > 0:
            poll_cache = app.state.poll_cache = PollCache(
                hub, watch_s=settings.poll_watch_s,
                max_tasks=settings.poll_cache_tasks, max_bytes=settings.poll_cache_bytes)
            metrics.registry.register(PollCacheCollector(poll_cache))
        hub.start()
        connections.start()
        if poll_cache is not None:
            poll_cache.start()
        sweeper = None
        if settings.timeout_sweep_s > 0:
            sweeper = TimeoutSweeper(redis, keys, metrics, sharded=app.state.cluster,
                                     interval_s=settings.timeout_sweep_s)
            sweeper.start()
        webhooks = app.state.webhooks = webhook_service(settings, redis, metrics)
        if webhooks is not None:
            webhooks.start()
        metrics_listener = metrics_server(settings, metrics)
        worker = None
        if demo:
            producer = Producer(redis, prefix=settings.prefix, retention_s=settings.retention_s,
                                sharded=is_cluster_url(settings.redis_url))
            worker = app.state.demo_worker = SimulatedWorker(
                producer, keys, settings.demo_step_s, settings.demo_max_tasks)
            app.state.demo_inbox = Inbox()
            app.state.webhook_signer = (WebhookSigner.from_setting(settings.webhook_secret)
                                        if settings.webhook_secret else None)
        logger.info("taskcast serving tasks from %s (prefix %r); access control: %s",
                    safe_url(settings.redis_url), settings.prefix, access.describe(settings))
        try:
            yield
        finally:
            if metrics_listener is not None:
                # shutdown() waits for the server thread's poll (up to 0.5 s): not on the loop.
                await asyncio.to_thread(metrics_listener.shutdown)
                metrics_listener.server_close()
            if worker is not None:
                await worker.close()
            if sweeper is not None:
                await sweeper.close()
            if webhooks is not None:
                await webhooks.close()
            await connections.close()
            if poll_cache is not None:
                await poll_cache.close()
            await hub.close()
            await redis.aclose()
            if pubsub_redis is not redis:
                await pubsub_redis.aclose()

    routes = [
        Route("/tasks/{task_id}", rest.get_task, methods=["GET"]),
        # An empty id still gets the 422 body rather than a bare 404.
        Route("/tasks/", rest.get_task, methods=["GET"]),
        Route("/tasks/{task_id}/events", PushEndpoint(sse.serve), methods=["GET"]),
        Route("/events", PushEndpoint(sse.serve), methods=["GET"]),
        WebSocketRoute("/ws", PushEndpoint(ws.serve)),
        WebSocketRoute("/tasks/{task_id}/ws", PushEndpoint(ws.serve)),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/taskcast.js", browser_client, methods=["GET"]),
    ]
    if not settings.metrics_port:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    if demo:
        routes = demo_routes() + demo_webhook_routes() + routes
    return Starlette(
        routes=routes,
        middleware=[cors.middleware()] if cors is not None else [],
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            StoreUnavailable: _store_error,
            CorruptRecord: _store_error,
            Exception: _unexpected_error,
        },
    )


def _report_support(support: server.ServerSupport, metrics: Metrics) -> None:
    """One warning at start when the server lacks what the fast paths need; /metrics too."""
    for feature, available in support.features().items():
        metrics.server_features.labels(feature).set(1 if available else 0)
    if support.problems:
        logger.warning(
            "push connections take the slower plain-ASGI path (server: %s): %s. "
            "Run the gateway with `taskcast serve` for direct writes, taskcast's WebSocket "
            "connection and clean stream endings on shutdown.",
            support.server, "; ".join(support.problems))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return envelope(exc.status_code, msg, headers=exc.headers)


async def _store_error(request: Request, exc: Exception) -> Response:
    return failure(exc, f"{request.scope.get('method', 'WS')} {request.url.path}", logger)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback after this handler; the client sees the seed's 500 body only.
    return internal_error()

