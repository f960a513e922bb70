"""Access tokens in a real browser (contract section 7): taskcast.js's `token` and `onForbidden`
options and the demo page, in Debian's Chromium driven by Playwright, against real gateways
with a key (in this process, `create_app(..., demo=True)`) on a real redis-server.

Covered: the demo page with access control on completes tasks over SSE, WebSocket and REST
polling, its images loaded from the gateway with `?token=`; tokens that expire mid-task (1 s
lifetime, tasks of several seconds) are renewed through the page's token function on each
transport, the bars still complete, and each terminal state is rendered exactly once; a string
token that does not name a task reports it to `onForbidden`; without a token the client cannot
read a task and says why; a refused string token stops the watch; a token function that keeps
returning a bad token backs off instead of looping; with access control off the demo needs no
token. Every wait is bounded (WAIT_MS); nothing is asserted about how long things take.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from taskcast.settings import Settings
from taskcast.tokens import issue
from tests.servers import Gateway, RedisServer, run_gateway
from tests.test_browser import (
    ALL_FINISHED,
    CHROMIUM,
    CHROMIUM_ARGS,
    RECORD_VERSIONS,
    WAIT_MS,
    assert_versions_only_rise,
    card,
    playwright_api,
    screenshot,
    status_log,
)

SECRET = "x" * 48
_prefixes = itertools.count()
MODES = ["sse", "ws", "poll"]

# Counts, per task, how often the page set a terminal data-status (a record's new value is the
# next record's oldValue for the same element, or the current value for the last one).
RECORD_TERMINAL = """
window.__terminal = {};
new MutationObserver((records) => {
  records.forEach((record, index) => {
    const later = records.slice(index + 1).find((other) => other.target === record.target);
    const value = later ? later.oldValue : record.target.dataset.status;
    if (value === 'completed' || value === 'failed') {
      const id = record.target.dataset.taskId;
      window.__terminal[id] = (window.__terminal[id] || 0) + 1;
    }
  });
}).observe(document, { subtree: true, attributes: true, attributeOldValue: true,
                       attributeFilter: ['data-status'] });
"""

# watch() in the page with the given options; resolves with what the callbacks saw once the
# watch is done. `token` may be a string, or 'bad-function' for a function that counts its calls
# and always returns a malformed token.
WATCH_IN_PAGE = """async ([ids, options]) => {
  const { watch } = await import('/taskcast.js');
  const seen = { updates: [], forbidden: [], missing: [], statuses: [], tokenCalls: 0 };
  window.__seen = seen;
  if (options.token === 'bad-function') {
    options.token = async () => { seen.tokenCalls += 1; return 'not-a-jwt'; };
  }
  const handle = watch(ids, (task) => seen.updates.push(task), {
    ...options,
    onStatus: (text) => seen.statuses.push(text),
    onForbidden: (refused) => seen.forbidden.push(...refused),
    onNotFound: (gone) => seen.missing.push(...gone),
  });
  window.__handle = handle;
  await handle.done;
  return seen;
}"""


def auth_settings(redis_server: RedisServer, step_s: float) -> Settings:
    return Settings(redis_url=redis_server.url, prefix=f"ta{next(_prefixes)}",
                    jwt_secret=SECRET, jwt_leeway_s=0, demo_step_s=step_s,
                    graceful_shutdown_s=1)


@pytest.fixture(scope="module")
async def fast(redis_server: RedisServer) -> AsyncIterator[Gateway]:
    """A demo gateway with a key whose tasks finish in well under a second."""
    async with run_gateway(auth_settings(redis_server, 0.05), demo=True) as gateway:
        yield gateway


@pytest.fixture(scope="module")
async def slow(redis_server: RedisServer) -> AsyncIterator[Gateway]:
    """A demo gateway with a key whose tasks last several seconds: at least 3 steps of
    0.8 s * [0.5, 1.5] (4+ progress steps of 8..24 % to reach 90, after a first whole step),
    so longer than any 1 s token (`exp` rounds up: it lives at most 2 s)."""
    async with run_gateway(auth_settings(redis_server, 0.8), demo=True) as gateway:
        yield gateway


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
    await page.add_init_script(RECORD_TERMINAL)
    yield page
    await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


async def start_demo_tasks(page: Any, count: int, mode: str) -> tuple[list[int], str]:
    """Fill in the demo form, press Start; the ids and the token POST /demo/tasks answered."""
    await page.fill("#count", str(count))
    await page.check(f"#mode-{mode}")
    async with page.expect_response("**/demo/tasks") as answer:
        await page.click("#start")
    response = await answer.value
    assert response.status == 201
    data = (await response.json())["data"]
    assert len(data["task_ids"]) == count and isinstance(data["token"], str)
    return data["task_ids"], data["token"]


async def wait_completed(page: Any, ids: list[int]) -> None:
    """Every card completed, its bar at 100 % and its image decoded by the browser."""
    await page.wait_for_function(ALL_FINISHED, arg=[ids, "completed"], timeout=WAIT_MS)


async def watch_in_page(page: Any, ids: list[int], options: dict[str, Any]) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_MS / 1000):
        seen: dict[str, Any] = await page.evaluate(WATCH_IN_PAGE, [ids, options])
    return seen


async def create_tasks(gateway: Gateway, count: int = 1) -> tuple[list[int], str]:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        created = await client.post("/demo/tasks", json={"count": count})
    assert created.status_code == 201
    data = created.json()["data"]
    return data["task_ids"], data["token"]


async def assert_each_terminal_rendered_once(page: Any, ids: list[int]) -> None:
    terminal: dict[str, int] = await page.evaluate("window.__terminal")
    assert {task_id: terminal.get(str(task_id)) for task_id in ids} == dict.fromkeys(ids, 1)


# -- the demo page with access control on -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_demo_with_tokens_completes_tasks_and_shows_images(
    page: Any, fast: Gateway, mode: str
) -> None:
    """imageBase64=false: the page loads each PNG from /demo/images/{id}.png?token=..."""
    await page.goto(f"{fast.url}/?mode={mode}&pollIntervalMs=200&imageBase64=false")
    ids, token = await start_demo_tasks(page, 3, mode)
    await wait_completed(page, ids)
    for task_id in ids:
        shown = await card(page, task_id)
        assert (shown["transport"], shown["percent"], shown["images"]) == (mode, "100%", 1)
        src = await page.get_attribute(f'[data-task-id="{task_id}"] img', "src")
        assert src == f"{fast.url}/demo/images/{task_id}.png?token={token}"
    await assert_versions_only_rise(page, ids)
    await assert_each_terminal_rendered_once(page, ids)
    log = await status_log(page)
    assert not any("falling back" in line or "unauthorized" in line for line in log), log
    assert await page.evaluate("window.taskcastDemo.tokenCalls") == 1  # no refresh needed
    async with httpx.AsyncClient(base_url=fast.url) as client:  # the images need the token
        assert (await client.get(f"/demo/images/{ids[0]}.png")).status_code == 401
    await screenshot(page, f"auth-demo-{mode}.png")


@pytest.mark.parametrize("mode", MODES)
async def test_tokens_expiring_mid_task_are_renewed(page: Any, slow: Gateway, mode: str) -> None:
    """1 s tokens, tasks of several seconds: the gateway refuses the token mid-task (SSE
    `token_expired`, WebSocket close 4401, a poll's 401), the page's token function asks
    POST /demo/tokens for another, the same transport reconnects, nothing is lost or repeated."""
    await page.goto(f"{slow.url}/?mode={mode}&pollIntervalMs=200&tokenTtlS=1")
    ids, _ = await start_demo_tasks(page, 2, mode)
    await wait_completed(page, ids)
    for task_id in ids:
        assert (await card(page, task_id))["transport"] == mode  # no fallback
    await assert_versions_only_rise(page, ids)
    await assert_each_terminal_rendered_once(page, ids)
    calls, refreshes = await page.evaluate(
        "[window.taskcastDemo.tokenCalls, window.taskcastDemo.tokenRefreshes]")
    assert calls > 1 and refreshes >= 1, (calls, refreshes)
    log = await status_log(page)
    assert any("refreshing the token" in line for line in log), log
    assert any(": token refreshed (1)" in line for line in log), log
    assert not any("falling back" in line for line in log), log
    assert log[-1].endswith("all tasks finished"), log
    assert "token refreshed" in await page.text_content("#transport-status")
    await screenshot(page, f"auth-token-refreshed-{mode}.png")


async def test_demo_without_access_control_uses_no_token(
    page: Any, redis_server: RedisServer
) -> None:
    """TASKCAST_AUTH=off: POST /demo/tasks answers token null, and the page watches (and
    loads images) without one."""
    settings = auth_settings(redis_server, 0.05).with_changes(auth="off")
    async with run_gateway(settings, demo=True) as gateway:
        await page.goto(f"{gateway.url}/?imageBase64=false")
        await page.fill("#count", "2")
        async with page.expect_response("**/demo/tasks") as answer:
            await page.click("#start")
        data = (await (await answer.value).json())["data"]
        assert data["token"] is None
        await wait_completed(page, data["task_ids"])
        for task_id in data["task_ids"]:
            src = await page.get_attribute(f'[data-task-id="{task_id}"] img', "src")
            assert src == f"/demo/images/{task_id}.png"
        assert await page.evaluate("window.taskcastDemo.tokenCalls") == 0
        await page.close()  # before the gateway stops


# -- the client library: refusals ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_token_for_another_task_reports_it_forbidden(
    page: Any, fast: Gateway, mode: str
) -> None:
    """A string token naming `mine` only: `theirs` goes to onForbidden (over SSE the client
    finds it with per-task HEAD requests), `mine` is still watched to completion."""
    [mine], token = await create_tasks(fast)
    [theirs], _ = await create_tasks(fast)
    await page.goto(fast.url)
    seen = await watch_in_page(page, [mine, theirs], {"transport": mode, "token": token})
    assert seen["forbidden"] == [theirs] and seen["missing"] == []
    assert {task["task_id"] for task in seen["updates"]} == {mine}
    terminal = [task for task in seen["updates"] if task["status"] in ("completed", "failed")]
    assert [task["status"] for task in terminal] == ["completed"]
    versions = [task["version"] for task in seen["updates"]]
    assert versions == sorted(set(versions))
    assert not any("falling back" in text for text in seen["statuses"]), seen["statuses"]


@pytest.mark.parametrize("mode", [None, "ws", "poll"])
async def test_without_a_token_the_client_cannot_read_and_says_why(
    page: Any, fast: Gateway, mode: str | None
) -> None:
    """No token against a gateway with a key: 401 (over SSE learnt from the HEAD probe), which
    a missing token cannot fix: the client says so and stops, without falling back."""
    [task_id], _ = await create_tasks(fast)
    await page.goto(fast.url)
    seen = await watch_in_page(page, [task_id], {"transport": mode})
    assert seen["updates"] == [] and seen["forbidden"] == [] and seen["missing"] == []
    last = seen["statuses"][-1]
    expected = {None: "SSE", "ws": "WebSocket", "poll": "REST polling"}[mode]
    assert last.startswith(f"{expected}: unauthorized"), seen["statuses"]
    assert "needs an access token" in last
    assert not any("falling back" in text for text in seen["statuses"]), seen["statuses"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_refused_string_token_stops_the_watch(
    page: Any, fast: Gateway, mode: str
) -> None:
    [task_id], _ = await create_tasks(fast)
    expired = issue(SECRET, [task_id], 1, now=0)  # expired in 1970
    await page.goto(fast.url)
    seen = await watch_in_page(page, [task_id], {"transport": mode, "token": expired})
    assert seen["updates"] == []
    assert "the token was refused and cannot be renewed" in seen["statuses"][-1], seen["statuses"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_token_function_that_keeps_failing_backs_off(
    page: Any, fast: Gateway, mode: str
) -> None:
    """A bad token: one immediate renewal, then the backoff (10 s here, longer than any bounded
    wait below), not a loop of calls."""
    [task_id], _ = await create_tasks(fast)
    await page.goto(fast.url)
    options = {"transport": None if mode == "sse" else mode, "token": "bad-function",
               "minBackoffMs": 10_000, "maxBackoffMs": 10_000}
    # Not awaited in the page: the watch goes on (backing off) until the test closes it.
    await page.evaluate(f"(args) => {{ ({WATCH_IN_PAGE})(args); }}", [[task_id], options])
    await page.wait_for_function(
        "() => window.__seen?.statuses.some((text) => text.includes('reconnecting in'))")
    seen = await page.evaluate("window.__seen")
    assert seen["tokenCalls"] == 2, seen  # the first call and one renewal, then a backoff
    assert any("refreshing the token" in text for text in seen["statuses"]), seen["statuses"]
    assert "again after a token refresh" in seen["statuses"][-1], seen["statuses"]
    assert not any("falling back" in text for text in seen["statuses"]), seen["statuses"]
    await page.evaluate("window.__handle.close()")
