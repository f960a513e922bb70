"""Redis key and channel names (contract section 3).

`{ID}` keeps its braces: it is a Redis Cluster hash tag, so a task's record and its channel
hash to the same slot and one script can touch both.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "taskcast"


@dataclass(frozen=True, slots=True)
class TaskKeys:
    prefix: str = DEFAULT_PREFIX

    def record(self, task_id: int) -> str:
        return f"{self.prefix}:task:{{{task_id}}}"

    def channel(self, task_id: int) -> str:
        return f"{self.prefix}:task:{{{task_id}}}:events"

    @property
    def id_counter(self) -> str:
        """INCR'd to allocate ids when a producer does not bring its own."""
        return f"{self.prefix}:next_task_id"

    def task_id_of_channel(self, channel: str) -> int | None:
        head, tail = f"{self.prefix}:task:{{", "}:events"
        if not (channel.startswith(head) and channel.endswith(tail)):
            return None
        digits = channel[len(head) : -len(tail)]
        return int(digits) if digits.isascii() and digits.isdigit() else None
