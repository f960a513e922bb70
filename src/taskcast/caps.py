"""The field caps of contract section 8, checked by producers before they send a change, and
the sizes the rest of the package goes by (how large a staged image may be, when an image is
large enough to be staged and left out of events).

The update script enforces the same caps (lua/apply_change.lua); checking them here first gives
the caller a clear exception without a round trip, and keeps an oversized image off the wire.
"""

from __future__ import annotations

import binascii
import re
from typing import Any

from taskcast.errors import TransitionRejected

MAX_LABEL_BYTES = 256  # type, angle
MAX_IMAGE_URL_BYTES = 8192
MAX_IMAGE_BASE64_BYTES = 16 * 1024 * 1024
MAX_IMAGE_BYTES = MAX_IMAGE_BASE64_BYTES // 4 * 3  # raw bytes that encode to 16 MiB of base64
MAX_ERROR_MESSAGE_BYTES = 4096  # longer messages are cut, never refused
INLINE_IMAGE_BASE64_BYTES = 65_536  # larger images are staged, and left out of events
MIN_TIMEOUT_S, MAX_TIMEOUT_S, DEFAULT_TIMEOUT_S = 1, 604_800, 3600
WEBHOOK_EVENTS = ("start", "progress", "completed", "failed")  # in the record's order
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed")

_ABSOLUTE_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[^/?#]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def _size(value: str) -> int:
    return len(value.encode("utf-8"))


def check_labels(fields: dict[str, Any]) -> None:
    """`type` and `angle`: strings of at most 256 bytes."""
    for name in ("type", "angle"):
        value = fields.get(name)
        if value is not None and _size(value) > MAX_LABEL_BYTES:
            raise TransitionRejected("TOO_LARGE", f"{name} is longer than 256 bytes")


def check_image_url(url: str | None) -> None:
    """At most 8192 bytes: empty, an absolute http(s) URL, or a path starting with `/`."""
    if url is None:
        return
    if _size(url) > MAX_IMAGE_URL_BYTES:
        raise TransitionRejected("TOO_LARGE", "image_url is longer than 8192 bytes")
    if url and not (_ABSOLUTE_URL.match(url) or url.startswith("/")):
        raise TransitionRejected("BAD_FIELD", "image_url must be empty, an absolute http(s) "
                                 "URL or a path starting with /")
    if _CONTROL.search(url):
        raise TransitionRejected("BAD_FIELD", "image_url must not contain control characters")


def decode_image_base64(image_base64: str) -> bytes:
    """The raw image of a base64 text, refusing what the script would refuse."""
    if len(image_base64) > MAX_IMAGE_BASE64_BYTES:
        raise TransitionRejected("TOO_LARGE", "image_base64 is larger than 16 MiB")
    try:
        return binascii.a2b_base64(image_base64.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise TransitionRejected("BAD_FIELD", "image_base64 is not valid base64") from None


def check_raw_image(image: bytes) -> None:
    """Raw image bytes: at most what encodes to 16 MiB of base64."""
    if len(image) > MAX_IMAGE_BYTES:
        raise TransitionRejected("TOO_LARGE", "the image is larger than 16 MiB as base64")


def check_timeout(timeout_s: object) -> None:
    """`timeout_s`: an integer from 1 to 604800 (a week)."""
    if timeout_s is None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or not (
            MIN_TIMEOUT_S <= timeout_s <= MAX_TIMEOUT_S):
        raise TransitionRejected("BAD_REQUEST", "timeout_s must be an integer from 1 to 604800")


def check_webhook(url: str | None, events: object) -> None:
    """`webhook_url`: an absolute http(s) URL of at most 8192 bytes, without spaces or control
    characters; `webhook_events`: a non-empty list of names from WEBHOOK_EVENTS, only with a
    URL (contract section 10)."""
    if url is not None:
        if _size(url) > MAX_IMAGE_URL_BYTES:
            raise TransitionRejected("TOO_LARGE", "webhook_url is longer than 8192 bytes")
        if not _ABSOLUTE_URL.match(url):
            raise TransitionRejected("BAD_FIELD", "webhook_url must be an absolute http(s) URL")
        if _CONTROL_OR_SPACE.search(url):
            raise TransitionRejected("BAD_FIELD", "webhook_url must not contain spaces or "
                                     "control characters")
    if events is None:
        return
    if isinstance(events, str) or not isinstance(events, list | tuple) or not all(
            isinstance(name, str) for name in events):
        raise TransitionRejected("BAD_FIELD", "webhook_events must be an array of event names")
    if any(name not in WEBHOOK_EVENTS for name in events):
        raise TransitionRejected("BAD_FIELD", "webhook_events may name only start, progress, "
                                 "completed, failed")
    if not events:
        raise TransitionRejected("BAD_FIELD", "webhook_events must name at least one event")
    if url is None:
        raise TransitionRejected("BAD_FIELD", "webhook_events comes only with webhook_url")
