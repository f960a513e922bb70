"""examples/client_wait.py and examples/client_batch.py (the Python client), run as their
docstrings say against a real redis-server and gateway, with the tasks driven by a Producer.

Each example is a subprocess; the gateway runs in the test's event loop (see
tests/test_examples.py, whose Example class collects their output). The examples are started
before the producer changes anything, so what they print was followed live.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskcast.client import AccessRefused, AsyncClient, Transport
from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.tokens import issue
from tests.servers import Gateway, RedisServer, free_port, run_gateway
from tests.sse_client import wait_for_metric
from tests.test_examples import PNG_SIGNATURE, ROOT, Spawn, python

PNG = PNG_SIGNATURE + bytes(range(256)) * 16  # the bytes only have to survive the trip


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def image_host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server (the CDN of `image_url`) serving a directory: (base URL, directory)."""
    root = tmp_path / "cdn"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def wait_example(url: str, task_id: int, *args: str) -> tuple[str, ...]:
    return python("client_wait.py", "--url", url, *args, str(task_id))


def batch_example(url: str, save_dir: Path, *task_ids: int) -> tuple[str, ...]:
    return python("client_batch.py", "--url", url, "--save-dir", str(save_dir),
                  *map(str, task_ids))


async def sse_streams_open(url: str, count: int) -> None:
    """Wait until the gateway holds `count` SSE streams: the clients are following."""
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as http:
        await wait_for_metric(http, "taskcast_open_connections", lambda n: n == count,
                              transport="sse")


def states(output: str) -> dict[int, list[tuple[str, int]]]:
    """The batch example's state lines: (status, version) in the order printed, per task."""
    seen: dict[int, list[tuple[str, int]]] = {}
    for match in re.finditer(r"^task (\d+): (\w+) \d+% \(version (\d+)\)", output, re.M):
        seen.setdefault(int(match[1]), []).append((match[2], int(match[3])))
    return seen


async def test_client_wait_exits_0_with_the_completed_task_and_1_with_a_failed_one(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn
) -> None:
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        done = (await producer.create(type="txt2img")).task_id
        failing = (await producer.create(type="img2img")).task_id
        waiters = [await spawn(*wait_example(gateway.url, done)),
                   await spawn(*wait_example(gateway.url, failing, "--timeout", "30"))]
        await sse_streams_open(gateway.url, 2)  # auto starts with SSE
        await producer.progress(done, 40)
        await producer.progress(failing, 10)
        await producer.complete(done, image_base64=PNG, image_url="https://cdn.example/1.png")
        await producer.fail(failing, "out of GPU memory")
        completed, failed = [await waiter.finish() for waiter in waiters]
    assert completed == 0, waiters[0].transcript()
    assert waiters[0].output == (f"task {done} completed (version 3): image {len(PNG)} bytes,"
                                 " image_url https://cdn.example/1.png")
    assert failed == 1, waiters[1].transcript()
    assert waiters[1].output == f"task {failing} failed (version 3): out of GPU memory"


async def test_client_batch_prints_each_state_and_saves_the_images(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn,
    image_host: tuple[str, Path], tmp_path: Path
) -> None:
    cdn_url, cdn_root = image_host
    hosted = PNG_SIGNATURE + b"only on the CDN" * 100
    (cdn_root / "b.jpg").write_bytes(hosted)
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        inline, linked, failing = [(await producer.create()).task_id for _ in range(3)]
        ids = (inline, linked, failing)
        live = await spawn(*batch_example(gateway.url, tmp_path / "auto", *ids))
        polled = await spawn(*batch_example(gateway.url, tmp_path / "poll", *ids),
                             "--transport", "poll")
        await sse_streams_open(gateway.url, 1)
        await producer.progress(inline, 50)
        await live.printed(f"task {inline}: processing 50% (version 2)")
        await producer.progress(failing, 20)
        await producer.complete(inline, image_base64=PNG)
        await producer.complete(linked, image_url=f"{cdn_url}/b.jpg")
        await producer.fail(failing, "the prompt was refused")
        statuses = [await live.finish(), await polled.finish()]
    assert statuses == [1, 1], live.transcript() + polled.transcript()  # one task failed
    for run, save_dir in ((live, tmp_path / "auto"), (polled, tmp_path / "poll")):
        output = run.output
        assert f"task {inline}: completed 100% (version 3): saved {save_dir / f'{inline}.png'}" \
            f" ({len(PNG)} bytes)" in output, run.transcript()
        assert f"task {linked}: completed 100% (version 2): saved {save_dir / f'{linked}.jpg'}" \
            in output, run.transcript()
        assert f"task {failing}: failed 20% (version 3): the prompt was refused" in output
        assert output.splitlines()[-1] == "3 task(s) finished, 1 with a problem"
        assert sorted(path.name for path in save_dir.iterdir()) == [f"{inline}.png",
                                                                    f"{linked}.jpg"]
        assert (save_dir / f"{inline}.png").read_bytes() == PNG
        assert (save_dir / f"{linked}.jpg").read_bytes() == hosted
        assert set(states(output)) == set(ids), output
        for seen in states(output).values():
            versions = [version for _, version in seen]
            assert versions == sorted(set(versions)), output  # at most once, in order
            assert seen[-1][0] in ("completed", "failed"), output  # the end is last
    # The live run printed every state of the first task (it waited for each one above).
    assert states(live.output)[inline] == [("submitted", 1), ("processing", 2),
                                           ("completed", 3)]


async def test_client_examples_follow_with_a_token_and_exit_3_when_refused(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn, tmp_path: Path
) -> None:
    secret = "example-secret-" + "x" * 40
    settings = Settings(redis_url=redis_server.url, prefix=prefix, jwt_secret=secret)
    async with run_gateway(settings) as gateway:
        task = (await producer.create()).task_id
        other = (await producer.create()).task_id
        token = issue(secret, [task], ttl_s=60)
        waiter = await spawn(*wait_example(gateway.url, task, "--token", token))
        batch = await spawn(*batch_example(gateway.url, tmp_path / "images", task),
                            env={"TASKCAST_TOKEN": token})
        await batch.printed(f"task {task}: submitted 0% (version 1)")
        await sse_streams_open(gateway.url, 2)
        await producer.complete(task, image_base64=PNG)
        assert await waiter.finish() == 0, waiter.transcript()
        assert await batch.finish() == 0, batch.transcript()
        assert (tmp_path / "images" / f"{task}.png").read_bytes() == PNG

        refused = [await spawn(*wait_example(gateway.url, task)),
                   await spawn(*batch_example(gateway.url, tmp_path / "none", task)),
                   await spawn(*wait_example(gateway.url, other, "--token", token)),
                   await spawn(*batch_example(gateway.url, tmp_path / "other", other),
                               env={"TASKCAST_TOKEN": token})]
        for run in refused:
            assert await run.finish() == 3, run.transcript()
    no_token, no_token_batch, wrong_task, wrong_task_batch = [
        "\n".join(run.stderr) for run in refused]
    assert "401" in no_token and "401" in no_token_batch
    assert "403" in wrong_task and "403" in wrong_task_batch


async def test_client_examples_exit_3_for_an_unknown_task_and_2_after_the_timeout(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn, tmp_path: Path
) -> None:
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        known = (await producer.create()).task_id
        unknown = [await spawn(*wait_example(gateway.url, 404404)),
                   await spawn(*batch_example(gateway.url, tmp_path / "images", known, 404404))]
        slow = await spawn(*wait_example(gateway.url, known, "--timeout", "1"))
        for run in unknown:
            assert await run.finish() == 3, run.transcript()
            assert "task 404404 not found" in "\n".join(run.stderr), run.transcript()
        assert await slow.finish() == 2, slow.transcript()
        assert f"task {known} not finished after 1.0s" in "\n".join(slow.stderr)
    assert not (tmp_path / "images").exists() or not os.listdir(tmp_path / "images")



def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python client" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


async def test_the_readme_python_client_snippets_run(
    redis_server: RedisServer, prefix: str, producer: Producer, spawn: Spawn, tmp_path: Path
) -> None:
    blocks = readme_python_blocks()
    assert len(blocks) == 2  # the async one, then the blocking one
    await producer.create(task_id=42)
    await producer.create(task_id=43)
    await producer.complete(42, image_base64=PNG)
    await producer.fail(43, "out of GPU memory")
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=prefix)) as gateway:
        runs = [await spawn(sys.executable, "-c",
                            block.replace("http://127.0.0.1:8000", gateway.url), cwd=tmp_path)
                for block in blocks]
        outputs = [await run.succeeded() for run in runs]
    assert sorted(outputs[0].splitlines()) == ["42 completed 100", "43 failed 0",
                                               "failed: out of GPU memory"]
    assert (tmp_path / "42.png").read_bytes() == PNG
    assert outputs[1] == "completed 100  "

# -- bugs in taskcast.client found while writing the examples (each failed before its fix) ------


async def test_watch_survives_a_short_restart_after_a_quiet_spell(
    redis_server: RedisServer, prefix: str, producer: Producer
) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=prefix, sse_retry_ms=100,
                        graceful_shutdown_s=1)
    port = free_port()
    task_id = (await producer.create()).task_id

    async def follow(transport: Transport) -> list[int]:
        async with AsyncClient(f"http://127.0.0.1:{port}", give_up_after_s=1.5,
                               max_backoff_s=0.3) as client:
            return [state.version async for state in client.watch([task_id],
                                                                  transport=transport)]

    async with run_gateway(settings, port=port):
        watches = [asyncio.create_task(follow(transport)) for transport in ("sse", "ws")]
        await asyncio.sleep(2.5)  # longer than give_up_after_s, with the gateway answering
    await asyncio.sleep(0.3)  # down for less than give_up_after_s
    async with run_gateway(settings, port=port):
        await producer.complete(task_id, image_url="https://cdn.example/1.png")
        async with asyncio.timeout(10):
            results = await asyncio.gather(*watches, return_exceptions=True)
    assert results == [[1, 2], [1, 2]]


async def test_watch_gives_up_when_a_fresh_token_is_refused_too(
    redis_server: RedisServer, prefix: str, producer: Producer
) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=prefix, jwt_secret="s" * 40)
    async with run_gateway(settings) as gateway:
        task_id = (await producer.create()).task_id
        for transport in ("sse", "ws", "poll"):
            calls = 0

            def stale() -> str:
                nonlocal calls
                calls += 1
                return "not-a-token"

            async with AsyncClient(gateway.url, token=stale) as client:
                with pytest.raises(AccessRefused) as refused:
                    async with asyncio.timeout(5):
                        await anext(client.watch([task_id], transport=transport))
            assert refused.value.status == 401
            assert calls <= 3, f"{transport}: the token function was called {calls} times"


async def test_an_invalid_task_id_is_refused_at_once(gateway: Gateway) -> None:
    async with AsyncClient(gateway.url, give_up_after_s=1, first_event_timeout_s=1) as client:
        calls: list[Callable[[], Awaitable[object]]] = [lambda: client.get(-1)]
        calls += [functools.partial(anext, client.watch([-1], transport=transport))
                  for transport in ("auto", "sse", "ws", "poll")]
        for call in calls:
            with pytest.raises(ValueError):  # InvalidTaskId is one
                async with asyncio.timeout(5):
                    await call()
