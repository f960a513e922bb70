"""`taskcast serve --workers N`: several gateway processes sharing one port and one Redis.

The kernel hands each new connection to one of the worker processes; a test cannot choose
which, so it opens several clients and checks that every one of them gets every terminal state,
whichever process serves it. Each worker subscribes to a task's channel at most once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from taskcast.keys import TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from tests.servers import RedisServer, free_port, kill, start_serve, wait_until_answering
from tests.sse_client import Follower, stream_problems

WORKERS = 2
CLIENTS = 8
STARTUP_BOUND_S = 30
EXIT_BOUND_S = 15
BOUND_S = 20
TERMINAL = ("completed", "failed")


def worker_pids(parent: int) -> set[int]:
    """The parent's multiprocessing children that run a gateway (not the resource tracker)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name in parentheses may hold spaces: the fields after it are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.add(int(entry.name))
    return pids


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(process: subprocess.Popen[bytes], workers: set[int]) -> None:
    """Clean-up after a failure: end the server and the workers this test saw, by pid."""
    kill(process, EXIT_BOUND_S)
    for pid in workers:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


async def wait_workers(parent: int) -> set[int]:
    async with asyncio.timeout(STARTUP_BOUND_S):
        while len(pids := worker_pids(parent)) < WORKERS:
            await asyncio.sleep(0.1)
    return pids


async def numsub(server: RedisServer, channel: str) -> int:
    """Connections subscribed to a channel: one per worker process that has a watcher on it."""
    out = await asyncio.to_thread(server.cli, "PUBSUB", "NUMSUB", channel)
    return int(out.split()[-1])


@asynccontextmanager
async def served(args: list[str], log_file: Path
                 ) -> AsyncIterator[tuple[subprocess.Popen[bytes], set[int], httpx.AsyncClient]]:
    """`taskcast serve --workers 2` on a free port, ready, with its worker pids and a client."""
    port = free_port()
    process = start_serve(["--workers", str(WORKERS), "--port", str(port),
                           "--graceful-shutdown-s", "2", *args], log_file)
    workers: set[int] = set()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S,
                                     limits=httpx.Limits(max_connections=4 * CLIENTS)) as client:
            await wait_until_answering(client, process, log_file, "/readyz", STARTUP_BOUND_S)
            workers.update(await wait_workers(process.pid))
            yield process, workers, client
    finally:
        stop(process, workers)


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "serve.log"


async def test_clients_on_every_worker_get_every_terminal_state_and_sigterm_stops_all(
    redis_server: RedisServer, producer: Producer, prefix: str, log_file: Path
) -> None:
    keys = TaskKeys(prefix)
    task_ids = [(await producer.create(type="txt2img")).task_id for _ in range(4)]
    args = ["--redis-url", redis_server.url, "--prefix", prefix]
    async with served(args, log_file) as (process, workers, client):
        assert len(workers) == WORKERS, workers
        # New connections land on whichever worker accepts first: several clients, each a
        # connection of its own, mostly end up spread over both processes.
        followers = [Follower(client, "/events?task_id=" + ",".join(map(str, task_ids)),
                              expect=task_ids).start() for _ in range(CLIENTS)]
        try:
            async with asyncio.timeout(BOUND_S):
                for follower in followers:
                    await follower.ready.wait()
            # However many clients a worker serves, it subscribes to a task once: one
            # subscription per process that serves a client (subscribing is asynchronous).
            channels = [keys.channel(task_id) for task_id in task_ids]
            async with asyncio.timeout(BOUND_S):
                while not all([await numsub(redis_server, channel) for channel in channels]):
                    await asyncio.sleep(0.05)
            for channel in channels:
                assert 1 <= await numsub(redis_server, channel) <= WORKERS

            finals: dict[int, Task] = {}
            async with asyncio.timeout(BOUND_S):
                for progress in (30, 70):
                    for task_id in task_ids:
                        await producer.progress(task_id, progress)
                for n, task_id in enumerate(task_ids):
                    if n % 2:
                        finals[task_id] = await producer.fail(task_id, "out of memory")
                    else:
                        finals[task_id] = await producer.complete(
                            task_id, image_url=f"https://cdn.example/{task_id}.png")
            transcripts = [await follower.result(BOUND_S) for follower in followers]
        finally:
            for follower in followers:
                await follower.stop()

        expected = {task_id: task.to_dict() for task_id, task in finals.items()}
        for transcript in transcripts:
            assert stream_problems(transcript, task_ids, multi=True) == []
            assert {t: states[-1] for t, states in transcript.by_task().items()} == expected
        async with asyncio.timeout(BOUND_S):  # every client has left: so has every subscription
            while any([await numsub(redis_server, channel) for channel in channels]):
                await asyncio.sleep(0.05)

        # One more client, still following an unfinished task when the server is told to stop.
        last = await producer.create(type="txt2img")
        lingering = Follower(client, f"/tasks/{last.task_id}/events",
                             expect=[last.task_id]).start()
        try:
            async with asyncio.timeout(BOUND_S):
                await lingering.ready.wait()

            process.send_signal(signal.SIGTERM)
            try:
                returncode = await asyncio.to_thread(process.wait, EXIT_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"taskcast serve did not exit within {EXIT_BOUND_S} s of SIGTERM:\n"
                            f"{log_file.read_text(errors='replace')}")
            transcript = await lingering.result(BOUND_S)  # the stream ended with the server
        finally:
            await lingering.stop()
        log = log_file.read_text(errors="replace")
        assert returncode == 0, log
        assert "Traceback" not in log
        assert [task["version"] for task in transcript.tasks()] == [1]
        async with asyncio.timeout(EXIT_BOUND_S):  # no worker outlives the server
            while any(running(pid) for pid in workers):
                await asyncio.sleep(0.05)
        with pytest.raises(httpx.TransportError):
            async with asyncio.timeout(BOUND_S):
                await client.get("/healthz")


def test_workers_on_the_embedded_store_are_refused_with_exit_2(log_file: Path) -> None:
    process = start_serve(["--workers", "2", "--redis-url", "memory://", "--port",
                           str(free_port())], log_file)
    try:
        returncode = process.wait(STARTUP_BOUND_S)
        log = log_file.read_text(errors="replace")
        assert returncode == 2, log
        assert "--workers needs a shared Redis" in log
        assert "Traceback" not in log
    finally:
        stop(process, set())
