"""Redis key and channel names (contract section 3).

`{ID}` keeps its braces: it is a Redis Cluster hash tag, so a task's record and its channel
hash to the same slot and one script can touch both.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "taskcast"
# Sorted sets the timeout index is spread over, so that on a cluster no single slot takes
# every create; gateways sweep them all.
TIMEOUT_BUCKETS = 16
# Likewise for the webhook index; each bucket is delivered by one gateway at a time.
WEBHOOK_BUCKETS = 16


@dataclass(frozen=True, slots=True)
class TaskKeys:
    """The names under one prefix `P`; every producer and gateway must use the same one."""

    prefix: str = DEFAULT_PREFIX

    def record(self, task_id: int) -> str:
        """The task's hash, `P:task:{ID}`."""
        return f"{self.prefix}:task:{{{task_id}}}"

    def channel(self, task_id: int) -> str:
        """The task's pub/sub channel, `P:task:{ID}:events`, in the same slot as its record."""
        return f"{self.prefix}:task:{{{task_id}}}:events"

    def image(self, task_id: int) -> str:
        """The raw bytes of a staged image, `P:task:{ID}:image` (the record's slot)."""
        return f"{self.prefix}:task:{{{task_id}}}:image"

    def upload(self, task_id: int, token: str) -> str:
        """Where a producer stages an image before the completion moves it to image()."""
        return f"{self.prefix}:task:{{{task_id}}}:upload:{token}"

    def timeouts(self, bucket: int) -> str:
        """Sorted set of task ids to check for a timeout, scored by the time (ms) to look
        (hints: the record's deadline is the truth); tasks spread over TIMEOUT_BUCKETS."""
        return f"{self.prefix}:timeouts:{{{bucket}}}"

    def timeouts_of(self, task_id: int) -> str:
        """The timeouts() bucket of a task."""
        return self.timeouts(task_id % TIMEOUT_BUCKETS)

    def webhooks(self, bucket: int) -> str:
        """Sorted set of task ids with a webhook to look after, scored by the time (ms) to
        look next; tasks spread over WEBHOOK_BUCKETS (`P:webhooks:{B}`)."""
        return f"{self.prefix}:webhooks:{{{bucket}}}"

    def webhooks_of(self, task_id: int) -> str:
        """The webhooks() bucket of a task."""
        return self.webhooks(task_id % WEBHOOK_BUCKETS)

    def webhook_owner(self, bucket: int) -> str:
        """Which gateway delivers a bucket: its id, with an expiry (the bucket's slot)."""
        return f"{self.prefix}:webhooks:{{{bucket}}}:owner"

    @property
    def webhook_members(self) -> str:
        """Sorted set of delivering gateways, scored by when each is presumed gone (ms)."""
        return f"{self.prefix}:webhooks:members"

    @property
    def webhook_wake(self) -> str:
        """Plain pub/sub channel on which the update script announces a change of a task that
        has a webhook (the message is its id)."""
        return f"{self.prefix}:webhooks"

    @property
    def id_counter(self) -> str:
        """INCR'd to allocate ids when a producer does not bring its own."""
        return f"{self.prefix}:next_task_id"

    def task_id_of_channel(self, channel: str) -> int | None:
        """The id in a task channel's name; None for any other channel (the control one)."""
        head, tail = f"{self.prefix}:task:{{", "}:events"
        if not (channel.startswith(head) and channel.endswith(tail)):
            return None
        digits = channel[len(head) : -len(tail)]
        return int(digits) if digits.isascii() and digits.isdigit() else None
