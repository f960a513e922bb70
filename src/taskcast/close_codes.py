"""WebSocket close codes and error-frame codes: the named values clients can act on.

Close codes (the connection ends):
    1000 NORMAL                  per-task socket: the terminal state was sent
    1008 POLICY_VIOLATION        Origin not allowed (sent before accept: the upgrade gets 403)
    1009 MESSAGE_TOO_BIG         a client frame over ws_max_frame_bytes (closed by uvicorn)
    1011 INTERNAL_ERROR          a bug on our side; reconnect
    1012 SERVICE_RESTART         graceful shutdown (uvicorn); reconnect, maybe to another replica
    1013 TRY_AGAIN_LATER         the client did not read fast enough; reconnect and resume
    4404 TASK_NOT_FOUND          per-task socket: unknown or expired task; do not reconnect
    4413 TOO_MANY_SUBSCRIPTIONS  more than ws_max_subscriptions tasks on one socket
    4422 INVALID_TASK_ID         per-task socket: malformed id (or image_base64 flag)
    4429 RATE_LIMITED            more client frames than ws_ops_per_s / ws_ops_burst allow
The 4xxx codes mirror the HTTP status of the same condition.

Error frames (`{"type": "error", "code": ..., "msg": ...}`; the connection stays open):
    400 BAD_FRAME   not JSON, not an object, or a binary frame
    404 NOT_FOUND   subscribe to unknown tasks (listed in `task_ids`); the others subscribe
    405 UNKNOWN_OP  `op` is not subscribe, unsubscribe or ping
    422 INVALID     `task_ids` missing, empty, or not non-negative int64s (pydantic-style `detail`)
    500 INTERNAL    subscribe to tasks whose record breaks the contract (listed in `task_ids`)
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NORMAL = 1000
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    TASK_NOT_FOUND = 4404
    TOO_MANY_SUBSCRIPTIONS = 4413
    INVALID_TASK_ID = 4422
    RATE_LIMITED = 4429


class ErrorCode(IntEnum):
    BAD_FRAME = 400
    NOT_FOUND = 404
    UNKNOWN_OP = 405
    INVALID = 422
    INTERNAL = 500
