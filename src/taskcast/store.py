"""Reading task records (contract section 3) for the REST endpoint and the live push hub."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from taskcast.errors import CorruptRecord, StoreUnavailable
from taskcast.keys import TaskKeys
from taskcast.models import RECORD_FIELDS, RECORD_FIELDS_WITHOUT_IMAGE_BASE64, Task

logger = logging.getLogger(__name__)

# Errors that mean "the store is not answering", as opposed to a bug in our code.
STORE_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


class TaskStore:
    """hub.TaskReader over Redis (or the embedded store): reads only, never writes.

    Every read raises StoreUnavailable when Redis does not answer (within the client's
    timeout); a record that breaks the contract raises CorruptRecord from get() and is left
    out of get_many(). A staged image (record field `image_bytes`) is read from its own key
    and base64-encoded here, so callers always get complete tasks.
    """

    def __init__(self, redis: aioredis.Redis, keys: TaskKeys) -> None:
        self.redis = redis
        self.keys = keys

    async def get(self, task_id: int, *, include_image_base64: bool = True) -> Task | None:
        """The current task, or None when there is no record (never created, or expired).

        Leaving `image_base64` out skips reading it from Redis too: it can be megabytes.
        """
        fields = RECORD_FIELDS if include_image_base64 else RECORD_FIELDS_WITHOUT_IMAGE_BASE64
        try:
            values = await self.redis.hmget(self.keys.record(task_id), fields)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"reading task {task_id} failed: {exc}") from exc
        task = Task.from_hmget(task_id, fields, values)
        if task is not None and task.image_omitted and include_image_base64:
            task = await self._with_image(task)
        return task

    async def _with_image(self, task: Task) -> Task:
        """The task with its staged image read and base64-encoded; raises CorruptRecord when
        the image key is missing or not `image_bytes` long."""
        try:
            data = await self.redis.get(self.keys.image(task.task_id))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"reading the image of task {task.task_id} failed: {exc}"
                                   ) from exc
        return with_staged_image(task, data)

    async def _hmget_many(self, task_ids: list[int], fields: Sequence[str]) -> list[Any]:
        """HMGET of the same fields from several records in one round trip (no MULTI)."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hmget(self.keys.record(task_id), fields)
                return list(await pipe.execute())
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"reading {len(task_ids)} tasks failed: {exc}") from exc

    async def get_many(self, task_ids: list[int]) -> dict[int, Task | None]:
        """Several records in one round trip (two when some have staged images)."""
        replies = await self._hmget_many(task_ids, RECORD_FIELDS)
        tasks: dict[int, Task | None] = {}
        staged: list[Task] = []
        for task_id, values in zip(task_ids, replies, strict=True):
            try:
                task = tasks[task_id] = Task.from_hmget(task_id, RECORD_FIELDS, values)
            except CorruptRecord as exc:  # one bad record must not hide the others
                logger.error("%s", exc)
                continue
            if task is not None and task.image_omitted:
                staged.append(task)
        # One at a time: on a cluster the image keys of different tasks are in different slots
        # (one MGET would be refused), and a batch rarely holds more than one.
        for task in staged:
            try:
                tasks[task.task_id] = await self._with_image(task)
            except CorruptRecord as exc:
                logger.error("%s", exc)
                del tasks[task.task_id]
        return tasks

    async def find_many(self, task_ids: list[int]) -> dict[int, Task | CorruptRecord | None]:
        """Which of these tasks exist, in one pipelined read without image bytes: the task
        (image left out), None without a record, or the CorruptRecord it raised. Raises
        StoreUnavailable when Redis does not answer: never a wrong "not found"."""
        replies = await self._hmget_many(task_ids, RECORD_FIELDS_WITHOUT_IMAGE_BASE64)
        found: dict[int, Task | CorruptRecord | None] = {}
        for task_id, values in zip(task_ids, replies, strict=True):
            try:
                found[task_id] = Task.from_hmget(task_id, RECORD_FIELDS_WITHOUT_IMAGE_BASE64,
                                                 values)
            except CorruptRecord as exc:
                found[task_id] = exc
        return found

    async def versions(self, task_ids: list[int]) -> dict[int, tuple[int, bool] | None]:
        """Only (version, finished) per record (None: no record; version -1: unreadable; a
        record without the field has version 0, as Task.from_record reads it), in one round
        trip: a cheap way to learn which of many watched records changed."""
        replies = await self._hmget_many(task_ids, ("version", "status"))
        found: dict[int, tuple[int, bool] | None] = {}
        for task_id, (version, status) in zip(task_ids, replies, strict=True):
            if version is None and status is None:
                found[task_id] = None
            else:
                if version is None:
                    number = 0
                else:
                    number = int(version) if version.isdigit() else -1
                found[task_id] = (number, status in (b"completed", b"failed"))
        return found

    async def ping(self) -> bool:
        """Whether Redis answers PING; never raises for a Redis that does not."""
        try:
            return bool(await self.redis.ping())
        except STORE_ERRORS:
            return False


def with_staged_image(task: Task, data: object) -> Task:
    """`task` (read with `image_omitted`) with the bytes of its image key, base64-encoded;
    raises CorruptRecord when they are missing or not `image_bytes` long. For TaskStore and
    SyncProducer, which read the key each their own way."""
    if not isinstance(data, bytes) or len(data) != task.staged_image_bytes:
        got = "missing" if data is None else f"{len(data)} bytes" if isinstance(
            data, bytes) else "not bytes"
        raise CorruptRecord(task.task_id, f"its staged image is {got}, not "
                            f"{task.staged_image_bytes} bytes")
    return task.with_image_base64(base64.b64encode(data).decode("ascii"))
