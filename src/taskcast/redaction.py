"""Tokens never reach a log line (contract section 7).

Browsers can only pass a token in the URL (`?token=`), and servers log URLs: uvicorn's access
log and its WebSocket handshake lines (`"WebSocket /ws?token=eyJ..." [accepted]`, at INFO even
with the access log off). A filter on every handler of the root logger and on uvicorn's
loggers rewrites such records before any handler formats them: the value of a `token`
parameter (in any spelling: `TOKEN`, `%74oken`) and the credentials after `Bearer` become
`[redacted]`. taskcast's own log lines
name paths, never query strings or headers.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

REDACTED = "[redacted]"
# A query parameter (after ?, & or their escapes) up to the next separator, space or quote.
_PARAMETER = re.compile(r"((?:[?&]|%3F|%26)([^=&?\s\"']+)(?:=|%3D))([^&\s\"']*)",
                        re.IGNORECASE)
_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "taskcast")


def redact(text: str) -> str:
    """`text` with token values replaced by `[redacted]`."""
    text = _PARAMETER.sub(_redact_parameter, text)
    return _BEARER.sub(r"\1" + REDACTED, text)


def _redact_parameter(match: re.Match[str]) -> str:
    # Any spelling of the name counts (`TOKEN`, `%74oken`), even those the gateway does not
    # accept: a client that sent one still sent a credential.
    if unquote(unquote(match.group(2))).lower() != "token":
        return match.group(0)
    return match.group(1) + REDACTED


class TokenRedactor(logging.Filter):
    """Rewrites a record's message and string arguments; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """logging.Filter: redact, keep the record."""
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in args)
        elif isinstance(args, dict):
            record.args = {key: redact(value) if isinstance(value, str) else value
                           for key, value in args.items()}
        return True


_FILTER = TokenRedactor()


def install() -> None:
    """Put the filter on uvicorn's and taskcast's loggers and on every handler they and the
    root logger have now (a record from any logger passes a handler's filters). Idempotent."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in _LOGGERS)]
    for logger in loggers:
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
