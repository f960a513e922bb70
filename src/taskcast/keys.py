"""Redis key and channel names (contract section 3).

`{ID}` keeps its braces: it is a Redis Cluster hash tag, so a task's record and its channel
hash to the same slot and one script can touch both.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "taskcast"


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
