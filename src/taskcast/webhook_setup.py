"""Building the webhook service from Settings: inside `taskcast serve` (app.py), or on its own
as `taskcast webhooks`."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import signal
import urllib.parse
from collections.abc import Callable
from typing import Any

from taskcast.connection import (
    connect,
    initialize_cluster,
    is_cluster_url,
    is_memory_url,
    safe_url,
)
from taskcast.keys import TaskKeys
from taskcast.metrics import Metrics, metrics_server
from taskcast.settings import Settings
from taskcast.webhook_sender import WebhookSender
from taskcast.webhook_signing import WebhookSigner
from taskcast.webhook_targets import TargetPolicy
from taskcast.webhooks import WebhookService

logger = logging.getLogger(__name__)

WEBHOOK_REDIS_CONNECTIONS = 20


def check(settings: Settings) -> str | None:
    """Why the webhook settings cannot work (for exit status 2 at start-up), or None."""
    if settings.webhooks not in ("on", "off"):
        return "TASKCAST_WEBHOOKS must be on or off"
    if settings.webhook_secret:
        try:
            WebhookSigner.from_setting(settings.webhook_secret)
        except ValueError as exc:
            return str(exc)
    if not 0 < settings.webhook_timeout_s <= 300 or settings.webhook_per_host < 1 or (
            settings.webhook_horizon_s <= 0 or settings.webhook_recheck_s <= 0):
        return ("webhook_timeout_s must be from 0 to 300 s, webhook_horizon_s and "
                "webhook_recheck_s positive, webhook_per_host at least 1")
    return None


def webhook_service(settings: Settings, redis: Any, metrics: Metrics, *,
                    standalone: bool = False) -> WebhookService | None:
    """The service when this process should deliver webhooks (a secret is set, and
    `webhooks` is on or this is `taskcast webhooks`), else None."""
    if not settings.webhook_secret or (settings.webhooks != "on" and not standalone):
        return None
    policy = TargetPolicy(settings.webhook_allowed_hosts)
    sender = WebhookSender(policy, timeout_s=settings.webhook_timeout_s,
                           per_host=settings.webhook_per_host)
    # Its own client: a burst of deliveries waits for these connections, not for REST's.
    own = connect(settings.redis_url, timeout=settings.redis_timeout_s,
                  max_connections=WEBHOOK_REDIS_CONNECTIONS, pool_timeout=30.0)
    cluster = is_cluster_url(settings.redis_url)
    service = WebhookService(
        own, TaskKeys(settings.prefix), metrics,
        WebhookSigner.from_setting(settings.webhook_secret), sender,
        wake_client=_wake_clients(settings, redis), member=secrets.token_hex(8),
        horizon_s=settings.webhook_horizon_s, recheck_s=settings.webhook_recheck_s,
        prepare=(lambda: initialize_cluster(own)) if cluster else None)
    logger.info("delivering webhooks; targets allowed: %s", policy.describe())
    return service


def _wake_clients(settings: Settings, redis: Any) -> Callable[[], Any]:
    """Makes the client of each (re)connection of the wake subscription. On a cluster, a
    plain connection to one node (plain PUBLISH reaches every node): the URL's node first,
    then any other known one."""
    url, timeout = settings.redis_url, settings.redis_timeout_s
    if is_memory_url(url):
        return lambda: connect(url)
    if not is_cluster_url(url):
        return lambda: connect(url, timeout=timeout, max_connections=2, retries=0, protocol=2)
    seed = urllib.parse.urlsplit(url.replace("+cluster://", "://", 1))
    attempts = [0]

    def node_client() -> Any:
        attempts[0] += 1
        target = seed
        nodes = _cluster_nodes(redis)
        if attempts[0] > 1 and nodes:
            host, port = random.choice(nodes)
            auth = seed.netloc.rpartition("@")[0]
            host_port = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            target = seed._replace(netloc=f"{auth}@{host_port}" if auth else host_port)
        return connect(urllib.parse.urlunsplit(target), timeout=timeout, max_connections=2,
                       retries=0, protocol=2)

    return node_client


def _cluster_nodes(redis: Any) -> list[tuple[str, int]]:
    try:
        return [(node.host, int(node.port)) for node in redis.get_nodes()]
    except Exception:  # a cluster client not initialized yet knows no nodes
        return []


def run_standalone(settings: Settings) -> int:
    """`taskcast webhooks`: deliver webhooks only (no HTTP listener except the metrics port)."""
    problem = check(settings)
    if problem is None and not settings.webhook_secret:
        problem = "taskcast webhooks needs TASKCAST_WEBHOOK_SECRET"
    if problem is None and is_memory_url(settings.redis_url):
        problem = "taskcast webhooks needs a shared Redis; memory:// lives in one process"
    if problem is not None:
        print(f"taskcast: {problem}")
        return 2
    asyncio.run(_run(settings))
    return 0


async def _run(settings: Settings) -> None:
    redis = connect(settings.redis_url, timeout=settings.redis_timeout_s)
    if is_cluster_url(settings.redis_url):
        await initialize_cluster(redis)
    metrics = Metrics()
    service = webhook_service(settings, redis, metrics, standalone=True)
    assert service is not None
    listener = metrics_server(settings, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    service.start()
    logger.info("taskcast webhooks running against %s", safe_url(settings.redis_url))
    try:
        await stop.wait()
    finally:
        logger.info("taskcast webhooks stopping")
        await service.close()
        await redis.aclose()
        if listener is not None:
            listener.shutdown()
            listener.server_close()

