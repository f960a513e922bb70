"""The answer of a process at its `max_connections` (TASKCAST_MAX_CONNECTIONS): a task read
that would go beyond it is refused at once, before any work, so that an overloaded gateway
stays responsive for the connections it has and a load balancer can send the client elsewhere.

REST and SSE: 503 `{"code":503,"msg":"server busy","data":null}` with `Retry-After` (and the
CORS headers the request would have had). WebSocket: accepted, then closed with 1013 (Try Again
Later), since browsers hide the status of a refused upgrade. The service endpoints (/healthz,
/readyz, /metrics, ...) are never refused.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from taskcast import ws
from taskcast.close_codes import CloseCode
from taskcast.cors import add_cors_headers
from taskcast.responses import envelope

RETRY_AFTER_S = 5


async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a task read that the process has no room for."""
    if scope["type"] == "websocket":
        if (await receive())["type"] != "websocket.connect":
            return
        await ws.refuse(send, CloseCode.TRY_AGAIN_LATER, "server busy: try again later")
        return
    response = envelope(503, "server busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    await add_cors_headers(response, scope)
    await response(scope, receive, send)
