#!/usr/bin/env python3
"""Follow a batch of tasks with the Python client (`taskcast.client`), print a line per state,
and save each completed task's image into a directory.

`AsyncClient.watch` yields every new state of the tasks (each version at most once and in
order per task, the terminal state always last) and ends when all of them are completed or
failed. A completed task's image is `image_data()` (decoded from `image_base64`) when the
gateway sent it, else it is downloaded from `image_url` (relative URLs against --url). It is
saved as DIR/<task_id>.png (the suffix of `image_url`'s path when downloaded and it has one).

Run it (a gateway on http://127.0.0.1:8000 and tasks that exist, e.g. from
examples/python_worker.py):

    .venv/bin/python examples/client_batch.py 42 43 44
    .venv/bin/python examples/client_batch.py --url http://127.0.0.1:8000 --save-dir out 42 43
    .venv/bin/python examples/client_batch.py --transport poll 42 43
    export TASKCAST_TOKEN=$(.venv/bin/taskcast token issue --task 42 --task 43 --ttl 600)
    .venv/bin/python examples/client_batch.py 42 43

With access control on, pass a token naming every task with `--token` or TASKCAST_TOKEN.

Exit status: 0 when every task completed and its image (if any) was saved, 1 when a task
failed or an image could not be downloaded, 2 for usage errors, 3 when a task does not exist or
the token was refused (401/403), 4 when the gateway could not be reached for the client's
`give_up_after_s` (60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import httpx

from taskcast.client import AccessRefused, AsyncClient, GatewayUnreachable, Task, TaskNotFound


async def save_image(task: Task, save_dir: Path, downloads: httpx.AsyncClient) -> str:
    """Write the task's image into save_dir; what to print about it."""
    data, suffix = task.image_data(), ".png"
    if data is None and task.image_url:
        response = await downloads.get(task.image_url)
        response.raise_for_status()
        data = response.content
        suffix = PurePosixPath(urlsplit(task.image_url).path).suffix or suffix
    if data is None:
        return "no image"
    path = save_dir / f"{task.task_id}{suffix}"
    path.write_bytes(data)
    return f"saved {path} ({len(data)} bytes)"


async def follow(args: argparse.Namespace) -> int:
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    problems = 0
    # The token is for the gateway only, so images are fetched with a client of their own.
    async with AsyncClient(args.url, token=args.token or None) as client, \
            httpx.AsyncClient(base_url=args.url, timeout=30) as downloads:
        async for task in client.watch(args.task_ids, transport=args.transport):
            line = f"task {task.task_id}: {task.status} {task.progress}% (version {task.version})"
            if task.status == "failed":
                problems += 1
                line += f": {task.error_message}"
            elif task.status == "completed":
                try:
                    line += ": " + await save_image(task, save_dir, downloads)
                except httpx.HTTPError as exc:
                    problems += 1
                    line += f": cannot download {task.image_url}: {exc!r}"
            print(line, flush=True)
    print(f"{len(set(args.task_ids))} task(s) finished, {problems} with a problem", flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_ids", type=int, nargs="+", metavar="TASK_ID")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--token", default=os.environ.get("TASKCAST_TOKEN", ""),
                        help="access token (default: $TASKCAST_TOKEN)")
    parser.add_argument("--save-dir", default="images",
                        help="where completed images go (default: ./images)")
    parser.add_argument("--transport", default="auto", choices=("auto", "sse", "ws", "poll"),
                        help="auto: SSE, then WebSocket, then polling (default: auto)")
    args = parser.parse_args(argv)
    if any(task_id < 0 for task_id in args.task_ids):
        parser.error("task ids are non-negative integers")
    try:
        return asyncio.run(follow(args))
    except (TaskNotFound, AccessRefused) as exc:
        print(f"client_batch: {exc}", file=sys.stderr)
        return 3
    except GatewayUnreachable as exc:
        print(f"client_batch: {exc}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
