#!/usr/bin/env python3
"""Wait for one task with the Python client (`taskcast.client`) and print how it ended.

The client does what examples/sse_client.py and ws_client.py do by hand: it follows the task
over SSE (falling back to WebSocket, then to polling, when a proxy blocks or buffers the
stream), reconnects with backoff, and skips versions it already has. This is the blocking
`Client`; examples/client_batch.py shows `AsyncClient`.

Run it (a gateway on http://127.0.0.1:8000 and a task that exists, e.g. from
examples/python_worker.py):

    .venv/bin/python examples/client_wait.py 42
    .venv/bin/python examples/client_wait.py --url http://127.0.0.1:8000 --timeout 60 42
    export TASKCAST_TOKEN=$(.venv/bin/taskcast token issue --task 42 --ttl 600)
    .venv/bin/python examples/client_wait.py 42

With access control on, pass the token with `--token` or TASKCAST_TOKEN. (The client also
takes a function that returns a token: it is called again when the gateway refuses or expires
the one it has.)

Exit status: 0 when the task completed, 1 when it failed, 2 for usage errors and when
--timeout passed first, 3 when the task does not exist or the token was refused (401/403), 4
when the gateway could not be reached for the client's `give_up_after_s` (60 s).
"""

from __future__ import annotations

import argparse
import os
import sys

from taskcast.client import AccessRefused, Client, GatewayUnreachable, TaskNotFound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_id", type=int, metavar="TASK_ID")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--token", default=os.environ.get("TASKCAST_TOKEN", ""),
                        help="access token (default: $TASKCAST_TOKEN)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="give up after this many seconds (default: never)")
    args = parser.parse_args(argv)
    if args.task_id < 0:
        parser.error("task ids are non-negative integers")

    try:
        with Client(args.url, token=args.token or None) as client:
            task = client.wait(args.task_id, timeout=args.timeout or None)
    except (TaskNotFound, AccessRefused) as exc:
        print(f"client_wait: {exc}", file=sys.stderr)
        return 3
    except GatewayUnreachable as exc:
        print(f"client_wait: {exc}", file=sys.stderr)
        return 4
    except TimeoutError:
        print(f"client_wait: task {args.task_id} not finished after {args.timeout}s",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

    if task.status == "failed":
        print(f"task {task.task_id} failed (version {task.version}): {task.error_message}")
        return 1
    image = task.image_data()  # the bytes decoded from image_base64, or None
    print(f"task {task.task_id} completed (version {task.version}): "
          f"image {len(image) if image else 0} bytes, image_url {task.image_url or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
