"""taskcast: a real-time task status gateway (REST, Server-Sent Events, WebSocket) over Redis."""

from __future__ import annotations

from taskcast.errors import (
    InvalidParameter,
    InvalidTaskId,
    StoreUnavailable,
    TaskcastError,
    TaskNotFound,
    TransitionRejected,
)
from taskcast.models import Task, TaskStatus

__all__ = [
    "InvalidParameter",
    "InvalidTaskId",
    "StoreUnavailable",
    "Task",
    "TaskNotFound",
    "TaskStatus",
    "TaskcastError",
    "TransitionRejected",
]
__version__ = "0.1.0"
