"""Webhooks (contract section 10): what a receiver gets (the envelope, Standard Webhooks headers
and signatures), which events, in which order, how often, with which retries, and that
deliveries survive gateways stopping, a lost wake-up message and a Redis restart; with two
gateways each message is sent by one of them.

Real parts only: redis-server processes, gateways in uvicorn, and a real HTTP receiver
(tests/webhook_receiver.py) on a loopback port, which the gateways are allowed to reach
(webhook_allowed_hosts). Waits are bounded; the few time comparisons are on the receiver's
arrival times and check protocol properties (retry schedule, Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import email.utils
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from standardwebhooks.webhooks import WebhookVerificationError

from taskcast.connection import connect
from taskcast.keys import WEBHOOK_BUCKETS, TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, eventually, run_gateway
from tests.sse_client import read_metric
from tests.webhook_receiver import Received, Receiver, Reply


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRET = new_secret()
ALL = ["start", "progress", "completed", "failed"]
BOUND_S = 15.0  # one step against hangs
DELIVERIES = "taskcast_webhook_deliveries_total"
BUCKETS = "taskcast_webhook_buckets"
TOLERANCE_S = 0.05  # ms rounding of retry_at against the receiver's monotonic clock
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


# -- helpers -----------------------------------------------------------------------------------


def hooked(redis_url: str, prefix: str, **overrides: Any) -> Settings:
    """Settings of a gateway that delivers webhooks to the loopback receiver."""
    values: dict[str, Any] = {
        "redis_url": redis_url, "prefix": prefix, "auth": "off", "webhook_secret": SECRET,
        "webhook_allowed_hosts": "127.0.0.1", "webhook_timeout_s": 2.0,
        "webhook_recheck_s": 1.0, **overrides}
    return Settings(**values)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway and an HTTP client for it."""
    async with run_gateway(settings) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as client:
        yield gateway, client


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as running:
        yield running


async def record(redis: Any, keys: TaskKeys, task_id: int) -> dict[str, str]:
    raw = await redis.hgetall(keys.record(task_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def wait_record(redis: Any, keys: TaskKeys, task_id: int,
                      predicate: Callable[[dict[str, str]], bool], what: str,
                      bound_s: float = BOUND_S) -> dict[str, str]:
    """The task's record once `predicate` holds for it."""
    seen: dict[str, str] = {}

    async def check() -> bool:
        nonlocal seen
        seen = await record(redis, keys, task_id)
        return predicate(seen)

    try:
        await eventually(check, what, bound_s)
    except AssertionError as exc:
        hook = {k: v for k, v in seen.items() if "webhook" in k or k == "version"}
        raise AssertionError(f"{exc}; record: {hook}") from None
    return seen


async def deliveries(client: httpx.AsyncClient, outcome: str) -> float:
    return await read_metric(client, DELIVERIES, outcome=outcome) or 0.0


async def indexed(redis: Any, keys: TaskKeys, task_id: int) -> float | None:
    """The task's score in its webhooks bucket, None without an entry."""
    score = await redis.zscore(keys.webhooks_of(task_id), str(task_id))
    return None if score is None else float(score)


def terminal(message: Received) -> bool:
    return message.type in ("task.completed", "task.failed")


def assert_in_order(messages: list[Received], final: Task) -> None:
    """One task's messages: strictly newer versions, each message once, the terminal state
    exactly once and last."""
    versions = [message.version for message in messages]
    assert versions == sorted(set(versions)), f"versions out of order or repeated: {versions}"
    assert [message.webhook_id for message in messages] == [
        f"msg_{final.task_id}_{version}" for version in versions]
    assert messages, f"nothing received for task {final.task_id}"
    assert terminal(messages[-1]), messages
    assert messages[-1].version == final.version
    assert messages[-1].data["status"] == final.status.value
    assert not any(terminal(message) for message in messages[:-1]), messages


async def create_with_hooks(producer: Producer, receiver: Receiver, paths: list[str],
                            events: list[str] | None = None) -> list[Task]:
    return [await producer.create(webhook_url=receiver.url(path), webhook_events=events)
            for path in paths]


# -- what a receiver gets ----------------------------------------------------------------------


async def test_the_envelope_headers_and_signature(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """Body {type, timestamp, data} with data the task as REST serves it, Content-Type JSON,
    webhook-id msg_<id>_<version>, webhook-timestamp now, a signature that verifies with the
    secret (and only with it, and only for these bytes)."""
    async with serving(hooked(redis_server.url, prefix)) as (_, client):
        created = await producer.create(type="portrait", angle="front",
                                        webhook_url=receiver.url("/hook"))
        await producer.progress(created.task_id, 40)
        done = await producer.complete(created.task_id, image_url="https://images.example/a.png",
                                       image_base64=PNG)
        (message,) = await receiver.wait_for("/hook", 1)
        rest = await client.get(f"/tasks/{done.task_id}")
    assert rest.status_code == 200
    payload = message.verify(SECRET)
    assert message.method == "POST"
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["type"] == "task.completed"
    assert payload["data"] == rest.json()["data"]
    assert payload["data"]["version"] == done.version
    assert payload["data"]["status"] == "completed"
    assert base64.b64decode(payload["data"]["image"]["image_base64"]) == PNG
    stamp = payload["timestamp"]
    assert stamp.endswith("Z"), stamp
    when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert round(when.timestamp() * 1000) == done.updated_at
    assert message.headers["content-type"] == "application/json"
    assert message.webhook_id == f"msg_{done.task_id}_{done.version}"
    assert abs(int(message.headers["webhook-timestamp"]) - message.wall) <= 60
    with pytest.raises(WebhookVerificationError):
        message.verify(new_secret())
    with pytest.raises(WebhookVerificationError):
        dataclasses.replace(message, body=message.body + b" ").verify(SECRET)


async def test_two_secrets_sign_with_each(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """During a rotation ("a,b") a receiver holding either secret verifies the message."""
    old, new = new_secret(), new_secret()
    settings = hooked(redis_server.url, prefix, webhook_secret=f"{old},{new}")
    async with serving(settings):
        task = await producer.create(webhook_url=receiver.url("/rotating"))
        done = await producer.complete(task.task_id, image_url="https://images.example/b.png")
        (message,) = await receiver.wait_for("/rotating", 1)
    signatures = message.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2, signatures
    assert all(signature.startswith("v1,") for signature in signatures)
    assert len(set(signatures)) == 2
    assert message.verify(old)["data"]["version"] == done.version
    assert message.verify(new)["data"]["version"] == done.version
    with pytest.raises(WebhookVerificationError):
        message.verify(SECRET)


# -- which events ------------------------------------------------------------------------------


async def test_events_filter_start_progress_and_terminal(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """Default: completed and failed only. start = the first change to processing, progress =
    later ones. ["progress"] never gets the first processing change; an unsubscribed terminal
    state sends nothing. Each change waits for the previous one's messages, so nothing is
    conflated."""
    async with serving(hooked(redis_server.url, prefix)):
        plain, failing = await create_with_hooks(producer, receiver, ["/plain", "/failing"])
        spaced = await producer.create(webhook_url=receiver.url("/spaced"),
                                       webhook_events=["start", "progress", "completed"])
        progress_only = await producer.create(webhook_url=receiver.url("/progress"),
                                              webhook_events=["progress"])
        completed_only = await producer.create(webhook_url=receiver.url("/completed"),
                                               webhook_events=["completed"])
        everyone = [plain, failing, progress_only, completed_only, spaced]  # spaced last
        versions: dict[int, list[int]] = {task.task_id: [] for task in everyone}
        for step, percent in enumerate([10, 30, 60]):
            for task in everyone:
                changed = await producer.progress(task.task_id, percent)
                versions[task.task_id].append(changed.version)
            await receiver.wait_for("/spaced", step + 1)
            await receiver.wait_for("/progress", step)
        finals = {}
        for task in (plain, progress_only, spaced):
            finals[task.task_id] = await producer.complete(
                task.task_id, image_url="https://images.example/c.png")
        for task in (failing, completed_only):
            finals[task.task_id] = await producer.fail(task.task_id, "no luck")
        await receiver.wait_for("/spaced", 4)
        await receiver.wait_for("/plain", 1)
        await receiver.wait_for("/failing", 1)
        await receiver.quiet(None, 1.5)  # more than recheck_s: every task was looked at again

    def seen(path: str) -> list[tuple[str, int]]:
        return [(message.type, message.version) for message in receiver.requests(path)]

    assert seen("/plain") == [("task.completed", finals[plain.task_id].version)]
    assert seen("/failing") == [("task.failed", finals[failing.task_id].version)]
    assert receiver.requests("/failing")[0].data["error_message"] == "no luck"
    started, *later = versions[spaced.task_id]
    assert seen("/spaced") == [("task.start", started), ("task.progress", later[0]),
                               ("task.progress", later[1]),
                               ("task.completed", finals[spaced.task_id].version)]
    first, *later = versions[progress_only.task_id]
    assert seen("/progress") == [("task.progress", version) for version in later]
    assert first not in [version for _, version in seen("/progress")]
    assert seen("/completed") == []
    for message in receiver.requests():
        message.verify(SECRET)


# -- order, retries, outcomes ------------------------------------------------------------------


async def test_order_and_terminal_under_load(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """20 tasks with 40 fast progress changes each and a completion, every event subscribed:
    per task the versions only grow, nothing is sent twice, the terminal state arrives and
    arrives last."""
    count, steps = 20, 40
    async with serving(hooked(redis_server.url, prefix)) as (_, client):
        tasks = await create_with_hooks(producer, receiver,
                                        [f"/load/{i}" for i in range(count)], ALL)

        async def drive(task: Task) -> Task:
            for percent in range(1, steps + 1):
                await producer.progress(task.task_id, percent)
            return await producer.complete(task.task_id, image_url="https://images.example/d")

        finals = await asyncio.gather(*(drive(task) for task in tasks))
        await receiver.wait_until(
            lambda: all(any(terminal(m) for m in receiver.requests(f"/load/{i}"))
                        for i in range(count)), timeout=30, what="every task's terminal")
        await receiver.quiet(None, 1.0)
        delivered = await deliveries(client, "delivered")
    for i, final in enumerate(finals):
        messages = receiver.requests(f"/load/{i}")
        assert_in_order(messages, final)
        assert messages[0].type == "task.start"
        assert all(m.type == "task.progress" for m in messages[1:-1]), messages
        assert all(m.data["status"] == "processing" for m in messages[:-1])
    assert delivered == len(receiver.requests())


async def test_retries_after_503_then_delivers(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """3 × 503 then 204: the same message (webhook-id, body) each time, the first retry within
    2 s of the failure, the delays growing per the schedule (0.5-1 s, 1-2 s, 2-4 s); the
    failure streak is cleared from the record after the success."""
    keys = TaskKeys(prefix)
    receiver.program("/flaky", [Reply(503)] * 3)
    async with serving(hooked(redis_server.url, prefix)) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/flaky"))
        done = await producer.complete(task.task_id, image_url="https://images.example/e.png")
        attempts = await receiver.wait_for("/flaky", 4, timeout=20)
        delivered = await wait_record(
            redis, keys, task.task_id,
            lambda r: r.get("webhook_version") == str(done.version), "delivery recorded")
        failed_count = await deliveries(client, "failed")
        delivered_count = await deliveries(client, "delivered")
        await receiver.quiet("/flaky", 0.5)
    assert [attempt.reply.status for attempt in attempts] == [503, 503, 503, 204]
    assert {attempt.webhook_id for attempt in attempts} == {f"msg_{task.task_id}_{done.version}"}
    assert len({attempt.body for attempt in attempts}) == 1
    for attempt in attempts:
        attempt.verify(SECRET)
    gaps = [later.at - earlier.at for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] <= 2.5, gaps
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= 0.5 * 2 ** (attempt - 1) - TOLERANCE_S, gaps
    for field in ("webhook_attempts", "webhook_retry_at", "webhook_failing_since",
                  "webhook_last_error", "webhook_state"):
        assert field not in delivered, delivered
    assert (failed_count, delivered_count) == (3, 1)
    assert await indexed(redis, keys, task.task_id) is None  # finished and delivered


async def test_retry_after_is_honoured(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """429 with Retry-After (seconds, or an HTTP date): the retry comes no sooner."""
    async with serving(hooked(redis_server.url, prefix)):
        seconds_task, date_task = await create_with_hooks(producer, receiver,
                                                          ["/seconds", "/date"])
        receiver.program("/seconds", [Reply(429, headers={"Retry-After": "3"})])
        until = time.time() + 5
        receiver.program("/date", [Reply(429, headers={
            "Retry-After": email.utils.formatdate(until, usegmt=True)})])
        await producer.complete(seconds_task.task_id, image_url="https://images.example/f")
        await producer.complete(date_task.task_id, image_url="https://images.example/f")
        first, second = await receiver.wait_for("/seconds", 2, timeout=BOUND_S)
        dated = await receiver.wait_for("/date", 2, timeout=BOUND_S)
    assert [first.reply.status, second.reply.status] == [429, 204]
    assert first.webhook_id == second.webhook_id
    assert second.at - first.at >= 3.0 - TOLERANCE_S
    # The date has whole seconds: the retry is due at int(until), over 4 s after `until` was
    # taken; the first attempt came well within a second of it.
    assert dated[1].wall >= int(until) - TOLERANCE_S
    assert dated[1].at - dated[0].at >= 2.5


async def test_a_slow_receiver_times_out_and_is_retried(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """No complete answer within webhook_timeout_s: a failed attempt, retried (and not waited
    for until the slow answer); once the receiver is quick the message is delivered."""
    keys = TaskKeys(prefix)
    receiver.program("/slow", [Reply(204, delay_s=6.0)])
    async with serving(hooked(redis_server.url, prefix, webhook_timeout_s=1.0)) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/slow"))
        done = await producer.complete(task.task_id, image_url="https://images.example/g")
        slow, quick = await receiver.wait_for("/slow", 2, timeout=BOUND_S)
        await wait_record(redis, keys, task.task_id,
                          lambda r: r.get("webhook_version") == str(done.version),
                          "delivery recorded")
        failed_count = await deliveries(client, "failed")
        delivered_count = await deliveries(client, "delivered")
    assert slow.webhook_id == quick.webhook_id == f"msg_{task.task_id}_{done.version}"
    assert 1.0 - TOLERANCE_S <= quick.at - slow.at < 6.0
    assert (failed_count, delivered_count) == (1, 1)


async def test_410_stops_every_later_message(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """410 on the start: nothing more for that task (progress and completion are not sent),
    the record says gone, the index entry is gone; another task meanwhile gets everything."""
    keys = TaskKeys(prefix)
    receiver.program("/gone", [Reply(410)])
    settings = hooked(redis_server.url, prefix, webhook_recheck_s=0.5)
    async with serving(settings) as (_, client):
        gone, control = await create_with_hooks(producer, receiver, ["/gone", "/control"], ALL)
        await producer.progress(gone.task_id, 10)
        await producer.progress(control.task_id, 10)
        await receiver.wait_for("/gone", 1)
        state = await wait_record(redis, keys, gone.task_id,
                                  lambda r: r.get("webhook_state") == "gone", "gone recorded")
        assert await indexed(redis, keys, gone.task_id) is None
        for task in (gone, control):
            await producer.progress(task.task_id, 50)
            await producer.complete(task.task_id, image_url="https://images.example/h")
        await receiver.wait_until(lambda: any(terminal(m) for m in receiver.requests("/control")),
                                  what="the control task's completion")
        await receiver.quiet("/gone", 2.0)
        gone_count = await deliveries(client, "gone")
        after = await record(redis, keys, gone.task_id)
    assert [m.type for m in receiver.requests("/gone")] == ["task.start"]
    assert state["webhook_last_error"] == "HTTP 410"
    assert after["webhook_state"] == "gone"
    assert after["status"] == "completed"
    control_types = [m.type for m in receiver.requests("/control")]
    assert control_types[0] == "task.start" and control_types[-1] == "task.completed"
    assert gone_count == 1


async def test_4xx_is_retried_like_any_failure_and_later_messages_follow(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """A 4xx other than 410 (a receiver with the wrong secret, or not deployed yet) does not
    drop the message: it is retried (same webhook-id, the error on the record meanwhile)
    until it is taken; the task's next message follows."""
    keys = TaskKeys(prefix)
    receiver.program("/picky", [Reply(401), Reply(404)])
    async with serving(hooked(redis_server.url, prefix)) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/picky"),
                                     webhook_events=["start", "completed"])
        started = await producer.progress(task.task_id, 10)
        streak = await wait_record(redis, keys, task.task_id,
                                   lambda r: r.get("webhook_last_error") == "HTTP 401",
                                   "the 401 recorded")
        attempts = await receiver.wait_for("/picky", 3)
        await wait_record(redis, keys, task.task_id,
                          lambda r: r.get("webhook_version") == str(started.version),
                          "the start delivered")
        done = await producer.complete(task.task_id, image_url="https://images.example/i")
        await receiver.wait_for("/picky", 4)
        await receiver.quiet("/picky", 1.0)
        failed_count = await deliveries(client, "failed")
        delivered_count = await deliveries(client, "delivered")
        after = await record(redis, keys, task.task_id)
    assert streak["webhook_attempts"] == "1" and "webhook_retry_at" in streak, streak
    assert streak.get("webhook_version", "0") == "0"
    assert [(m.type, m.version, m.reply.status) for m in receiver.requests("/picky")] == [
        ("task.start", started.version, 401), ("task.start", started.version, 404),
        ("task.start", started.version, 204), ("task.completed", done.version, 204)]
    assert len({m.webhook_id for m in attempts}) == 1
    assert (failed_count, delivered_count) == (2, 2)
    assert after["webhook_version"] == str(done.version)
    assert "webhook_last_error" not in after and "webhook_attempts" not in after


async def test_a_redirect_is_not_followed(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """302: not followed (the redirect's target gets nothing), a failure retried at the URL
    itself until it answers 2xx."""
    keys = TaskKeys(prefix)
    receiver.program("/moved", [Reply.redirect(receiver.url("/target"))] * 2)
    async with serving(hooked(redis_server.url, prefix)) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/moved"))
        done = await producer.complete(task.task_id, image_url="https://images.example/j")
        streak = await wait_record(redis, keys, task.task_id,
                                   lambda r: r.get("webhook_last_error") == "HTTP 302",
                                   "the 302 recorded")
        await receiver.wait_for("/moved", 3)
        await wait_record(redis, keys, task.task_id,
                          lambda r: r.get("webhook_version") == str(done.version),
                          "the delivery recorded")
        await receiver.quiet(None, 0.5)
        failed_count = await deliveries(client, "failed")
    assert streak["webhook_attempts"] == "1"
    assert [m.reply.status for m in receiver.requests()] == [302, 302, 204]
    assert receiver.requests("/target") == []
    assert {m.webhook_id for m in receiver.requests()} == {f"msg_{task.task_id}_{done.version}"}
    assert failed_count == 2


async def test_a_failing_receiver_is_dead_after_the_horizon(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """Always 503 and a 2 s horizon: retried, then dead (recorded, counted, out of the index),
    then nothing more is sent."""
    keys = TaskKeys(prefix)
    receiver.program("/down", then=Reply(503))
    settings = hooked(redis_server.url, prefix, webhook_horizon_s=2.0, webhook_recheck_s=0.5)
    async with serving(settings) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/down"))
        done = await producer.complete(task.task_id, image_url="https://images.example/k")
        state = await wait_record(redis, keys, task.task_id,
                                  lambda r: r.get("webhook_state") == "dead", "dead recorded")
        tried = len(receiver.requests("/down"))
        await receiver.quiet("/down", 1.5)
        dead_count = await deliveries(client, "dead")
        failed_count = await deliveries(client, "failed")
        entry = await indexed(redis, keys, task.task_id)
    attempts = receiver.requests("/down")
    assert tried >= 2, attempts
    assert {m.webhook_id for m in attempts} == {f"msg_{task.task_id}_{done.version}"}
    assert attempts[-1].at - attempts[0].at >= 2.0 - TOLERANCE_S  # dead only after the horizon
    assert state["webhook_last_error"] == "HTTP 503"
    assert "webhook_attempts" not in state and "webhook_retry_at" not in state
    assert dead_count == 1
    assert failed_count == tried - 1
    assert entry is None


async def test_a_target_not_allowed_is_refused_without_a_connection(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """Without webhook_allowed_hosts a loopback URL is refused: nothing reaches it, the
    refusal is recorded and counted (and not retried)."""
    keys = TaskKeys(prefix)
    async with serving(hooked(redis_server.url, prefix, webhook_allowed_hosts="")) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/private"),
                                     webhook_events=["start", "completed"])
        await producer.progress(task.task_id, 5)
        done = await producer.complete(task.task_id, image_url="https://images.example/l")
        state = await wait_record(redis, keys, task.task_id,
                                  lambda r: r.get("webhook_version") == str(done.version),
                                  "the refusal recorded")
        await receiver.quiet(None, 1.0)
        refused_count = await deliveries(client, "refused")
    assert receiver.requests() == []
    assert "not a public address" in state["webhook_last_error"]
    assert 1 <= refused_count <= 2  # the start may be conflated into the completion
    assert "webhook_attempts" not in state


async def test_a_huge_response_body_is_not_read_to_the_end(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """A 2xx with a 50 MiB body is a delivery, promptly (at most 64 KiB of it are read)."""
    receiver.program("/huge", then=Reply(200, body_size=50 * 2**20))
    async with serving(hooked(redis_server.url, prefix)) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/huge"), webhook_events=ALL)
        await producer.progress(task.task_id, 1)
        await receiver.wait_for("/huge", 1)
        done = await producer.complete(task.task_id, image_url="https://images.example/m")
        await receiver.wait_until(lambda: any(terminal(m) for m in receiver.requests("/huge")),
                                  what="the completion")
        await receiver.quiet(None, 0.5)
        delivered = await deliveries(client, "delivered")
    assert_in_order(receiver.requests("/huge"), done)
    assert delivered == len(receiver.requests("/huge"))


# -- many gateways, restarts, lost wakes -------------------------------------------------------


async def test_two_gateways_share_buckets_and_send_each_message_once(
    redis: aioredis.Redis, redis_server: RedisServer, producer: Producer, prefix: str,
    receiver: Receiver
) -> None:
    """A second gateway joins one that holds every bucket: within a few lease renewals both
    hold buckets, and while the buckets move each task's messages are sent once each, in
    order, the terminal exactly once, each by one of the gateways."""
    count = 30
    keys = TaskKeys(prefix)
    settings = hooked(redis_server.url, prefix)
    async with serving(settings) as (_, client_a):
        tasks = await create_with_hooks(producer, receiver,
                                        [f"/pair/{i}" for i in range(count)], ALL)

        async def all_held() -> bool:
            return await read_metric(client_a, BUCKETS) == WEBHOOK_BUCKETS

        await eventually(all_held, "the first gateway holding every bucket")
        async with serving(settings) as (_, client_b):
            percent = 0
            held: list[float] = []

            async def both_hold() -> bool:
                nonlocal percent
                held[:] = [await read_metric(c, BUCKETS) or 0.0 for c in (client_a, client_b)]
                percent = min(percent + 1, 95)  # changes while the leases move
                await asyncio.gather(*(producer.progress(t.task_id, percent) for t in tasks))
                await asyncio.sleep(0.3)
                return min(held) > 0

            await eventually(both_hold, "both gateways holding buckets", bound_s=40)
            owners = [await redis.get(keys.webhook_owner(b)) for b in range(WEBHOOK_BUCKETS)]
            finals = await asyncio.gather(*(
                producer.complete(t.task_id, image_url="https://images.example/n")
                for t in tasks))
            await receiver.wait_until(
                lambda: all(any(terminal(m) for m in receiver.requests(f"/pair/{i}"))
                            for i in range(count)), timeout=BOUND_S, what="every terminal")
            await receiver.quiet(None, 1.0)
            delivered = [await deliveries(c, "delivered") for c in (client_a, client_b)]
    for i, final in enumerate(finals):
        assert_in_order(receiver.requests(f"/pair/{i}"), final)
    ids = [m.webhook_id for m in receiver.requests()]
    assert len(ids) == len(set(ids))
    assert sum(delivered) == len(ids)
    assert min(delivered) > 0, delivered  # each delivered (at least) its buckets' completions
    assert len({owner for owner in owners if owner is not None}) == 2, owners
    assert percent > 1  # changes were made while the buckets moved


async def test_changes_while_no_gateway_runs_are_delivered_by_the_next(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """A gateway stops; tasks change, finish and are created meanwhile; the next gateway
    delivers all of it, in order (recheck_s is long: the next gateway's first look at its
    buckets finds it, not a periodic look)."""
    settings = hooked(redis_server.url, prefix, webhook_recheck_s=120.0)
    async with serving(settings):
        early = await create_with_hooks(producer, receiver,
                                        [f"/early/{i}" for i in range(8)], ALL)
        for task in early:
            await producer.progress(task.task_id, 10)
        await receiver.wait_until(
            lambda: all(receiver.requests(f"/early/{i}") for i in range(8)),
            what="every start")
    finals = []
    for task in early:
        await producer.progress(task.task_id, 60)
        finals.append(await producer.complete(task.task_id, image_url="https://images.example/o"))
    late = await create_with_hooks(producer, receiver, ["/late/0", "/late/1"], ALL)
    finals.append(await producer.fail(late[0].task_id, "while nobody delivered"))
    await producer.progress(late[1].task_id, 20)
    finals.append(await producer.complete(late[1].task_id, image_url="https://images.example/o"))
    await receiver.quiet(None, 0.5)  # nobody delivers meanwhile
    paths = [f"/early/{i}" for i in range(8)] + ["/late/0", "/late/1"]
    async with serving(settings):
        await receiver.wait_until(
            lambda: all(any(terminal(m) for m in receiver.requests(p)) for p in paths),
            what="every terminal")
        await receiver.quiet(None, 0.5)
    for path, final in zip(paths, finals, strict=True):
        assert_in_order(receiver.requests(path), final)
    assert [m.type for m in receiver.requests("/late/1")][-1] == "task.completed"
    assert receiver.requests("/late/0")[-1].data["error_message"] == "while nobody delivered"


async def test_a_change_during_a_lost_wake_subscription_is_delivered(
    own_redis: RedisServer, prefix: str, receiver: Receiver
) -> None:
    """CLIENT KILL TYPE pubsub drops the wake subscription; a task completed before it is
    back (its wake-up message reached nobody: PUBSUB NUMSUB says 0 right after) is still
    delivered promptly: the re-subscription looks at every entry. recheck_s is long, so the
    periodic look cannot be what delivers it."""
    keys = TaskKeys(prefix)
    client = connect(own_redis.url)
    producer = Producer(client, prefix=prefix)
    try:
        async with serving(hooked(own_redis.url, prefix, webhook_recheck_s=120.0)):
            tasks = await create_with_hooks(producer, receiver,
                                            [f"/wake/{i}" for i in range(5)])
            for task in tasks:
                await producer.progress(task.task_id, 10)

            async def settled() -> bool:  # every entry next looked at in about recheck_s
                soon = time.time() * 1000 + 60_000
                scores = [await indexed(client, keys, t.task_id) for t in tasks]
                return all(s is not None and s > soon for s in scores)

            async def subscribed() -> bool:
                return dict(await client.pubsub_numsub(keys.webhook_wake)).get(
                    keys.webhook_wake.encode(), 0) > 0

            await eventually(settled, "every task looked at")
            lost = []
            for i, task in enumerate(tasks):
                await eventually(subscribed, "the wake subscription")
                await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                final = await producer.complete(task.task_id, image_url="https://x.example/p")
                if not await subscribed():
                    lost.append(i)
                message = await receiver.wait_for_match(f"/wake/{i}", terminal,
                                                        timeout=BOUND_S, what=f"task {i}")
                assert message.version == final.version
            assert lost, "no wake-up message was lost for sure (the subscription came back "\
                         "too fast each time)"
    finally:
        await client.aclose()


async def test_deliveries_resume_after_a_redis_restart(tmp_path: Path, prefix: str,
                                                       receiver: Receiver) -> None:
    """Redis (with an append-only file, so the records survive) stops and starts again under a
    running gateway: later changes of a task from before, and a task created after, are
    delivered, in order."""
    server = RedisServer(tmp_path / "redis", extra_args=["--appendonly", "yes",
                                                         "--appendfsync", "always"])
    server.start()
    try:
        async with serving(hooked(server.url, prefix)):
            before_client = connect(server.url)
            try:
                early = await Producer(before_client, prefix=prefix).create(
                    webhook_url=receiver.url("/before"), webhook_events=ALL)
                await Producer(before_client, prefix=prefix).progress(early.task_id, 10)
                await receiver.wait_for("/before", 1)
            finally:
                await before_client.aclose()
            server.stop()
            await asyncio.sleep(1.0)  # the gateway's connections fail meanwhile
            server.start()
            client = connect(server.url)
            producer = Producer(client, prefix=prefix)
            try:
                await producer.progress(early.task_id, 50)
                early_final = await producer.complete(early.task_id,
                                                      image_url="https://x.example/q")
                fresh = await producer.create(webhook_url=receiver.url("/after"),
                                              webhook_events=ALL)
                await producer.progress(fresh.task_id, 30)
                fresh_final = await producer.complete(fresh.task_id,
                                                      image_url="https://x.example/q")
                for path in ("/before", "/after"):
                    await receiver.wait_for_match(path, terminal, timeout=30,
                                                  what=f"the completion at {path}")
                await receiver.quiet(None, 0.5)
            finally:
                await client.aclose()
    finally:
        server.stop()
    assert_in_order(receiver.requests("/before"), early_final)
    assert receiver.requests("/before")[0].type == "task.start"
    assert_in_order(receiver.requests("/after"), fresh_final)


async def test_without_a_secret_nothing_is_sent(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """No webhook_secret: no service, no request; a gateway with one then delivers the same
    task (so it was deliverable all along)."""
    unsigned = Settings(redis_url=redis_server.url, prefix=prefix, auth="off",
                        webhook_allowed_hosts="127.0.0.1", webhook_recheck_s=0.5)
    async with serving(unsigned) as (gateway, _):
        assert gateway.app.state.webhooks is None
        task = await producer.create(webhook_url=receiver.url("/unsigned"))
        done = await producer.complete(task.task_id, image_url="https://images.example/r")
        await receiver.quiet(None, 1.5)
    async with serving(hooked(redis_server.url, prefix)) as (gateway, _):
        assert gateway.app.state.webhooks is not None
        (message,) = await receiver.wait_for("/unsigned", 1)
    assert message.verify(SECRET)["data"]["version"] == done.version


async def test_a_long_request_timeout_still_leaves_the_buckets_usable(
    redis_server: RedisServer, producer: Producer, prefix: str, receiver: Receiver
) -> None:
    """With webhook_timeout_s 30 (the lease's safety margin is timeout + 2 s), the gateway still
    holds its buckets and delivers: the lease grows with the timeout. Before, a fixed 30 s lease
    left no usable time at all, and nothing was ever sent."""
    async with serving(hooked(redis_server.url, prefix, webhook_timeout_s=30.0)) as (_, client):
        task = await producer.create(webhook_url=receiver.url("/patient"))
        done = await producer.complete(task.task_id, image_url="https://images.example/l.png")
        [message] = await receiver.wait_for("/patient", 1)

        async def all_held() -> bool:  # the first tick may still be taking the rest
            return await read_metric(client, BUCKETS) == WEBHOOK_BUCKETS

        await eventually(all_held, "all 16 buckets held")
    assert message.webhook_id == f"msg_{task.task_id}_{done.version}"
