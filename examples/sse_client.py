#!/usr/bin/env python3
"""Follow tasks over Server-Sent Events until every one is completed or failed.

One task streams from `GET /tasks/{id}/events`; several share one `GET /events?task_id=...`
connection. The SSE wire format is parsed by hand below (it is only a few rules). When the
connection drops or the gateway restarts, the client waits the server's `retry:` delay and
reconnects with `Last-Event-ID`: on a one-task stream only newer versions follow (and 204 No
Content if it already holds the terminal one); a many-task stream restarts from each task's
current state, so versions the client already has are skipped.

Run it (a gateway on http://127.0.0.1:8000 and tasks that exist, e.g. from
examples/python_worker.py):

    .venv/bin/python examples/sse_client.py 42
    .venv/bin/python examples/sse_client.py --url http://127.0.0.1:8000 42 43 44
    .venv/bin/python examples/sse_client.py --no-image-base64 --timeout 60 42
    export TASKCAST_TOKEN=$(.venv/bin/taskcast token issue --task 42 --ttl 600)
    .venv/bin/python examples/sse_client.py 42

With access control on, the token (`--token` or TASKCAST_TOKEN) goes in the Authorization
header; a 401/403, or `event: token_expired` at the end of the token's life, ends the client
with status 1 (a real client would get a fresh token and reconnect).

Needs httpx (`pip install httpx`; the .venv has it through the test extras). Exit status: 0
when all tasks are finished (completed or failed), 1 when a task does not exist (or another 4xx
answer that retrying cannot fix), 2 when --timeout passed first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = ("completed", "failed")


class Refused(Exception):
    """An answer that reconnecting cannot fix: unknown task (404) or a bad request (4xx)."""


@dataclass
class Event:
    id: str | None = None
    event: str = "message"
    data: list[str] = field(default_factory=list)
    retry_ms: int | None = None


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """SSE parsing: lines up to a blank line form one event; `:` lines are comments."""
    event = Event()
    async for line in response.aiter_lines():
        if not line:
            if event.data or event.retry_ms is not None:
                yield event
            event = Event()
            continue
        if line.startswith(":"):
            continue  # `: keep-alive`
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            event.data.append(value)
        elif name == "id":
            event.id = value
        elif name == "event":
            event.event = value
        elif name == "retry" and value.isdigit():
            event.retry_ms = int(value)


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
    def __init__(self, base_url: str, task_ids: list[int], include_image_base64: bool,
                 read_timeout_s: float, token: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.task_ids = list(dict.fromkeys(task_ids))
        self.include = include_image_base64
        self.read_timeout_s = read_timeout_s
        self.versions: dict[int, int] = {}  # the newest version seen per task
        self.finished: set[int] = set()
        self.last_event_id: str | None = None
        self.retry_s = 2.0  # until the server says otherwise
        self.failures = 0  # connection attempts in a row that failed

    @property
    def unfinished(self) -> list[int]:
        return [task_id for task_id in self.task_ids if task_id not in self.finished]

    def request(self) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {} if self.include else {"image_base64": "false"}
        if len(self.task_ids) == 1:
            return f"{self.base_url}/tasks/{self.task_ids[0]}/events", params
        # Only unfinished tasks: a finished one has nothing more to say.
        params["task_id"] = ",".join(str(task_id) for task_id in self.unfinished)
        return f"{self.base_url}/events", params

    async def run(self) -> None:
        # Streams are long-lived: no overall timeout, but a read timeout longer than the
        # server's keep-alive interval (15 s by default) detects a dead connection.
        timeout = httpx.Timeout(10.0, read=self.read_timeout_s)
        async with httpx.AsyncClient(timeout=timeout) as client:
            while self.unfinished:
                try:
                    await self.stream_once(client)
                except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                    print(f"connection problem: {exc!r}", file=sys.stderr)
                    self.failures += 1
                if not self.unfinished:
                    break
                # The server's `retry:` delay, doubled per failure in a row (up to 30 s), with
                # jitter so that many clients do not come back at the same instant.
                delay = min(30.0, self.retry_s * 2 ** min(self.failures, 4))
                delay *= random.uniform(0.8, 1.2)
                print(f"reconnecting in {delay:.1f}s"
                      f" (Last-Event-ID: {self.last_event_id or '-'})", file=sys.stderr)
                await asyncio.sleep(delay)

    async def stream_once(self, client: httpx.AsyncClient) -> None:
        """One connection, until the server ends the stream (or it breaks: an exception)."""
        url, params = self.request()
        headers = {"Accept": "text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        async with client.stream("GET", url, params=params, headers=headers) as response:
            if response.status_code == 204:  # we already hold every terminal state
                self.finished.update(self.task_ids)
                return
            if response.status_code == 404:
                raise Refused(f"not found: task(s) {self.unfinished}")
            if 400 <= response.status_code < 500:
                await response.aread()
                raise Refused(f"HTTP {response.status_code}: {response.text}")
            response.raise_for_status()  # 5xx: trouble behind the gateway, retry
            self.failures = 0
            async for event in events(response):
                if event.retry_ms is not None:
                    self.retry_s = event.retry_ms / 1000
                if event.id is not None:
                    self.last_event_id = event.id
                if event.event == "message" and event.data:
                    self.on_task(json.loads("\n".join(event.data)))
                elif event.event == "not_found":  # the record vanished (expired)
                    self.last_event_id = None  # so the reconnect is answered with the 404
                elif event.event == "end":  # many-task stream: all finished
                    self.finished.update(self.task_ids)
                elif event.event == "token_expired":
                    raise Refused("the token expired: issue a fresh one and run again")

    def on_task(self, task: dict[str, Any]) -> None:
        task_id, version = int(task["task_id"]), int(task["version"])
        if version <= self.versions.get(task_id, 0):
            return  # a many-task stream restarted from the current state: seen already
        self.versions[task_id] = version
        print(describe(task), flush=True)
        if task["status"] in TERMINAL:
            self.finished.add(task_id)


async def follow(args: argparse.Namespace) -> int:
    follower = Follower(args.url, args.task_ids, not args.no_image_base64, args.read_timeout_s,
                        args.token)
    try:
        async with asyncio.timeout(args.timeout or None):
            await follower.run()
    except Refused as exc:
        print(f"sse_client: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"sse_client: gave up after {args.timeout}s; unfinished: {follower.unfinished}",
              file=sys.stderr)
        return 2
    print(f"all {len(follower.task_ids)} task(s) finished", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_ids", type=int, nargs="+", metavar="TASK_ID")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--no-image-base64", action="store_true",
                        help="leave the image's base64 out of the events")
    parser.add_argument("--read-timeout-s", type=float, default=45.0,
                        help="reconnect when nothing (not even a keep-alive) came this long")
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
