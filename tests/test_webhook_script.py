"""Webhooks (contract section 10), what the update script and the producers do with them.

- The script checks `webhook_url` (absolute http(s), at most 8192 bytes, no spaces or control
  characters) and `webhook_events` (a non-empty array of start/progress/completed/failed, only
  with a URL, only at creation); a refusal writes and publishes nothing.
- An accepted create keeps the webhook on the record: events in canonical order, without
  duplicates, default "completed,failed"; the first change to processing sets
  `started_version`, which later changes leave alone.
- Every accepted change of a task with a webhook PUBLISHes its id on `P:webhooks` (the wake);
  tasks without a webhook, changes that alter nothing and refusals publish no wake.
- Producer.create and SyncProducer.create refuse the same inputs before sending anything, and
  index the task in `P:webhooks:{id % 16}`.

The script runs on a real redis-server and on the embedded `memory://` store (the `store`
fixture); the producers against the session's redis-server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from taskcast.errors import TransitionRejected
from taskcast.keys import WEBHOOK_BUCKETS, TaskKeys
from tests.channels import Published, subscribed
from tests.test_script_limits import (
    Flavour,
    assert_unchanged,
    command_calls,
    snapshot,
)
from tests.test_update_script import ScriptStore, reason_of

TIMEOUT = 10.0
TASK = 21
HOOK = "https://hooks.example/taskcast"
URL_8192 = "https://hooks.example/" + "a" * (8192 - len("https://hooks.example/"))
# 8192 bytes in 4098 characters: the cap counts bytes.
URL_8192_MULTIBYTE = "https://h.example/" + "é" * 4087
assert len(URL_8192.encode()) == 8192 and len(URL_8192_MULTIBYTE.encode()) == 8192


def create(**fields: Any) -> dict[str, Any]:
    return {"op": "create", **fields}


def update(**fields: Any) -> dict[str, Any]:
    return {"op": "update", **fields}


@asynccontextmanager
async def wakes(store: ScriptStore) -> AsyncIterator[Published]:
    """Subscribed to the wake channel P:webhooks; drain() gives the ids published there."""
    async with subscribed(store.client, [store.keys.webhook_wake], TIMEOUT) as published:
        yield published


async def assert_refused(store: ScriptStore, change: dict[str, Any], reason: str,
                         task_id: int = TASK) -> str:
    """The change is refused with `reason`; no key under the prefix changes (bytes, TTL), and
    nothing is published, neither on the task's channel nor on the wake channel."""
    document = orjson.dumps({"task_id": str(task_id), **change})
    before = await snapshot(store.client, store.prefix)
    channels = [store.keys.webhook_wake, store.keys.channel(task_id)]
    async with subscribed(store.client, channels, TIMEOUT) as published:
        with pytest.raises(ResponseError) as info:
            await store.run(store.script_keys(task_id), [document])
        heard = await published.drain()
    assert reason_of(info.value) == reason, str(info.value)
    assert_unchanged(before, await snapshot(store.client, store.prefix))
    assert heard == []
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Validation by the script.

REFUSED_CREATES = [
    pytest.param(create(webhook_url=URL_8192 + "a"), "TOO_LARGE", id="url-8193-bytes"),
    pytest.param(create(webhook_url=URL_8192_MULTIBYTE + "a"), "TOO_LARGE",
                 id="url-8193-bytes-4099-chars"),
    pytest.param(create(webhook_url=""), "BAD_FIELD", id="url-empty"),
    pytest.param(create(webhook_url="ftp://hooks.example/x"), "BAD_FIELD", id="url-ftp"),
    pytest.param(create(webhook_url="/hooks/x"), "BAD_FIELD", id="url-path-only"),
    pytest.param(create(webhook_url="hooks.example/x"), "BAD_FIELD", id="url-relative"),
    pytest.param(create(webhook_url="//hooks.example/x"), "BAD_FIELD",
                 id="url-scheme-relative"),
    pytest.param(create(webhook_url="http://"), "BAD_FIELD", id="url-http-no-host"),
    pytest.param(create(webhook_url="https:///x"), "BAD_FIELD", id="url-empty-host"),
    pytest.param(create(webhook_url="http://?x=1"), "BAD_FIELD", id="url-query-no-host"),
    pytest.param(create(webhook_url="javascript:alert(1)"), "BAD_FIELD", id="url-javascript"),
    pytest.param(create(webhook_url="https://hooks.example/a b"), "BAD_FIELD", id="url-space"),
    pytest.param(create(webhook_url="https://hooks.example/a\tb"), "BAD_FIELD", id="url-tab"),
    pytest.param(create(webhook_url="https://hooks.example/a\r\nX: y"), "BAD_FIELD",
                 id="url-crlf"),
    pytest.param(create(webhook_url="https://hooks.example/a\x00b"), "BAD_FIELD", id="url-nul"),
    pytest.param(create(webhook_url="https://hooks.example/a\x1fb"), "BAD_FIELD", id="url-0x1f"),
    pytest.param(create(webhook_url="https://hooks.example/a\x7fb"), "BAD_FIELD", id="url-del"),
    pytest.param(create(webhook_url=5), "BAD_REQUEST", id="url-number"),
    pytest.param(create(webhook_url=HOOK, webhook_events="completed"), "BAD_FIELD",
                 id="events-string"),
    pytest.param(create(webhook_url=HOOK, webhook_events=1), "BAD_FIELD", id="events-number"),
    pytest.param(create(webhook_url=HOOK, webhook_events=True), "BAD_FIELD", id="events-bool"),
    pytest.param(create(webhook_url=HOOK, webhook_events={"completed": True}), "BAD_FIELD",
                 id="events-object"),
    pytest.param(create(webhook_url=HOOK, webhook_events=[]), "BAD_FIELD", id="events-empty"),
    pytest.param(create(webhook_url=HOOK, webhook_events=["completed", "done"]), "BAD_FIELD",
                 id="events-unknown-name"),
    pytest.param(create(webhook_url=HOOK, webhook_events=["Completed"]), "BAD_FIELD",
                 id="events-wrong-case"),
    pytest.param(create(webhook_url=HOOK, webhook_events=["task.completed"]), "BAD_FIELD",
                 id="events-type-name"),
    pytest.param(create(webhook_url=HOOK, webhook_events=[1]), "BAD_FIELD",
                 id="events-number-item"),
    pytest.param(create(webhook_url=HOOK, webhook_events=[["start"]]), "BAD_FIELD",
                 id="events-nested"),
    pytest.param(create(webhook_url=HOOK, webhook_events=["start", None]), "BAD_FIELD",
                 id="events-null-item"),
    pytest.param(create(webhook_events=["completed"]), "BAD_FIELD", id="events-without-url"),
]


@pytest.mark.parametrize(("change", "reason"), REFUSED_CREATES)
async def test_bad_webhook_fields_on_create_are_refused_and_write_nothing(
    store: ScriptStore, change: dict[str, Any], reason: str
) -> None:
    """webhook_url over 8192 bytes is TOO_LARGE; anything but an absolute http(s) URL with a
    host, without spaces and control characters, and events other than a non-empty array of
    the four names (given with a URL), is BAD_FIELD. No record, no wake."""
    await assert_refused(store, change, reason)
    assert await store.record(TASK) == {}


@pytest.mark.parametrize("url", [
    pytest.param(URL_8192, id="8192-bytes"),
    pytest.param(URL_8192_MULTIBYTE, id="8192-bytes-4098-chars"),
    pytest.param("http://127.0.0.1:8080/hook", id="http-address-port"),
    pytest.param("HTTPS://Hooks.Example/X?a=1&b=2#frag", id="scheme-any-case"),
    pytest.param("http://[::1]:9000/", id="ipv6-literal"),
    pytest.param("https://user:pw@hooks.example/x", id="userinfo"),
])
async def test_a_good_webhook_url_is_kept_on_the_record(store: ScriptStore, url: str) -> None:
    """Up to 8192 bytes (not characters) are accepted, and kept byte for byte."""
    async with wakes(store) as published:
        await store.apply(TASK, create(webhook_url=url))
        heard = await published.drain()
    record = await store.record(TASK)
    assert record["webhook_url"] == url
    assert record["webhook_events"] == "completed,failed"
    assert heard == [str(TASK).encode()]


@pytest.mark.parametrize(("change", "reason"), [
    pytest.param(update(progress=50, webhook_url=HOOK), "BAD_FIELD", id="url"),
    pytest.param(update(progress=50, webhook_events=["start"]), "BAD_FIELD", id="events"),
    pytest.param(update(webhook_url=HOOK, webhook_events=["completed"]), "BAD_FIELD",
                 id="both"),
    pytest.param(update(status="completed", webhook_url="http://other.example/"), "BAD_FIELD",
                 id="url-with-completion"),
])
@pytest.mark.parametrize("existing", [None, HOOK], ids=["task-without-webhook",
                                                        "task-with-webhook"])
async def test_webhook_fields_on_update_are_refused(
    store: ScriptStore, change: dict[str, Any], reason: str, existing: str | None
) -> None:
    """webhook_url and webhook_events are set at creation only: on op=update BAD_FIELD, and
    the task (with or without a webhook of its own) is left as it was."""
    created = create() if existing is None else create(webhook_url=existing)
    await store.apply(TASK, created)
    await store.apply(TASK, update(status="processing", progress=40))
    await assert_refused(store, change, reason)
    record = await store.record(TASK)
    assert record.get("webhook_url") == existing
    assert record["status"] == "processing" and record["progress"] == "40"


async def test_a_webhook_needs_a_task_record_key(store: ScriptStore) -> None:
    """The wake channel is derived from the record key P:task:{ID}: a create with a webhook
    under any other key is refused (without one it is accepted, as before webhooks)."""
    keys = [f"{store.prefix}:job{{{TASK}}}", f"{store.prefix}:job{{{TASK}}}:events"]
    before = await snapshot(store.client, store.prefix)
    with pytest.raises(ResponseError) as info:
        await store.run(keys, [orjson.dumps({"task_id": str(TASK),
                                             **create(webhook_url=HOOK)})])
    assert reason_of(info.value) == "BAD_REQUEST"
    assert_unchanged(before, await snapshot(store.client, store.prefix))
    await store.run(keys, [orjson.dumps({"task_id": str(TASK), **create()})])


# --------------------------------------------------------------------------------------------
# What an accepted create keeps.

@pytest.mark.parametrize(("events", "kept"), [
    pytest.param(["completed"], "completed", id="one"),
    pytest.param(["failed", "start"], "start,failed", id="reordered"),
    pytest.param(["failed", "start", "failed", "progress", "start"], "start,progress,failed",
                 id="duplicates"),
    pytest.param(["completed", "failed", "progress", "start"], "start,progress,completed,failed",
                 id="all-reversed"),
    pytest.param(["progress", "progress"], "progress", id="one-twice"),
])
async def test_events_are_kept_in_canonical_order_without_duplicates(
    store: ScriptStore, events: list[str], kept: str
) -> None:
    await store.apply(TASK, create(webhook_url=HOOK, webhook_events=events))
    record = await store.record(TASK)
    assert record["webhook_events"] == kept
    assert record["webhook_url"] == HOOK


async def test_default_events_are_completed_and_failed(store: ScriptStore) -> None:
    reply = orjson.loads(await store.apply(TASK, create(webhook_url=HOOK)))
    record = await store.record(TASK)
    assert record["webhook_events"] == "completed,failed"
    # The task object is the contract's: the webhook is not part of it.
    assert "webhook_url" not in reply and "webhook_events" not in reply


async def test_started_version_is_the_first_change_to_processing(store: ScriptStore) -> None:
    """started_version: the version of the first change to processing; progress after it,
    and the completion, leave it alone."""
    await store.apply(TASK, create(webhook_url=HOOK, webhook_events=["start", "progress"]))
    assert (await store.record(TASK)).get("started_version", "0") == "0"
    started = orjson.loads(await store.apply(TASK, update(status="processing", progress=0)))
    assert started["version"] == 2
    assert (await store.record(TASK))["started_version"] == "2"
    for progress in (10, 60, 90):
        await store.apply(TASK, update(progress=progress))
        assert (await store.record(TASK))["started_version"] == "2"
    await store.apply(TASK, update(status="processing"))  # alters nothing
    done = orjson.loads(await store.apply(TASK, update(status="completed")))
    record = await store.record(TASK)
    assert record["started_version"] == "2"
    assert record["version"] == str(done["version"]) == "6"


async def test_started_version_is_set_by_the_change_that_starts_processing_late(
    store: ScriptStore
) -> None:
    """A task that stays submitted for a while (a change of timeout_s) gets started_version
    only with the change that makes it processing; a task completed straight from submitted
    never has one."""
    await store.apply(TASK, create(webhook_url=HOOK))
    await store.apply(TASK, update(timeout_s=120))
    assert (await store.record(TASK)).get("started_version", "0") == "0"
    await store.apply(TASK, update(status="processing", progress=5))
    assert (await store.record(TASK))["started_version"] == "3"

    other = TASK + 1
    await store.apply(other, create(webhook_url=HOOK))
    await store.apply(other, update(status="completed", image_url="https://cdn/x.png"))
    assert (await store.record(other)).get("started_version", "0") == "0"


# --------------------------------------------------------------------------------------------
# The wake.

async def test_each_accepted_change_of_a_webhook_task_publishes_a_wake(
    store: ScriptStore
) -> None:
    """PUBLISH P:webhooks <id> for every accepted change of a task with a webhook (create,
    progress, completion, op=timeout), in order; none for a task without a webhook, for a
    change that alters nothing (also a repeated create with its token, a repeated completion)
    and for a refused change."""
    hooked, plain, overdue, plain_overdue, tokened = TASK, TASK + 1, TASK + 2, TASK + 3, TASK + 4
    async with wakes(store) as published:
        await store.apply(hooked, create(webhook_url=HOOK))                      # wake
        await store.apply(plain, create())
        await store.apply(hooked, update(status="processing", progress=10))      # wake
        await store.apply(plain, update(status="processing", progress=10))
        await store.apply(hooked, update(progress=10))                           # nothing new
        await store.apply(hooked, update(status="processing"))                   # nothing new
        await store.apply(hooked, update(progress=20))                           # wake
        assert await store.reject(hooked, update(progress=15)) == "PROGRESS_DECREASE"
        assert await store.reject(hooked, update(status="submitted")) == "BAD_TRANSITION"
        await store.apply(hooked, update(status="completed", image_url="/x.png"))  # wake
        await store.apply(hooked, update(status="completed", image_url="/x.png"))  # repeated
        assert await store.reject(hooked, update(status="failed",
                                                 error_message="late")) == "TERMINAL"
        await store.apply(plain, update(status="completed"))

        await store.apply(overdue, create(webhook_url=HOOK))                     # wake
        await store.apply(plain_overdue, create())
        for task_id in (overdue, plain_overdue):
            await store.hset(task_id, {"deadline_ms": "1"})
            failed = orjson.loads(await store.apply(task_id, {"op": "timeout"}))  # wake (hooked)
            assert failed["status"] == "failed"

        await store.apply(tokened, create(webhook_url=HOOK, create_token="tok-1"))  # wake
        await store.apply(tokened, create(webhook_url=HOOK, create_token="tok-1"))  # the same
        assert await store.reject(tokened, create(webhook_url=HOOK)) == "EXISTS"
        heard = await published.drain()
    assert heard == [str(task_id).encode() for task_id in
                     (hooked, hooked, hooked, hooked, overdue, overdue, tokened)]


async def test_the_wake_channel_follows_the_prefix(store: ScriptStore) -> None:
    """The wake goes to <prefix>:webhooks of the record key's own prefix only."""
    other = TaskKeys(store.prefix + "x")
    async with subscribed(store.client, [other.webhook_wake], TIMEOUT) as elsewhere:
        await store.apply(TASK, create(webhook_url=HOOK))
        heard_elsewhere = await elsewhere.drain()
    async with wakes(store) as published:
        await store.apply(TASK, update(progress=3))
        heard = await published.drain()
    assert heard_elsewhere == []
    assert heard == [str(TASK).encode()]


# --------------------------------------------------------------------------------------------
# Producers.

PRODUCER_REFUSALS = [
    pytest.param({"webhook_url": URL_8192 + "a"}, "TOO_LARGE", id="url-8193-bytes"),
    pytest.param({"webhook_url": URL_8192_MULTIBYTE + "a"}, "TOO_LARGE",
                 id="url-8193-bytes-4099-chars"),
    pytest.param({"webhook_url": ""}, "BAD_FIELD", id="url-empty"),
    pytest.param({"webhook_url": "ftp://hooks.example/x"}, "BAD_FIELD", id="url-ftp"),
    pytest.param({"webhook_url": "/hooks/x"}, "BAD_FIELD", id="url-relative"),
    pytest.param({"webhook_url": "http://"}, "BAD_FIELD", id="url-http-no-host"),
    pytest.param({"webhook_url": "https:///x"}, "BAD_FIELD", id="url-empty-host"),
    pytest.param({"webhook_url": "https://hooks.example/a b"}, "BAD_FIELD", id="url-space"),
    pytest.param({"webhook_url": "https://hooks.example/a\nb"}, "BAD_FIELD", id="url-newline"),
    pytest.param({"webhook_url": "https://hooks.example/a\x00b"}, "BAD_FIELD", id="url-nul"),
    pytest.param({"webhook_url": "https://hooks.example/a\x7fb"}, "BAD_FIELD", id="url-del"),
    pytest.param({"webhook_url": HOOK, "webhook_events": "completed"}, "BAD_FIELD",
                 id="events-string"),
    pytest.param({"webhook_url": HOOK, "webhook_events": []}, "BAD_FIELD", id="events-empty"),
    pytest.param({"webhook_url": HOOK, "webhook_events": ["completed", "done"]}, "BAD_FIELD",
                 id="events-unknown-name"),
    pytest.param({"webhook_url": HOOK, "webhook_events": [None]}, "BAD_FIELD",
                 id="events-none-item"),
    pytest.param({"webhook_events": ["completed"]}, "BAD_FIELD", id="events-without-url"),
    pytest.param({"task_id": 77, "webhook_url": "ftp://x/"}, "BAD_FIELD", id="explicit-id"),
]


@pytest.mark.parametrize(("kwargs", "reason"), PRODUCER_REFUSALS)
async def test_producers_refuse_bad_webhooks_before_sending_anything(
    flavour: Flavour, redis: aioredis.Redis, prefix: str, kwargs: dict[str, Any], reason: str
) -> None:
    """Producer.create / SyncProducer.create raise TransitionRejected with the script's reason
    before any command reaches Redis (INFO commandstats: no INCR, ZADD, script call), and no key
    under the prefix changes."""
    before = await snapshot(redis, prefix)
    calls = await command_calls(redis)
    with pytest.raises(TransitionRejected) as info:
        await flavour.call("create", **kwargs)
    assert await command_calls(redis) == calls
    assert_unchanged(before, await snapshot(redis, prefix))
    assert info.value.reason == reason


async def webhook_index(redis: aioredis.Redis, keys: TaskKeys) -> dict[int, dict[int, float]]:
    """Every webhook bucket's entries: bucket -> {task id: score}."""
    found: dict[int, dict[int, float]] = {}
    for bucket in range(WEBHOOK_BUCKETS):
        entries = await redis.zrange(keys.webhooks(bucket), 0, -1, withscores=True)
        if entries:
            found[bucket] = {int(member): score for member, score in entries}
    return found


async def test_producers_index_webhook_tasks_in_their_bucket(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """A create with a webhook puts the task into P:webhooks:{id % 16} scored "look now" (ms),
    and only there; a task without a webhook is in no webhook bucket. The record keeps the URL
    and the events."""
    keys = TaskKeys(prefix)
    started_ms = time.time() * 1000
    explicit = [await flavour.call("create", task_id=task_id, webhook_url=HOOK)
                for task_id in (5, 16, 37)]
    allocated = await flavour.call("create", webhook_url=HOOK + "/b",
                                   webhook_events=["start", "completed"])
    plain = await flavour.call("create", task_id=100)
    plain_allocated = await flavour.call("create")
    ended_ms = time.time() * 1000

    hooked = [task.task_id for task in [*explicit, allocated]]
    index = await webhook_index(redis, keys)
    assert sorted(t for entries in index.values() for t in entries) == sorted(hooked)
    for task_id in hooked:
        score = index[task_id % WEBHOOK_BUCKETS][task_id]
        assert started_ms - 1 <= score <= ended_ms + 1, (task_id, score)
    assert all(t not in entries for entries in index.values()
               for t in (plain.task_id, plain_allocated.task_id))

    record = {k.decode(): v.decode()
              for k, v in (await redis.hgetall(keys.record(allocated.task_id))).items()}
    assert record["webhook_url"] == HOOK + "/b"
    assert record["webhook_events"] == "start,completed"
    assert (await redis.hget(keys.record(5), "webhook_events")) == b"completed,failed"
    assert await redis.hget(keys.record(100), "webhook_url") is None


async def test_a_producer_create_never_postpones_an_index_entry(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """The producer's ZADD is LT: an entry already due earlier (a gateway's retry time, say)
    keeps its score; a later one is brought forward to now."""
    keys = TaskKeys(prefix)
    early, late = 3, 19  # both in bucket 3
    await redis.zadd(keys.webhooks_of(early), {str(early): 1000, str(late): 2 ** 50})
    await flavour.call("create", task_id=early, webhook_url=HOOK)
    await flavour.call("create", task_id=late, webhook_url=HOOK)
    assert await redis.zscore(keys.webhooks_of(early), str(early)) == 1000
    late_score = await redis.zscore(keys.webhooks_of(late), str(late))
    assert late_score is not None and late_score <= time.time() * 1000 + 1
