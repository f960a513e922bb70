"""CORS (`TASKCAST_CORS_ORIGINS`): SSE streams answer with exactly the headers Starlette's
CORSMiddleware gives REST, and configuring CORS no longer moves them off the direct path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, run_gateway

BOUND_S = 20
SITE = "https://app.example"


@pytest.fixture
async def cors_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with run_gateway(settings.with_changes(cors_origins=f"{SITE}, https://b.example")
                           ) as gateway:
        yield gateway


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items()
            if name.startswith("access-control-") or name == "vary"}


@pytest.mark.parametrize("origin", [SITE, "https://evil.example", None])
async def test_a_stream_gets_the_same_cors_headers_as_rest(
    cors_gateway: Gateway, producer: Producer, origin: str | None
) -> None:
    task = await producer.create()
    await producer.fail(task.task_id, "done")  # so that the stream ends by itself
    headers = {"Origin": origin} if origin else {}
    async with httpx.AsyncClient(base_url=cors_gateway.url, timeout=BOUND_S) as http:
        rest = await http.get(f"/tasks/{task.task_id}", headers=headers)
        stream = await http.get(f"/tasks/{task.task_id}/events", headers=headers)
        multi = await http.get(f"/events?task_id={task.task_id}", headers=headers)
        missing = await http.get("/tasks/999999/events", headers=headers)  # a 404
    assert (rest.status_code, stream.status_code, multi.status_code, missing.status_code) == (
        200, 200, 200, 404)
    expected = cors_headers(rest)
    if origin == SITE:
        assert expected["access-control-allow-origin"] == SITE
        assert expected["access-control-expose-headers"] == "ETag, WWW-Authenticate"
    else:
        assert "access-control-allow-origin" not in expected
    for response in (stream, multi, missing):
        assert cors_headers(response) == expected


async def test_a_preflight_for_a_reconnect_with_last_event_id_is_allowed(
    cors_gateway: Gateway
) -> None:
    async with httpx.AsyncClient(base_url=cors_gateway.url, timeout=BOUND_S) as http:
        response = await http.options("/tasks/1/events", headers={
            "Origin": SITE, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == SITE


async def test_with_cors_configured_streams_still_take_the_direct_path(
    cors_gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    async with httpx.AsyncClient(base_url=cors_gateway.url, timeout=BOUND_S) as http:
        async with http.stream("GET", f"/tasks/{task.task_id}/events",
                               headers={"Origin": SITE}) as response:
            assert response.headers["access-control-allow-origin"] == SITE
            lines = response.aiter_lines()
            async with asyncio.timeout(BOUND_S):
                while not (await anext(lines)).startswith("data:"):
                    pass
            sessions = list(cors_gateway.app.state.connections._sessions)
            # The session writes straight to uvicorn's connection (CORSMiddleware would
            # have wrapped `send` and hidden it).
            assert len(sessions) == 1 and sessions[0]._link is not None
