"""The examples in examples/, run as their README says, against a real redis-server and gateway.

Each example runs as a subprocess (`sys.executable examples/...`, `bash examples/...`); the
gateway runs in the test's event loop, so the subprocesses are asyncio subprocesses and every
wait is bounded. What is checked is what a user would see: the clients, started before the
producers, exit 0 after printing the terminal states, and the Python side sees what the
non-Python producer wrote.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import json
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.store import TaskStore
from taskcast.tokens import issue
from tests.servers import RedisServer, free_port, run_gateway
from tests.sse_client import read_metric, wait_for_metric

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BOUND_S = 30.0  # no single example run may take longer than this
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Example:
    """One running example: its output is collected line by line while it runs."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert process.stdout is not None and process.stderr is not None
        self._readers = [asyncio.create_task(self._collect(process.stdout, self.stdout)),
                         asyncio.create_task(self._collect(process.stderr, self.stderr))]

    @staticmethod
    async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.stdout)

    def transcript(self) -> str:
        return (f"--- {self.name} (exit {self.process.returncode})\n--- stdout:\n{self.output}"
                f"\n--- stderr:\n" + "\n".join(self.stderr))

    async def printed(self, text: str, bound_s: float = BOUND_S) -> None:
        """Wait until `text` appears in stdout."""
        try:
            async with asyncio.timeout(bound_s):
                while text not in self.output:
                    if self.process.returncode is not None and all(
                            reader.done() for reader in self._readers):
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        assert text in self.output, f"{text!r} not printed\n{self.transcript()}"

    async def finish(self, bound_s: float = BOUND_S) -> int:
        """Wait for the exit (and the rest of the output); the exit status."""
        try:
            async with asyncio.timeout(bound_s):
                await self.process.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            raise AssertionError(f"still running after {bound_s}s\n{self.transcript()}") from None
        assert self.process.returncode is not None
        return self.process.returncode

    async def succeeded(self) -> str:
        status = await self.finish()
        assert status == 0, self.transcript()
        return self.output

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


Spawn = Callable[..., Awaitable[Example]]


def example_env() -> dict[str, str]:
    """The user's environment minus proxies (the servers are on 127.0.0.1) and TASKCAST_*
    (every address and prefix is passed as an argument)."""
    env = {name: value for name, value in os.environ.items()
           if not name.lower().endswith("_proxy") and not name.startswith("TASKCAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python(script: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, str(EXAMPLES / script), *args)


def worker(redis_server: RedisServer, prefix: str, *args: str) -> tuple[str, ...]:
    return python("python_worker.py", "--redis-url", redis_server.url, "--prefix", prefix,
                  "--step-s", "0.05", *args)


def client(script: str, url: str, *task_ids: int) -> tuple[str, ...]:
    return python(script, "--url", url, "--timeout", str(BOUND_S), *map(str, task_ids))


def assert_png(image_base64: str) -> None:
    """A decodable PNG: signature, IHDR, and an IDAT that inflates to the image's size."""
    png = base64.b64decode(image_base64, validate=True)
    assert png.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", png[16:24])
    idat_length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    pixels = zlib.decompress(png[41:41 + idat_length])
    assert len(pixels) == height * (1 + 3 * width)


async def rest_task(url: str, task_id: int) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as http:
        response = await http.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()["data"]
    return data


# -- the Python worker, followed by the SSE and WebSocket clients ----------------------------


async def test_worker_tasks_are_followed_to_the_end_by_the_sse_and_ws_clients(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn
) -> None:
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        # As in a real service: the API created the tasks; the workers pick them up by id.
        done_id = (await producer.create(type="txt2img", angle="front")).task_id
        failed_id = (await producer.create(type="img2img", angle="side")).task_id
        followers = [
            await spawn(*client("sse_client.py", gateway.url, done_id), "--no-image-base64"),
            await spawn(*client("sse_client.py", gateway.url, done_id, failed_id)),
            await spawn(*client("ws_client.py", gateway.url, done_id, failed_id)),
        ]
        for follower in followers:  # all subscribed before any work starts
            await follower.printed(f"task {done_id}: submitted 0% (version 1)")

        completing = await spawn(*worker(redis_server, prefix, "--task-id", str(done_id)))
        failing = await spawn(*worker(redis_server, prefix, "--task-id", str(failed_id),
                                      "--fail", "out of GPU memory"))
        completed_output = await completing.succeeded()
        failed_output = await failing.succeeded()
        assert completed_output.splitlines()[0] == f"task_id={done_id}"
        assert f"task {done_id}: completed 100% (version 7)" in completed_output
        assert f"task {failed_id}: failed" in failed_output

        single, many, ws = [await follower.succeeded() for follower in followers]
        for output in (single, many, ws):
            progress = [line for line in output.splitlines()
                        if line.startswith(f"task {done_id}: processing")]
            assert progress, output  # the steps were seen live, not only the end
            assert f"task {done_id}: completed 100% (version 7)" in output
        for output in (many, ws):
            assert f"task {failed_id}: failed" in output
            assert "error_message='out of GPU memory'" in output
            assert "all 2 task(s) finished" in output
        assert "all 1 task(s) finished" in single
        assert "image_base64=0 chars" in single  # --no-image-base64
        assert "image_base64=0 chars" not in many + ws

        task = await rest_task(gateway.url, done_id)
        assert task["status"] == "completed"
        image = task["image"]
        assert isinstance(image, dict)
        assert_png(image["image_base64"])


async def test_worker_without_a_task_id_creates_one(
    redis_server: RedisServer, prefix: str, spawn: Spawn, tmp_path: Path
) -> None:
    png = PNG_SIGNATURE + b"read from a file instead of drawn"
    (tmp_path / "one.png").write_bytes(png)
    run = await spawn(*worker(redis_server, prefix, "--steps", "2", "--image",
                              str(tmp_path / "one.png"), "--image-url", "https://cdn.example/1"))
    output = await run.succeeded()
    assert output.splitlines()[0] == "task_id=1"  # the first id of a fresh prefix
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        task = await rest_task(gateway.url, 1)
    assert task["status"] == "completed"
    assert task["image"] == {"image_base64": base64.b64encode(png).decode(),
                             "image_url": "https://cdn.example/1"}


async def test_clients_reconnect_across_a_gateway_restart(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn
) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=prefix, sse_retry_ms=200,
                        graceful_shutdown_s=2)
    port = free_port()
    task_id = (await producer.create()).task_id
    async with run_gateway(settings, port=port) as gateway:
        url = gateway.url
        sse = await spawn(*client("sse_client.py", url, task_id))
        ws = await spawn(*client("ws_client.py", url, task_id))
        await producer.progress(task_id, 30)
        for follower in (sse, ws):
            await follower.printed(f"task {task_id}: processing 30% (version 2)")
    # Gone: graceful shutdown ends the SSE streams and closes the sockets with 1012.
    async with run_gateway(settings, port=port), httpx.AsyncClient(
            base_url=url, timeout=10, trust_env=False) as http:
        for transport in ("sse", "ws"):
            await wait_for_metric(http, "taskcast_open_connections", lambda n: n == 1,
                                  transport=transport)
        # The SSE client reconnected with Last-Event-ID: 2, which is still the current
        # version: the gateway has nothing to send it (without the header it would resend v2).
        await asyncio.sleep(0.3)
        assert await read_metric(http, "taskcast_messages_delivered_total",
                                 transport="sse") in (None, 0.0)
        await producer.progress(task_id, 60)
        await producer.complete(task_id, image_url="https://cdn.example/done.png")
        for follower in (sse, ws):
            output = await follower.succeeded()
            assert output.count("processing 30% (version 2)") == 1, output
            assert f"task {task_id}: completed 100% (version 4)" in output
    assert "Last-Event-ID: 2" in "\n".join(sse.stderr), sse.transcript()
    assert "connection closed (1012)" in "\n".join(ws.stderr), ws.transcript()


async def test_clients_exit_1_for_an_unknown_task(
    redis_server: RedisServer, prefix: str, spawn: Spawn
) -> None:
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        runs = [await spawn(*client(script, gateway.url, 404404))
                for script in ("sse_client.py", "ws_client.py")]
        for run in runs:
            assert await run.finish() == 1, run.transcript()
            assert "404404" in "\n".join(run.stderr)


async def test_clients_follow_with_a_token_and_exit_1_without_one(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn
) -> None:
    secret = "example-secret-" + "x" * 40
    settings = Settings(redis_url=redis_server.url, prefix=prefix, jwt_secret=secret)
    async with run_gateway(settings) as gateway:
        task = await producer.create()
        other = await producer.create()
        token = issue(secret, [task.task_id], ttl_s=60)
        with_token = [await spawn(*client(script, gateway.url, task.task_id), "--token", token)
                      for script in ("sse_client.py", "ws_client.py")]
        for follower in with_token:
            await follower.printed(f"task {task.task_id}: submitted 0% (version 1)")
        await producer.complete(task.task_id, image_url="https://cdn.example/1.png")
        for follower in with_token:
            assert "completed 100%" in await follower.succeeded()
        refused = [await spawn(*client(script, gateway.url, task.task_id))
                   for script in ("sse_client.py", "ws_client.py")]
        refused += [await spawn(*client(script, gateway.url, other.task_id), "--token", token)
                    for script in ("sse_client.py", "ws_client.py")]
        for run in refused:
            assert await run.finish() == 1, run.transcript()
        sse_none, ws_none, sse_other, ws_other = ["\n".join(run.stderr) for run in refused]
        assert "HTTP 401" in sse_none and "HTTP 403" in sse_other
        assert "'code': 401" in ws_none and "'code': 403" in ws_other


# -- the redis-cli producer ---------------------------------------------------------------------

needs_redis_cli = pytest.mark.skipif(shutil.which("redis-cli") is None,
                                     reason="redis-cli is not installed")


def shell(redis_server: RedisServer, prefix: str, *args: str) -> tuple[str, ...]:
    return ("bash", str(EXAMPLES / "redis_cli_producer.sh"), "-p", str(redis_server.port),
            "-P", prefix, *args)


@needs_redis_cli
async def test_redis_cli_producer_completes_a_task_the_gateway_serves(
    redis_server: RedisServer, prefix: str, redis: aioredis.Redis, spawn: Spawn, tmp_path: Path
) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(PNG_SIGNATURE + bytes(range(256)) * 64)  # 16 KiB: rides in via stdin
    run = await spawn(*shell(redis_server, prefix, "-t", "42", "-d", "0", "-f", str(image),
                             "-u", "https://cdn.example/42.png"))
    lines = (await run.succeeded()).splitlines()
    assert lines[0] == "task_id=42"
    states = [json.loads(line) for line in lines[1:]]
    assert [state["version"] for state in states] == [1, 2, 3, 4, 5, 6]
    assert [state["progress"] for state in states] == [0, 20, 40, 60, 80, 100]

    task = await TaskStore(redis, TaskKeys(prefix)).get(42)
    assert task is not None and task.status == "completed" and task.version == 6
    assert base64.b64decode(task.image_base64) == image.read_bytes()
    assert task.image_url == "https://cdn.example/42.png"
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        served = await rest_task(gateway.url, 42)
    assert served["status"] == "completed" and served["version"] == 6

    # A large image is staged (issue 12): the raw bytes go to P:task:{ID}:image, and the
    # gateway serves them base64-encoded.
    large = tmp_path / "large.png"
    large.write_bytes(PNG_SIGNATURE + os.urandom(200_000))
    staged = await spawn(*shell(redis_server, prefix, "-t", "43", "-d", "0", "-f", str(large)))
    final = json.loads((await staged.succeeded()).splitlines()[-1])
    assert (final["status"], final.get("image_base64_omitted")) == ("completed", True)
    assert await redis.hget(TaskKeys(prefix).record(43), "image_bytes") == str(
        large.stat().st_size).encode()
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        served = await rest_task(gateway.url, 43)
    assert base64.b64decode(served["image"]["image_base64"]) == large.read_bytes()
    assert not [key async for key in redis.scan_iter(f"{prefix}:task:{{43}}:upload:*")]

    # The same id again: the script refuses the create, the example says so and exits 1.
    again = await spawn(*shell(redis_server, prefix, "-t", "42", "-d", "0"))
    assert await again.finish() == 1
    assert "REJECTED EXISTS" in "\n".join(again.stderr)


@needs_redis_cli
async def test_redis_cli_producer_failure_is_pushed_to_an_sse_client(
    redis_server: RedisServer, prefix: str, redis: aioredis.Redis, spawn: Spawn
) -> None:
    shipped = importlib.resources.files("taskcast") / "lua/apply_change.lua"
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        # No -t: the id comes from INCR P:next_task_id, as the Python library does it.
        run = await spawn(*shell(redis_server, prefix, "-d", "0.3", "-s", str(shipped),
                                 "-e", 'the "GPU" ran out of memory'))
        await run.printed('"version":1')
        task_id = int(run.stdout[0].removeprefix("task_id="))
        assert task_id == 1
        sse = await spawn(*client("sse_client.py", gateway.url, task_id))
        await run.succeeded()
        output = await sse.succeeded()
    assert f"task {task_id}: failed 40%" in output
    assert "error_message='the \"GPU\" ran out of memory'" in output
    task = await TaskStore(redis, TaskKeys(prefix)).get(task_id)
    assert task is not None and task.status == "failed"
    assert task.error_message == 'the "GPU" ran out of memory'
