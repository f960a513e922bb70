#!/usr/bin/env python3
"""Receive taskcast's webhooks: verify each one, drop repeats, keep each task's newest state.

Give it the gateway's TASKCAST_WEBHOOK_SECRET (during a rotation the gateway's comma-separated
list works here too), then create tasks whose `webhook_url` is this receiver's /webhooks:

    TASKCAST_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 9000
    taskcast task create --webhook-url http://127.0.0.1:9000/webhooks --webhook-event start \
        --webhook-event progress --webhook-event completed --webhook-event failed

(A gateway delivers to loopback and private addresses only when they are listed in
TASKCAST_WEBHOOK_ALLOWED_HOSTS, e.g. 127.0.0.1 for this local run.) Needs starlette and uvicorn
(taskcast's own dependencies) and `pip install standardwebhooks`.

Each POST /webhooks goes through these steps, in this order:
  1. verify the Standard Webhooks signature over the raw body: 401 when it does not verify,
     and the body is never parsed;
  2. a webhook-id accepted before is a repeat (delivery is at least once: a message whose 2xx
     got lost comes again with the same webhook-id): 204, nothing else;
  3. a task this service no longer wants (here: --cancelled TASK_ID) gets 410, and taskcast
     then sends no more messages for that task;
  4. a version older than the newest one accepted for the task is ignored (204);
  5. the message is queued and answered 204 at once. A worker prints one line per message:
     `task.progress task_id=42 status=processing progress=40 version=3`.
Do slow work after answering: the gateway waits at most 10 s (TASKCAST_WEBHOOK_TIMEOUT_S) for
the answer, and a timeout is retried. Everything here is in memory; a real service keeps the
webhook-ids (a unique key) and the versions in its database, next to its jobs, and writes them
in the same transaction as the queued job, before answering.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MAX_BODY_BYTES = 20 * 1024 * 1024  # a completed task carries its image: up to 16 MiB of base64
REMEMBERED = 100_000  # webhook-ids and task versions kept (the oldest are forgotten)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def remember(memory: OrderedDict[Any, Any], key: Any, value: Any = None) -> None:
    memory[key] = value
    memory.move_to_end(key)
    if len(memory) > REMEMBERED:
        memory.popitem(last=False)


class Receiver:
    def __init__(self, secrets: list[str], cancelled: set[int]) -> None:
        self.verifiers = [Webhook(secret) for secret in secrets]
        self.cancelled = cancelled
        self.seen_ids: OrderedDict[str, None] = OrderedDict()
        self.newest: OrderedDict[int, int] = OrderedDict()  # task_id -> newest version
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def verify(self, body: bytes, headers: dict[str, str]) -> Any:
        """The parsed body if its signature verifies with one of the secrets, else None."""
        for verifier in self.verifiers:
            with contextlib.suppress(WebhookVerificationError):
                return verifier.verify(body, headers)
        return None

    async def webhook(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return Response(status_code=413, headers={"connection": "close"})
        message = self.verify(bytes(body), dict(request.headers))
        if not isinstance(message, dict):
            log("401 rejected: the signature does not verify")
            return Response(status_code=401)
        # Verified: from here on the message is taskcast's. (No await below: one at a time.)
        webhook_id = request.headers["webhook-id"]
        if webhook_id in self.seen_ids:
            log(f"204 duplicate webhook-id {webhook_id}")
            return Response(status_code=204)
        task = message.get("data")
        if not str(message.get("type")).startswith("task.") or not isinstance(task, dict):
            return Response(status_code=204)  # a kind of message this receiver does not use
        task_id, version = task["task_id"], task["version"]
        if task_id in self.cancelled:
            log(f"410 cancelled: task_id={task_id}")
            return Response(status_code=410)
        if version <= self.newest.get(task_id, 0):
            log(f"204 older: task_id={task_id} version={version}"
                f" <= {self.newest[task_id]}")
            return Response(status_code=204)
        remember(self.seen_ids, webhook_id)
        remember(self.newest, task_id, version)
        self.queue.put_nowait(message)
        return Response(status_code=204)

    async def work(self) -> None:
        """Handles the accepted messages one at a time, in the order they were accepted."""
        while True:
            message = await self.queue.get()
            task = message["data"]
            print(f"{message['type']} task_id={task['task_id']} status={task['status']}"
                  f" progress={task['progress']} version={task['version']}", flush=True)
            self.queue.task_done()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        worker = asyncio.create_task(self.work())
        yield
        with contextlib.suppress(TimeoutError):  # finish what was answered 204
            async with asyncio.timeout(10):
                await self.queue.join()
        worker.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9000")),
                        help="port to listen on (default: $PORT or 9000)")
    parser.add_argument("--cancelled", type=int, action="append", default=[],
                        metavar="TASK_ID", help="answer 410 for this task (repeatable)")
    args = parser.parse_args(argv)
    secrets = [s.strip() for s in os.environ.get("TASKCAST_WEBHOOK_SECRET", "").split(",")
               if s.strip()]
    if not secrets:
        parser.error("set TASKCAST_WEBHOOK_SECRET to the gateway's whsec_... secret")
    try:
        if not all(secret.startswith("whsec_") for secret in secrets):
            raise ValueError
        receiver = Receiver(secrets, set(args.cancelled))
    except Exception:  # never print the secret itself
        parser.error("TASKCAST_WEBHOOK_SECRET is not a whsec_<base64> secret")
    app = Starlette(routes=[Route("/webhooks", receiver.webhook, methods=["POST"])],
                    lifespan=receiver.lifespan)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
