"""Redis going away under a running gateway: the seed's 500 body, readiness 503, and recovery on
the same gateway once Redis is back. Each test has a redis-server of its own (`own_redis`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from taskcast.connection import connect
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, eventually, run_gateway, wait_ready

SEED = Path(__file__).parent / "data" / "task-status.openapi.yaml"
SEED_RESPONSES = yaml.safe_load(SEED.read_text(encoding="utf-8"))["paths"]["/tasks/{task_id}"][
    "get"
]["responses"]
REDIS_TIMEOUT_S = 0.5
# redis-py makes 3 attempts (retries=2), each up to a connect and a read timeout, plus backoff.
PAUSED_BOUND_S = 6 * REDIS_TIMEOUT_S + 1.5
INTERNAL_ERROR = {"code": 500, "msg": "internal server error", "data": None}
READY = {"code": 200, "msg": "ready", "data": {"redis": "ok", "pubsub": "ok"}}
NOT_READY = {"code": 503, "msg": "redis unavailable", "data": {"redis": "unavailable"}}


def seed_shape(response: httpx.Response, code: int) -> Any:
    assert response.status_code == code, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    jsonschema.validate(body, SEED_RESPONSES[str(code)]["content"]["application/json"]["schema"])
    return body


def assert_internal_error(response: httpx.Response) -> None:
    assert seed_shape(response, 500) == INTERNAL_ERROR
    assert response.content == b'{"code":500,"msg":"internal server error","data":null}'
    for leak in (b"Traceback", b"Error", b"redis", b"127.0.0.1"):
        assert leak not in response.content


@asynccontextmanager
async def producer_for(server: RedisServer, prefix: str) -> AsyncIterator[Producer]:
    """A producer on a fresh client: the old one's connections died with the server."""
    producer = Producer(connect(server.url), prefix=prefix)
    try:
        yield producer
    finally:
        async with asyncio.timeout(5):
            await producer.close()


async def create_task(server: RedisServer, prefix: str, task_id: int) -> None:
    async with asyncio.timeout(5), producer_for(server, prefix) as producer:
        await producer.create(task_id=task_id, type="txt2img", angle="front")


@asynccontextmanager
async def gateway_on(server: RedisServer, prefix: str
                     ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    settings = Settings(redis_url=server.url, prefix=prefix, redis_timeout_s=REDIS_TIMEOUT_S)
    async with run_gateway(settings) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as client:
            yield gateway, client


async def get(client: httpx.AsyncClient, path: str, bound_s: float = 10,
              headers: dict[str, str] | None = None) -> httpx.Response:
    async with asyncio.timeout(bound_s):
        return await client.get(path, headers=headers)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_redis_down_gives_500_and_503_then_recovers_on_the_same_gateway(
    own_redis: RedisServer, prefix: str, how: str
) -> None:
    await create_task(own_redis, prefix, 41)
    async with gateway_on(own_redis, prefix) as (gateway, client):
        seed_shape(await get(client, "/tasks/41"), 200)
        assert (await wait_ready(client)).json() == READY

        own_redis.stop() if how == "stop" else own_redis.kill()
        # Until the gateway notices (its pub/sub connection breaks), a polled task is still
        # answered from memory (poll_cache.py); from then on every poll reads Redis.
        async def noticed() -> bool:
            return not gateway.app.state.hub.broker.connected

        await eventually(noticed, "the gateway notices that Redis is gone")

        assert_internal_error(await get(client, "/tasks/41"))
        # Every request keeps failing cleanly, including the If-None-Match path.
        assert_internal_error(await get(client, "/tasks/41"))
        assert_internal_error(await get(client, "/tasks/41?image_base64=false"))
        assert_internal_error(await get(client, "/tasks/41", headers={"If-None-Match": '"1"'}))
        ready = await get(client, "/readyz")
        assert ready.status_code == 503
        assert ready.json() == NOT_READY
        health = await get(client, "/healthz")
        assert health.status_code == 200
        # Bad input is still judged without Redis.
        assert (await get(client, "/tasks/abc")).status_code == 422

        own_redis.start()
        await create_task(own_redis, prefix, 41)  # no persistence: the record is gone

        body = seed_shape(await get(client, "/tasks/41"), 200)
        assert body["data"]["task_id"] == 41
        assert body["data"]["status"] == "submitted"
        assert (await wait_ready(client)).json() == READY
        assert (await get(client, "/healthz")).status_code == 200


async def test_requests_while_redis_is_down_do_not_disturb_later_requests(
    own_redis: RedisServer, prefix: str
) -> None:
    await create_task(own_redis, prefix, 5)
    async with gateway_on(own_redis, prefix) as (_, client):
        own_redis.stop()
        async with asyncio.timeout(15):
            responses = await asyncio.gather(*(client.get("/tasks/5") for _ in range(20)))
        for response in responses:
            assert_internal_error(response)
        own_redis.start()
        await create_task(own_redis, prefix, 5)
        async with asyncio.timeout(15):
            responses = await asyncio.gather(*(client.get("/tasks/5") for _ in range(20)))
        for response in responses:
            assert seed_shape(response, 200)["data"]["task_id"] == 5


async def test_paused_redis_gives_500_within_the_redis_timeout_then_recovers(
    own_redis: RedisServer, prefix: str
) -> None:
    await create_task(own_redis, prefix, 9)
    await create_task(own_redis, prefix, 10)
    async with gateway_on(own_redis, prefix) as (_, client):
        seed_shape(await get(client, "/tasks/9"), 200)  # a pooled connection exists
        own_redis.pause()
        try:
            # Task 9 is polled, so answered from memory until the pub/sub connection is
            # declared hung (redis_ping_deadline_s); task 10 is a miss and reads Redis.
            assert seed_shape(await get(client, "/tasks/9", bound_s=1), 200)["data"][
                "task_id"] == 9
            started = time.monotonic()
            response = await get(client, "/tasks/10", bound_s=PAUSED_BOUND_S)
            elapsed = time.monotonic() - started
            assert_internal_error(response)
            assert elapsed >= REDIS_TIMEOUT_S * 0.9  # it did wait for Redis, then gave up

            started = time.monotonic()
            ready = await get(client, "/readyz", bound_s=PAUSED_BOUND_S)
            assert ready.status_code == 503
            assert ready.json() == NOT_READY
            assert time.monotonic() - started < PAUSED_BOUND_S
            assert (await get(client, "/healthz", bound_s=1)).status_code == 200
        finally:
            own_redis.resume()

        body = seed_shape(await get(client, "/tasks/10"), 200)
        assert body["data"]["task_id"] == 10
        assert (await wait_ready(client)).json() == READY


async def test_healthz_answers_promptly_while_a_request_waits_on_a_paused_redis(
    own_redis: RedisServer, prefix: str
) -> None:
    await create_task(own_redis, prefix, 3)
    async with gateway_on(own_redis, prefix) as (_, client):
        own_redis.pause()
        try:
            stuck = asyncio.create_task(get(client, "/tasks/3", bound_s=PAUSED_BOUND_S))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            assert (await get(client, "/healthz", bound_s=1)).status_code == 200
            assert time.monotonic() - started < 0.5
            assert_internal_error(await stuck)
        finally:
            own_redis.resume()
