"""The demo's webhook receiver page (issue 14, item 4), in a real browser: `taskcast demo` (a
process of its own, on a real redis-server) sends every event of its tasks as signed webhooks to
its own receiver, and /demo/webhooks shows them arriving. The receiver refuses what does not
verify; with `--webhooks off` the page says that nothing is delivered.
"""

from __future__ import annotations

import base64
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskcast.webhook_signing import WebhookSigner
from tests.servers import RedisServer
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS, DemoGateway, playwright_api

_prefixes = itertools.count()

# True once the page lists, for every id, a row of `type` (a finished task's last callback).
ROWS_ARRIVED = """
([ids, type]) => ids.every((id) => [...document.querySelectorAll('#received tr')].some(
  (row) => row.children[2].textContent === String(id) && row.children[1].textContent === type))
"""
# Every row as [seq, type, task_id, version], oldest first.
ROWS = """
() => [...document.querySelectorAll('#received tr')].reverse().map((row) => [
  Number(row.children[0].textContent), row.children[1].textContent,
  Number(row.children[2].textContent), Number(row.children[5].textContent)])
"""


@pytest.fixture
async def browser_page() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await chromium.new_context()
        context.set_default_timeout(WAIT_MS)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        await context.close()
        await chromium.close()
        assert errors == [], f"uncaught errors in the page: {errors}"


async def start(redis_server: RedisServer, tmp_path: Path, *extra: str) -> DemoGateway:
    gateway = DemoGateway(redis_server.url, f"dw{next(_prefixes)}", tmp_path / "demo.log",
                          extra=extra)
    await gateway.start()
    return gateway


async def test_the_receiver_page_shows_each_tasks_callbacks_arriving(
        browser_page: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    demo = await start(redis_server, tmp_path)
    try:
        await browser_page.goto(f"{demo.url}/demo/webhooks")
        async with httpx.AsyncClient(base_url=demo.url, timeout=10) as client:
            ok = (await client.post("/demo/tasks", json={"count": 3})).json()["data"]["task_ids"]
            bad = (await client.post("/demo/tasks", json={"count": 1, "fail": True})
                   ).json()["data"]["task_ids"]
        await browser_page.wait_for_function(ROWS_ARRIVED, arg=[ok, "task.completed"])
        await browser_page.wait_for_function(ROWS_ARRIVED, arg=[bad, "task.failed"])
        rows = await browser_page.evaluate(ROWS)
        for task_id in ok + bad:
            mine = [(kind, version) for _, kind, tid, version in rows if tid == task_id]
            versions = [version for _, version in mine]
            assert versions == sorted(set(versions)), f"task {task_id}: {mine}"
            assert mine[0][0] == "task.start", mine
            assert mine[-1][0] in ("task.completed", "task.failed"), mine
            assert [kind for kind, _ in mine[1:-1]] == ["task.progress"] * (len(mine) - 2)
        status = await browser_page.text_content("#status")
        assert status == f"{len(rows)} callback(s) received"
    finally:
        await demo.stop()


async def test_the_demo_receiver_refuses_what_does_not_verify(
        redis_server: RedisServer, tmp_path: Path) -> None:
    demo = await start(redis_server, tmp_path)
    stranger = WebhookSigner.from_setting("whsec_" + base64.b64encode(os.urandom(32)).decode())
    body = (b'{"type":"task.completed","timestamp":"2026-01-01T00:00:00.000Z","data":'
            b'{"task_id":1}}')
    now = int(time.time())
    try:
        async with httpx.AsyncClient(base_url=demo.url, timeout=10) as client:
            for headers in (
                    stranger.headers("msg_1_1", now, body),  # another secret
                    {"webhook-id": "msg_1_1", "webhook-timestamp": str(now)},  # unsigned
                    {}):
                answer = await client.post("/demo/webhooks/receive", content=body,
                                           headers=headers)
                assert answer.status_code == 401, (headers, answer.text)
            listed = (await client.get("/demo/webhooks/received?after=0&wait=0")).json()
            assert listed["data"] == {"enabled": True, "entries": []}
    finally:
        await demo.stop()


async def test_with_webhooks_off_the_page_says_so(
        browser_page: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    demo = await start(redis_server, tmp_path, "--webhooks", "off")
    try:
        await browser_page.goto(f"{demo.url}/demo/webhooks")
        await browser_page.wait_for_function(
            "() => document.getElementById('status').textContent.includes('does not deliver')")
    finally:
        await demo.stop()
