#!/usr/bin/env python3
"""Follow tasks over one WebSocket (`/ws`) until every one is completed or failed.

It subscribes to the task ids, prints each new state, and reconnects (resubscribing to the
tasks still unfinished) when the gateway closes with 1012 (restart: maybe another replica
answers next), or when the connection drops without a close frame (1006: e.g. this client read
too slowly and the gateway aborted its connection). Every
(re)subscription starts with each task's current state, so states it already has (same
version) are skipped. Close codes 4xxx mean "do not retry" and end the client.

Run it (a gateway on http://127.0.0.1:8000 and tasks that exist, e.g. from
examples/python_worker.py):

    .venv/bin/python examples/ws_client.py 42
    .venv/bin/python examples/ws_client.py --url http://127.0.0.1:8000 42 43 44
    .venv/bin/python examples/ws_client.py --no-image-base64 --timeout 60 42
    export TASKCAST_TOKEN=$(.venv/bin/taskcast token issue --task 42 --ttl 600)
    .venv/bin/python examples/ws_client.py 42

With access control on, the token (`--token` or TASKCAST_TOKEN) is sent in an
`{"op":"auth","token":...}` frame before subscribing (it could also ride on the upgrade as an
Authorization header). Its expiry closes the socket with 4401, which ends this client with
status 1; a real client would send a fresh token in another `auth` frame before that.

Needs only `websockets` (a dependency of taskcast). Exit status: 0 when all tasks are finished
(completed or failed), 1 when a task does not exist or the gateway refused the client, 2 when
--timeout passed first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

TERMINAL = ("completed", "failed")
# 1012: the gateway is restarting; 1001/1011: going away / server error; 1013: try again later
# (other servers send it). A drop without a close frame (1006, or no code) is retried as well:
# that is what a client that reads too slowly sees when the gateway aborts its connection.
RECONNECT_CODES = {1001, 1011, 1012, 1013}


class Refused(Exception):
    """The gateway said something that reconnecting cannot fix."""


def websocket_url(base: str, include_image_base64: bool) -> str:
    base = base.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(http):
            base = ws + base[len(http):]
    return base + "/ws" + ("" if include_image_base64 else "?image_base64=false")


def describe(task: dict[str, Any]) -> str:
    text = (f"task {task['task_id']}: {task['status']} {task['progress']}% "
            f"(version {task['version']})")
    if task["status"] == "completed":
        image = task["image"]
        text += (f" image_url={image['image_url'] or '-'}"
                 f" image_base64={len(image['image_base64'])} chars")
    elif task["status"] == "failed":
        text += f" error_message={task['error_message']!r}"
    return text


class Follower:
    def __init__(self, url: str, task_ids: list[int], token: str = "") -> None:
        self.url = url
        self.token = token
        self.task_ids = list(dict.fromkeys(task_ids))
        self.versions: dict[int, int] = {}
        self.finished: set[int] = set()
        self.unknown: set[int] = set()

    @property
    def unfinished(self) -> list[int]:
        return [task_id for task_id in self.task_ids
                if task_id not in self.finished and task_id not in self.unknown]

    async def run(self) -> None:
        failures = 0
        while self.unfinished:
            try:
                # max_size=None: a completed task's frame carries its image, maybe megabytes.
                async with connect(self.url, max_size=None, open_timeout=10) as ws:
                    failures = 0
                    await self.session(ws)
                    return  # every task finished; leaving the block closes with 1000
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code is not None and code not in RECONNECT_CODES:
                    reason = exc.rcvd.reason if exc.rcvd is not None else ""
                    raise Refused(f"closed with {code} {reason}".rstrip()) from None
                print(f"connection closed ({code or 'no close frame'}); reconnecting",
                      file=sys.stderr)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if 400 <= status < 500:  # e.g. 403: Origin not allowed
                    raise Refused(f"handshake refused with HTTP {status}") from None
                print(f"handshake failed with HTTP {status}", file=sys.stderr)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                print(f"cannot connect: {exc!r}", file=sys.stderr)
            failures += 1
            delay = min(10.0, 0.25 * 2**failures) * random.uniform(0.8, 1.2)
            print(f"reconnecting in {delay:.1f}s", file=sys.stderr)
            await asyncio.sleep(delay)

    async def session(self, ws: ClientConnection) -> None:
        """Subscribe to what is unfinished and read until it is all finished."""
        if self.token:
            await ws.send(json.dumps({"op": "auth", "token": self.token}))
        await ws.send(json.dumps({"op": "subscribe", "task_ids": self.unfinished}))
        while self.unfinished:
            frame: dict[str, Any] = json.loads(await ws.recv())
            kind = frame.get("type")
            if kind == "task":
                self.on_task(frame["data"])
            elif kind == "authenticated":
                print(f"authenticated until {frame['exp']}", flush=True)
            elif kind == "subscribed":
                print(f"subscribed to {frame['task_ids']}", flush=True)
            elif kind == "error" and frame.get("code") == 404:
                # Unknown (or expired) tasks; the others of the same frame are subscribed.
                print(f"not found: task(s) {frame['task_ids']}", file=sys.stderr)
                self.unknown.update(frame["task_ids"])
            elif kind == "error":
                raise Refused(f"error frame: {frame}")

    def on_task(self, task: dict[str, Any]) -> None:
        task_id, version = int(task["task_id"]), int(task["version"])
        if version <= self.versions.get(task_id, 0):
            return  # resubscribed after a reconnect: this state was printed already
        self.versions[task_id] = version
        print(describe(task), flush=True)
        if task["status"] in TERMINAL:
            self.finished.add(task_id)


async def follow(args: argparse.Namespace) -> int:
    url = websocket_url(args.url, not args.no_image_base64)
    follower = Follower(url, args.task_ids, args.token)
    try:
        async with asyncio.timeout(args.timeout or None):
            await follower.run()
    except Refused as exc:
        print(f"ws_client: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"ws_client: gave up after {args.timeout}s; unfinished: {follower.unfinished}",
              file=sys.stderr)
        return 2
    if follower.unknown:
        print(f"ws_client: unknown task(s) {sorted(follower.unknown)}", file=sys.stderr)
        return 1
    print(f"all {len(follower.task_ids)} task(s) finished", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_ids", type=int, nargs="+", metavar="TASK_ID")
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="gateway base URL (http://, https://, ws:// or wss://)")
    parser.add_argument("--no-image-base64", action="store_true",
                        help="leave the image's base64 out of the task frames")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="give up after this many seconds (default: never)")
    parser.add_argument("--token", default=os.environ.get("TASKCAST_TOKEN", ""),
                        help="access token (default: $TASKCAST_TOKEN)")
    args = parser.parse_args(argv)
    if any(task_id < 0 for task_id in args.task_ids):
        parser.error("task ids are non-negative integers")
    try:
        return asyncio.run(follow(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
