"""`taskcast demo` keeps at most `demo_max_tasks` tasks (issue 12, item 6): it runs on the
embedded in-memory store by default, so making more deletes the oldest, records and jobs."""

from __future__ import annotations

import httpx

from taskcast.settings import Settings
from tests.servers import run_gateway

BOUND_S = 10.0


async def test_the_demo_deletes_its_oldest_tasks_beyond_its_cap(settings: Settings) -> None:
    capped = settings.with_changes(demo_max_tasks=3, demo_step_s=30.0)  # jobs stay running
    async with run_gateway(capped, demo=True) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        ids: list[int] = []
        for _ in range(3):
            created = await http.post("/demo/tasks", json={"count": 2})
            assert created.status_code == 201, created.text
            ids += created.json()["data"]["task_ids"]
        statuses = {task_id: (await http.get(f"/tasks/{task_id}")).status_code for task_id in ids}
        assert statuses == {**{task_id: 404 for task_id in ids[:3]},
                            **{task_id: 200 for task_id in ids[3:]}}
        worker = gateway.app.state.demo_worker
        assert list(worker.created) == ids[3:]
        assert sorted(worker._jobs) == ids[3:]  # the evicted tasks' jobs were stopped
        # Tokens are signed only for tasks the demo still keeps.
        renewed = await http.post("/demo/tokens", json={"task_ids": ids[:1]})
        assert renewed.status_code == 403
