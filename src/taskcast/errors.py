"""Exceptions raised by taskcast.

    TaskcastError
     +-- InvalidParameter     a request parameter that does not parse (a 422 detail item)
     |    +-- InvalidTaskId   a task id that is not a non-negative int64
     +-- TaskNotFound         no record for that id (never created, or expired)
     +-- TransitionRejected   the update script refused a change; nothing was written
     +-- CorruptRecord        a record in Redis that does not follow the contract
     +-- StoreUnavailable     Redis could not be reached or did not answer in time
"""

from __future__ import annotations

from typing import Any


class TaskcastError(Exception):
    """Base class of every error taskcast raises on purpose."""


class InvalidParameter(TaskcastError, ValueError):
    """`detail` is the FastAPI/pydantic-style error item the REST API returns with 422."""

    def __init__(self, raw: str, detail: dict[str, Any]) -> None:
        super().__init__(f"invalid {detail['loc'][-1]} {raw!r}: {detail['msg']}")
        self.raw = raw
        self.detail = detail


class InvalidTaskId(InvalidParameter):
    """The text is not a non-negative integer that fits in int64."""


class TaskNotFound(TaskcastError, LookupError):
    """No record for `task_id`: never created, or expired after its retention."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} not found")
        self.task_id = task_id


class TransitionRejected(TaskcastError):
    """The Lua script refused the change (`reason` is its REJECTED code, e.g. `TERMINAL`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class CorruptRecord(TaskcastError):
    """The record of `task_id` breaks the contract: a field of the wrong type, or an
    unknown status. The update script never writes one; a plain HSET producer can."""

    def __init__(self, task_id: int, why: str) -> None:
        super().__init__(f"task {task_id} has a malformed record: {why}")
        self.task_id = task_id


class StoreUnavailable(TaskcastError):
    """Redis (or the embedded store) failed; the original error is the `__cause__`."""
