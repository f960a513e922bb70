"""`taskcast demo`'s webhook receiver: the demo's tasks send their webhooks back to the demo
itself (`POST /demo/webhooks/receive`, signature verified like any receiver should), and the
page at `/demo/webhooks` shows them arriving (it long-polls `/demo/webhooks/received`)."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from taskcast.responses import JSONBody, envelope
from taskcast.static import static_file
from taskcast.webhook_signing import WebhookSigner

KEPT = 200  # callbacks the page can show
TOLERANCE_S = 300  # as the Standard Webhooks libraries: older (or future) timestamps are refused
MAX_WAIT_S = 20.0
MAX_BODY_BYTES = 1 << 20


class Inbox:
    """The last KEPT verified callbacks, numbered, with a wait for the next one."""

    def __init__(self) -> None:
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEPT)
        self.count = 0
        self._arrived = asyncio.Condition()

    async def add(self, entry: dict[str, Any]) -> None:
        """Keep `entry` as number count + 1 and wake the waiting pages."""
        self.count += 1
        self.entries.append({"seq": self.count, **entry})
        async with self._arrived:
            self._arrived.notify_all()

    async def after(self, seq: int, wait_s: float) -> list[dict[str, Any]]:
        """Entries numbered above `seq`, waiting up to `wait_s` for one if there is none."""
        if self.count <= seq:
            async with self._arrived:
                try:
                    async with asyncio.timeout(wait_s):
                        await self._arrived.wait_for(lambda: self.count > seq)
                except TimeoutError:
                    return []
        return [entry for entry in self.entries if entry["seq"] > seq]


def demo_webhook_url(request: Request) -> str | None:
    """Where the demo's tasks send their webhooks: this gateway, over loopback unless it
    listens on one address only; None when this gateway does not deliver webhooks."""
    if getattr(request.app.state, "webhooks", None) is None:
        return None
    settings = request.app.state.settings
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    port = (request.scope.get("server") or ("", settings.port))[1]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/demo/webhooks/receive"


async def receive(request: Request) -> Response:
    """`POST /demo/webhooks/receive`: a receiver as the README describes one; 401 for a
    message whose signature or timestamp does not verify."""
    signer: WebhookSigner | None = getattr(request.app.state, "webhook_signer", None)
    body = await request.body()
    headers = request.headers
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    if signer is None or len(body) > MAX_BODY_BYTES or not signer.verify(
            msg_id, stamp, body, headers.get("webhook-signature", "")) or abs(
            time.time() - int(stamp)) > TOLERANCE_S:
        return envelope(401, "signature does not verify")
    message = orjson.loads(body)
    data = message["data"]
    await request.app.state.demo_inbox.add({
        "webhook_id": msg_id, "type": message["type"], "timestamp": message["timestamp"],
        "received_ms": int(time.time() * 1000), "task_id": data["task_id"],
        "status": data["status"], "progress": data["progress"], "version": data["version"],
        "image_base64_bytes": len(data["image"]["image_base64"]),
        "error_message": data["error_message"]})
    return Response(status_code=204)


async def received(request: Request) -> Response:
    """`GET /demo/webhooks/received?after=N&wait=S`: callbacks numbered above N, waiting up
    to S seconds (default and at most 20) for one."""
    after = _number(request.query_params.get("after", "0"), 0)
    wait = min(MAX_WAIT_S, _number(request.query_params.get("wait", ""), int(MAX_WAIT_S)))
    inbox: Inbox = request.app.state.demo_inbox
    enabled = request.app.state.webhooks is not None
    entries = await inbox.after(after, wait if enabled else 0)  # nothing will come: at once
    return JSONBody({"code": 200, "msg": "success",
                     "data": {"enabled": enabled, "entries": entries}})


def _number(raw: str, default: int) -> int:
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else default


async def page(request: Request) -> Response:
    """`GET /demo/webhooks`: the receiver's page."""
    return static_file("webhooks.html", "text/html; charset=utf-8")


def demo_webhook_routes() -> list[BaseRoute]:
    """The receiver's routes (only `taskcast demo` mounts them)."""
    return [
        Route("/demo/webhooks", page, methods=["GET"]),
        Route("/demo/webhooks/receive", receive, methods=["POST"]),
        Route("/demo/webhooks/received", received, methods=["GET"]),
    ]
