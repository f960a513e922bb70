"""The producer library, the CLI, and producers that do not use the library at all.

Everything runs against the session's real redis-server.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from taskcast.errors import TaskNotFound, TransitionRejected
from taskcast.keys import TaskKeys
from taskcast.models import Task, TaskStatus
from taskcast.producer import Producer, SyncProducer
from taskcast.script import script_source
from taskcast.store import TaskStore
from tests.channels import subscribed
from tests.servers import REDIS_CLI, RedisServer

TIMEOUT = 10.0
DAY = 86_400


@pytest.fixture
def keys(prefix: str) -> TaskKeys:
    return TaskKeys(prefix)


@pytest.fixture
def store(redis: aioredis.Redis, keys: TaskKeys) -> TaskStore:
    return TaskStore(redis, keys)


@pytest.fixture
def sync_producer(redis_server: RedisServer, prefix: str) -> Iterator[SyncProducer]:
    producer = SyncProducer.from_url(redis_server.url, prefix=prefix)
    yield producer
    producer.close()


async def record_of(redis: aioredis.Redis, keys: TaskKeys, task_id: int) -> dict[bytes, bytes]:
    async with asyncio.timeout(TIMEOUT):
        return dict(await redis.hgetall(keys.record(task_id)))


# --------------------------------------------------------------------------------------------
# Producer (asyncio)


async def test_create_without_id_allocates_increasing_ids_from_the_counter(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys
) -> None:
    async with asyncio.timeout(TIMEOUT):
        tasks = [await producer.create(type="txt2img", angle="front") for _ in range(3)]
        assert [task.task_id for task in tasks] == [1, 2, 3]
        assert await redis.get(keys.id_counter) == b"3"

        await redis.set(keys.id_counter, 41)  # another producer took ids up to 41
        assert (await producer.create()).task_id == 42
        assert await redis.get(keys.id_counter) == b"42"

    first = tasks[0]
    assert first == Task(task_id=1, status=TaskStatus.SUBMITTED, progress=0, type="txt2img",
                         angle="front", version=1, updated_at=first.updated_at)
    assert first.updated_at > 0


async def test_create_with_explicit_id_uses_it_and_leaves_the_counter_alone(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys, store: TaskStore
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create(task_id=9_000_000_000_123, type="img2img", angle="left")
        assert task.task_id == 9_000_000_000_123
        assert await redis.get(keys.id_counter) is None
        assert await store.get(task.task_id) == task
        with pytest.raises(TransitionRejected) as info:
            await producer.create(task_id=9_000_000_000_123)
    assert info.value.reason == "EXISTS"


async def test_progress_marks_processing_and_publishes_the_task(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys, store: TaskStore
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create(type="txt2img")
        async with subscribed(redis, [keys.channel(task.task_id)], TIMEOUT) as events:
            at_40 = await producer.progress(task.task_id, 40)
            at_75 = await producer.progress(task.task_id, 75)
            published = await events.drain()
        stored = await store.get(task.task_id)

    assert (at_40.status, at_40.progress, at_40.version) == (TaskStatus.PROCESSING, 40, 2)
    assert (at_75.status, at_75.progress, at_75.version) == (TaskStatus.PROCESSING, 75, 3)
    assert at_75.type == "txt2img"
    assert [Task.from_json(message) for message in published] == [at_40, at_75]
    assert stored == at_75


async def test_progress_with_status_submitted_keeps_the_task_submitted(
    producer: Producer,
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        queued = await producer.progress(task.task_id, 5, status=TaskStatus.SUBMITTED)
    assert (queued.status, queued.progress, queued.version) == (TaskStatus.SUBMITTED, 5, 2)


async def test_complete_with_image_url_sets_progress_100_and_the_retention_ttl(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys, store: TaskStore
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        await producer.progress(task.task_id, 60)
        done = await producer.complete(task.task_id, image_url="https://cdn.example/1.png")
        ttl = await redis.ttl(keys.record(task.task_id))
        stored = await store.get(task.task_id)

    assert (done.status, done.progress, done.version) == (TaskStatus.COMPLETED, 100, 3)
    assert (done.image_url, done.image_base64) == ("https://cdn.example/1.png", "")
    assert done.is_terminal
    assert stored == done
    assert DAY - 2 <= ttl <= DAY


async def test_complete_base64_encodes_raw_bytes(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys
) -> None:
    raw = b"\x89PNG\r\n\x1a\n\x00\xff binary"
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        done = await producer.complete(task.task_id, image_base64=raw)
        record = await record_of(redis, keys, task.task_id)
    assert done.image_base64 == base64.b64encode(raw).decode("ascii")
    assert base64.b64decode(done.image_base64) == raw
    assert record[b"image_base64"] == base64.b64encode(raw)


async def test_complete_passes_a_str_image_unchanged(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys
) -> None:
    text = "aGVsbG8="  # base64 text is checked (contract 8) but not re-encoded
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        done = await producer.complete(task.task_id, image_base64=text, image_url="/u")
        record = await record_of(redis, keys, task.task_id)
    assert (done.image_base64, done.image_url) == (text, "/u")
    assert record[b"image_base64"] == text.encode()


async def test_fail_records_the_error_message_and_keeps_progress(
    producer: Producer, store: TaskStore
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        await producer.progress(task.task_id, 30)
        failed = await producer.fail(task.task_id, 'CUDA "out of memory" ✗')
        stored = await store.get(task.task_id)
    assert (failed.status, failed.progress) == (TaskStatus.FAILED, 30)
    assert failed.error_message == 'CUDA "out of memory" ✗'
    assert stored == failed


async def test_fail_with_empty_message_raises_value_error_and_writes_nothing(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        before = await record_of(redis, keys, task.task_id)
        with pytest.raises(ValueError):
            await producer.fail(task.task_id, "")
        assert await record_of(redis, keys, task.task_id) == before


async def test_update_applies_any_allowed_change(producer: Producer) -> None:
    async with asyncio.timeout(TIMEOUT):
        task = await producer.create()
        done = await producer.update(task.task_id, status="completed", image_url="/u",
                                     image_base64="YmI=")
    assert (done.status, done.image_url, done.image_base64) == (
        TaskStatus.COMPLETED, "/u", "YmI=")


async def _completed(producer: Producer) -> int:
    task = await producer.create()
    await producer.complete(task.task_id, image_url="/u")
    return task.task_id


async def test_repeating_the_completion_returns_the_same_state(producer: Producer) -> None:
    task = await producer.create()
    done = await producer.complete(task.task_id, image_url="/u")
    again = await producer.complete(task.task_id, image_url="/u")  # a worker's retry
    assert again == done
    assert again.version == 2  # create (1), complete (2); the repeat wrote nothing


async def _at_50(producer: Producer) -> int:
    task = await producer.create()
    await producer.progress(task.task_id, 50)
    return task.task_id


REJECTED_CALLS = [
    pytest.param(_completed, lambda p, i: p.progress(i, 100), "TERMINAL", id="after-complete"),
    pytest.param(_completed, lambda p, i: p.fail(i, "late"), "TERMINAL", id="fail-after-complete"),
    pytest.param(_completed, lambda p, i: p.complete(i, image_url="/other"), "TERMINAL",
                 id="complete-again-differently"),
    pytest.param(_at_50, lambda p, i: p.progress(i, 49), "PROGRESS_DECREASE", id="decrease"),
    pytest.param(_at_50, lambda p, i: p.progress(i, 101), "BAD_PROGRESS", id="above-100"),
    pytest.param(_at_50, lambda p, i: p.progress(i, 60, status=TaskStatus.SUBMITTED),
                 "BAD_TRANSITION", id="back-to-submitted"),
    pytest.param(_at_50, lambda p, i: p.update(i, type="other"), "BAD_FIELD", id="type-change"),
    pytest.param(_at_50, lambda p, i: p.update(i, error_message="x"), "BAD_FIELD",
                 id="error-without-failure"),
    pytest.param(_at_50, lambda p, i: p.update(i, status="paused"), "BAD_STATUS",
                 id="unknown-status"),
]


@pytest.mark.parametrize(("setup", "call", "reason"), REJECTED_CALLS)
async def test_rejected_transition_raises_transition_rejected_with_reason(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys, setup: Any, call: Any,
    reason: str,
) -> None:
    async with asyncio.timeout(TIMEOUT):
        task_id = await setup(producer)
        before = await record_of(redis, keys, task_id)
        with pytest.raises(TransitionRejected) as info:
            await call(producer, task_id)
        assert await record_of(redis, keys, task_id) == before
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")


@pytest.mark.parametrize("call", [
    pytest.param(lambda p: p.progress(404, 10), id="progress"),
    pytest.param(lambda p: p.complete(404, image_url="/u"), id="complete"),
    pytest.param(lambda p: p.fail(404, "boom"), id="fail"),
    pytest.param(lambda p: p.update(404, status="processing"), id="update"),
])
async def test_update_of_a_missing_task_raises_task_not_found(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys, call: Any
) -> None:
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(TaskNotFound) as info:
            await call(producer)
        assert await redis.exists(keys.record(404)) == 0
    assert info.value.task_id == 404


async def test_producer_retention_s_sets_the_ttl_and_zero_keeps_forever(
    redis: aioredis.Redis, prefix: str, keys: TaskKeys
) -> None:
    short = Producer(redis, prefix=prefix, retention_s=90)
    forever = Producer(redis, prefix=prefix, retention_s=0)
    async with asyncio.timeout(TIMEOUT):
        first = await short.create()
        await short.fail(first.task_id, "x")
        second = await forever.create()
        await forever.complete(second.task_id, image_url="/u")
        assert 88 <= await redis.ttl(keys.record(first.task_id)) <= 90
        assert await redis.ttl(keys.record(second.task_id)) == -1


async def test_out_of_range_retention_s_is_refused_without_touching_the_task(
    redis: aioredis.Redis, prefix: str, keys: TaskKeys
) -> None:
    misconfigured = Producer(redis, prefix=prefix, retention_s=10**16)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(TransitionRejected) as refused_create:
            await misconfigured.create()
        assert refused_create.value.reason == "BAD_REQUEST"
        task = await Producer(redis, prefix=prefix).create()
        before = await record_of(redis, keys, task.task_id)
        with pytest.raises(TransitionRejected) as refused:
            await misconfigured.complete(task.task_id, image_url="/u")
        assert refused.value.reason == "BAD_REQUEST"
        assert await record_of(redis, keys, task.task_id) == before


async def test_sharded_producer_spublishes_the_event(
    redis: aioredis.Redis, prefix: str, keys: TaskKeys
) -> None:
    producer = Producer(redis, prefix=prefix, sharded=True)
    pubsub = redis.pubsub()
    try:
        async with asyncio.timeout(TIMEOUT):
            task = await producer.create(task_id=5)
            await pubsub.ssubscribe(keys.channel(5))
            while (await pubsub.get_message(timeout=1.0)) is None:
                pass
            done = await producer.complete(task.task_id, image_url="/u")
            message = None
            while message is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        async with asyncio.timeout(TIMEOUT):
            await pubsub.aclose()
    assert message["type"] == "smessage"
    assert Task.from_json(message["data"]) == done


async def test_memory_producer_runs_the_same_flow(prefix: str) -> None:
    producer = Producer.from_url(f"memory://producer-{prefix}", prefix=prefix)
    try:
        async with asyncio.timeout(TIMEOUT):
            task = await producer.create(type="t")
            await producer.progress(task.task_id, 20)
            done = await producer.complete(task.task_id, image_base64=b"\x00\x01")
            with pytest.raises(TransitionRejected) as info:
                await producer.progress(task.task_id, 100)
            with pytest.raises(TaskNotFound):
                await producer.progress(task.task_id + 1, 1)
    finally:
        await producer.close()
    assert (task.task_id, done.status, done.progress, done.version) == (
        1, TaskStatus.COMPLETED, 100, 3)
    assert done.image_base64 == "AAE="
    assert info.value.reason == "TERMINAL"


# --------------------------------------------------------------------------------------------
# SyncProducer


def test_sync_producer_create_progress_complete_and_get(sync_producer: SyncProducer) -> None:
    task = sync_producer.create(type="txt2img", angle="back")
    assert (task.task_id, task.status, task.version) == (1, TaskStatus.SUBMITTED, 1)
    assert sync_producer.get(task.task_id) == task

    at_70 = sync_producer.progress(task.task_id, 70)
    assert (at_70.status, at_70.progress) == (TaskStatus.PROCESSING, 70)
    assert sync_producer.get(task.task_id) == at_70

    done = sync_producer.complete(task.task_id, image_base64=b"png-bytes", image_url="/u")
    assert (done.status, done.progress, done.version) == (TaskStatus.COMPLETED, 100, 3)
    assert done.image_base64 == base64.b64encode(b"png-bytes").decode()
    assert sync_producer.get(task.task_id) == done

    explicit = sync_producer.create(task_id=77)
    assert explicit.task_id == 77
    assert sync_producer.create().task_id == 2


def test_sync_producer_fail_and_rejections(sync_producer: SyncProducer) -> None:
    task = sync_producer.create()
    with pytest.raises(ValueError):
        sync_producer.fail(task.task_id, "")
    assert sync_producer.get(task.task_id) == task

    failed = sync_producer.fail(task.task_id, "boom")
    assert (failed.status, failed.error_message) == (TaskStatus.FAILED, "boom")
    with pytest.raises(TransitionRejected) as info:
        sync_producer.progress(task.task_id, 10)
    assert info.value.reason == "TERMINAL"
    with pytest.raises(TransitionRejected) as info:
        sync_producer.create(task_id=task.task_id)
    assert info.value.reason == "EXISTS"
    assert sync_producer.get(task.task_id) == failed


def test_sync_producer_missing_task_raises_task_not_found(sync_producer: SyncProducer) -> None:
    with pytest.raises(TaskNotFound):
        sync_producer.get(12345)
    with pytest.raises(TaskNotFound):
        sync_producer.progress(12345, 10)
    with pytest.raises(TaskNotFound):
        sync_producer.get(12345)  # the failed update created nothing


# --------------------------------------------------------------------------------------------
# Producers that do not use the library


def plain_record(task: dict[str, Any]) -> dict[str, str]:
    """The contract's string fields of a record, as a plain HSET producer writes them."""
    return {
        "task_id": str(task["task_id"]), "status": task["status"],
        "progress": str(task["progress"]), "type": task["type"], "angle": task["angle"],
        "image_url": task["image"]["image_url"],
        "image_base64": task["image"]["image_base64"],
        "error_message": task["error_message"], "version": str(task["version"]),
        "created_at": "1700000000000", "updated_at": str(task["updated_at"]),
    }


async def test_plain_hset_and_publish_producer_is_read_by_the_store(
    redis: aioredis.Redis, keys: TaskKeys, store: TaskStore
) -> None:
    task = {
        "task_id": 31, "status": "processing", "progress": 45, "type": "txt2img",
        "angle": "front ↑", "image": {"image_base64": "", "image_url": ""},
        "error_message": "", "version": 4, "updated_at": 1_700_000_123_456,
    }
    async with asyncio.timeout(TIMEOUT):
        async with subscribed(redis, [keys.channel(31)], TIMEOUT) as events:
            await redis.hset(keys.record(31), mapping=plain_record(task))
            await redis.publish(keys.channel(31), orjson.dumps(task))
            published = await events.drain()
        stored = await store.get(31)

    expected = Task(task_id=31, status=TaskStatus.PROCESSING, progress=45, type="txt2img",
                    angle="front ↑", version=4, updated_at=1_700_000_123_456)
    assert stored == expected
    assert [Task.from_json(message) for message in published] == [expected]
    assert stored is not None and stored.to_dict() == task


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({"status": "processing", "progress": "30"},
                 {"status": TaskStatus.PROCESSING, "progress": 30}, id="status-and-progress"),
    pytest.param({"type": "txt2img"}, {"status": TaskStatus.SUBMITTED, "type": "txt2img"},
                 id="type-only"),
    pytest.param({"status": "completed", "image_url": "https://cdn/x.png", "progress": "100"},
                 {"status": TaskStatus.COMPLETED, "progress": 100,
                  "image_url": "https://cdn/x.png"}, id="completed-without-version"),
    pytest.param({"status": "failed", "error_message": "boom"},
                 {"status": TaskStatus.FAILED, "error_message": "boom"}, id="failed"),
])
async def test_store_fills_defaults_for_a_partial_plain_record(
    redis: aioredis.Redis, keys: TaskKeys, store: TaskStore, fields: dict[str, str],
    expected: dict[str, Any],
) -> None:
    async with asyncio.timeout(TIMEOUT):
        await redis.hset(keys.record(8), mapping=fields)
        stored = await store.get(8)
    defaults: dict[str, Any] = {
        "task_id": 8, "status": TaskStatus.SUBMITTED, "progress": 0, "type": "", "angle": "",
        "image_base64": "", "image_url": "", "error_message": "", "version": 0,
        "updated_at": 0,
    }
    assert stored == Task(**{**defaults, **expected})


async def test_script_continues_a_record_written_by_plain_hset(
    producer: Producer, redis: aioredis.Redis, keys: TaskKeys, store: TaskStore
) -> None:
    async with asyncio.timeout(TIMEOUT):
        await redis.hset(keys.record(12), mapping={"status": "processing", "progress": "20",
                                                   "type": "txt2img", "version": "6"})
        task = await producer.progress(12, 35)
        assert await store.get(12) == task
    assert (task.status, task.progress, task.type, task.version) == (
        TaskStatus.PROCESSING, 35, "txt2img", 7)


@pytest.fixture
def script_file() -> Iterator[Path]:
    """The shipped .lua file itself, as a producer in another language would read it."""
    with as_file(files("taskcast").joinpath("lua/apply_change.lua")) as path:
        yield path


async def run_cli(*args: str) -> str:
    """redis-cli as a non-Python producer would call it; stdout and stderr together."""
    async with asyncio.timeout(TIMEOUT):
        process = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output, _ = await process.communicate()
    assert process.returncode == 0 or b"REJECTED" in output, output
    return output.decode()


async def test_redis_cli_evalsha_of_the_shipped_script_is_seen_by_python(
    redis_server: RedisServer, redis: aioredis.Redis, keys: TaskKeys, store: TaskStore,
    producer: Producer, script_file: Path,
) -> None:
    assert script_file.read_text(encoding="utf-8") == script_source()
    port = str(redis_server.port)
    sha = (await run_cli(
        "bash", "-c", 'exec "$0" -p "$1" SCRIPT LOAD "$(cat "$2")"', REDIS_CLI, port,
        str(script_file),
    )).strip()
    assert len(sha) == 40

    record, channel = keys.record(51), keys.channel(51)
    async with subscribed(redis, [channel], TIMEOUT) as events:
        created = await run_cli(
            REDIS_CLI, "-p", port, "EVALSHA", sha, "2", record, channel,
            '{"op":"create","task_id":"51","type":"go-worker","angle":"top"}',
        )
        progressed = await run_cli(
            REDIS_CLI, "-p", port, "EVALSHA", sha, "2", record, channel,
            '{"op":"update","task_id":"51","status":"processing","progress":25}',
        )
        published = await events.drain()

    assert [message.decode() for message in published] == [
        created.strip(), progressed.strip()]
    async with asyncio.timeout(TIMEOUT):
        stored = await store.get(51)
    assert stored == Task.from_json(progressed)
    assert stored is not None
    assert (stored.status, stored.progress, stored.type, stored.angle, stored.version) == (
        TaskStatus.PROCESSING, 25, "go-worker", "top", 2)

    # The Python producer carries on where the other one left off.
    async with asyncio.timeout(TIMEOUT):
        done = await producer.complete(51, image_url="/u")
    assert done.version == 3


async def test_redis_cli_evalsha_of_a_rejected_change_prints_rejected(
    redis_server: RedisServer, redis: aioredis.Redis, keys: TaskKeys, producer: Producer,
) -> None:
    port = str(redis_server.port)
    sha = (await run_cli(REDIS_CLI, "-p", port, "SCRIPT", "LOAD", script_source())).strip()
    async with asyncio.timeout(TIMEOUT):
        await producer.create(task_id=52)
        await producer.progress(52, 80)
        before = await record_of(redis, keys, 52)
    async with subscribed(redis, [keys.channel(52)], TIMEOUT) as events:
        output = await run_cli(
            REDIS_CLI, "-p", port, "EVALSHA", sha, "2", keys.record(52), keys.channel(52),
            '{"op":"update","task_id":"52","progress":10}',
        )
        published = await events.drain()
    assert "REJECTED PROGRESS_DECREASE" in output
    assert published == []
    assert await record_of(redis, keys, 52) == before


# --------------------------------------------------------------------------------------------
# CLI


def taskcast(
    redis_server: RedisServer, prefix: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """`taskcast task <args>` in a subprocess, pointed at this test's server and prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCAST_")}
    return subprocess.run(
        [sys.executable, "-m", "taskcast", "task", *args,
         "--redis-url", redis_server.url, "--prefix", prefix],
        capture_output=True, text=True, timeout=30, check=False, env=env,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    data: dict[str, Any] = orjson.loads(result.stdout)
    return data


def test_cli_task_lifecycle_prints_each_task_as_json(
    redis_server: RedisServer, prefix: str
) -> None:
    created = ok_json(taskcast(redis_server, prefix, "create", "--type", "txt2img",
                               "--angle", "front"))
    assert created["task_id"] == 1
    assert (created["status"], created["type"], created["angle"]) == (
        "submitted", "txt2img", "front")

    progressed = ok_json(taskcast(redis_server, prefix, "progress", "1", "40"))
    assert (progressed["status"], progressed["progress"], progressed["version"]) == (
        "processing", 40, 2)

    done = ok_json(taskcast(redis_server, prefix, "complete", "1", "--image-url", "https://x"))
    assert (done["status"], done["progress"], done["image"]) == (
        "completed", 100, {"image_base64": "", "image_url": "https://x"})

    assert ok_json(taskcast(redis_server, prefix, "get", "1")) == done


def test_cli_create_with_id_and_fail(redis_server: RedisServer, prefix: str) -> None:
    created = ok_json(taskcast(redis_server, prefix, "create", "--id", "900"))
    assert (created["task_id"], created["version"]) == (900, 1)
    failed = ok_json(taskcast(redis_server, prefix, "fail", "900", "GPU on fire"))
    assert (failed["status"], failed["error_message"]) == ("failed", "GPU on fire")
    assert ok_json(taskcast(redis_server, prefix, "get", "900")) == failed


def test_cli_rejected_change_exits_1_with_a_taskcast_message(
    redis_server: RedisServer, prefix: str
) -> None:
    ok_json(taskcast(redis_server, prefix, "create", "--id", "3"))
    ok_json(taskcast(redis_server, prefix, "progress", "3", "50"))
    result = taskcast(redis_server, prefix, "progress", "3", "20")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("taskcast: PROGRESS_DECREASE")

    again = taskcast(redis_server, prefix, "create", "--id", "3")
    assert again.returncode == 1
    assert again.stderr.startswith("taskcast: EXISTS")

    empty = taskcast(redis_server, prefix, "fail", "3", "")
    assert empty.returncode == 1
    assert empty.stderr.startswith("taskcast: ")
    assert ok_json(taskcast(redis_server, prefix, "get", "3"))["progress"] == 50


def test_cli_get_of_a_missing_task_exits_1(redis_server: RedisServer, prefix: str) -> None:
    result = taskcast(redis_server, prefix, "get", "4242")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "taskcast: task 4242 not found\n"


def test_cli_complete_image_file_base64_encodes_the_file(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    image = tmp_path / "out.png"
    image.write_bytes(bytes(range(256)) * 3)
    ok_json(taskcast(redis_server, prefix, "create", "--id", "6"))
    done = ok_json(taskcast(redis_server, prefix, "complete", "6", "--image-file", str(image)))
    assert done["image"]["image_base64"] == base64.b64encode(image.read_bytes()).decode()
    assert ok_json(taskcast(redis_server, prefix, "get", "6")) == done


async def test_a_create_that_finds_its_allocated_id_taken_skips_to_the_next_one(
    redis: aioredis.Redis, prefix: str, keys: TaskKeys
) -> None:
    """Issue 12: the id INCR handed out already has a record that this create did not make
    (an explicit id given elsewhere). Before, create() returned that foreign record as its
    own; now it is never adopted, and the create takes the next id."""
    producer = Producer(redis, prefix=prefix)
    async with asyncio.timeout(TIMEOUT):
        await redis.set(keys.id_counter, 4)
        earlier = await producer.create(task_id=5, type="txt2img", angle="front")
        again = await producer.create(type="other", angle="back")
        assert again.task_id == 6 and (again.type, again.version) == ("other", 1)
        assert await producer.get(5) == earlier
        with pytest.raises(TransitionRejected) as refused:  # an explicit id stays strict
            await producer.create(task_id=5)
        assert refused.value.reason == "EXISTS"


def test_a_sync_create_that_finds_its_allocated_id_taken_skips_to_the_next_one(
    redis_server: RedisServer, prefix: str
) -> None:
    producer = SyncProducer.from_url(redis_server.url, prefix=prefix)
    try:
        producer.redis.set(TaskKeys(prefix).id_counter, 6)
        earlier = producer.create(task_id=7, type="txt2img")
        again = producer.create(type="other")
        assert again.task_id == 8 and (again.type, again.version) == ("other", 1)
        assert producer.get(7) == earlier
    finally:
        producer.close()


async def test_many_concurrent_first_creates_on_a_new_producer_all_succeed(
    redis_server: RedisServer, prefix: str
) -> None:
    producer = Producer.from_url(redis_server.url, prefix=prefix)
    try:
        async with asyncio.timeout(TIMEOUT):
            await producer.redis.script_flush()  # every call would otherwise race to load it
            created = await asyncio.gather(*(producer.create() for _ in range(200)))
        assert sorted(task.task_id for task in created) == list(range(1, 201))
    finally:
        await producer.close()
