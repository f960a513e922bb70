"""The server adapter: the one module that knows uvicorn's internals.

The gateway needs seven things from its server that ASGI does not offer. Here is how each is
obtained from uvicorn (the versions in SUPPORTED_UVICORN, pinned in pyproject.toml):

* write a pre-encoded body chunk straight to an SSE response's connection (HttpLink), skipping
  the ASGI `send` and the waking of the stream's task: the transport of uvicorn's httptools
  request cycle, which ASGI's `send` is a bound method of;
* answer a whole small response (a REST poll from memory) in one write instead of uvicorn's
  two (head, then body: two syscalls, a third of such a request's CPU), leaving the request
  cycle as uvicorn's `send` leaves it after the last body message (HttpLink.respond);
* detect a departed SSE client without a task per stream waiting for `http.disconnect`: the
  cycle's `disconnected` flag, polled by one timer for all streams;
* end an SSE response without waiting for the stream's task, in the same write as its last
  states (end_now): the cycle's own `send`, run to completion on the spot, which it does
  whenever its flow control is not paused;
* take over the close of a finished SSE response's connection (to close it later, between
  deliveries): the cycle's `keep_alive` flag;
* abort a connection whose client stopped reading (ASGI can only close politely, which waits
  for the client): the transport's abort();
* know that the server is shutting down before it starts waiting for open streams: uvicorn
  calls shutdown() on every open connection's protocol object, and ours pass it on first.

WebSockets need no internals: uvicorn builds taskcast's own connection class
(websocket_protocol.py) for upgrade requests, whose direct writes and synchronous closes are
public methods. Both protocol classes are given to uvicorn as its `http` and `ws` protocols
(uvicorn_options), which is also how the shutdown notice reaches the gateway.

At start, server_support() checks that the running server is a supported uvicorn with these
classes. When it is not (another server, another uvicorn version, other protocol classes), the
gateway logs one warning, /metrics says which features are off, and every stream takes the plain
ASGI path: correct, but slower.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from taskcast.settings import Settings
from taskcast.websocket_protocol import Limits, WebSocketConnection

logger = logging.getLogger(__name__)

SUPPORTED_UVICORN = ((0, 54), (0, 56))  # [lowest, above highest): the versions tested
SHUTDOWN_HOOK = "taskcast.server_shutdown"  # key in the lifespan state; value: a callable


class FastPathBroken(RuntimeError):
    """The server did not behave as the versions this adapter was tested with: the caller
    falls back to the plain ASGI path, and says so loudly."""
FEATURES = ("direct_http_writes", "websocket_protocol", "shutdown_notice")


@dataclass(frozen=True, slots=True)
class ServerSupport:
    """What the running server offers beyond ASGI, decided once at start."""

    server: str
    direct_http_writes: bool = False
    websocket_protocol: bool = False
    shutdown_notice: bool = False
    problems: tuple[str, ...] = ()

    def features(self) -> dict[str, bool]:
        """Each name in FEATURES with whether it is on (the taskcast_server_feature gauge)."""
        return {name: bool(getattr(self, name)) for name in FEATURES}


def server_support(lifespan_send: Callable[..., Any]) -> ServerSupport:
    """Inspect the server from the `send` of its lifespan protocol (uvicorn's holds the
    configuration, whose protocol classes are what every connection will be served by)."""
    config = getattr(getattr(lifespan_send, "__self__", None), "config", None)
    if not isinstance(config, uvicorn.Config):
        return ServerSupport("unknown", problems=("the server is not uvicorn",))
    version = uvicorn.__version__
    name = f"uvicorn {version}"
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if not SUPPORTED_UVICORN[0] <= numbers < SUPPORTED_UVICORN[1]:
        low, high = (".".join(map(str, bound)) for bound in SUPPORTED_UVICORN)
        return ServerSupport(name, problems=(f"uvicorn {version} is not in the tested range "
                                             f">={low},<{high}",))
    problems = []
    http = isinstance(config.http_protocol_class, type) and issubclass(
        config.http_protocol_class, TaskcastHttpProtocol)
    if not http:
        problems.append(f"HTTP is served by {_name(config.http_protocol_class)}, "
                        f"not {_name(TaskcastHttpProtocol)}")
    ws = isinstance(config.ws_protocol_class, type) and issubclass(
        config.ws_protocol_class, TaskcastWebSocket)
    if not ws:
        problems.append(f"WebSockets are served by {_name(config.ws_protocol_class)}, "
                        f"not {_name(TaskcastWebSocket)}")
    return ServerSupport(name, direct_http_writes=http, websocket_protocol=ws,
                         shutdown_notice=http, problems=tuple(problems))


def on_server_shutdown(lifespan_scope: MutableMapping[str, Any], hook: Callable[[], None]
                       ) -> None:
    """Call `hook` when the server begins its graceful shutdown, before it waits for open
    connections (possibly more than once). Only servers that ServerSupport credits with
    shutdown_notice call it. The lifespan state is the dict uvicorn hands each connection."""
    state = lifespan_scope.get("state")
    if isinstance(state, dict):
        state[SHUTDOWN_HOOK] = hook


def _notify_shutdown(app_state: dict[str, Any]) -> None:
    hook = app_state.get(SHUTDOWN_HOOK)
    if hook is not None:
        hook()


class TaskcastHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which tells the gateway when the server shuts down and
    leaves no reference cycle behind when its connection becomes a WebSocket."""

    def shutdown(self) -> None:
        """Tell the gateway first (on_server_shutdown), then uvicorn's own shutdown: an idle
        connection closes now, one with a response under way once the response is done."""
        _notify_shutdown(self.app_state)
        super().shutdown()

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's upgrade, then cut the parser's cycle back to this object, which
        reference counting can then free at once."""
        super().handle_websocket_upgrade()
        # The connection belongs to the WebSocket protocol now and this object is done.
        # Its parser refers back to it (callbacks), a cycle that uvicorn breaks only in
        # connection_lost(), which an upgraded connection never calls here: ~5 KiB a socket
        # left for a full collection (tests/test_memory.py).
        self.parser = None  # type: ignore[assignment]


@functools.lru_cache(maxsize=16)
def _limits(max_size: int, ping_interval: float | None, ping_timeout: float | None) -> Limits:
    return Limits(max_size=max_size, ping_interval=ping_interval, ping_timeout=ping_timeout)


class TaskcastWebSocket(WebSocketConnection):
    """taskcast's WebSocket connection, built the way uvicorn builds its `ws` protocols."""

    __slots__ = ()

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        super().__init__(
            config.loaded_app,
            limits=_limits(config.ws_max_size, config.ws_ping_interval, config.ws_ping_timeout),
            root_path=config.root_path, app_state=app_state,
            connections=server_state.connections, tasks=server_state.tasks, loop=_loop)

    def shutdown(self) -> None:
        """Tell the gateway first (on_server_shutdown), then WebSocketConnection.shutdown."""
        _notify_shutdown(self.app_state)
        super().shutdown()


# -- per connection -------------------------------------------------------------------------


class HttpLink:
    """An HTTP/1.1 response in progress on uvicorn's httptools protocol, for the writes and
    checks that skip ASGI. Writes are valid from the response head (sent through ASGI, with a
    chunked body) to the end of the body (also through ASGI); the caller keeps to that."""

    __slots__ = ("_cycle", "transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self.transport: asyncio.Transport = cycle.transport

    @property
    def writable(self) -> bool:
        """A chunk written now goes out at once: nothing is buffered, the connection is open."""
        transport = self.transport
        return not transport.get_write_buffer_size() and not transport.is_closing()

    def write_if_idle(self, chunk: bytes) -> bool:
        """Write one chunk (see http_chunk) if nothing is buffered; else False."""
        transport = self.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            return False
        transport.write(chunk)
        return True

    def write(self, chunks: list[bytes]) -> None:
        """Whole HTTP/1.1 chunks (see http_chunk), in order; the caller checked `writable`."""
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        else:
            self.transport.writelines(chunks)

    def end_now(self, body: bytes) -> bool:
        """End the response with `body` as its last bytes (one write: the chunk and the end of
        the body), at once. uvicorn's own `send` does it, so the request cycle is complete as
        if the application had sent it; it only ever waits while its flow control is paused,
        and then this returns False having written nothing. Raises FastPathBroken (nothing
        written) if the send waits anyway."""
        cycle = self._cycle
        if cycle.flow.write_paused or cycle.disconnected or cycle.response_complete:
            return False
        return _run_now(cycle.send({"type": "http.response.body", "body": body,
                                    "more_body": False}))

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """The whole response, head and body, in one write, at once; False (nothing written)
        when it must take the ASGI path: a response already started, flow control paused, a
        departed client, uvicorn's access log on (it logs in `send`), or a HEAD request.
        `headers` must be valid (no CR/LF, names lower-case) and carry the content-length of
        `body` unless the status has no body (304). The cycle ends as uvicorn's `send` ends it
        after the last body message: complete, `Connection: close` honoured, the next
        pipelined request started."""
        cycle = self._cycle
        if (cycle.response_started or cycle.flow.write_paused or cycle.disconnected
                or cycle.access_log or cycle.scope["method"] == "HEAD"):
            return False
        content = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:  # server, date: kept current by uvicorn
            content += (name, b": ", value, b"\r\n")
        for name, value in headers:
            content += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        self.transport.write(b"".join(content))
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()
        return True

    @property
    def disconnected(self) -> bool:
        """uvicorn has seen the client go. Nothing announces it: the sweeper polls this."""
        return bool(self._cycle.disconnected)

    def keep_open_after_body(self) -> None:
        """uvicorn closes a `Connection: close` response's connection inside the send that ends
        its body; after this, the connection stays open until the caller closes it."""
        self._cycle.keep_alive = True

    def abort(self) -> None:
        """Drop the connection at once, discarding what is buffered for the client."""
        self.transport.abort()


def _run_now(step: Coroutine[Any, Any, None]) -> bool:
    """Run a coroutine that should not wait to its end, now; FastPathBroken if it waits."""
    try:
        step.send(None)
    except StopIteration:
        return True
    step.close()  # it waited before writing anything (uvicorn's send drains first)
    raise FastPathBroken("uvicorn's send waited while its flow control said it would not")


def http_chunk(data: bytes) -> bytes:
    """`data` framed as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def http_link(send: Callable[..., Any]) -> HttpLink | None:
    """The link under an ASGI `send` of uvicorn's httptools protocol, else None."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return None
    return HttpLink(cycle)


def websocket_link(send: Callable[..., Any]) -> WebSocketConnection | None:
    """taskcast's own WebSocket connection under an ASGI `send`, else None."""
    connection = getattr(send, "__self__", None)
    return connection if isinstance(connection, WebSocketConnection) else None


def abort_connection(send: Callable[..., Any]) -> bool:
    """Abort the TCP connection under an ASGI `send` of any of uvicorn's protocols (ours, its
    httptools and h11 cycles, its WebSocket implementations: each keeps the transport it
    writes to); False under a server that offers no way to reach it."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        return False
    abort()
    return True


# -- running uvicorn --------------------------------------------------------------------------


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's keyword arguments for these settings, with taskcast's protocol classes
    (which server_support() looks for)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "lifespan": "on",
        "access_log": False,
        "http": TaskcastHttpProtocol,
        "ws": TaskcastWebSocket,
        # A frame over this size closes the socket with 1009: clients only send small ops.
        "ws_max_size": settings.ws_max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
        "backlog": 4096,
    }


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """A uvicorn.Config from uvicorn_options(settings); `overrides` win."""
    options = uvicorn_options(settings)
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run(app: Any, settings: Settings) -> None:
    """Serve in this process until SIGTERM/SIGINT."""
    uvicorn.Server(uvicorn_config(app, settings)).run()


def run_workers(factory: str, settings: Settings) -> None:
    """`settings.workers` processes sharing the port; each imports `factory` ("module:name")."""
    uvicorn.run(factory, factory=True, workers=settings.workers, **uvicorn_options(settings))


def _name(value: object) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)
