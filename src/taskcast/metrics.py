"""Prometheus metrics of one gateway, served at `/metrics`.

Each app owns its registry, so several gateways in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from taskcast.settings import Settings

# The `_created` samples double every counter's output and say nothing useful here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every metric of one gateway, in `registry`, which is its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "taskcast_open_connections", "Open push connections", ["transport"], registry=r
        )
        self.watched_tasks = Gauge(
            "taskcast_watched_tasks", "Tasks with at least one local watcher", registry=r
        )
        self.subscriptions = Gauge(
            "taskcast_redis_subscriptions", "Task channels this process subscribes to", registry=r
        )
        self.events_received = Counter(
            "taskcast_events_received", "Task events received from Redis pub/sub", registry=r
        )
        self.events_malformed = Counter(
            "taskcast_events_malformed", "Pub/sub messages that were not a task object",
            registry=r,
        )
        # Counted on every write, so a plain int per transport instead of a locked Counter;
        # exported through _DeliveryCollector below.
        self.delivered: dict[str, int] = {"sse": 0, "ws": 0}
        r.register(_DeliveryCollector(self.delivered))
        self.conflated = Counter(
            "taskcast_updates_conflated",
            "Progress states replaced by a newer one before a slow client took them", registry=r,
        )
        self.dropped = Counter(
            "taskcast_updates_dropped",
            "States not delivered because their client was disconnected as too slow", registry=r,
        )
        self.slow_disconnects = Counter(
            "taskcast_slow_client_disconnects", "Clients closed because they stopped reading",
            ["transport"], registry=r,
        )
        self.resyncs = Counter(
            "taskcast_resyncs", "Task records re-read from Redis", ["reason"], registry=r
        )
        self.server_features = Gauge(
            "taskcast_server_feature",
            "1 when the server offers what a fast path needs (see server.py), else 0",
            ["feature"], registry=r,
        )
        self.fast_path_failures = Counter(
            "taskcast_fast_path_failures",
            "Direct writes the server did not take as the adapter expects (then ASGI is used)",
            ["feature"], registry=r,
        )
        self.auth_refusals = Counter(
            "taskcast_auth_refusals",
            "Requests and connections refused or ended by access control (contract 7)",
            ["transport", "reason"], registry=r,
        )
        self.redis_reconnects = Counter(
            "taskcast_redis_reconnects", "Pub/sub connections re-established", registry=r
        )
        self.timed_out = Counter(
            "taskcast_tasks_timed_out",
            "Tasks this gateway failed because no change came within their timeout_s",
            registry=r,
        )
        self.timeout_checks = Counter(
            "taskcast_timeout_checks",
            "Tasks the timeout sweep asked the update script about, by answer",
            ["answer"], registry=r,
        )
        self.webhook_deliveries = Counter(
            "taskcast_webhook_deliveries",
            "Webhook attempts by outcome: delivered, failed (will be retried), gone (410), "
            "refused (target not allowed), dead (retry horizon passed), expired (record gone "
            "while retrying)", ["outcome"], registry=r,
        )
        self.webhook_lag_seconds = Histogram(
            "taskcast_webhook_lag_seconds",
            "From a task's change (its updated_at) to the receiver's 2xx for it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
                     3600), registry=r,
        )
        self.webhook_request_seconds = Histogram(
            "taskcast_webhook_request_seconds", "Duration of webhook requests, any outcome",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.webhook_retries_pending = Gauge(
            "taskcast_webhook_retries_pending",
            "Tasks of this gateway's buckets whose webhook waits for a retry", registry=r,
        )
        self.webhook_buckets = Gauge(
            "taskcast_webhook_buckets", "Webhook buckets this gateway delivers", registry=r,
        )


class _DeliveryCollector(Collector):
    def __init__(self, delivered: dict[str, int]) -> None:
        self.delivered = delivered

    def collect(self) -> Iterable[Metric]:
        """Collector: the delivery counts as taskcast_messages_delivered{transport}."""
        family = CounterMetricFamily("taskcast_messages_delivered",
                                     "Task states written to clients", labels=["transport"])
        for transport, count in self.delivered.items():
            family.add_metric([transport], count)
        yield family


async def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics`: this process's metrics in the Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def metrics_server(settings: Settings, metrics: Metrics) -> WSGIServer | None:
    """With `metrics_port` set: prometheus_client's own HTTP server for this process's
    metrics, on `metrics_host:metrics_port`, in a thread (the main port then has no /metrics,
    so the public listener shows nothing about the process). Call shutdown() and
    server_close() on it at the end. None when metrics stay on the main port."""
    if not settings.metrics_port:
        return None
    server, _ = start_http_server(settings.metrics_port, settings.metrics_host,
                                  registry=metrics.registry)
    return server
