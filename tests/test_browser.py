"""The browser side, in a real browser: Debian's Chromium driven by Playwright against real
`taskcast demo` gateway processes on a real redis-server.

Covered: the demo page runs tasks to completion over SSE, WebSocket and REST polling (bars at
100 %, the PNG decoded by the browser), shows a failure's error_message, keeps going across a
gateway restart on the same port (the tasks live in Redis; the simulated worker dies with the
gateway, so this test finishes them with the producer library), falls back SSE -> WebSocket ->
polling when streaming is blocked, and the cross-origin example page in examples/browser.
The demo runs with access control on, as `taskcast demo` does by default; its gateways share
one secret (TASKCAST_JWT_SECRET) so that tests can mint tokens and tokens survive a restart.
Tokens that expire, refusals and the client's token option: tests/test_browser_auth.py.
Screenshots go to test-artifacts/ (gitignored).

Chromium comes from Debian (`scripts/test` installs it); Playwright never downloads a browser.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskcast.connection import connect
from taskcast.demo import SIMULATED_FAILURE, render_png
from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.store import TaskStore
from taskcast.tokens import issue
from tests.servers import RedisServer, free_port

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (scripts/test installs Debian's chromium)",
                allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
WAIT_MS = 20_000  # every wait on the page is bounded by this
SECRET = "browser-tests-secret-0123456789abcdefghijklmnop"  # the demo gateways' signing key
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
_prefixes = itertools.count()

# Records every data-version the page writes, per task: a repeat or a step back would show.
RECORD_VERSIONS = """
window.__versions = {};
new MutationObserver((records) => {
  for (const record of records) {
    const id = record.target.dataset.taskId;
    (window.__versions[id] ||= []).push(Number(record.target.dataset.version));
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-version'] });
"""

# True when every listed task card is finished with `status`; completed ones need a decoded image.
ALL_FINISHED = """
([ids, status]) => ids.every((id) => {
  const item = document.querySelector(`[data-task-id="${id}"]`);
  if (!item || item.dataset.status !== status) return false;
  if (status !== 'completed') return true;
  const img = item.querySelector('img');
  const bar = item.querySelector('.progress');  // a <div data-progress> or a <progress>
  return (bar.dataset.progress ?? String(bar.value)) === '100'
    && img !== null && img.complete && img.naturalWidth > 0;
})
"""


class DemoGateway:
    """`python -m taskcast demo` as a process of its own, which a test may stop and start again
    on the same port."""

    def __init__(self, redis_url: str, prefix: str, log: Path, port: int | None = None,
                 step_s: float = 0.1, extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = [sys.executable, "-m", "taskcast", "demo", "--port", str(self.port),
                     "--redis-url", redis_url, "--prefix", prefix, "--demo-step-s", str(step_s),
                     "--log-level", "warning", "--graceful-shutdown-s", "2", *extra]
        self.log = log
        self.env = {**os.environ, "TASKCAST_JWT_SECRET": SECRET}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env)
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the demo gateway exited:\n{self.log.read_text()}")
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"the demo gateway did not become ready:\n{self.log.read_text()}")

    async def stop(self) -> None:
        """SIGTERM: a graceful shutdown, as an orchestrator does it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait, 15)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1100, "height": 800})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.add_init_script(RECORD_VERSIONS)
    yield page
    await page.unroute_all(behavior="ignoreErrors")
    await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
async def demo(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[DemoGateway]:
    """One demo gateway for the tests that do not restart it."""
    log = tmp_path_factory.mktemp("demo") / "gateway.log"
    gateway = DemoGateway(redis_server.url, f"tb{next(_prefixes)}", log)
    await gateway.start()
    yield gateway
    await gateway.stop()


@pytest.fixture(scope="module", autouse=True)
def artifacts() -> None:
    ARTIFACTS.mkdir(exist_ok=True)


async def start_batch(page: Any, count: int, mode: str = "sse", fail: bool = False
                      ) -> tuple[list[int], str | None]:
    """Fill in the demo form, press Start, and return the ids the gateway created and the
    token that came with them (None with access control off)."""
    await page.fill("#count", str(count))
    await page.set_checked("#fail", fail)
    await page.check(f"#mode-{mode}")
    async with page.expect_response(re.compile(r"/demo/tasks$")) as answer:
        await page.click("#start")
    response = await answer.value
    assert response.status == 201
    data = (await response.json())["data"]
    ids: list[int] = data["task_ids"]
    assert len(ids) == count
    return ids, data["token"]


async def start_tasks(page: Any, count: int, mode: str = "sse", fail: bool = False) -> list[int]:
    """start_batch(), the ids only."""
    return (await start_batch(page, count, mode, fail))[0]


async def wait_finished(page: Any, ids: list[int], status: str = "completed") -> None:
    await page.wait_for_function(ALL_FINISHED, arg=[ids, status], timeout=WAIT_MS)


async def card(page: Any, task_id: int) -> dict[str, Any]:
    """What the page shows for one task."""
    return await page.eval_on_selector(f'[data-task-id="{task_id}"]', """(item) => ({
        status: item.dataset.status, transport: item.dataset.transport,
        version: Number(item.dataset.version),
        statusText: item.querySelector('.status').textContent,
        percent: item.querySelector('.percent').textContent,
        progress: Number(item.querySelector('.progress').dataset.progress),
        error: item.querySelector('.error').textContent,
        images: item.querySelectorAll('img').length,
    })""")


async def assert_versions_only_rise(page: Any, ids: list[int]) -> None:
    versions: dict[str, list[int]] = await page.evaluate("window.__versions")
    for task_id in ids:
        seen = versions[str(task_id)]
        assert seen == sorted(set(seen)), f"task {task_id} got versions {seen}"


async def screenshot(page: Any, name: str) -> None:
    """The whole page, CSS transitions finished, into test-artifacts/."""
    await page.screenshot(path=ARTIFACTS / name, full_page=True, animations="disabled")


async def status_log(page: Any) -> list[str]:
    log: list[str] = await page.evaluate("window.taskcastDemo.statusLog")
    return log


# -- the demo page ------------------------------------------------------------------------------


async def test_demo_page_runs_five_tasks_to_completion(page: Any, demo: DemoGateway) -> None:
    await page.goto(demo.url)
    ids, token = await start_batch(page, 5)
    assert token is not None  # the demo runs with access control on
    await wait_finished(page, ids)
    async with httpx.AsyncClient(base_url=demo.url,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        for task_id in ids:
            shown = await card(page, task_id)
            task = (await client.get(f"/tasks/{task_id}")).json()["data"]
            assert (shown["status"], shown["statusText"], shown["percent"], shown["images"]) == (
                "completed", "completed", "100%", 1)
            assert shown["version"] == task["version"]
            assert shown["transport"] == "sse"
    await assert_versions_only_rise(page, ids)
    assert (await status_log(page))[-1].endswith("all tasks finished")
    await screenshot(page, "demo-finished.png")


async def test_a_failing_task_shows_its_error_message(page: Any, demo: DemoGateway) -> None:
    await page.goto(demo.url)
    [task_id] = await start_tasks(page, 1, fail=True)
    await wait_finished(page, [task_id], "failed")
    shown = await card(page, task_id)
    assert shown["error"] == SIMULATED_FAILURE
    assert shown["statusText"] == "failed" and shown["images"] == 0
    assert 0 < shown["progress"] < 100
    await screenshot(page, "demo-failed.png")


@pytest.mark.parametrize("mode", ["ws", "poll"])
async def test_websocket_and_polling_modes_complete_tasks(
    page: Any, demo: DemoGateway, mode: str
) -> None:
    await page.goto(f"{demo.url}/?pollIntervalMs=200")
    ids = await start_tasks(page, 3, mode=mode)
    await wait_finished(page, ids)
    for task_id in ids:
        assert (await card(page, task_id))["transport"] == mode
    await assert_versions_only_rise(page, ids)
    assert not any("falling back" in line for line in await status_log(page))


# -- a gateway restart under an open page -------------------------------------------------------


@pytest.mark.parametrize("mode", ["sse", "ws", "poll"])
async def test_bars_finish_after_the_gateway_restarts(
    page: Any, redis_server: RedisServer, tmp_path: Path, mode: str
) -> None:
    prefix = f"tb{next(_prefixes)}"
    # The simulated worker sleeps through this test: the producer below moves the tasks, so
    # they are certainly unfinished when the first gateway (and its worker) goes away.
    first = DemoGateway(redis_server.url, prefix, tmp_path / "gateway.log", step_s=600)
    await first.start()
    redis = connect(redis_server.url)
    producer = Producer(redis, prefix=prefix)
    second = DemoGateway(redis_server.url, prefix, tmp_path / "gateway.log", port=first.port)
    try:
        await page.goto(f"{first.url}/?pollIntervalMs=300")
        ids = await start_tasks(page, 3, mode=mode)
        for task_id in ids:
            await producer.progress(task_id, 30)
        await page.wait_for_function(
            "(ids) => ids.every((id) => document.querySelector("
            "`[data-task-id=\"${id}\"]`).dataset.status === 'processing')", arg=ids)
        await first.stop()

        store = TaskStore(redis, TaskKeys(prefix))
        for task_id in ids:
            task = await store.get(task_id)
            assert task is not None and (task.status, task.progress) == ("processing", 30)
        await page.wait_for_function(
            "() => window.taskcastDemo.statusLog.some((line) => line.includes('reconnecting'))")

        # The new gateway first repeats the states the page already shows (the client must drop
        # them), then streams what the producer does from here on.
        await second.start()
        await page.wait_for_function(
            "() => window.taskcastDemo.statusLog.at(-1).endsWith(': live')")
        for task_id in ids:
            await producer.progress(task_id, 95)
        await page.wait_for_function(
            "(ids) => ids.every((id) => document.querySelector("
            "`[data-task-id=\"${id}\"] .progress`).dataset.progress === '95')", arg=ids)
        for task_id in ids:
            await producer.complete(task_id, image_base64=render_png(task_id),
                                    image_url=f"/demo/images/{task_id}.png")
        await wait_finished(page, ids)
    finally:
        await second.stop()
        await first.stop()
        await producer.close()
    for task_id in ids:
        assert (await card(page, task_id))["transport"] == mode  # reconnected, no fallback
    await assert_versions_only_rise(page, ids)
    await screenshot(page, f"demo-after-restart-{mode}.png")


# -- fallbacks when streaming is blocked --------------------------------------------------------


async def test_sse_refused_falls_back_to_websocket(page: Any, demo: DemoGateway) -> None:
    await page.route(re.compile(r"/events\?"), lambda route: route.abort())
    await page.goto(demo.url)
    ids = await start_tasks(page, 2)
    await wait_finished(page, ids)
    for task_id in ids:
        assert (await card(page, task_id))["transport"] == "ws"
    assert any("SSE unavailable" in line for line in await status_log(page))
    await assert_versions_only_rise(page, ids)


async def test_silent_sse_and_websocket_fall_back_to_polling(
    page: Any, demo: DemoGateway
) -> None:
    """A proxy that buffers the stream and one that swallows WebSocket frames: neither errors,
    both stay silent; firstEventTimeoutMs moves the client on."""
    held: list[Any] = []
    await page.route(re.compile(r"/events\?"), lambda route: held.append(route))  # no answer
    await page.route_web_socket(re.compile(r"/ws"), lambda ws: None)  # opens, never speaks
    await page.goto(f"{demo.url}/?firstEventTimeoutMs=800&pollIntervalMs=200")
    ids = await start_tasks(page, 2)
    await wait_finished(page, ids)
    for task_id in ids:
        assert (await card(page, task_id))["transport"] == "poll"
    log = await status_log(page)
    assert any("SSE unavailable (no event in 800 ms)" in line for line in log), log
    assert any("WebSocket unavailable (no frame in 800 ms)" in line for line in log), log
    assert held, "the SSE request never reached the route"


# -- the client library itself -----------------------------------------------------------------


async def test_client_drops_unknown_tasks_and_can_leave_out_the_image(
    page: Any, demo: DemoGateway
) -> None:
    """An unknown id makes the whole SSE request a 404; the client asks which id it was. (The
    token names the unknown id too: the gateway answers 403 before 404 otherwise.)"""
    async with httpx.AsyncClient(base_url=demo.url) as client:
        created = await client.post("/demo/tasks", json={"count": 1})
    [task_id] = created.json()["data"]["task_ids"]
    token = issue(SECRET, [task_id, 987654321], 60)
    await page.goto(demo.url)
    async with asyncio.timeout(WAIT_MS / 1000):
        seen = await page.evaluate("""async ([ids, token]) => {
            const { watch } = await import('/taskcast.js');
            const updates = [], missing = [];
            const handle = watch(ids, (task) => updates.push(task), {
                token, includeImageBase64: false, onNotFound: (gone) => missing.push(...gone),
            });
            await handle.done;
            return { updates, missing, transport: handle.transport };
        }""", [[task_id, 987654321], token])
    assert seen["missing"] == [987654321]
    versions = [task["version"] for task in seen["updates"]]
    assert versions == sorted(set(versions)) and seen["transport"] == ""  # closed when done
    final = seen["updates"][-1]
    assert final["status"] == "completed"
    assert final["image"] == {"image_base64": "", "image_url": f"/demo/images/{task_id}.png"}


# -- the cross-origin example page --------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def example_site() -> Iterator[str]:
    """`python -m http.server` for examples/browser, in a thread."""
    handler = functools.partial(_QuietHandler, directory=str(ROOT / "examples" / "browser"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("transport", ["", "ws", "poll"])
async def test_example_page_watches_a_gateway_on_another_origin(
    page: Any, redis_server: RedisServer, example_site: str, tmp_path: Path, transport: str
) -> None:
    gateway = DemoGateway(redis_server.url, f"tb{next(_prefixes)}", tmp_path / "gateway.log",
                          extra=("--cors-origins", example_site, "--allowed-origins", example_site))
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            created = await client.post("/demo/tasks", json={"count": 2, "fail": False})
            ids: list[int] = created.json()["data"]["task_ids"]
            token: str = created.json()["data"]["token"]
        await page.goto(example_site)
        await page.fill("#gateway", gateway.url)
        await page.fill("#task-ids", ", ".join(map(str, ids)))
        await page.fill("#token", token)
        await page.select_option("#transport", transport)
        await page.click("#watch")
        await wait_finished(page, ids)
        log = await page.text_content("#log")
        expected = {"": "SSE: live", "ws": "WebSocket: live", "poll": "polling every"}[transport]
        assert expected in log and "unavailable" not in log, log
        await screenshot(page, f"example-{transport or 'auto'}.png")
    finally:
        await gateway.stop()
