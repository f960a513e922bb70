"""The shipped Lua update script and the mapping of its replies to Python values."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis.exceptions import AskError, ClusterError, ResponseError, TryAgainError

from taskcast.errors import StoreUnavailable, TaskNotFound, TransitionRejected

SCRIPT_RESOURCE = "lua/apply_change.lua"


@cache
def script_source() -> str:
    """The text of lua/apply_change.lua, read once per process."""
    return files("taskcast").joinpath(SCRIPT_RESOURCE).read_text(encoding="utf-8")


def rejection_from(error: ResponseError, task_id: int) -> Exception:
    """Turn a `REJECTED <REASON> <message>` error reply into TaskNotFound/TransitionRejected.

    A cluster that refuses the write for now (CLUSTERDOWN, TRYAGAIN, MOVED/ASK left after
    redis-py's retries) is StoreUnavailable; any other ResponseError is returned unchanged.
    """
    text = str(error)
    if isinstance(error, ClusterError | TryAgainError | AskError):
        return StoreUnavailable(f"changing task {task_id} failed: {text}")
    if not text.startswith("REJECTED "):
        return error
    _, reason, message = (text.split(" ", 2) + [""])[:3]
    if reason == "NOT_FOUND":
        return TaskNotFound(task_id)
    return TransitionRejected(reason, message)
