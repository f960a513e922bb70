"""The timeout sweep: fails tasks whose worker stopped reporting (contract section 8).

The update script keeps each unfinished task's deadline on its record (`deadline_ms`, moved
by every accepted change); producers index new tasks in the sorted sets `P:timeouts:{0..15}`,
scored by when to look (a hint, early rather than late). Every gateway runs this sweep: it
takes the entries that are due and sends the script op "timeout" for each, which fails the
task only if its record's deadline has passed by Redis's clock, atomically. So with many
gateways a task is failed once, and a hint that was early only costs a look.

Index entries are updated by compare-and-set on their score, so a sweep never undoes a
producer's newer hint (a shorter `timeout_s`) that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import orjson
from redis.exceptions import ResponseError

from taskcast.aio import cancel_and_wait
from taskcast.keys import TIMEOUT_BUCKETS, TaskKeys
from taskcast.metrics import Metrics
from taskcast.script import script_source
from taskcast.store import STORE_ERRORS

logger = logging.getLogger(__name__)

# KEYS[1] a timeouts bucket; ARGV: member, the score it was picked with, the new score ('' to
# remove). Only when the score is still the one picked: a producer may have moved it since.
_RESCORE = """
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current and tonumber(current) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  end
  return 1
end
return 0
"""
CORRUPT_RETRY_MS = 300_000  # a malformed record is looked at again after this
EARLY_MS = 1000  # entries this close to due are taken now rather than a sweep later


class TimeoutSweeper:
    """Runs the sweep every `interval_s` seconds, `batch` entries per bucket at most."""

    def __init__(self, redis: Any, keys: TaskKeys, metrics: Metrics, *, sharded: bool,
                 interval_s: float = 5.0, batch: int = 500) -> None:
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.publish = "SPUBLISH" if sharded else "PUBLISH"
        self.interval_s = interval_s
        self.batch = batch
        self._script = redis.register_script(script_source())
        self._rescore = redis.register_script(_RESCORE)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Sweep in the background until close()."""
        self._task = asyncio.create_task(self._run(), name="taskcast-timeouts")

    async def close(self) -> None:
        """Stop sweeping: the sweep under way is cancelled, in whatever Redis call it is."""
        self._closing = True
        task = self._task
        if task is None:
            return
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while not self._closing:
            # Jittered, so that gateways started together do not sweep in lockstep.
            await asyncio.sleep(self.interval_s * random.uniform(0.8, 1.0))
            try:
                await self.sweep()
            except STORE_ERRORS as exc:
                logger.warning("timeout sweep postponed: %s", exc)
            except Exception:
                logger.exception("timeout sweep failed; trying again at the next one")

    async def sweep(self) -> int:
        """One pass over every bucket; returns how many tasks this call failed."""
        failed = 0
        buckets = list(range(TIMEOUT_BUCKETS))
        random.shuffle(buckets)  # gateways sweeping together start at different buckets
        for bucket in buckets:
            failed += await self._sweep_bucket(self.keys.timeouts(bucket))
        return failed

    async def _sweep_bucket(self, bucket: str) -> int:
        due = await self.redis.zrangebyscore(
            bucket, "-inf", int(time.time() * 1000) + EARLY_MS, start=0, num=self.batch,
            withscores=True)
        failed = 0
        for member, score in due:
            raw = member.decode() if isinstance(member, bytes) else str(member)
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
                await self._set_score(bucket, raw, score, None)  # not a task id: drop it
                continue
            task_id = int(raw)
            answer, new_score = await self._check(task_id)
            self.metrics.timeout_checks.labels(answer).inc()
            if answer == "timed_out":
                failed += 1
                self.metrics.timed_out.inc()
            await self._set_score(bucket, raw, score, new_score)
        return failed

    async def _check(self, task_id: int) -> tuple[str, int | None]:
        """Ask the script; (answer, the entry's new score or None to drop it)."""
        change = orjson.dumps({"op": "timeout", "task_id": str(task_id),
                               "publish": self.publish})
        try:
            reply = await self._script(
                keys=[self.keys.record(task_id), self.keys.channel(task_id)], args=[change])
        except ResponseError as exc:
            if "CORRUPT" in str(exc):
                logger.error("timeout check of task %d: %s", task_id, exc)
                return "corrupt", int(time.time() * 1000) + CORRUPT_RETRY_MS
            raise
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        if text.startswith("{"):
            logger.info("task %d timed out", task_id)
            return "timed_out", None
        if text.startswith("DUE "):
            return "not_due", int(text[4:])
        return text.lower(), None  # "finished" or "gone"

    async def _set_score(self, bucket: str, member: str, picked: float,
                         new_score: int | None) -> None:
        await self._rescore(keys=[bucket], args=[
            member, int(picked), "" if new_score is None else new_score])
