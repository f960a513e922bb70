"""The task object (contract section 1): its JSON, and reading it from a record or an event.

The task object's JSON is encoded and decoded here only. How it is framed on the wire is
the transports' business: SSE events in sse.py, WebSocket messages in ws.py, the REST
envelope in responses.py."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import orjson

from taskcast.caps import MAX_IMAGE_BYTES
from taskcast.errors import CorruptRecord

_INTEGER = re.compile(r"-?[0-9]{1,19}")  # ASCII digits only; int() takes more ("٣", "1_0")


class TaskStatus(StrEnum):
    """The four states; submitted -> processing -> completed | failed (or submitted ->
    completed | failed), enforced by the update script, not here."""

    SUBMITTED = "submitted"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        """Completed or failed: nothing can change the task any more."""
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED)


# Hash fields of the record `P:task:{ID}` (contract section 3).
RECORD_FIELDS: tuple[str, ...] = (
    "task_id",
    "status",
    "progress",
    "type",
    "angle",
    "image_url",
    "image_base64",
    "error_message",
    "version",
    "created_at",
    "updated_at",
    # Set (the length) when the image was staged: its raw bytes are in `P:task:{ID}:image`.
    "image_bytes",
)
RECORD_FIELDS_WITHOUT_IMAGE_BASE64 = tuple(f for f in RECORD_FIELDS if f != "image_base64")


@dataclass(frozen=True, slots=True)
class Task:
    """One version of a task, immutable; `version` 0 when the record or event had none.

    `image_omitted`: the image exists but its bytes are not in this object (an event that left
    a large image out, or a record whose image was staged); `image_base64` is then "" and the
    bytes must be read from the record (TaskStore does).
    """

    task_id: int
    status: TaskStatus
    progress: int
    type: str = ""
    angle: str = ""
    image_base64: str = ""
    image_url: str = ""
    error_message: str = ""
    version: int = 0
    updated_at: int = 0
    image_omitted: bool = False
    staged_image_bytes: int = 0  # from a record: the length of the raw image in its own key

    @property
    def is_terminal(self) -> bool:
        """The status is completed or failed."""
        return self.status.is_terminal

    def to_dict(self, *, include_image_base64: bool = True) -> dict[str, Any]:
        """The task object in the seed's field order; `image` is always present."""
        return {
            "task_id": self.task_id,
            "status": self.status.value,
            "progress": self.progress,
            "type": self.type,
            "angle": self.angle,
            "image": {
                "image_base64": self.image_base64 if include_image_base64 else "",
                "image_url": self.image_url,
            },
            "error_message": self.error_message,
            "version": self.version,
            "updated_at": self.updated_at,
        }

    def to_json(self, *, include_image_base64: bool = True) -> bytes:
        """to_dict() as compact UTF-8 JSON: the bytes every transport sends."""
        return orjson.dumps(self.to_dict(include_image_base64=include_image_base64))

    def image_data(self) -> bytes | None:
        """The image's bytes, decoded from `image_base64`; None when it is empty (no image, an
        `image_url` only, or a watch with image_base64=False)."""
        return base64.b64decode(self.image_base64) if self.image_base64 else None

    def without_image_base64(self) -> Task:
        """The same task with `image_base64` empty (itself when it already is)."""
        return replace(self, image_base64="") if self.image_base64 else self

    def with_image_base64(self, image_base64: str) -> Task:
        """The same task with its image filled in (for a task read with `image_omitted`)."""
        return replace(self, image_base64=image_base64, image_omitted=False,
                       staged_image_bytes=0)

    @classmethod
    def from_record(cls, task_id: int, record: Mapping[str, str | None]) -> Task:
        """Build from the hash fields; missing fields take the contract's defaults.

        Plain-HSET producers may write only some fields, so absence is not corruption; a field
        that is present but garbled or out of range is (CorruptRecord), and so is a record
        that breaks the contract's rules (`completed` below 100, the id of another task): the
        gateway never serves one.
        """

        def text(name: str) -> str:
            return record.get(name) or ""

        def integer(name: str, low: int = 0, high: int = 2**63 - 1) -> int:
            raw = record.get(name)
            if raw is None:
                return 0
            # Strictly digits, as the Lua script reads them: the two must agree on what a
            # valid record is, or the gateway would show tasks no producer can update.
            if not _INTEGER.fullmatch(raw):
                raise CorruptRecord(task_id, f"{name}={raw!r} is not an integer")
            value = int(raw)
            if not low <= value <= high:
                raise CorruptRecord(task_id, f"{name}={raw!r} is out of range {low}..{high}")
            return value

        raw_status = record.get("status")
        if raw_status is None:
            raw_status = TaskStatus.SUBMITTED.value
        try:
            status = TaskStatus(raw_status)
        except ValueError:
            raise CorruptRecord(task_id, f"unknown status {raw_status!r}") from None
        if record.get("task_id") is not None and integer("task_id") != task_id:
            raise CorruptRecord(task_id, f"task_id={record.get('task_id')!r} names another task")
        progress = integer("progress", 0, 100)
        if status is TaskStatus.COMPLETED and progress != 100:
            raise CorruptRecord(task_id, f"completed with progress {progress}")
        image_bytes = integer("image_bytes", 0, MAX_IMAGE_BYTES)
        return cls(
            task_id=task_id,
            status=status,
            progress=progress,
            type=text("type"),
            angle=text("angle"),
            image_base64=text("image_base64"),
            image_url=text("image_url"),
            error_message=text("error_message"),
            version=integer("version"),
            updated_at=integer("updated_at"),
            image_omitted=image_bytes > 0,
            staged_image_bytes=image_bytes,
        )

    @classmethod
    def from_hmget(
        cls, task_id: int, fields: Sequence[str], values: Sequence[bytes | str | None]
    ) -> Task | None:
        """From an HMGET reply; None when no field exists (no record, or it expired)."""
        try:
            record = {
                name: value.decode() if isinstance(value, bytes) else value
                for name, value in zip(fields, values, strict=True)
                if value is not None
            }
        except UnicodeDecodeError as exc:
            raise CorruptRecord(task_id, f"a field is not UTF-8 ({exc.reason})") from None
        return cls.from_record(task_id, record) if record else None

    @classmethod
    def from_json(cls, payload: bytes | str) -> Task:
        """Decode an event payload; raises ValueError (or KeyError/TypeError) when malformed."""
        data = orjson.loads(payload)
        if not isinstance(data, dict):
            raise TypeError(f"an event is a JSON object, not {type(data).__name__}")
        image = data.get("image") or {}
        if not isinstance(image, dict):
            raise TypeError(f"`image` is a JSON object, not {type(image).__name__}")
        return cls(
            task_id=_as_int(data["task_id"]),
            status=TaskStatus(data["status"]),
            progress=_as_int(data.get("progress", 0)),
            type=str(data.get("type", "")),
            angle=str(data.get("angle", "")),
            image_base64=str(image.get("image_base64", "")),
            image_url=str(image.get("image_url", "")),
            error_message=str(data.get("error_message", "")),
            version=_as_int(data.get("version", 0)),
            updated_at=_as_int(data.get("updated_at", 0)),
            image_omitted=data.get("image_base64_omitted") is True,
        )


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
