"""Python memory a polled task holds in the gateway, by allocation site (tracemalloc).

    .venv/bin/python bench/poll_memory.py              # 5,000 tasks
    .venv/bin/python bench/poll_memory.py --tasks 20000 --top 15

Starts a private redis-server on a free port, writes the tasks with the producer (created,
then progress 40), runs the gateway in this process under uvicorn (`TASKCAST_POLL_WATCH_S`
600, so nothing expires), polls 200 other tasks to warm every path, then polls each task twice
(the miss, then a hit) under tracemalloc, waits for a resync round, and prints the memory still
held per task: in total, and by the lines that allocated it (the gateway, redis-py and
everything else in the process, the HTTP client included). The poll cache charges each task
poll_cache.ENTRY_OVERHEAD_BYTES; this is how that figure is checked at scale
(tests/test_poll_cache.py checks it over 200 tasks).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import subprocess
import tempfile
import time
import tracemalloc

import httpx
import uvicorn

from taskcast import server
from taskcast.app import GatewayApp, create_app
from taskcast.connection import connect
from taskcast.poll_cache import ENTRY_OVERHEAD_BYTES
from taskcast.producer import Producer
from taskcast.settings import Settings

FIRST = 100_000
WARM = 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def seed(url: str, count: int) -> None:
    producer = Producer(connect(url, max_connections=64), prefix="mem", max_concurrency=64)
    try:
        async def one(task_id: int) -> None:
            await producer.create(task_id=task_id)
            await producer.progress(task_id, 40)

        await asyncio.gather(*(one(task_id) for task_id in range(FIRST, FIRST + count + WARM)))
    finally:
        await producer.close()


async def measure(url: str, count: int, top: int) -> None:
    settings = Settings(redis_url=url, prefix="mem", auth="off", poll_watch_s=600)
    app = GatewayApp(create_app(settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    instance = uvicorn.Server(server.uvicorn_config(app, settings, log_level="warning"))
    serving = asyncio.create_task(instance.serve(sockets=[sock]))
    while not instance.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            limit = asyncio.Semaphore(16)

            async def poll(task_id: int) -> None:
                async with limit:
                    for _ in range(2):
                        response = await client.get(f"/tasks/{task_id}")
                        assert response.status_code == 200, response.text

            await asyncio.gather(*(poll(task_id) for task_id in
                                   range(FIRST + count, FIRST + count + WARM)))
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            await asyncio.gather(*(poll(task_id) for task_id in range(FIRST, FIRST + count)))
            await asyncio.sleep(settings.resync_interval_s + 1)  # a resync round re-reads all
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
    finally:
        instance.should_exit = True
        await serving
        sock.close()
    stats = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in stats)
    print(f"{count:,} polled tasks: {total / count:,.0f} B held per task "
          f"(charged {ENTRY_OVERHEAD_BYTES:,} B)")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / count:8.1f} B/task  {frame.filename}:{frame.lineno}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--top", type=int, default=10, help="allocation sites to list")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="poll-memory-") as workdir:
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            url = f"redis://127.0.0.1:{port}/0"
            asyncio.run(seed(url, args.tasks))
            asyncio.run(measure(url, args.tasks, args.top))
        finally:
            redis.terminate()
            redis.wait(10)


if __name__ == "__main__":
    main()
