"""Webhook delivery (contract section 10): the task states a task's creator asked for, POSTed
to its `webhook_url`, signed, retried, at least once and in order.

How pending deliveries are remembered, so that nothing is lost to a restart, a Redis restart
or a lost pub/sub message, on a single Redis and on a cluster:

- The task's record is the truth. It holds `webhook_url`, `webhook_events`,
  `started_version` (written by the update script) and what this module wrote:
  `webhook_version` (the newest version delivered, or ended by a refusal), the failure streak
  (`webhook_attempts`, `webhook_failing_since`, `webhook_retry_at`, `webhook_last_error`), and
  `webhook_state` ("gone" after a 410, "dead" after the retry horizon). A message is pending
  when the record's current state is newer than `webhook_version` and is of a subscribed kind.
- The index `P:webhooks:{0..15}` holds every task whose webhook is not finished, scored by
  when to look next: producers add a task before and after creating it; this module moves
  the entry (a retry's time, or `recheck_s` later for an unfinished task with nothing
  pending) and removes it when the task is finished and delivered, gone or dead.
- The update script PUBLISHes the id of every changed task with a webhook on `P:webhooks`
  (a plain channel, which reaches every node of a cluster): the prompt path. A lost message
  only delays a delivery to the next look at the entry (`recheck_s`), and a reconnect of that
  subscription looks at every entry at once.
- Buckets are leased (webhook_leases.py): each bucket's tasks are delivered by one gateway, and
  within it one task's messages one at a time, so a newer version never overtakes an older one.

Each message is the task's newest state when it is sent (progress is conflated), so a retry
after a newer change sends that newer state, under its own `webhook-id` (`msg_<id>_<version>`,
the same on every attempt at that version, from any gateway).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from taskcast.aio import Backoff, cancel_and_wait
from taskcast.errors import CorruptRecord, StoreUnavailable
from taskcast.keys import WEBHOOK_BUCKETS, TaskKeys
from taskcast.metrics import Metrics
from taskcast.models import RECORD_FIELDS, Task, TaskStatus
from taskcast.store import STORE_ERRORS, with_staged_image
from taskcast.webhook_leases import BucketLeases
from taskcast.webhook_sender import Attempt, WebhookSender
from taskcast.webhook_signing import WebhookSigner

logger = logging.getLogger(__name__)

WEBHOOK_FIELDS = ("webhook_url", "webhook_events", "started_version", "webhook_version",
                  "webhook_state", "webhook_attempts", "webhook_failing_since",
                  "webhook_retry_at")
MAX_RETRY_DELAY_S = 1800.0  # retries grow 1, 2, 4 ... s (jittered) up to this
CORRUPT_RETRY_MS = 300_000
PAGE = 500  # index entries read per ZRANGE

# KEYS[1] the record. ARGV[1]: a version to record as delivered ('' for none; only ever
# raised), then field/value pairs to set ('' deletes the field). Nothing on a missing record:
# a delivery must not resurrect a record that expired.
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if ARGV[1] ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'webhook_version') or '0') or 0
  if tonumber(ARGV[1]) > current then
    redis.call('HSET', KEYS[1], 'webhook_version', ARGV[1])
  end
end
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
_CLEAR_FAILURES = ("webhook_attempts", "", "webhook_failing_since", "", "webhook_retry_at", "")


@dataclass(frozen=True, slots=True)
class Hook:
    """A task's webhook as its record has it."""

    url: str
    events: frozenset[str]
    started_version: int
    sent_version: int
    state: str
    attempts: int
    failing_since_ms: int
    retry_at_ms: int

    @classmethod
    def from_values(cls, values: list[Any]) -> Hook | None:
        """From an HMGET of WEBHOOK_FIELDS; None without a webhook_url."""
        text = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]
        if not text[0]:
            return None

        def number(value: str | None) -> int:
            return int(value) if value and value.isascii() and value.isdigit() else 0

        return cls(url=text[0], events=frozenset((text[1] or "completed,failed").split(",")),
                   started_version=number(text[2]), sent_version=number(text[3]),
                   state=text[4] or "", attempts=number(text[5]),
                   failing_since_ms=number(text[6]), retry_at_ms=number(text[7]))


def next_message(task: Task, hook: Hook) -> str | None:
    """The event to send for the task's current state, or None when nothing is pending.

    `start` is the first change to processing, `progress` any later change while processing;
    a start that was not yet delivered goes out as `start` with the newest state."""
    if task.version <= hook.sent_version:
        return None
    if task.status is TaskStatus.PROCESSING:
        if "start" in hook.events and hook.sent_version < hook.started_version:
            return "start"
        if "progress" in hook.events and task.version > hook.started_version:
            return "progress"
        return None
    if task.is_terminal and task.status.value in hook.events:
        return task.status.value
    return None


def envelope(kind: str, task: Task) -> bytes:
    """The Standard Webhooks body: type, timestamp (when the state was reached), data."""
    when = datetime.datetime.fromtimestamp(task.updated_at / 1000, datetime.UTC)
    return orjson.dumps({"type": f"task.{kind}",
                         "timestamp": when.isoformat(timespec="milliseconds").replace(
                             "+00:00", "Z"),
                         "data": task.to_dict()})


def message_id(task: Task) -> str:
    """The `webhook-id` of the message carrying this version of the task."""
    return f"msg_{task.task_id}_{task.version}"


def retry_delay_s(attempts: int, retry_after_s: float | None) -> float:
    """How long to wait after the `attempts`-th failure in a row: 0.5-1 s after the first,
    then doubling (jittered) up to MAX_RETRY_DELAY_S; never sooner than Retry-After."""
    delay = min(MAX_RETRY_DELAY_S, 2.0 ** (attempts - 1)) * random.uniform(0.5, 1.0)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_DELAY_S * 2))
    return delay


LOOK_ERRORS = (StoreUnavailable, *STORE_ERRORS)


class WebhookService:
    """Delivers the webhooks of the buckets this gateway holds; start() and close().

    `redis` is the service's own client (close() closes it), so that a burst of deliveries
    waits for its own connections rather than taking the ones REST reads need; `prepare` runs
    before its first command (a cluster client's start-up)."""

    def __init__(self, redis: Any, keys: TaskKeys, metrics: Metrics, signer: WebhookSigner,
                 sender: WebhookSender, *, wake_client: Callable[[], Any],
                 member: str, horizon_s: float = 86_400.0, recheck_s: float = 15.0,
                 sweep_s: float = 1.0, max_in_flight: int = 500,
                 prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.signer = signer
        self.sender = sender
        self._prepare = prepare
        self.horizon_ms = int(horizon_s * 1000)
        self.recheck_ms = int(recheck_s * 1000)
        self.sweep_s = sweep_s
        self.max_in_flight = max_in_flight
        self._wake_client = wake_client
        # A gateway stops sending `margin` before its lease could run out; the lease is long
        # enough that this leaves most of it usable, whatever the request timeout.
        margin = sender.timeout_s + 2.0
        self.leases = BucketLeases(redis, keys, member, busy=self._bucket_busy,
                                   lease_s=max(30.0, 3 * margin), margin_s=margin)
        self._mark = redis.register_script(_MARK)
        self._running: dict[int, bool] = {}  # task -> look again when this pass ends
        self._queued: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._retrying: set[int] = set()  # tasks this process knows to be in backoff
        self._workers: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        self.wake_connected = False
        self._wake_closing: asyncio.Future[None] | None = None
        metrics.webhook_retries_pending.set_function(lambda: len(self._retrying))
        # Read when scraped: a gauge set after each renewal lagged behind the first deliveries.
        metrics.webhook_buckets.set_function(lambda: len(self.leases.held))

    def start(self) -> None:
        """Lease buckets, listen for wakes and sweep, in the background until close()."""
        self._loops = [asyncio.create_task(self._lease_loop(), name="taskcast-webhook-leases"),
                       asyncio.create_task(self._sweep_loop(), name="taskcast-webhook-sweep"),
                       asyncio.create_task(self._wake_loop(), name="taskcast-webhook-wakes")]

    async def close(self) -> None:
        """Stop: no new sends; sends under way get the request timeout to end; then the
        buckets are given up so that another gateway takes over at once (if a send had to be
        cancelled, the leases are left to expire instead)."""
        self._closing = True
        for loop in self._loops:
            await cancel_and_wait(loop)
        if self._wake_closing is not None:  # the wake connection's close, shielded from that
            await asyncio.wait([self._wake_closing], timeout=2.0)
        self._queued.clear()
        workers = list(self._workers)
        if workers:
            await asyncio.wait(workers, timeout=self.sender.timeout_s + 1.0)
        unfinished = [worker for worker in workers if not worker.done()]
        for worker in unfinished:
            await cancel_and_wait(worker)
        if not unfinished:
            try:
                await self.leases.release_all()
            except STORE_ERRORS as exc:
                logger.warning("webhook buckets not released (they expire by themselves): %s",
                               exc)
        await self.sender.close()
        await self.redis.aclose()

    # -- scheduling

    def look(self, task_id: int) -> None:
        """Look at a task soon: send what is pending (if this gateway holds its bucket)."""
        if self._closing or not self.leases.holds(task_id % WEBHOOK_BUCKETS):
            return
        if task_id in self._running:
            self._running[task_id] = True
            return
        if len(self._running) >= self.max_in_flight:
            self._queued[task_id] = None  # bounded by the tasks of the held buckets
            return
        self._running[task_id] = False
        worker = asyncio.create_task(self._run(task_id))
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    def _bucket_busy(self, bucket: int) -> bool:
        """Whether a look at one of the bucket's tasks is under way (asked only for buckets
        being given up, so a pass over at most max_in_flight tasks)."""
        return any(task_id % WEBHOOK_BUCKETS == bucket for task_id in self._running)

    async def _run(self, task_id: int) -> None:
        try:
            again = True
            while again and not self._closing:
                self._running[task_id] = False
                try:
                    await self._process(task_id)
                except LOOK_ERRORS as exc:
                    # The entry keeps its score: the sweep looks again in a moment.
                    logger.warning("webhook of task %d postponed: %s", task_id, exc)
                except Exception:
                    logger.exception("webhook of task %d failed; the sweep tries again", task_id)
                again = self._running.get(task_id, False)  # woken meanwhile: look again
        finally:
            del self._running[task_id]
            while self._queued and len(self._running) < self.max_in_flight:
                queued, _ = self._queued.popitem(last=False)
                self.look(queued)

    # -- one look at one task

    async def _process(self, task_id: int) -> None:
        """Send what is pending for the task, or schedule the next look. A change made
        meanwhile wakes this gateway, and _run looks again."""
        index = self.keys.webhooks_of(task_id)
        member = str(task_id)
        try:
            task, hook = await self._read(task_id)
        except CorruptRecord as exc:
            logger.error("webhook of task %d: %s", task_id, exc)
            await self.redis.zadd(index, {member: _now_ms() + CORRUPT_RETRY_MS})
            return
        if task is None or hook is None or hook.state in ("gone", "dead"):
            if task is None and task_id in self._retrying:
                self.metrics.webhook_deliveries.labels("expired").inc()
                logger.warning("webhook of task %d abandoned: the record expired while its "
                               "delivery was being retried", task_id)
            self._retrying.discard(task_id)
            await self.redis.zrem(index, member)
            return
        now = _now_ms()
        if hook.attempts and hook.retry_at_ms > now:
            self._retrying.add(task_id)
            await self.redis.zadd(index, {member: hook.retry_at_ms})
            return
        kind = next_message(task, hook)
        if kind is None:
            self._retrying.discard(task_id)
            if task.is_terminal:
                await self.redis.zrem(index, member)  # finished and nothing left to send
            else:
                await self.redis.zadd(index, {member: now + self.recheck_ms})
            return
        bucket = task_id % WEBHOOK_BUCKETS
        if not self.leases.holds(bucket):
            return  # the lease ran short meanwhile: leave it to the next owner
        body = envelope(kind, task)
        attempt = await self.sender.post(
            hook.url, body, self.signer.headers(message_id(task), int(time.time()), body),
            still_wanted=lambda: self.leases.holds(bucket) and not self._closing)
        if attempt.outcome == "skipped":
            return  # the entry is due still: the next owner (or the sweep) sends it
        await self._record(task, hook, kind, attempt, index)

    async def _read(self, task_id: int) -> tuple[Task | None, Hook | None]:
        """The task (image included) and its webhook, from one HMGET (and the staged image,
        if any)."""
        record = self.keys.record(task_id)
        try:
            values = await self.redis.hmget(record, (*RECORD_FIELDS, *WEBHOOK_FIELDS))
            task = Task.from_hmget(task_id, RECORD_FIELDS, values[:len(RECORD_FIELDS)])
            if task is not None and task.image_omitted:
                task = with_staged_image(task, await self.redis.get(self.keys.image(task_id)))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"reading task {task_id} failed: {exc}") from exc
        return task, Hook.from_values(values[len(RECORD_FIELDS):])

    async def _settled(self, task: Task, index: str) -> None:
        """After a message ended: drop a finished task's entry, or look again at the recheck
        (a newer change wakes this gateway before that)."""
        if task.is_terminal:
            await self.redis.zrem(index, str(task.task_id))
        else:
            await self.redis.zadd(index, {str(task.task_id): _now_ms() + self.recheck_ms})

    async def _record(self, task: Task, hook: Hook, kind: str, attempt: Attempt,
                      index: str) -> None:
        task_id, member, now = task.task_id, str(task.task_id), _now_ms()
        record = self.keys.record(task_id)
        self.metrics.webhook_request_seconds.observe(attempt.duration_s)
        if attempt.outcome == "delivered":
            self.metrics.webhook_deliveries.labels("delivered").inc()
            self.metrics.webhook_lag_seconds.observe(max(0.0, (now - task.updated_at) / 1000))
            self._retrying.discard(task_id)
            await self._mark(keys=[record], args=[task.version, *_CLEAR_FAILURES,
                                                  "webhook_last_error", ""])
            await self._settled(task, index)
            return
        if attempt.outcome == "gone":
            self.metrics.webhook_deliveries.labels("gone").inc()
            logger.info("webhook of task %d: the receiver answered 410; no more messages",
                        task_id)
            self._retrying.discard(task_id)
            await self._mark(keys=[record], args=["", "webhook_state", "gone",
                                                  "webhook_last_error", "HTTP 410",
                                                  *_CLEAR_FAILURES])
            await self.redis.zrem(index, member)
            return
        if attempt.outcome == "refused":
            # Not retried: the allowlist says no, and will until it is changed (a later
            # message of the task is tried again, against the allowlist of that time).
            self.metrics.webhook_deliveries.labels(attempt.outcome).inc()
            logger.warning("webhook task.%s of task %d not delivered: %s", kind, task_id,
                           attempt.error)
            self._retrying.discard(task_id)
            await self._mark(keys=[record], args=[task.version, *_CLEAR_FAILURES,
                                                  "webhook_last_error", attempt.error])
            await self._settled(task, index)
            return
        attempts = hook.attempts + 1
        failing_since = hook.failing_since_ms or now
        if now - failing_since >= self.horizon_ms:
            self.metrics.webhook_deliveries.labels("dead").inc()
            logger.warning("webhook of task %d is dead: failing for %d s (last: %s)",
                           task_id, (now - failing_since) // 1000, attempt.error)
            self._retrying.discard(task_id)
            await self._mark(keys=[record], args=["", "webhook_state", "dead",
                                                  "webhook_last_error", attempt.error,
                                                  *_CLEAR_FAILURES])
            await self.redis.zrem(index, member)
            return
        self.metrics.webhook_deliveries.labels("failed").inc()
        delay_ms = int(retry_delay_s(attempts, attempt.retry_after_s) * 1000)
        retry_at = min(now + delay_ms, failing_since + self.horizon_ms)
        self._retrying.add(task_id)
        await self._mark(keys=[record], args=[
            "", "webhook_attempts", attempts, "webhook_failing_since", failing_since,
            "webhook_retry_at", retry_at, "webhook_last_error", attempt.error])
        await self.redis.zadd(index, {member: retry_at})

    # -- the loops

    async def _lease_loop(self) -> None:
        interval = max(1.0, self.leases.lease_ms / 1000 / 6)
        backoff = Backoff(base=0.5, cap=interval)
        if self._prepare is not None:
            await self._prepare()
        while not self._closing:
            try:
                taken = await self.leases.tick()
                backoff.reset()
            except STORE_ERRORS as exc:
                logger.warning("webhook bucket leases not renewed: %s", exc)
                await asyncio.sleep(backoff.next())
                continue
            for bucket in taken:
                await self._look_at_bucket(bucket, due_only=False)
            await asyncio.sleep(interval * random.uniform(0.8, 1.0))

    async def _sweep_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.sweep_s * random.uniform(0.8, 1.0))
            try:
                for bucket in self.leases.held:
                    await self._look_at_bucket(bucket, due_only=True)
            except LOOK_ERRORS as exc:
                logger.warning("webhook sweep postponed: %s", exc)

    async def _look_at_bucket(self, bucket: int, *, due_only: bool) -> None:
        """look() at the bucket's due entries, or at all of them (after a gap in wakes)."""
        key = self.keys.webhooks(bucket)
        high: Any = _now_ms() if due_only else "+inf"
        offset = 0
        while self.leases.holds(bucket):
            page = await self.redis.zrangebyscore(key, "-inf", high, start=offset, num=PAGE)
            for raw in page:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                if text.isascii() and text.isdigit() and len(text) <= 19:
                    self.look(int(text))
                else:
                    await self.redis.zrem(key, raw)  # not a task id
            if len(page) < PAGE or due_only:
                return
            offset += PAGE

    async def _wake_loop(self) -> None:
        """Wakes from the update script; after each (re)connect, a look at every entry."""
        backoff = Backoff(base=0.2, cap=5.0)
        while not self._closing:
            client = self._wake_client()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.keys.webhook_wake)
                await self._listen(pubsub, backoff)
            except STORE_ERRORS as exc:
                logger.warning("webhook wake subscription lost (%s); sweeping meanwhile", exc)
            finally:
                self.wake_connected = False
                # Shielded: close() cancels this loop every 0.1 s until it ends, and a cancel
                # landing in pubsub.aclose() used to skip client.aclose(), leaving the
                # connection open until the garbage collector found it (a ResourceWarning).
                self._wake_closing = asyncio.ensure_future(_close_quietly(pubsub, client))
                await asyncio.shield(self._wake_closing)
            await asyncio.sleep(backoff.next())

    async def _listen(self, pubsub: Any, backoff: Backoff) -> None:
        last_seen = time.monotonic()
        last_ping = 0.0
        confirmed = False
        while not self._closing:
            if time.monotonic() - last_ping >= 2.0:
                await pubsub.ping()
                last_ping = time.monotonic()
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is None:
                if now - last_seen > 6.0:
                    raise ConnectionError("no answer to PING for 6 s")
                continue
            last_seen = now
            kind = message.get("type")
            if kind == "subscribe" and not confirmed:
                confirmed = self.wake_connected = True
                backoff.reset()
                for bucket in self.leases.held:  # anything missed while not subscribed
                    await self._look_at_bucket(bucket, due_only=False)
            elif kind == "message":
                data = message.get("data")
                text = data.decode() if isinstance(data, bytes) else str(data)
                if text.isascii() and text.isdigit() and len(text) <= 19:
                    self.look(int(text))


async def _close_quietly(pubsub: Any, client: Any) -> None:
    """Close a wake subscription and its client, each even if the other fails."""
    for closing in (pubsub.aclose, client.aclose):
        try:
            await closing()
        except STORE_ERRORS:
            pass


def _now_ms() -> int:
    return int(time.time() * 1000)
