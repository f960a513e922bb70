"""Parsing of task ids from URLs, query strings and client frames (contract section 2)."""

from __future__ import annotations

import re
from typing import Any

from taskcast.errors import InvalidTaskId

INT64_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")


def parse_task_id(raw: str, loc: tuple[str | int, ...] = ("path", "task_id")) -> int:
    """Return the id, or raise InvalidTaskId carrying a pydantic-style 422 detail item.

    Only ASCII digits are accepted: Python's int() would also take "٣", "1_0" and " 7 ".
    """
    if not _DIGITS.fullmatch(raw):
        if raw.startswith("-") and _DIGITS.fullmatch(raw[1:]):
            raise InvalidTaskId(raw, _bound_error(raw, loc, "greater_than_equal", "ge", 0))
        raise InvalidTaskId(
            raw,
            {
                "type": "int_parsing",
                "loc": list(loc),
                "msg": "Input should be a valid integer, unable to parse string as an integer",
                "input": raw,
            },
        )
    # int() refuses more than 4300 digits (ValueError); an int64 has at most 19 after zeros.
    if len(raw.lstrip("0")) > 19 or int(raw) > INT64_MAX:
        raise InvalidTaskId(raw, _bound_error(raw, loc, "less_than_equal", "le", INT64_MAX))
    return int(raw)


def parse_task_id_value(value: object, loc: tuple[str | int, ...]) -> int:
    """The same rule for a JSON value: an int (not a bool) or a decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidTaskId(
            repr(value),
            {"type": "int_type", "loc": list(loc), "msg": "Input should be a valid integer",
             "input": value},
        )
    if isinstance(value, str):
        return parse_task_id(value, loc)
    if value < 0:
        raise InvalidTaskId(str(value), _bound_error(value, loc, "greater_than_equal", "ge", 0))
    if value > INT64_MAX:
        raise InvalidTaskId(
            str(value), _bound_error(value, loc, "less_than_equal", "le", INT64_MAX)
        )
    return value


def _bound_error(
    raw: object, loc: tuple[str | int, ...], kind: str, op: str, bound: int
) -> dict[str, Any]:
    word = "greater than or equal to" if op == "ge" else "less than or equal to"
    return {
        "type": kind,
        "loc": list(loc),
        "msg": f"Input should be {word} {bound}",
        "input": raw,
        "ctx": {op: bound},
    }
