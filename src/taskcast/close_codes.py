"""WebSocket close codes and error-frame codes: the named values clients can act on.

Close codes (the connection ends):
    1000 NORMAL                  per-task socket: the terminal state was sent
    1008 POLICY_VIOLATION        Origin not allowed (sent before accept: the upgrade gets 403)
    1009 MESSAGE_TOO_BIG         a client message over ws_max_frame_bytes (closed by the
                                 connection, websocket_protocol.py or uvicorn's, not ws.py)
    1011 INTERNAL_ERROR          a bug on our side, a per-task socket's record that breaks the
                                 contract or a Redis error while it is looked up (contract 8),
                                 or no pong within ws_ping_timeout_s; reconnect
    1012 SERVICE_RESTART         graceful shutdown; reconnect, maybe to another replica
    1012 also                    the socket reached TASKCAST_MAX_STREAM_S: reconnect
    1013 TRY_AGAIN_LATER         the process is at TASKCAST_MAX_CONNECTIONS (busy.py): try
                                 again later, maybe on another replica. (A client that stops
                                 reading is aborted instead, ws.py: it sees 1006)
    4401 UNAUTHORIZED            access control (contract 7): no valid token at the upgrade of
                                 /tasks/{id}/ws, an invalid one at the upgrade of /ws, no
                                 valid token on /ws within ws_auth_timeout_s, or the token
                                 expired; reconnect with a fresh token
    4403 FORBIDDEN               /tasks/{id}/ws: the token does not name the task
    4404 TASK_NOT_FOUND          per-task socket: unknown or expired task; do not reconnect
    4413 TOO_MANY_SUBSCRIPTIONS  more than ws_max_subscriptions tasks on one socket
    4422 INVALID_TASK_ID         per-task socket: malformed id; either socket: a malformed
                                 image_base64 flag
    4429 RATE_LIMITED            more client frames than ws_ops_per_s / ws_ops_burst allow,
                                 or an op while ws.MAX_QUEUED_REPLIES frames wait unread
The 4xxx codes mirror the HTTP status of the same condition. Protocol errors (1002, 1007)
come from websocket_protocol.py.

Error frames (`{"type": "error", "code": ..., "msg": ...}`; the connection stays open):
    400 BAD_FRAME   not JSON, not an object, or a binary frame
    401 UNAUTHORIZED subscribe before any valid token, or an `auth` op whose token is not
                    valid (the socket keeps its previous token, if any)
    403 FORBIDDEN   subscribe to tasks the token does not name (listed in `task_ids`); the
                    others subscribe
    404 NOT_FOUND   subscribe to unknown tasks (listed in `task_ids`); the others subscribe.
                    Also a subscribed task whose record vanished (it is unsubscribed)
    405 UNKNOWN_OP  `op` is not subscribe, unsubscribe, auth or ping
    422 INVALID     `task_ids` missing, empty, or not non-negative int64s (pydantic-style `detail`)
    500 INTERNAL    subscribe to tasks whose record breaks the contract, or while Redis does
                    not answer (listed in `task_ids`; none of them is subscribed)
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Close codes a client may see; meanings in the module docstring."""

    NORMAL = 1000
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    TASK_NOT_FOUND = 4404
    TOO_MANY_SUBSCRIPTIONS = 4413
    INVALID_TASK_ID = 4422
    RATE_LIMITED = 4429


class ErrorCode(IntEnum):
    """The `code` of an error frame; meanings in the module docstring."""

    BAD_FRAME = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    UNKNOWN_OP = 405
    INVALID = 422
    INTERNAL = 500
