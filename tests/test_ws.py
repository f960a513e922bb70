"""The WebSocket transport (`/ws`, `/tasks/{task_id}/ws`) over a real gateway and redis-server.

What is checked is the delivery guarantee of hub.py as a client sees it: per task the current
state first, then only strictly newer versions, never a duplicate, and always the terminal state;
plus the per-task socket's close codes and the release of Redis subscriptions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from taskcast.connection import connect as redis_connect
from taskcast.keys import TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, run_gateway

Frame = dict[str, Any]
BOUND_S = 10.0
TERMINAL = ("completed", "failed")
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


# -- helpers (test_ws_abuse.py imports these too) ------------------------------------------------


def ws_connect(gateway: Gateway, path: str = "/ws", **options: Any) -> Any:
    """A client for the gateway; final frames may carry a base64 image, so no size limit."""
    options.setdefault("max_size", None)
    return connect(gateway.ws_url + path, proxy=None, open_timeout=BOUND_S,
                   close_timeout=BOUND_S, **options)


async def send(ws: ClientConnection, frame: Any) -> None:
    async with asyncio.timeout(BOUND_S):
        await ws.send(orjson.dumps(frame).decode())


async def recv(ws: ClientConnection, bound_s: float = BOUND_S) -> Frame:
    async with asyncio.timeout(bound_s):
        message = await ws.recv()
    assert isinstance(message, str), "the gateway sends JSON text frames only"
    frame: Frame = orjson.loads(message)
    return frame


async def frames_before_pong(ws: ClientConnection) -> list[Frame]:
    """A ping round trip: every frame the gateway sent before answering it."""
    await send(ws, {"op": "ping"})
    frames = []
    while (frame := await recv(ws))["type"] != "pong":
        frames.append(frame)
    return frames


async def close_code(ws: ClientConnection, bound_s: float = BOUND_S) -> int | None:
    """Read until the gateway closes; the close code it sent (frames before it are dropped)."""
    async with asyncio.timeout(bound_s):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, f"closed without a close frame: {exc!r}"
            return exc.rcvd.code


async def subscribe(ws: ClientConnection, task_ids: list[int]) -> None:
    await send(ws, {"op": "subscribe", "task_ids": task_ids})
    assert await recv(ws) == {"type": "subscribed", "task_ids": task_ids}


async def numsub(server: RedisServer, prefix: str, task_id: int) -> int:
    """How many connections Redis has subscribed to the task's channel (the gateway's one)."""
    out = await asyncio.to_thread(server.cli, "PUBSUB", "NUMSUB", TaskKeys(prefix).channel(task_id))
    return int(out.split()[-1])


async def wait_numsub(server: RedisServer, prefix: str, task_id: int, expected: int) -> None:
    async with asyncio.timeout(BOUND_S):
        while await numsub(server, prefix, task_id) != expected:
            await asyncio.sleep(0.05)


async def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent)."""
    async with asyncio.timeout(BOUND_S), httpx.AsyncClient() as client:
        response = await client.get(gateway.url + "/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


class Tracker:
    """Task frames one socket received, checked against the delivery guarantee as they come."""

    def __init__(self) -> None:
        self.versions: dict[int, list[int]] = defaultdict(list)
        self.terminal: dict[int, Frame] = {}
        self.states: list[Frame] = []

    def add(self, frame: Frame) -> Frame:
        assert frame["type"] == "task", frame
        data: Frame = frame["data"]
        task_id, version = data["task_id"], data["version"]
        seen = self.versions[task_id]
        assert task_id not in self.terminal, f"task {task_id}: a state after its terminal state"
        assert not seen or version > seen[-1], f"task {task_id}: version {version} after {seen}"
        seen.append(version)
        self.states.append(data)
        if data["status"] in TERMINAL:
            self.terminal[task_id] = data
        return data

    async def until_terminal(self, ws: ClientConnection, task_ids: list[int],
                             bound_s: float = 30.0) -> None:
        async with asyncio.timeout(bound_s):
            while not set(task_ids) <= self.terminal.keys():
                self.add(await recv(ws))


async def drive(producer: Producer, task_id: int, *, fail: bool = False) -> list[Task]:
    """Progress a task to its end; every state the script wrote, in order."""
    states = [await producer.progress(task_id, progress) for progress in (10, 45, 80)]
    if fail:
        states.append(await producer.fail(task_id, f"task {task_id} broke"))
    else:
        states.append(await producer.complete(
            task_id, image_url=f"https://cdn.example/{task_id}.png", image_base64=IMAGE))
    return states


# -- /ws: delivery ----------------------------------------------------------------------------


async def test_a_hundred_tasks_on_one_socket_each_reach_their_terminal_state_in_order(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    created = [await producer.create(type="txt2img", angle=f"a{n}") for n in range(100)]
    task_ids = [task.task_id for task in created]
    written: dict[tuple[int, int], Frame] = {(t.task_id, t.version): t.to_dict() for t in created}
    tracker = Tracker()
    async with ws_connect(gateway) as ws:
        await subscribe(ws, task_ids)
        reader = asyncio.create_task(tracker.until_terminal(ws, task_ids, bound_s=60))
        async with asyncio.timeout(60):
            runs = await asyncio.gather(*(
                drive(producer, task_id, fail=n % 10 == 3) for n, task_id in enumerate(task_ids)
            ))
            await reader
        assert await frames_before_pong(ws) == []  # nothing after the terminal states

    for states in runs:
        written.update({(t.task_id, t.version): t.to_dict() for t in states})
    # Every frame is exactly a state the script wrote (no invented or mixed-up states) ...
    for data in tracker.states:
        assert written[data["task_id"], data["version"]] == data
    # ... each task's terminal state arrived, and it is the last one written.
    for task_id, states in zip(task_ids, runs, strict=True):
        assert tracker.terminal[task_id] == states[-1].to_dict()
    assert sum(1 for s in tracker.terminal.values() if s["status"] == "failed") == 10
    completed = next(s for s in tracker.terminal.values() if s["status"] == "completed")
    assert completed["image"]["image_base64"]  # included unless the client opts out
    # Terminal states release the Redis subscriptions of every task.
    for task_id in (task_ids[0], task_ids[50], task_ids[-1]):
        await wait_numsub(redis_server, prefix, task_id, 0)
    async with asyncio.timeout(BOUND_S):
        while await metric(gateway, "taskcast_watched_tasks") != 0:
            await asyncio.sleep(0.05)


async def test_subscribing_to_a_finished_task_gives_its_terminal_state_once(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    task = await producer.create(type="txt2img", angle="front")
    final = (await drive(producer, task.task_id))[-1]
    async with ws_connect(gateway) as ws:
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": final.to_dict()}
        assert await frames_before_pong(ws) == []
        await wait_numsub(redis_server, prefix, task.task_id, 0)
        assert await frames_before_pong(ws) == []


async def test_a_second_socket_on_a_finished_task_also_gets_the_terminal_state(
    gateway: Gateway, producer: Producer
) -> None:
    """The hub may still hold the task's state from the first watcher: it must be offered."""
    task = await producer.create()
    final = await producer.fail(task.task_id, "out of memory")
    async with ws_connect(gateway) as first, ws_connect(gateway) as second:
        await subscribe(first, [task.task_id])
        await subscribe(second, [task.task_id])
        for ws in (first, second):
            assert await recv(ws) == {"type": "task", "data": final.to_dict()}
            assert await frames_before_pong(ws) == []


async def test_unknown_tasks_get_a_404_error_frame_and_the_known_ones_subscribe(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    known = [(await producer.create()).task_id for _ in range(2)]
    unknown = [9_000_000_001, 9_000_000_002]
    async with ws_connect(gateway) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [known[0], unknown[0], known[1],
                                                         unknown[1]]})
        frames = [await recv(ws), await recv(ws)]
        errors = [f for f in frames if f["type"] == "error"]
        assert len(errors) == 1, frames
        assert errors[0]["code"] == 404
        assert errors[0]["task_ids"] == unknown
        assert isinstance(errors[0]["msg"], str) and errors[0]["msg"]
        assert {"type": "subscribed", "task_ids": known} in frames

        tracker = Tracker()
        tracker.add(await recv(ws))
        tracker.add(await recv(ws))
        assert {s["task_id"] for s in tracker.states} == set(known)
        runs = await asyncio.gather(*(drive(producer, task_id) for task_id in known))
        await tracker.until_terminal(ws, known)
        for task_id, states in zip(known, runs, strict=True):
            assert tracker.terminal[task_id] == states[-1].to_dict()
        assert await frames_before_pong(ws) == []
    for task_id in unknown:
        assert await numsub(redis_server, prefix, task_id) == 0


async def test_unsubscribe_stops_delivery_and_releases_the_redis_subscription(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    task = await producer.create()
    async with ws_connect(gateway) as ws:
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}
        await wait_numsub(redis_server, prefix, task.task_id, 1)

        await send(ws, {"op": "unsubscribe", "task_ids": [task.task_id]})
        assert await recv(ws) == {"type": "unsubscribed", "task_ids": [task.task_id]}
        await wait_numsub(redis_server, prefix, task.task_id, 0)

        await drive(producer, task.task_id)
        assert await frames_before_pong(ws) == []


async def test_two_sockets_on_one_task_unsubscribing_one_keeps_the_other_and_the_subscription(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    task = await producer.create()
    async with ws_connect(gateway) as leaving, ws_connect(gateway) as staying:
        for ws in (leaving, staying):
            await subscribe(ws, [task.task_id])
            assert await recv(ws) == {"type": "task", "data": task.to_dict()}
        await wait_numsub(redis_server, prefix, task.task_id, 1)

        await send(leaving, {"op": "unsubscribe", "task_ids": [task.task_id]})
        assert await recv(leaving) == {"type": "unsubscribed", "task_ids": [task.task_id]}
        assert await frames_before_pong(staying) == []  # the hub has seen the unsubscribe
        assert await numsub(redis_server, prefix, task.task_id) == 1

        # The staying socket receives the new states: by then the leaving one would have too.
        states = await drive(producer, task.task_id)
        tracker = Tracker()
        await tracker.until_terminal(staying, [task.task_id])
        assert tracker.terminal[task.task_id] == states[-1].to_dict()
        assert await frames_before_pong(leaving) == []
        await wait_numsub(redis_server, prefix, task.task_id, 0)


async def test_unsubscribing_then_subscribing_again_gives_the_current_state_again(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    async with ws_connect(gateway) as ws:
        await subscribe(ws, [task.task_id])
        assert (await recv(ws))["data"]["version"] == task.version
        await send(ws, {"op": "unsubscribe", "task_ids": [task.task_id]})
        assert await recv(ws) == {"type": "unsubscribed", "task_ids": [task.task_id]}
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}


async def test_subscribing_again_after_the_terminal_state_gives_the_terminal_state_again(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    final = await producer.complete(task.task_id, image_url="https://cdn.example/x.png")
    async with ws_connect(gateway) as ws:
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": final.to_dict()}
        assert await frames_before_pong(ws) == []  # released now: it is not subscribed any more
        await subscribe(ws, [task.task_id])  # "current state first" for a new subscription
        assert await frames_before_pong(ws) == [{"type": "task", "data": final.to_dict()}]


# -- /tasks/{task_id}/ws ----------------------------------------------------------------------


async def test_per_task_socket_sends_states_then_closes_1000_after_the_terminal_one(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create(type="img2img", angle="side")
    tracker = Tracker()
    async with ws_connect(gateway, f"/tasks/{task.task_id}/ws") as ws:
        assert tracker.add(await recv(ws)) == task.to_dict()
        states = await drive(producer, task.task_id)
        with pytest.raises(ConnectionClosedOK) as closed:
            async with asyncio.timeout(BOUND_S):
                while True:
                    tracker.add(await recv(ws))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    assert tracker.terminal[task.task_id] == states[-1].to_dict()
    assert {(s["task_id"], s["status"]) for s in tracker.states} <= {
        (task.task_id, status) for status in ("submitted", "processing", "completed")}


async def test_per_task_socket_on_a_finished_task_sends_the_terminal_state_and_closes_1000(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    final = await producer.fail(task.task_id, "nsfw filter")
    async with ws_connect(gateway, f"/tasks/{task.task_id}/ws") as ws:
        assert await recv(ws) == {"type": "task", "data": final.to_dict()}
        assert await close_code(ws) == 1000


async def test_per_task_socket_ignores_client_frames(gateway: Gateway, producer: Producer) -> None:
    """It carries task frames only: an op gets no reply, and does not end the socket."""
    task = await producer.create()
    async with ws_connect(gateway, f"/tasks/{task.task_id}/ws") as ws:
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}
        await send(ws, {"op": "ping"})
        await send(ws, {"op": "subscribe", "task_ids": [task.task_id]})
        final = (await drive(producer, task.task_id))[-1]
        tracker = Tracker()
        tracker.add({"type": "task", "data": task.to_dict()})
        await tracker.until_terminal(ws, [task.task_id])
        assert tracker.terminal[task.task_id] == final.to_dict()
        assert await close_code(ws) == 1000


async def test_per_task_socket_on_an_unknown_task_closes_4404(gateway: Gateway) -> None:
    async with ws_connect(gateway, "/tasks/9000000123/ws") as ws:
        assert await close_code(ws) == 4404


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "9223372036854775808", "%20", "1" * 5000],
                         ids=lambda raw: raw[:20])
async def test_per_task_socket_with_a_malformed_id_closes_4422(
    gateway: Gateway, raw: str
) -> None:
    async with ws_connect(gateway, f"/tasks/{raw}/ws") as ws:
        assert await close_code(ws) == 4422


async def test_per_task_socket_with_a_malformed_image_base64_flag_closes_4422(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    async with ws_connect(gateway, f"/tasks/{task.task_id}/ws?image_base64=maybe") as ws:
        assert await close_code(ws) == 4422


async def test_a_watched_task_whose_record_vanishes_gets_404_on_ws_and_4404_per_task(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    """An unfinished task's record expires or is deleted while clients watch it."""
    task = await producer.create()
    other = await producer.create()
    keys = TaskKeys(prefix)
    async with ws_connect(gateway) as many, ws_connect(gateway, f"/tasks/{task.task_id}/ws") as one:
        await subscribe(many, [task.task_id, other.task_id])
        assert {(await recv(many))["data"]["task_id"] for _ in range(2)} == {
            task.task_id, other.task_id}
        assert await recv(one) == {"type": "task", "data": task.to_dict()}

        await asyncio.to_thread(redis_server.cli, "DEL", keys.record(task.task_id))
        # A malformed event makes the hub re-read the record at once (no resync wait).
        await asyncio.to_thread(redis_server.cli, "PUBLISH", keys.channel(task.task_id), "junk")

        error = await recv(many)
        assert error["type"] == "error" and error["code"] == 404, error
        assert error["task_ids"] == [task.task_id]
        assert await close_code(one) == 4404
        await wait_numsub(redis_server, prefix, task.task_id, 0)
        # The other task is still followed on the same socket.
        final = await producer.complete(other.task_id, image_url="https://cdn.example/o.png")
        assert await recv(many) == {"type": "task", "data": final.to_dict()}
        assert await frames_before_pong(many) == []


# -- image_base64=false ---------------------------------------------------------------------


async def test_image_base64_false_leaves_the_image_out_of_task_frames(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    final = await producer.complete(task.task_id, image_url="https://cdn.example/i.png",
                                    image_base64=IMAGE)
    assert final.image_base64
    trimmed = final.to_dict(include_image_base64=False)
    assert trimmed["image"] == {"image_base64": "", "image_url": "https://cdn.example/i.png"}

    async with ws_connect(gateway, "/ws?image_base64=false") as ws:
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": trimmed}
    async with ws_connect(gateway, f"/tasks/{task.task_id}/ws?image_base64=false") as ws:
        assert await recv(ws) == {"type": "task", "data": trimmed}
        assert await close_code(ws) == 1000
    # Two clients of one task, one with and one without the image, each get their own form.
    other = await producer.create()
    async with ws_connect(gateway, "/ws?image_base64=0") as lean, ws_connect(gateway) as full:
        for ws in (lean, full):
            await subscribe(ws, [other.task_id])
            assert (await recv(ws))["data"]["version"] == other.version
        done = await producer.complete(other.task_id, image_base64=IMAGE)
        assert (await recv(lean))["data"] == done.to_dict(include_image_base64=False)
        assert (await recv(full))["data"] == done.to_dict()


async def test_ws_with_a_malformed_image_base64_flag_closes_4422(gateway: Gateway) -> None:
    async with ws_connect(gateway, "/ws?image_base64=maybe") as ws:
        assert await close_code(ws) == 4422


# -- Redis restarted under a running gateway ------------------------------------------------


@asynccontextmanager
async def producer_on(url: str, prefix: str) -> AsyncIterator[Producer]:
    producer = Producer(redis_connect(url), prefix=prefix)
    try:
        yield producer
    finally:
        async with asyncio.timeout(5):
            await producer.close()


@asynccontextmanager
async def restarted_behind_a_password(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Producer]:
    """Start the killed Redis again, closed to the gateway until the block is done.

    Redis comes back behind a password only the test knows (redis-cli's readiness PING reads it
    from REDISCLI_AUTH); the producer inside the block uses it, and the password is removed on
    the way out, so the gateway sees the records only as they are at the end of the block.
    """
    password = uuid.uuid4().hex
    monkeypatch.setenv("REDISCLI_AUTH", password)
    server.extra_args = ["--requirepass", password]
    try:
        server.start()
        async with producer_on(f"redis://:{password}@127.0.0.1:{server.port}/0",
                               prefix) as producer:
            yield producer
            await producer.redis.config_set("requirepass", "")
    finally:
        server.extra_args = []
        monkeypatch.delenv("REDISCLI_AUTH")


async def test_redis_killed_and_restarted_mid_run_the_socket_still_gets_every_terminal_state(
    own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(redis_url=own_redis.url, prefix=prefix, resync_interval_s=0.5,
                        redis_ping_deadline_s=1.5, redis_timeout_s=0.5)
    tracker = Tracker()
    async with run_gateway(settings) as gateway, ws_connect(gateway) as ws:
        async with producer_on(own_redis.url, prefix) as producer:
            task_ids = [(await producer.create(task_id=7000 + n)).task_id for n in range(20)]
            await subscribe(ws, task_ids)
            for task_id in task_ids:
                await producer.progress(task_id, 30)  # version 2
        async with asyncio.timeout(BOUND_S):
            while any(tracker.versions[t][-1:] != [2] for t in task_ids):
                tracker.add(await recv(ws))

        own_redis.kill()
        async with asyncio.timeout(BOUND_S):  # the gateway has noticed the outage
            while await metric(gateway, "taskcast_redis_reconnects_total") < 1:
                await asyncio.sleep(0.05)

        # Redis runs without persistence: after the restart the records are gone and have to be
        # re-created, and a re-created record starts again at version 1. The gateway only passes
        # on versions above the newest it has seen (2 here), so the re-created tasks are driven
        # past that before they finish: create (v1), progress 30 (v2, the state the client
        # already has), progress 60 (v3) and then the terminal state (v4). (A task re-created and
        # finished at once is covered by the test at the end of this file.)
        # While a record is missing the gateway would (rightly) report the task as gone with a 404
        # frame, so the records are re-created before the gateway can read them.
        async with restarted_behind_a_password(own_redis, prefix, monkeypatch) as producer:
            for task_id in task_ids:
                await producer.create(task_id=task_id)
                await producer.progress(task_id, 30)
                await producer.progress(task_id, 60)

        async with producer_on(own_redis.url, prefix) as producer:
            finals = {}
            for n, task_id in enumerate(task_ids):
                if n % 2:
                    finals[task_id] = await producer.fail(task_id, "worker lost")
                else:
                    finals[task_id] = await producer.complete(task_id, image_base64=IMAGE)
        await tracker.until_terminal(ws, task_ids, bound_s=30)
        for task_id in task_ids:
            assert tracker.terminal[task_id] == finals[task_id].to_dict()
        assert await frames_before_pong(ws) == []  # the socket stayed open all along


async def test_subscribing_while_redis_hangs_is_an_error_500_then_works_once_it_answers(
    own_redis: RedisServer, prefix: str
) -> None:
    """Contract 8 (issue 12): the lookup fails (StoreUnavailable), so /ws answers an error
    frame 500 for the ids and subscribes none of them (before: "subscribed" for tasks it
    could not look up), and the per-task socket closes with 1011. The same /ws socket
    subscribes normally once Redis answers again."""
    settings = Settings(redis_url=own_redis.url, prefix=prefix, resync_interval_s=0.5,
                        redis_ping_deadline_s=1.5, redis_timeout_s=0.5)
    async with producer_on(own_redis.url, prefix) as producer:
        task = await producer.create(task_id=31)
        async with run_gateway(settings) as gateway, ws_connect(gateway) as many:
            own_redis.pause()
            try:
                await send(many, {"op": "subscribe", "task_ids": [task.task_id]})
                error = await recv(many)
                assert (error["type"], error["code"], error["task_ids"]) == (
                    "error", 500, [task.task_id])
                async with ws_connect(gateway, f"/tasks/{task.task_id}/ws") as one:
                    assert await close_code(one) == 1011
            finally:
                own_redis.resume()
            await send(many, {"op": "subscribe", "task_ids": [task.task_id]})
            assert await recv(many) == {"type": "subscribed", "task_ids": [task.task_id]}
            assert await recv(many) == {"type": "task", "data": task.to_dict()}
            final = (await drive(producer, task.task_id))[-1]
            tracker = Tracker()
            await tracker.until_terminal(many, [task.task_id])
            assert tracker.terminal[task.task_id] == final.to_dict()


# -- graceful shutdown ----------------------------------------------------------------------


async def test_graceful_shutdown_closes_open_sockets_with_1012(
    settings: Settings, producer: Producer
) -> None:
    task = await producer.create()
    async with run_gateway(settings) as gateway:
        async with ws_connect(gateway) as many, ws_connect(
            gateway, f"/tasks/{task.task_id}/ws"
        ) as one:
            await subscribe(many, [task.task_id])
            assert (await recv(many))["data"] == task.to_dict()
            assert (await recv(one))["data"] == task.to_dict()
            gateway.server.should_exit = True
            assert await close_code(many) == 1012
            assert await close_code(one) == 1012


async def test_a_task_recreated_after_redis_lost_its_data_still_delivers_its_terminal_state(
    own_redis: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(redis_url=own_redis.url, prefix=prefix, resync_interval_s=0.5,
                        redis_ping_deadline_s=1.5, redis_timeout_s=0.5)
    async with run_gateway(settings) as gateway, ws_connect(gateway) as ws:
        async with producer_on(own_redis.url, prefix) as producer:
            await producer.create(task_id=77)
            await producer.progress(77, 30)  # version 2
        await subscribe(ws, [77])
        assert (await recv(ws))["data"]["version"] == 2
        own_redis.kill()
        async with restarted_behind_a_password(own_redis, prefix, monkeypatch) as producer:
            await producer.create(task_id=77)  # version 1 again: the worker retried the task
            final = await producer.complete(77, image_url="https://cdn.example/77.png")
        assert final.version == 2
        # The record is the truth, and it is terminal: some resync must deliver it.
        assert await recv(ws, bound_s=10 * settings.resync_interval_s) == {
            "type": "task", "data": final.to_dict()}
