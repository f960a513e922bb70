from __future__ import annotations

import httpx

from taskcast.producer import Producer
from tests.servers import Gateway


async def test_rest_returns_a_task_written_by_the_producer(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create(type="txt2img", angle="front")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        response = await client.get(f"/tasks/{task.task_id}")
    assert response.status_code == 200
    assert response.json()["data"]["status"] == "submitted"
