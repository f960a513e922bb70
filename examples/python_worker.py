#!/usr/bin/env python3
"""A generation worker written with taskcast's producer library.

It creates a task (or takes one that already exists with --task-id), reports progress in
steps, then completes it with a real PNG (drawn here with zlib alone, or read from --image)
or, with --fail, fails it. Every change goes through the shipped Lua script, which publishes
it, so SSE and WebSocket clients see each step at once. It prints the task id first and the
final state last.

Run it (a Redis server and, to watch it, a gateway: `.venv/bin/taskcast serve`):

    .venv/bin/python examples/python_worker.py
    .venv/bin/python examples/python_worker.py --redis-url redis://127.0.0.1:6379/0 \
        --prefix taskcast --task-id 42 --steps 5 --step-s 0.5
    .venv/bin/python examples/python_worker.py --fail "out of GPU memory"
    .venv/bin/python examples/python_worker.py --image some.png --image-url https://cdn/x.png

--redis-url and --prefix default to TASKCAST_REDIS_URL and TASKCAST_PREFIX, like the gateway.
Only the taskcast package is needed (no extra dependencies). Exit status: 0 when the task
reached the intended final state, 1 when the script refused a change or Redis stayed away.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from taskcast.errors import StoreUnavailable, TaskcastError, TransitionRejected
from taskcast.keys import TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from taskcast.store import TaskStore

T = TypeVar("T")

# A change that alters nothing is a no-op in the script, so retrying one after a Redis hiccup
# is safe: the worst case is that it was applied the first time and the retry changes nothing.
RETRIES = 5


def make_png(seed: int, size: int = 64) -> bytes:
    """A small, valid PNG: an 8x8 checkerboard whose two colours depend on `seed`."""
    light = bytes(((seed * 73 + 90) % 160 + 96, (seed * 151 + 40) % 160 + 96, 230))
    dark = bytes((40, (seed * 37) % 120 + 20, (seed * 97) % 120 + 40))
    cell = size // 8
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # filter type "None" for this scanline
        for x in range(size):
            rows += light if (x // cell + y // cell) % 2 == 0 else dark

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b""))


async def retrying(change: Callable[[], Awaitable[T]]) -> T:
    """Run one producer call, retrying while Redis is unreachable (with a growing pause)."""
    for attempt in range(RETRIES):
        try:
            return await change()
        except StoreUnavailable as exc:
            if attempt == RETRIES - 1:
                raise
            pause = 0.2 * 2**attempt
            print(f"redis unavailable ({exc}); retrying in {pause:.1f}s", file=sys.stderr)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


async def take_task(producer: Producer, store: TaskStore, args: argparse.Namespace) -> Task:
    """A new task, or the one named by --task-id (created when it does not exist yet)."""
    if args.task_id is None:
        return await retrying(lambda: producer.create(type=args.type, angle=args.angle))
    try:
        return await retrying(
            lambda: producer.create(task_id=args.task_id, type=args.type, angle=args.angle))
    except TransitionRejected as exc:
        if exc.reason != "EXISTS":
            raise
    # Typical for a real worker: the API that accepted the job created the task already.
    task = await retrying(lambda: store.get(args.task_id))
    if task is None:  # expired between the two calls
        raise TransitionRejected("NOT_FOUND", f"task {args.task_id} vanished")
    if task.is_terminal:
        raise TransitionRejected("TERMINAL", f"task {task.task_id} is already {task.status}")
    return task


def describe(task: Task) -> str:
    text = f"task {task.task_id}: {task.status} {task.progress}% (version {task.version})"
    if task.status == "completed":
        size = len(task.image_base64) * 3 // 4
        text += f" image_url={task.image_url or '-'} image_base64=~{size} bytes"
    elif task.status == "failed":
        text += f" error_message={task.error_message!r}"
    return text


async def work(args: argparse.Namespace) -> Task:
    # Read the image first: a missing file should fail before the task is touched.
    image_file = args.image.read_bytes() if args.image else None
    producer = Producer.from_url(args.redis_url, prefix=args.prefix,
                                 retention_s=args.retention_s)
    store = TaskStore(producer.redis, TaskKeys(args.prefix))
    try:
        task = await take_task(producer, store, args)
        task_id = task.task_id
        print(f"task_id={task_id}", flush=True)
        print(describe(task), flush=True)
        fail_at = args.steps // 2 if args.fail else None
        for step in range(1, args.steps + 1):
            await asyncio.sleep(args.step_s)  # ... the real generation work goes here ...
            if step == fail_at:
                break
            # Progress never decreases: an adopted task may already be further along.
            progress = max(task.progress, step * 99 // args.steps)
            task = await retrying(partial(producer.progress, task_id, progress))
            print(describe(task), flush=True)
        if args.fail:
            task = await retrying(lambda: producer.fail(task_id, args.fail))
        else:
            image = image_file or make_png(task_id)
            task = await retrying(lambda: producer.complete(
                task_id, image_base64=image, image_url=args.image_url or None))
        print(describe(task), flush=True)
        return task
    finally:
        await producer.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url",
                        default=os.environ.get("TASKCAST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--prefix", default=os.environ.get("TASKCAST_PREFIX", "taskcast"))
    parser.add_argument("--task-id", type=int, help="drive this task (created if missing); "
                        "default: a new task with the next id")
    parser.add_argument("--type", default="txt2img", help="task type when creating")
    parser.add_argument("--angle", default="front", help="view angle when creating")
    parser.add_argument("--steps", type=int, default=5, help="progress reports (default 5)")
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds per step")
    parser.add_argument("--fail", metavar="ERROR_MESSAGE",
                        help="fail half-way with this message instead of completing")
    parser.add_argument("--image", type=Path, help="a PNG file to deliver (default: drawn here)")
    parser.add_argument("--image-url", default="", help="also set image_url")
    parser.add_argument("--retention-s", type=int, default=86_400,
                        help="seconds the finished task is kept (0 = forever)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task = asyncio.run(work(args))
    except (TaskcastError, OSError) as exc:
        print(f"python_worker: {exc}", file=sys.stderr)
        return 1
    intended = "failed" if args.fail else "completed"
    return 0 if task.status == intended else 1


if __name__ == "__main__":
    sys.exit(main())
