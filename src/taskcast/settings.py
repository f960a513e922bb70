"""One frozen settings object, built from `TASKCAST_*` environment variables and CLI flags.

The app factory takes it explicitly, so tests build Settings instead of patching the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from taskcast.keys import DEFAULT_PREFIX

ENV_PREFIX = "TASKCAST_"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a gateway: field `x_y` is `TASKCAST_X_Y` and `taskcast serve --x-y`."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata={"help": "redis://, rediss://, unix:// or memory:// (embedded store)"},
    )
    prefix: str = field(default=DEFAULT_PREFIX, metadata={"help": "Redis key prefix"})
    retention_s: int = field(
        default=86_400, metadata={"help": "seconds a finished task is kept (0 = forever)"}
    )
    workers: int = field(
        default=1, metadata={"help": "gateway processes sharing the port (needs a Redis URL)"}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    redis_timeout_s: float = field(
        default=2.0, metadata={"help": "Redis connect/read timeout for requests, in seconds"}
    )

    sse_keepalive_s: float = field(
        default=15.0, metadata={"help": "seconds between SSE keep-alive comments"}
    )
    sse_retry_ms: int = field(
        default=2000, metadata={"help": "reconnect delay hinted to EventSource clients (ms)"}
    )
    send_timeout_s: float = field(
        default=10.0, metadata={"help": "a client that takes longer to accept a write is closed"}
    )
    resync_interval_s: float = field(
        default=5.0, metadata={"help": "seconds between re-reads of watched unfinished tasks"}
    )
    redis_ping_deadline_s: float = field(
        default=5.0, metadata={"help": "pub/sub connection without any reply this long is rebuilt"}
    )
    timeout_sweep_s: float = field(
        default=5.0, metadata={"help": "how often this gateway fails tasks past their "
                               "timeout_s (seconds; 0: never, leave it to other gateways)"}
    )
    poll_watch_s: float = field(
        default=10.0, metadata={"help": "seconds a polled task stays followed in memory after "
                                "its last REST poll, answering polls without Redis (0: every "
                                "poll reads Redis)"}
    )
    poll_cache_tasks: int = field(
        default=100_000, metadata={"help": "most polled tasks kept in memory (beyond: the least "
                                   "recently polled goes)"}
    )
    poll_cache_bytes: int = field(
        default=268_435_456, metadata={"help": "most bytes charged to polled tasks in memory: "
                                       "2.5 KiB each plus twice its image_base64 (beyond: the "
                                       "least recently polled goes)"}
    )
    max_tasks_per_stream: int = field(
        default=1000, metadata={"help": "task ids one /events stream may watch"}
    )

    metrics_port: int = field(
        default=0, metadata={"help": "serve /metrics on this port instead of the main one "
                             "(0 = on the main port, public like it)"}
    )
    metrics_host: str = field(
        default="127.0.0.1", metadata={"help": "address of the metrics port's listener"}
    )
    max_connections: int = field(
        default=10_000, metadata={"help": "task reads (REST requests, SSE streams, WebSockets) "
                                  "open at once in this process; more: 503 / close 1013 "
                                  "(0 = no cap)"}
    )
    max_stream_s: float = field(
        default=3600.0, metadata={"help": "an SSE stream or WebSocket is ended after 90-100 % "
                                  "of this (clients reconnect and resume; 0 = never)"}
    )
    ws_max_frame_bytes: int = field(
        default=65_536, metadata={"help": "largest client WebSocket frame (bigger: close 1009)"}
    )
    ws_max_subscriptions: int = field(
        default=1000, metadata={"help": "tasks one WebSocket may watch (more: close 4413)"}
    )
    ws_ops_per_s: float = field(
        default=20.0, metadata={"help": "sustained client ops per second per WebSocket"}
    )
    ws_ops_burst: int = field(
        default=100, metadata={"help": "client ops allowed in a burst (beyond: close 4429)"}
    )
    ws_ping_interval_s: float = field(
        default=20.0, metadata={"help": "seconds between protocol pings to WebSocket clients"}
    )
    ws_ping_timeout_s: float = field(
        default=20.0, metadata={"help": "a client that does not answer a ping this long is closed"}
    )
    allowed_origins: str = field(
        default="", metadata={"help": "comma-separated Origins allowed to open WebSockets "
                              "('*' = any; empty = same host only)"}
    )
    cors_origins: str = field(
        default="", metadata={"help": "comma-separated Origins allowed by CORS ('*' = any; "
                              "empty = CORS off)"}
    )
    auth: str = field(
        default="on", metadata={"help": "on: with a key set, every task read needs a token "
                                "(without one, only a loopback address is served); off: "
                                "no tokens, anyone who reaches the gateway reads every task"}
    )
    # Read from the environment only: a secret on the command line shows in `ps`.
    jwt_secret: str = field(
        default="", repr=False,
        metadata={"help": "HS256/HS384/HS512 secret, at least 32 bytes", "secret": True},
    )
    jwt_public_key_file: str = field(
        default="", metadata={"help": "PEM public key for RS256/384/512, ES256/384 or EdDSA"}
    )
    jwt_audience: str = field(
        default="", metadata={"help": "when set, a token's aud must include it"}
    )
    jwt_issuer: str = field(default="", metadata={"help": "when set, a token's iss must be it"})
    jwt_leeway_s: float = field(
        default=5.0, metadata={"help": "clock skew allowed on exp/nbf/iat, 0..30 seconds"}
    )
    ws_auth_timeout_s: float = field(
        default=10.0, metadata={"help": "a /ws socket with no valid token this long is closed "
                                "with 4401"}
    )
    demo_step_s: float = field(
        default=0.4, metadata={"help": "taskcast demo: seconds between simulated progress steps"}
    )
    demo_max_tasks: int = field(
        default=1000, metadata={"help": "taskcast demo: tasks it keeps; making more deletes "
                                "the oldest (records, images, running jobs)"}
    )
    demo_token_ttl_s: int = field(
        default=600, metadata={"help": "taskcast demo: lifetime of the tokens it hands out"}
    )
    webhooks: str = field(
        default="on", metadata={"help": "on: deliver webhooks from this process when "
                                "TASKCAST_WEBHOOK_SECRET is set; off: never (another process, "
                                "e.g. `taskcast webhooks`, delivers them)"}
    )
    webhook_secret: str = field(
        default="", repr=False,
        metadata={"help": "whsec_ secret(s) signing webhooks, comma-separated for rotation",
                  "secret": True},
    )
    webhook_allowed_hosts: str = field(
        default="", metadata={"help": "comma-separated hosts, addresses or CIDRs webhooks may "
                              "reach although they are not public (loopback, private, "
                              "link-local); empty: public addresses only"}
    )
    webhook_timeout_s: float = field(
        default=10.0, metadata={"help": "a webhook request without a complete answer this long "
                                "is a failure (retried)"}
    )
    webhook_per_host: int = field(
        default=10, metadata={"help": "webhook requests one gateway makes to one host at once"}
    )
    webhook_horizon_s: float = field(
        default=86_400.0, metadata={"help": "a webhook failing for this long is dead (no more "
                                    "retries; counted, and written on the task's record)"}
    )
    webhook_recheck_s: float = field(
        default=15.0, metadata={"help": "seconds between looks at an unfinished task with a "
                                "webhook (what bounds the delay of a lost wake-up message)"}
    )
    graceful_shutdown_s: int = field(
        default=5, metadata={"help": "seconds open connections get to end on shutdown"}
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `TASKCAST_<FIELD>` variables, then explicit overrides (CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = environ.get(ENV_PREFIX + spec.name.upper())
            if raw is not None:
                values[spec.name] = _convert(spec.name, raw, spec.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The settings as TASKCAST_* variables, for worker processes that rebuild them."""
        return {ENV_PREFIX + spec.name.upper(): str(getattr(self, spec.name))
                for spec in fields(self)}

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with `changes`; this one stays as it is."""
        return replace(self, **changes)


def _convert(name: str, raw: str, kind: object) -> Any:
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind in ("tuple[str, ...]",):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
