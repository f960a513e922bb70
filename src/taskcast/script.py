"""The shipped Lua update script and the mapping of its replies to Python values."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis.exceptions import ResponseError

from taskcast.errors import TaskNotFound, TransitionRejected

SCRIPT_RESOURCE = "lua/apply_change.lua"


@cache
def script_source() -> str:
    return files("taskcast").joinpath(SCRIPT_RESOURCE).read_text(encoding="utf-8")


def rejection_from(error: ResponseError, task_id: int) -> Exception:
    """Turn a `REJECTED <REASON> <message>` error reply into TaskNotFound/TransitionRejected.

    Any other ResponseError (wrong type, script error) is returned unchanged.
    """
    text = str(error)
    if not text.startswith("REJECTED "):
        return error
    _, reason, message = (text.split(" ", 2) + [""])[:3]
    if reason == "NOT_FOUND":
        return TaskNotFound(task_id)
    return TransitionRejected(reason, message)
