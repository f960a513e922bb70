from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from taskcast.connection import connect, connect_sync
from taskcast.producer import Producer, SyncProducer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, run_gateway
from tests.test_examples import ROOT as EXAMPLES_ROOT
from tests.test_examples import Example, Spawn, example_env
from tests.test_script_limits import Flavour
from tests.test_update_script import ScriptStore

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests isolate themselves by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop, kill or pause it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests can share one redis-server."""
    return f"t{next(_prefixes)}"


@pytest.fixture
def settings(redis_server: RedisServer, prefix: str) -> Settings:
    return Settings(redis_url=redis_server.url, prefix=prefix)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def producer(redis: aioredis.Redis, prefix: str) -> Producer:
    return Producer(redis, prefix=prefix)


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with run_gateway(settings) as running:
        yield running


@pytest.fixture(params=["redis-server", "memory"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
                ) -> AsyncIterator[ScriptStore]:
    """The shipped update script on a real redis-server and on the embedded `memory://` store
    (both must run it identically); test_update_script.py and test_script_limits.py."""
    if request.param == "redis-server":
        client = connect(redis_server.url)
    else:
        client = connect(f"memory://update-script-{uuid.uuid4().hex}")
    yield ScriptStore(client, prefix)
    async with asyncio.timeout(10):
        await client.aclose()


@pytest.fixture
async def real_store(redis_server: RedisServer, prefix: str) -> AsyncIterator[ScriptStore]:
    """The update script on the real redis-server only (cases too large for `memory://`)."""
    client = connect(redis_server.url)
    yield ScriptStore(client, prefix)
    async with asyncio.timeout(10):
        await client.aclose()


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Starts examples (with extra environment variables, in another directory, if given);
    whatever is still running at the end of the test is killed. test_examples.py and
    test_client_examples.py."""
    running: list[Example] = []

    async def start(*args: str, env: dict[str, str] | None = None,
                    cwd: Path = EXAMPLES_ROOT) -> Example:
        process = await asyncio.create_subprocess_exec(
            *args, cwd=cwd, env={**example_env(), **(env or {})},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        example = Example(Path(args[1]).name if len(args) > 1 else args[0], process)
        running.append(example)
        return example

    try:
        yield start
    finally:
        for example in running:
            await example.kill()


@pytest.fixture(params=["Producer", "SyncProducer"])
async def flavour(
    request: pytest.FixtureRequest, redis: aioredis.Redis, redis_server: RedisServer,
    prefix: str,
) -> AsyncIterator[Flavour]:
    if request.param == "Producer":
        yield Flavour(Producer(redis, prefix=prefix))
        return
    client = connect_sync(redis_server.url)
    try:
        yield Flavour(SyncProducer(client, prefix=prefix))
    finally:
        client.close()
