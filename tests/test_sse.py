"""Server-Sent Events over a real gateway and a real redis-server: `/tasks/{id}/events` and
`/events?task_id=..`, with a small SSE parser of our own (tests/sse_client.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, run_gateway
from tests.sse_client import (
    Follower,
    metric,
    numsub,
    read_metric,
    read_stream,
    stream_problems,
    wait_for_metric,
)

NOT_FOUND = {"code": 404, "msg": "task not found", "data": None}
INT_PARSING_MSG = "Input should be a valid integer, unable to parse string as an integer"
OPEN_SSE = ("taskcast_open_connections", {"transport": "sse"})
BOUND_S = 20  # only against hangs


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        yield http


async def drive(producer: Producer, task_id: int, *, steps: int = 5, fail: bool = False,
                pause_s: float = 0.01, image: bytes | None = None) -> None:
    """submitted -> processing with rising progress -> completed (or failed)."""
    for step in range(1, steps + 1):
        await producer.progress(task_id, step * 100 // (steps + 1))
        await asyncio.sleep(pause_s)
    if fail:
        await producer.fail(task_id, f"worker crashed on {task_id}")
    else:
        await producer.complete(task_id, image_url=f"https://cdn.example/{task_id}.png",
                                image_base64=image)


def assert_sse_headers(response_headers: httpx.Headers | None) -> None:
    assert response_headers is not None
    assert response_headers["content-type"].startswith("text/event-stream")
    assert response_headers["cache-control"] == "no-store"
    assert response_headers["x-accel-buffering"] == "no"


async def get(client: httpx.AsyncClient, path: str, **kwargs: Any) -> httpx.Response:
    async with asyncio.timeout(BOUND_S):
        return await client.get(path, **kwargs)


# --- one task ---------------------------------------------------------------------------------


async def test_finished_task_sends_its_final_state_and_the_stream_ends(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create(type="txt2img", angle="front")
    await producer.progress(task.task_id, 50)
    final = await producer.complete(task.task_id, image_url="https://cdn.example/a.png",
                                    image_base64=b"\x89PNG...")

    transcript = await read_stream(client, f"/tasks/{task.task_id}/events", timeout=BOUND_S)

    assert stream_problems(transcript, [task.task_id]) == []
    assert_sse_headers(transcript.headers)
    assert transcript.frames[0].retry == 2000 and transcript.frames[0].data_lines  # one block
    assert transcript.tasks() == [{
        "task_id": task.task_id, "status": "completed", "progress": 100, "type": "txt2img",
        "angle": "front",
        "image": {"image_base64": base64.b64encode(b"\x89PNG...").decode(),
                  "image_url": "https://cdn.example/a.png"},
        "error_message": "", "version": final.version, "updated_at": final.updated_at,
    }]
    assert transcript.task_frames()[0].id == str(final.version)


async def test_failed_task_carries_its_error_message(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create(type="txt2img")
    failed = await producer.fail(task.task_id, "out of GPU memory")

    transcript = await read_stream(client, f"/tasks/{task.task_id}/events", timeout=BOUND_S)

    assert stream_problems(transcript, [task.task_id]) == []
    [state] = transcript.tasks()
    assert state["status"] == "failed"
    assert state["error_message"] == "out of GPU memory"
    assert state["version"] == failed.version
    assert state["image"] == {"image_base64": "", "image_url": ""}


async def test_live_task_streams_strictly_newer_versions_up_to_the_terminal_state(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create(type="txt2img")
    path = f"/tasks/{task.task_id}/events"
    followers = [Follower(client, path, expect=[task.task_id]).start() for _ in range(3)]
    async with asyncio.timeout(BOUND_S):
        for follower in followers:
            await follower.ready.wait()  # the current state arrives without any change

    await drive(producer, task.task_id, steps=9)

    for follower in followers:
        transcript = await follower.result(BOUND_S)
        assert stream_problems(transcript, [task.task_id]) == []
        states = transcript.tasks()
        assert (states[0]["version"], states[0]["status"]) == (1, "submitted")
        assert (states[-1]["version"], states[-1]["status"]) == (11, "completed")
        versions = [s["version"] for s in states]
        assert len(versions) == len(set(versions))
        progress = [s["progress"] for s in states]
        assert progress == sorted(progress)


async def test_last_event_id_resumes_with_newer_versions_only(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    for progress in (10, 20, 30):
        await producer.progress(task.task_id, progress)  # now at version 4
    path = f"/tasks/{task.task_id}/events"

    # Behind: the current state (v4) at once, then the rest.
    behind = Follower(client, path, headers={"Last-Event-ID": "2"}, expect=[task.task_id])
    # Up to date: nothing until the next change.
    current = Follower(client, path, headers={"Last-Event-ID": "4"})
    # Not a version: ignored, as if absent.
    garbage = Follower(client, path, headers={"Last-Event-ID": "abc"}, expect=[task.task_id])
    # Above any version the task had: not one of its ids, so also from the current state.
    ahead = Follower(client, path, headers={"Last-Event-ID": "50"}, expect=[task.task_id])
    for follower in (behind, current, garbage, ahead):
        follower.start()
    async with asyncio.timeout(BOUND_S):
        for follower in (behind, garbage, ahead, current):
            await follower.ready.wait()
        await current.connected.wait()
    for follower in (behind, garbage, ahead):
        assert [s["version"] for s in follower.transcript.tasks()] == [4]
    assert current.transcript.tasks() == []

    await producer.progress(task.task_id, 60)  # v5
    final = await producer.complete(task.task_id, image_url="https://cdn.example/x.png")  # v6

    for follower in (behind, current, garbage, ahead):
        transcript = await follower.result(BOUND_S)
        assert stream_problems(transcript, [task.task_id]) == []
        versions = [s["version"] for s in transcript.tasks()]
        assert versions[-1] == final.version
        if follower in (behind, current):
            floor = int(follower.headers["Last-Event-ID"])
            assert all(v > floor for v in versions), versions


async def test_last_event_id_of_the_terminal_state_gets_204(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    await producer.progress(task.task_id, 30)
    final = await producer.complete(task.task_id, image_url="https://cdn.example/x.png")
    path = f"/tasks/{task.task_id}/events"

    response = await get(client, path, headers={"Last-Event-ID": str(final.version)})
    assert response.status_code == 204, response.text
    assert response.content == b""

    # One version before the terminal one: exactly the terminal state, then the end. An id
    # above any version the task had is not one of its ids: the stream starts from scratch.
    for seen in (final.version - 1, final.version + 5):
        transcript = await read_stream(client, path, timeout=BOUND_S,
                                       headers={"Last-Event-ID": str(seen)})
        assert stream_problems(transcript, [task.task_id]) == []
        assert [s["version"] for s in transcript.tasks()] == [final.version]


async def test_image_base64_false_leaves_the_image_out_of_every_event(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    image = b"\x00\x01" * 5000
    follower = Follower(client, f"/tasks/{task.task_id}/events?image_base64=false",
                        expect=[task.task_id]).start()
    full = Follower(client, f"/tasks/{task.task_id}/events", expect=[task.task_id]).start()
    async with asyncio.timeout(BOUND_S):
        await follower.ready.wait()
        await full.ready.wait()
    await drive(producer, task.task_id, steps=2, image=image)

    trimmed = await follower.result(BOUND_S)
    assert stream_problems(trimmed, [task.task_id]) == []
    last = trimmed.tasks()[-1]
    assert last["status"] == "completed"
    assert last["image"] == {"image_base64": "",
                             "image_url": f"https://cdn.example/{task.task_id}.png"}
    assert all(s["image"]["image_base64"] == "" for s in trimmed.tasks())

    # The same version with the image, on the other connection.
    untrimmed = await full.result(BOUND_S)
    assert untrimmed.tasks()[-1]["image"]["image_base64"] == base64.b64encode(image).decode()
    assert untrimmed.tasks()[-1]["version"] == last["version"]


async def test_keep_alive_comments_while_the_task_is_quiet(
    redis_server: RedisServer, prefix: str, producer: Producer
) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=prefix, sse_keepalive_s=0.2,
                        sse_retry_ms=1234)
    task = await producer.create()

    def two_keepalives(_frame: Any, transcript: Any) -> bool:
        return bool(transcript.keepalives() >= 2)

    async with run_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        quiet = Follower(http, f"/tasks/{task.task_id}/events", stop_when=two_keepalives).start()
        transcript = await quiet.result(BOUND_S)
        assert transcript.frames[0].retry == 1234
        assert [s["version"] for s in transcript.tasks()] == [1]
        assert transcript.keepalives() == 2
        comments = [f for f in transcript.frames if f.comments]
        assert all(f.comments == ["keep-alive"] and f.is_keepalive for f in comments)

        # Keep-alives around live events do not disturb them.
        live = Follower(http, f"/tasks/{task.task_id}/events", expect=[task.task_id]).start()
        async with asyncio.timeout(BOUND_S):
            await live.ready.wait()
        await drive(producer, task.task_id, steps=3, pause_s=0.3)
        live_transcript = await live.result(BOUND_S)
        assert stream_problems(live_transcript, [task.task_id], retry_ms=1234) == []
        assert live_transcript.keepalives() >= 1


# --- errors -----------------------------------------------------------------------------------


async def test_unknown_task_gets_the_404_envelope(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    known = await producer.create()
    for path in ("/tasks/987654321/events", "/events?task_id=987654321",
                 f"/events?task_id={known.task_id}&task_id=987654321"):
        response = await get(client, path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json() == NOT_FOUND


def int_parsing(raw: str, loc: list[Any]) -> dict[str, Any]:
    return {"type": "int_parsing", "loc": loc, "msg": INT_PARSING_MSG, "input": raw}


@pytest.mark.parametrize(("path", "detail"), [
    ("/tasks/abc/events", int_parsing("abc", ["path", "task_id"])),
    ("/tasks/1.5/events", int_parsing("1.5", ["path", "task_id"])),
    ("/tasks/-3/events", {"type": "greater_than_equal", "loc": ["path", "task_id"],
                          "msg": "Input should be greater than or equal to 0", "input": "-3",
                          "ctx": {"ge": 0}}),
    ("/tasks/9223372036854775808/events",
     {"type": "less_than_equal", "loc": ["path", "task_id"],
      "msg": "Input should be less than or equal to 9223372036854775807",
      "input": "9223372036854775808", "ctx": {"le": 9223372036854775807}}),
    (f"/tasks/{'1' * 5000}/events",
     {"type": "less_than_equal", "loc": ["path", "task_id"],
      "msg": "Input should be less than or equal to 9223372036854775807",
      "input": "1" * 5000, "ctx": {"le": 9223372036854775807}}),
    (f"/events?task_id=1&task_id={'9' * 5000}",
     {"type": "less_than_equal", "loc": ["query", "task_id", 1],
      "msg": "Input should be less than or equal to 9223372036854775807",
      "input": "9" * 5000, "ctx": {"le": 9223372036854775807}}),
    ("/events?task_id=abc", int_parsing("abc", ["query", "task_id", 0])),
    ("/events?task_id=1&task_id=x7", int_parsing("x7", ["query", "task_id", 1])),
    ("/events?task_id=1,2,oops", int_parsing("oops", ["query", "task_id", 2])),
    ("/events", {"type": "missing", "loc": ["query", "task_id"], "msg": "Field required",
                 "input": None}),
    ("/tasks/1/events?image_base64=maybe",
     {"type": "bool_parsing", "loc": ["query", "image_base64"],
      "msg": "Input should be a valid boolean, unable to interpret input", "input": "maybe"}),
])
async def test_malformed_requests_get_a_422_as_in_rest(
    client: httpx.AsyncClient, path: str, detail: dict[str, Any]
) -> None:
    response = await get(client, path)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": [detail]}


async def test_too_many_tasks_on_one_stream_get_a_422(client: httpx.AsyncClient) -> None:
    ids = ",".join(str(task_id) for task_id in range(1, 1002))
    response = await get(client, f"/events?task_id={ids}")
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": [{
        "type": "too_long", "loc": ["query", "task_id"],
        "msg": "List should have at most 1000 items", "input": 1001,
        "ctx": {"max_length": 1000},
    }]}


async def test_garbage_on_the_channel_does_not_break_the_stream(
    client: httpx.AsyncClient, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    task = await producer.create()
    channel = TaskKeys(prefix).channel(task.task_id)
    follower = Follower(client, f"/tasks/{task.task_id}/events", expect=[task.task_id]).start()
    async with asyncio.timeout(BOUND_S):
        await follower.ready.wait()
    before = await read_metric(client, "taskcast_events_malformed_total") or 0

    # Not JSON; another task's state; a replay of the state the client already has.
    redis_server.cli("PUBLISH", channel, "not json")
    redis_server.cli("PUBLISH", channel, '{"task_id":999999,"status":"completed","version":9}')
    redis_server.cli("PUBLISH", channel, task.to_json().decode())
    await wait_for_metric(client, "taskcast_events_malformed_total", lambda v: v >= before + 2)
    await drive(producer, task.task_id, steps=2)

    transcript = await follower.result(BOUND_S)
    assert stream_problems(transcript, [task.task_id]) == []
    assert [s["version"] for s in transcript.tasks()][0] == 1
    assert transcript.tasks()[-1]["version"] == 4


# --- many tasks on one connection -------------------------------------------------------------


async def test_multi_task_stream_of_50_tasks_driven_concurrently(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    tasks = [await producer.create(type="txt2img", angle=str(i)) for i in range(50)]
    ids = [task.task_id for task in tasks]
    half = len(ids) // 2
    # Both spellings of the list: repeated parameters and a comma-separated value.
    path = ("/events?" + "&".join(f"task_id={i}" for i in ids[:half])
            + "&task_id=" + ",".join(str(i) for i in ids[half:]))
    follower = Follower(client, path, expect=ids).start()
    async with asyncio.timeout(BOUND_S):
        await follower.ready.wait()
    assert_sse_headers(follower.transcript.headers)

    async with asyncio.timeout(BOUND_S):
        await asyncio.gather(*(
            drive(producer, task_id, steps=4, fail=index % 7 == 0, pause_s=0.005)
            for index, task_id in enumerate(ids)
        ))

    transcript = await follower.result(BOUND_S)
    assert stream_problems(transcript, ids, multi=True) == []
    last_states = {task_id: states[-1] for task_id, states in transcript.by_task().items()}
    for index, task_id in enumerate(ids):
        expected = "failed" if index % 7 == 0 else "completed"
        assert last_states[task_id]["status"] == expected
        assert last_states[task_id]["version"] == 6  # create, 4 progress steps, terminal

    response = await get(client, path, headers={"Last-Event-ID": "done"})
    assert response.status_code == 204
    assert response.content == b""


async def test_multi_task_stream_of_finished_tasks_ends_at_once(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    first, second = await producer.create(), await producer.create()
    await producer.complete(first.task_id, image_url="https://cdn.example/1.png",
                            image_base64=b"image bytes")
    await producer.fail(second.task_id, "nope")
    # A repeated id is watched once.
    path = f"/events?task_id={first.task_id},{second.task_id}&task_id={first.task_id}"

    transcript = await read_stream(client, path, timeout=BOUND_S)

    assert stream_problems(transcript, [first.task_id, second.task_id], multi=True) == []
    assert sorted(s["task_id"] for s in transcript.tasks()) == sorted(
        [first.task_id, second.task_id])
    assert transcript.by_task()[first.task_id][0]["image"]["image_base64"] != ""

    trimmed = await read_stream(client, path + "&image_base64=false", timeout=BOUND_S)
    assert stream_problems(trimmed, [first.task_id, second.task_id], multi=True) == []
    assert trimmed.by_task()[first.task_id][0]["image"] == {
        "image_base64": "", "image_url": "https://cdn.example/1.png"}


# --- resources --------------------------------------------------------------------------------


async def test_subscriptions_are_released_when_all_clients_leave(
    client: httpx.AsyncClient, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    tasks = [await producer.create() for _ in range(6)]
    ids = [task.task_id for task in tasks]
    channels = [TaskKeys(prefix).channel(task_id) for task_id in ids]
    multi = Follower(client, "/events?task_id=" + ",".join(map(str, ids)), expect=ids).start()
    singles = [Follower(client, f"/tasks/{i}/events", expect=[i]).start() for i in ids]
    async with asyncio.timeout(BOUND_S):
        for follower in (multi, *singles):
            await follower.ready.wait()
        # One subscription per task for the whole process, however many clients.
        assert numsub(redis_server.cli, channels) == dict.fromkeys(channels, 1)

    # Half the tasks finish (their streams end), the other clients just go away.
    for task_id in ids[:3]:
        await producer.complete(task_id, image_url="https://cdn.example/x.png")
    for follower in singles[:3]:
        transcript = await follower.result(BOUND_S)
        assert stream_problems(transcript, [transcript.tasks()[0]["task_id"]]) == []
    for follower in (multi, *singles[3:]):
        await follower.stop()

    counts: dict[str, int] = {}
    try:
        async with asyncio.timeout(BOUND_S):
            while True:
                counts = numsub(redis_server.cli, channels)
                if not any(counts.values()):
                    break
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"subscriptions left behind: {counts}") from None
    await wait_for_metric(client, "taskcast_watched_tasks", lambda v: v == 0)
    await wait_for_metric(client, "taskcast_redis_subscriptions", lambda v: v == 0)


async def test_open_connections_metric_follows_open_streams(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    name, labels = OPEN_SSE
    assert (await read_metric(client, name, **labels) or 0) == 0
    task = await producer.create()
    path = f"/tasks/{task.task_id}/events"

    # A client that goes away.
    leaving = Follower(client, path, expect=[task.task_id]).start()
    async with asyncio.timeout(BOUND_S):
        await leaving.ready.wait()
    assert await read_metric(client, name, **labels) == 1
    await leaving.stop()
    await wait_for_metric(client, name, lambda v: v == 0, **labels)

    # Streams the server ends.
    staying = [Follower(client, path, expect=[task.task_id]).start() for _ in range(3)]
    async with asyncio.timeout(BOUND_S):
        for follower in staying:
            await follower.ready.wait()
    assert await read_metric(client, name, **labels) == 3
    await drive(producer, task.task_id, steps=1)
    for follower in staying:
        assert stream_problems(await follower.result(BOUND_S), [task.task_id]) == []
    await wait_for_metric(client, name, lambda v: v == 0, **labels)
    response = await get(client, "/metrics")
    assert (metric(response.text, "taskcast_messages_delivered_total", transport="sse")
            or 0) >= 3 * 3


async def test_the_plain_httpx_sse_loop_gets_only_events_with_data(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    """Issue 13: every stream began with a `retry:`-only block, which httpx-sse (like other
    generic parsers) yields as an event with empty data, so `json.loads(event.data)` failed
    on the first event. The hint now rides in the first event. Checked on a fresh connect, on
    /events, and on a reconnect whose Last-Event-ID is the current version (keep-alives and
    nothing else until the next change)."""
    task = await producer.create(type="txt2img", angle="front")
    await producer.progress(task.task_id, 30)

    async def states(path: str, headers: dict[str, str] | None = None,
                     until: int = 3) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(BOUND_S), aconnect_sse(
                client, "GET", path, headers=dict(headers or {})) as source:
            async for event in source.aiter_sse():
                if event.event == "end":
                    break
                got.append(json.loads(event.data))  # what failed on the retry-only block
                if got[-1]["version"] >= until:
                    break
        return got

    fresh = await states(f"/tasks/{task.task_id}/events", until=2)
    many = await states(f"/events?task_id={task.task_id}", until=2)
    assert [s["version"] for s in fresh] == [s["version"] for s in many] == [2]
    resumed = asyncio.create_task(states(f"/tasks/{task.task_id}/events",
                                         headers={"Last-Event-ID": "2"}))
    await asyncio.sleep(0.3)  # connected, with nothing to send yet
    done = await producer.complete(task.task_id, image_url="https://cdn.example/x.png")
    assert [s["version"] for s in await resumed] == [done.version]


async def test_keep_alives_between_events_are_no_events_to_httpx_sse(
    settings: Settings, producer: Producer
) -> None:
    """Issue 13: a keep-alive sent as a comment-only block after an event reaches httpx-sse as
    an event with empty data (it keeps the last event id), so the plain loop broke after the
    first quiet spell. Keep-alives are now comment lines that do not end a block."""
    task = await producer.create(type="txt2img", angle="front")
    quick = settings.with_changes(sse_keepalive_s=0.05)
    async with run_gateway(quick) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        got: list[int] = []

        async def follow() -> None:
            async with asyncio.timeout(BOUND_S), aconnect_sse(
                    http, "GET", f"/tasks/{task.task_id}/events") as source:
                async for event in source.aiter_sse():
                    got.append(json.loads(event.data)["version"])  # failed on "" before

        following = asyncio.create_task(follow())
        for progress in (30, 60):
            await asyncio.sleep(0.4)  # several keep-alives in between
            await producer.progress(task.task_id, progress)
        await asyncio.sleep(0.4)
        done = await producer.complete(task.task_id, image_url="https://cdn.example/x.png")
        await following
    assert got == [1, 2, 3, done.version]
