"""The producer library for generation workers: every change goes through the Lua script.

    producer = Producer.from_url("redis://127.0.0.1:6379/0")
    task = await producer.create(type="txt2img", angle="front")
    await producer.progress(task.task_id, 40)
    await producer.complete(task.task_id, image_url="https://cdn/x.png")

`SyncProducer` offers the same calls for code that is not asyncio.
A refused change raises TransitionRejected (or TaskNotFound) and leaves the record untouched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from taskcast import caps
from taskcast.connection import connect, connect_sync, is_cluster_url
from taskcast.errors import StoreUnavailable, TaskNotFound, TransitionRejected
from taskcast.keys import DEFAULT_PREFIX, TaskKeys
from taskcast.models import RECORD_FIELDS, Task, TaskStatus
from taskcast.script import rejection_from, script_source
from taskcast.store import STORE_ERRORS, TaskStore, with_staged_image

DEFAULT_RETENTION_S = 86_400
DEFAULT_WAIT_S = 30.0  # how long a call waits for a free connection during a burst
DEFAULT_MAX_CONCURRENCY = 50
UPLOAD_TTL_MS = 120_000  # a staged image the completion never moved expires by itself
TIMEOUT_HINT_MARGIN_MS = 60_000
CREATE_ATTEMPTS = 5  # ids from INCR that turn out to be taken, before giving up


class _Changes:
    """Builds the change documents and script calls; shared by both producers, so that the
    two send the same bytes. Checks the field caps (caps.py) before anything is sent."""

    def __init__(self, prefix: str, retention_s: int, sharded: bool) -> None:
        self.keys = TaskKeys(prefix)
        self.retention_s = retention_s
        self.publish = "SPUBLISH" if sharded else "PUBLISH"

    def document(self, op: str, task_id: int, fields: dict[str, Any]) -> bytes:
        """The change as JSON; fields set to None are left out (they change nothing)."""
        change = {"op": op, "task_id": str(task_id), "retention_s": self.retention_s,
                  "publish": self.publish}
        change.update({name: value for name, value in fields.items() if value is not None})
        return orjson.dumps(change)

    def script_keys(self, task_id: int, upload: str | None = None) -> list[str]:
        """KEYS of the script call: the task's record, then its channel (then, for a staged
        image, the upload and the image key)."""
        keys = [self.keys.record(task_id), self.keys.channel(task_id)]
        if upload is not None:
            keys += [upload, self.keys.image(task_id)]
        return keys

    @staticmethod
    def creation(type: str, angle: str, timeout_s: int | None, webhook_url: str | None,
                 webhook_events: Sequence[str] | None) -> dict[str, Any]:
        """The fields of a create, with a fresh create_token (see Producer.create)."""
        caps.check_webhook(webhook_url, webhook_events)
        events = list(webhook_events) if webhook_events is not None else None
        return {"type": type, "angle": angle, "timeout_s": timeout_s,
                "create_token": secrets.token_urlsafe(12), "webhook_url": webhook_url,
                "webhook_events": events}

    @staticmethod
    def webhook_hint() -> int:
        """Score of a new task in its webhooks bucket: look now (ms)."""
        return int(time.time() * 1000)

    @staticmethod
    def checked(fields: dict[str, Any]) -> dict[str, Any]:
        """The fields after the caps of contract 8 (TransitionRejected as the script would)."""
        caps.check_labels(fields)
        caps.check_image_url(fields.get("image_url"))
        caps.check_timeout(fields.get("timeout_s"))
        return fields

    @staticmethod
    def staged(fields: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        """Splits a large image off the fields: (fields with `image_bytes`, raw bytes to
        upload), or (fields, None) for an image small enough to send inline (or none).

        `image_base64` may be raw bytes (encoded here) or base64 text (checked here)."""
        image = fields.get("image_base64")
        if image is None:
            return fields, None
        if isinstance(image, str):
            if len(image) <= caps.INLINE_IMAGE_BASE64_BYTES:
                caps.decode_image_base64(image)  # refuse bad base64 before Redis does
                return fields, None
            image = caps.decode_image_base64(image)
        caps.check_raw_image(image)
        if (len(image) + 2) // 3 * 4 <= caps.INLINE_IMAGE_BASE64_BYTES:
            return {**fields, "image_base64": base64.b64encode(image).decode("ascii")}, None
        rest = {name: value for name, value in fields.items() if name != "image_base64"}
        return {**rest, "image_bytes": len(image)}, image

    @staticmethod
    def completion(image_url: str | None, image_base64: str | bytes | None) -> dict[str, Any]:
        """The fields of a completion (raw image bytes or base64 text, see staged())."""
        return {"status": TaskStatus.COMPLETED.value, "image_url": image_url,
                "image_base64": image_base64}

    @staticmethod
    def failure(error_message: str) -> dict[str, Any]:
        """The fields of a failure; raises ValueError for an empty message."""
        if not error_message:
            raise ValueError("a failed task needs an error_message")
        return {"status": TaskStatus.FAILED.value, "error_message": error_message}

    @staticmethod
    def timeout_hint(timeout_s: int | None) -> int:
        """Score of a task in its timeouts bucket: when a gateway should first look (ms).

        A hint that may be early, never late by much: a minute before the deadline by this
        machine's clock, so a clock up to a minute ahead of Redis's does not delay the timeout.
        The gateway asks the script, which goes by Redis's clock and the record's deadline."""
        timeout = caps.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        return int(time.time() * 1000) + timeout * 1000 - TIMEOUT_HINT_MARGIN_MS

    @staticmethod
    def result(reply: bytes, image: bytes | None, fields: dict[str, Any]) -> Task:
        """The task the script returned, with the image it left out filled in."""
        task = Task.from_json(reply)
        if task.image_omitted:
            if image is not None:
                return task.with_image_base64(base64.b64encode(image).decode("ascii"))
            sent = fields.get("image_base64")
            if isinstance(sent, str):
                return task.with_image_base64(sent)
        return task


class Producer:
    """Changes tasks through the update script, for asyncio code.

    Each change is one atomic script call, which publishes the new state if it changed
    anything. It returns the task as the script left it, or raises TransitionRejected
    (`reason` as in the contract; nothing written), TaskNotFound, or StoreUnavailable when
    Redis does not answer, in which case the change may or may not have happened. Sending
    the same change again is safe: a change that alters nothing writes and publishes
    nothing and returns the current state.

    Limits (contract 8) are checked before anything is sent, with the reasons the script
    uses: TOO_LARGE for a size, BAD_FIELD for a form, BAD_REQUEST for `timeout_s`.
    Images whose base64 is over 64 KiB are staged: the raw bytes are SET under an upload
    key, and the completion moves them in place (lua/apply_change.lua, "Staged images").

    A burst of calls waits for a free connection: at most `max_concurrency` calls talk to
    Redis at once, and a call that waits longer than `wait_s` for its turn raises
    StoreUnavailable without having sent anything.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_s: int = DEFAULT_RETENTION_S,
        sharded: bool = False,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self.redis = redis
        self._changes = _Changes(prefix, retention_s, sharded)
        self._script = redis.register_script(script_source())
        self._script_loaded = False
        self._script_lock: asyncio.Lock | None = None
        self._max_concurrency = max_concurrency
        self._turns: asyncio.Semaphore | None = None
        self.wait_s = wait_s

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Producer:
        """A `redis+cluster://` URL publishes with SPUBLISH (sharded) unless told otherwise.
        The client's own pool waits as long as the producer does (`wait_s`)."""
        options.setdefault("sharded", is_cluster_url(url))
        wait_s = options.get("wait_s", DEFAULT_WAIT_S)
        size = options.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        return cls(connect(url, max_connections=size, pool_timeout=wait_s), **options)

    async def close(self) -> None:
        """Close the Redis client, also one the caller passed in."""
        await self.redis.aclose()

    async def create(self, *, task_id: int | None = None, type: str = "", angle: str = "",
                     timeout_s: int | None = None, webhook_url: str | None = None,
                     webhook_events: Sequence[str] | None = None) -> Task:
        """Create a submitted task; without `task_id` the next id is allocated in Redis.

        Never returns a record it did not create: each create carries a random token stored
        on the record, and a create that finds a record is EXISTS unless the record has its
        token (redis-py sent the create again after a lost reply). An allocated id that is
        taken (ids given explicitly elsewhere, or a lost counter) is skipped for the next.
        With an explicit `task_id`, a taken id is TransitionRejected("EXISTS").

        `timeout_s` (default 3600): the task fails if no change arrives for that long.
        `webhook_url`: gateways POST the task's states there, `webhook_events` of them
        (default ["completed", "failed"]; README, "Webhooks")."""
        fields = _Changes.checked(_Changes.creation(type, angle, timeout_s, webhook_url,
                                                    webhook_events))
        async with self._turn():
            if not self._script_loaded:
                await self._load_script()  # before the INCR and the ZADD: see _load_script
            if task_id is not None:
                return await self._create(task_id, fields)
            for _ in range(CREATE_ATTEMPTS):
                try:
                    allocated = int(await self.redis.incr(self._changes.keys.id_counter))
                except STORE_ERRORS as exc:
                    raise StoreUnavailable(f"allocating a task id failed: {exc}") from exc
                try:
                    return await self._create(allocated, fields)
                except TransitionRejected as exc:
                    if exc.reason != "EXISTS":
                        raise
        raise TransitionRejected("EXISTS", f"{CREATE_ATTEMPTS} allocated ids in a row were "
                                 f"taken: is {self._changes.keys.id_counter} behind?")

    async def _create(self, task_id: int, fields: dict[str, Any]) -> Task:
        # Indexed before it exists, so that a crash between the two cannot leave a task that
        # never times out or whose webhook is never sent (an entry without a record is
        # dropped by the sweep), and again after, because a sweep in between may have dropped
        # the entry as such.
        webhook = fields.get("webhook_url") is not None
        await self._index(task_id, fields.get("timeout_s"), webhook=webhook)
        task = await self._call("create", task_id, fields)
        await self._index(task_id, fields.get("timeout_s"), webhook=webhook)
        return task

    async def get(self, task_id: int) -> Task:
        """The current record; raises TaskNotFound when there is none."""
        task = await TaskStore(self.redis, self._changes.keys).get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def progress(
        self, task_id: int, progress: int, *, status: TaskStatus = TaskStatus.PROCESSING,
        timeout_s: int | None = None,
    ) -> Task:
        """Set the progress (0..100; lower than the current one is PROGRESS_DECREASE) and
        the status, processing unless told otherwise; `timeout_s` replaces the task's."""
        return await self.update(task_id, status=status.value, progress=progress,
                                 timeout_s=timeout_s)

    async def complete(
        self,
        task_id: int,
        *,
        image_url: str | None = None,
        image_base64: str | bytes | None = None,
    ) -> Task:
        """Complete the task (progress 100) with an image URL and/or the image: raw bytes,
        or base64 text (checked). Images over 64 KiB of base64 are staged (see the class)."""
        return await self.update(task_id, **_Changes.completion(image_url, image_base64))

    async def fail(self, task_id: int, error_message: str) -> Task:
        """Fail the task; an empty `error_message` raises ValueError before Redis is asked.
        A message over 4096 bytes is cut there by the script."""
        return await self.update(task_id, **_Changes.failure(error_message))

    async def update(self, task_id: int, **fields: Any) -> Task:
        """Any change the contract allows (status, progress, image_url, image_base64,
        error_message, timeout_s)."""
        fields, image = _Changes.staged(_Changes.checked(fields))
        async with self._turn():
            task = await self._call("update", task_id, fields, image)
            if task.is_terminal:
                await self._unindex_timeout(task_id)
            elif fields.get("timeout_s") is not None:
                await self._index_timeout(task_id, fields["timeout_s"])
            return task

    # -- internals

    def _turn(self) -> _Turn:
        if self._turns is None:
            self._turns = asyncio.Semaphore(self._max_concurrency)
        return _Turn(self._turns, self.wait_s)

    async def _index(self, task_id: int, timeout_s: int | None, *, webhook: bool) -> None:
        await self._index_timeout(task_id, timeout_s)
        if webhook:
            try:  # LT as for timeouts: never postpones a look already scheduled
                await self.redis.zadd(self._changes.keys.webhooks_of(task_id),
                                      {str(task_id): _Changes.webhook_hint()}, lt=True)
            except STORE_ERRORS as exc:
                raise StoreUnavailable(f"indexing task {task_id} for webhooks failed: {exc}"
                                       ) from exc

    async def _index_timeout(self, task_id: int, timeout_s: int | None) -> None:
        # LT: an entry is only ever moved earlier (a hint may be early, never late), so a
        # create that finds its id taken cannot postpone the other task's timeout.
        key = self._changes.keys.timeouts_of(task_id)
        try:
            await self.redis.zadd(key, {str(task_id): _Changes.timeout_hint(timeout_s)}, lt=True)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"indexing task {task_id} for timeouts failed: {exc}"
                                   ) from exc

    async def _unindex_timeout(self, task_id: int) -> None:
        try:  # only housekeeping: the sweep drops finished tasks by itself
            await self.redis.zrem(self._changes.keys.timeouts_of(task_id), str(task_id))
        except STORE_ERRORS:
            pass

    async def _load_script(self) -> None:
        """Before the first command: set the client up and SCRIPT LOAD (on every primary of a
        cluster), once, while concurrent first calls wait.

        Otherwise each of many concurrent first calls gets NOSCRIPT and loads the script
        itself, which on a cluster exhausted the connection pool in the benchmark, and a cold
        cluster client's lazy start-up races under a burst of first commands."""
        if self._script_lock is None:
            self._script_lock = asyncio.Lock()
        async with self._script_lock:
            if self._script_loaded:
                return
            try:
                await self.redis.initialize()
                await self.redis.script_load(script_source())
            except STORE_ERRORS as exc:
                raise StoreUnavailable(f"loading the update script failed: {exc}") from exc
            self._script_loaded = True

    async def _call(self, op: str, task_id: int, fields: dict[str, Any],
                    image: bytes | None = None) -> Task:
        if not self._script_loaded:
            await self._load_script()
        upload = None
        try:
            if image is not None:
                upload = self._changes.keys.upload(task_id, secrets.token_hex(8))
                await self.redis.set(upload, image, px=UPLOAD_TTL_MS)
            reply = await self._script(keys=self._changes.script_keys(task_id, upload),
                                       args=[self._changes.document(op, task_id, fields)])
        except ResponseError as exc:
            raise rejection_from(exc, task_id) from None
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"changing task {task_id} failed: {exc}") from exc
        finally:
            if upload is not None:
                # Gone already when the completion moved it; left after a refusal.
                with contextlib.suppress(*STORE_ERRORS):
                    await self.redis.delete(upload)
        return _Changes.result(reply, image, fields)


class _Turn:
    """Waits up to `wait_s` for a place among the callers talking to Redis."""

    __slots__ = ("_semaphore", "_wait_s", "_held")

    def __init__(self, semaphore: asyncio.Semaphore, wait_s: float) -> None:
        self._semaphore = semaphore
        self._wait_s = wait_s
        self._held = False

    async def __aenter__(self) -> None:
        try:
            async with asyncio.timeout(self._wait_s):
                await self._semaphore.acquire()
        except TimeoutError:
            raise StoreUnavailable(f"no free Redis connection within {self._wait_s} s "
                                   "(nothing was sent)") from None
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        if self._held:
            self._semaphore.release()


class SyncProducer:
    """The blocking twin of Producer, for workers that are not asyncio: the same calls,
    returns, exceptions, caps, staging and timeouts, each blocking until Redis answers or
    the client gives up. Thread-safe as redis-py's client is (a connection per call)."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_s: int = DEFAULT_RETENTION_S,
        sharded: bool = False,
    ) -> None:
        self.redis = redis
        self._changes = _Changes(prefix, retention_s, sharded)
        self._script = redis.register_script(script_source())

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SyncProducer:
        """A `redis+cluster://` URL publishes with SPUBLISH (sharded) unless told otherwise."""
        options.setdefault("sharded", is_cluster_url(url))
        return cls(connect_sync(url), **options)

    def close(self) -> None:
        """Close the Redis client, also one the caller passed in."""
        self.redis.close()

    def create(self, *, task_id: int | None = None, type: str = "", angle: str = "",
               timeout_s: int | None = None, webhook_url: str | None = None,
               webhook_events: Sequence[str] | None = None) -> Task:
        """As Producer.create."""
        fields = _Changes.checked(_Changes.creation(type, angle, timeout_s, webhook_url,
                                                    webhook_events))
        if task_id is not None:
            return self._create(task_id, fields)
        for _ in range(CREATE_ATTEMPTS):
            try:
                allocated = int(self.redis.incr(self._changes.keys.id_counter))
            except STORE_ERRORS as exc:
                raise StoreUnavailable(f"allocating a task id failed: {exc}") from exc
            try:
                return self._create(allocated, fields)
            except TransitionRejected as exc:
                if exc.reason != "EXISTS":
                    raise
        raise TransitionRejected("EXISTS", f"{CREATE_ATTEMPTS} allocated ids in a row were "
                                 f"taken: is {self._changes.keys.id_counter} behind?")

    def _create(self, task_id: int, fields: dict[str, Any]) -> Task:
        webhook = fields.get("webhook_url") is not None
        self._index(task_id, fields.get("timeout_s"), webhook=webhook)  # see Producer._create
        task = self._call("create", task_id, fields)
        self._index(task_id, fields.get("timeout_s"), webhook=webhook)
        return task

    def progress(
        self, task_id: int, progress: int, *, status: TaskStatus = TaskStatus.PROCESSING,
        timeout_s: int | None = None,
    ) -> Task:
        """As Producer.progress."""
        return self.update(task_id, status=status.value, progress=progress, timeout_s=timeout_s)

    def complete(
        self,
        task_id: int,
        *,
        image_url: str | None = None,
        image_base64: str | bytes | None = None,
    ) -> Task:
        """As Producer.complete."""
        return self.update(task_id, **_Changes.completion(image_url, image_base64))

    def fail(self, task_id: int, error_message: str) -> Task:
        """As Producer.fail."""
        return self.update(task_id, **_Changes.failure(error_message))

    def update(self, task_id: int, **fields: Any) -> Task:
        """As Producer.update."""
        fields, image = _Changes.staged(_Changes.checked(fields))
        task = self._call("update", task_id, fields, image)
        if task.is_terminal:
            with contextlib.suppress(*STORE_ERRORS):
                self.redis.zrem(self._changes.keys.timeouts_of(task_id), str(task_id))
        elif fields.get("timeout_s") is not None:
            self._index_timeout(task_id, fields["timeout_s"])
        return task

    def get(self, task_id: int) -> Task:
        """The current record; raises TaskNotFound when there is none."""
        keys = self._changes.keys
        try:
            values = self.redis.hmget(keys.record(task_id), RECORD_FIELDS)
            task = Task.from_hmget(task_id, RECORD_FIELDS, values)
            if task is not None and task.image_omitted:
                task = with_staged_image(task, self.redis.get(keys.image(task_id)))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"reading task {task_id} failed: {exc}") from exc
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def _index(self, task_id: int, timeout_s: int | None, *, webhook: bool) -> None:
        self._index_timeout(task_id, timeout_s)
        if webhook:
            try:  # LT: see Producer._index
                self.redis.zadd(self._changes.keys.webhooks_of(task_id),
                                {str(task_id): _Changes.webhook_hint()}, lt=True)
            except STORE_ERRORS as exc:
                raise StoreUnavailable(f"indexing task {task_id} for webhooks failed: {exc}"
                                       ) from exc

    def _index_timeout(self, task_id: int, timeout_s: int | None) -> None:
        try:  # LT: see Producer._index_timeout
            self.redis.zadd(self._changes.keys.timeouts_of(task_id),
                            {str(task_id): _Changes.timeout_hint(timeout_s)}, lt=True)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"indexing task {task_id} for timeouts failed: {exc}"
                                   ) from exc

    def _call(self, op: str, task_id: int, fields: dict[str, Any],
              image: bytes | None = None) -> Task:
        upload = None
        try:
            if image is not None:
                upload = self._changes.keys.upload(task_id, secrets.token_hex(8))
                self.redis.set(upload, image, px=UPLOAD_TTL_MS)
            reply = self._script(keys=self._changes.script_keys(task_id, upload),
                                 args=[self._changes.document(op, task_id, fields)])
        except ResponseError as exc:
            raise rejection_from(exc, task_id) from None
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"changing task {task_id} failed: {exc}") from exc
        finally:
            if upload is not None:
                with contextlib.suppress(*STORE_ERRORS):
                    self.redis.delete(upload)
        return _Changes.result(reply, image, fields)
