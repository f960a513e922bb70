"""Which gateway delivers which webhook bucket: leases, shared out fairly.

Each of the WEBHOOK_BUCKETS buckets has an owner key `P:webhooks:{B}:owner` holding the id of
the gateway that delivers it, with an expiry (`lease_s`); only that gateway sends the webhooks
of the bucket's tasks, so with N gateways each message is sent by one of them. Gateways
announce themselves in `P:webhooks:members` (scored by when they are presumed gone) and each
holds at most ceil(buckets / members): a gateway that joins gets buckets from the others within
a few renewals, and the buckets of one that dies are taken over when their leases expire.

Two gateways never send the same bucket's messages at once: a gateway stops starting sends
for a bucket `margin_s` (more than a request's timeout) before its lease would expire
unrenewed, and one that gives a bucket up keeps the lease until its sends under way for that
bucket have ended.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from taskcast.keys import WEBHOOK_BUCKETS, TaskKeys

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class BucketLeases:
    """The buckets this gateway holds; tick() every few seconds keeps them and shares them."""

    def __init__(self, redis: Any, keys: TaskKeys, member: str, *,
                 busy: Callable[[int], bool], lease_s: float = 30.0,
                 margin_s: float = 12.0) -> None:
        self.redis = redis
        self.busy = busy  # whether a send for the bucket is under way
        self.keys = keys
        self.member = member
        self.lease_ms = int(lease_s * 1000)
        self.margin_s = margin_s
        self._held: dict[int, float] = {}  # bucket -> monotonic time until which it is ours
        self._leaving: set[int] = set()  # given up; the lease is kept while busy(bucket)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def holds(self, bucket: int) -> bool:
        """Whether this gateway may send for `bucket` now."""
        until = self._held.get(bucket)
        return until is not None and time.monotonic() < until

    @property
    def held(self) -> list[int]:
        """The buckets held now."""
        return [bucket for bucket in self._held if self.holds(bucket)]

    async def tick(self) -> list[int]:
        """Announce this gateway, renew its leases, give up or take buckets toward its fair
        share; returns the buckets it newly took (to be swept at once)."""
        now_ms = int(time.time() * 1000)
        await self.redis.zadd(self.keys.webhook_members, {self.member: now_ms + self.lease_ms})
        await self.redis.zremrangebyscore(self.keys.webhook_members, "-inf", now_ms)
        members = max(1, int(await self.redis.zcard(self.keys.webhook_members)))
        share = math.ceil(WEBHOOK_BUCKETS / members)
        for bucket in list(self._held):
            started = time.monotonic()
            if await self._renew(keys=[self.keys.webhook_owner(bucket)],
                                 args=[self.member, self.lease_ms]):
                self._held[bucket] = started + self.lease_ms / 1000 - self.margin_s
            else:
                del self._held[bucket]  # expired and taken: it is someone else's now
        while len(self._held) > share:
            bucket = max(self._held)
            del self._held[bucket]
            self._leaving.add(bucket)
        for bucket in list(self._leaving):
            owner = self.keys.webhook_owner(bucket)
            if self.busy(bucket):
                await self._renew(keys=[owner], args=[self.member, self.lease_ms])
            else:
                self._leaving.discard(bucket)
                await self._release(keys=[owner], args=[self.member])
        taken = []
        free = [bucket for bucket in range(WEBHOOK_BUCKETS)
                if bucket not in self._held and bucket not in self._leaving]
        random.shuffle(free)
        for bucket in free:
            if len(self._held) >= share:
                break
            started = time.monotonic()
            if await self.redis.set(self.keys.webhook_owner(bucket), self.member, nx=True,
                                    px=self.lease_ms):
                self._held[bucket] = started + self.lease_ms / 1000 - self.margin_s
                taken.append(bucket)
        return taken

    async def release_all(self) -> None:
        """Give every bucket up and leave (on shutdown), so others take over at once."""
        held, self._held = list(self._held) + list(self._leaving), {}
        self._leaving = set()
        for bucket in held:
            await self._release(keys=[self.keys.webhook_owner(bucket)], args=[self.member])
        await self.redis.zrem(self.keys.webhook_members, self.member)
