"""A real HTTP webhook receiver for tests: a Starlette app served by uvicorn on 127.0.0.1 (a
free port) in the test's event loop. It records every request and answers each path as the
test programs it.

    async with Receiver() as receiver:
        receiver.program("/flaky", [Reply(503)] * 3)              # then the default, 204
        receiver.program("/down", then=Reply(503))                 # 503 forever
        receiver.program("/slow", [Reply(204, delay_s=5)])         # first answer after 5 s
        receiver.program("/busy", [Reply(429, headers={"Retry-After": "1"})])
        receiver.program("/moved", [Reply.redirect(receiver.url("/elsewhere"))])
        receiver.program("/huge", then=Reply(200, body_size=10 * 2**20))
        ... create tasks with webhook_url=receiver.url("/flaky") ...
        first, = await receiver.wait_for("/flaky", 4)  # the first 4 requests, bounded wait
        assert first.type == "task.completed" and first.verify(secret)["data"]["version"] == 3

Every path accepts every method. A path's programmed replies are used one per request, in
order; once they are used up, every further request gets the path's `then` reply (by
default the receiver's default, 204). Waits are bounded (`timeout`, seconds) and raise
AssertionError saying what arrived. Requests are recorded when their body has been read,
before the reply (and its delay).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CHUNK = 65_536


@dataclass(frozen=True)
class Reply:
    """One answer: `status` with `headers`, after `delay_s` seconds; the body is `body` and
    then `body_size` filler bytes (streamed, for a huge body)."""

    status: int = 204
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b""
    body_size: int = 0

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Reply:
        return cls(status, headers={"Location": location})


@dataclass(frozen=True)
class Received:
    """One recorded request. `at` is time.monotonic() on arrival (the test process's clock,
    the same the gateways in it use), `wall` time.time(); `seq` counts requests to the
    receiver from 0; `reply` is what it was (or is being) answered."""

    seq: int
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float
    wall: float
    reply: Reply

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def type(self) -> str:
        """The envelope's type, e.g. "task.completed"."""
        return str(self.json()["type"])

    @property
    def data(self) -> dict[str, Any]:
        """The envelope's data: the task object."""
        data: dict[str, Any] = self.json()["data"]
        return data

    @property
    def version(self) -> int:
        return int(self.data["version"])

    def verify(self, secret: str) -> Any:
        """The parsed body if the Standard Webhooks signature verifies with `secret`
        (standardwebhooks.WebhookVerificationError otherwise)."""
        return Webhook(secret).verify(self.body, self.headers)

    def __repr__(self) -> str:
        try:
            what = f"{self.type} v{self.version}"
        except Exception:
            what = f"{len(self.body)} bytes"
        return (f"<#{self.seq} {self.method} {self.path} {what} id={self.webhook_id!r} "
                f"-> {self.reply.status}>")


class Receiver:
    """The receiver; use it as an async context manager (it serves between enter and exit)."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply(204)
        self.port = 0
        self._received: list[Received] = []
        self._programs: dict[str, collections.deque[Reply]] = {}
        self._then: dict[str, Reply] = {}
        self._arrival = asyncio.Event()
        self._closing = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    # -- programming and reading

    def url(self, path: str = "/") -> str:
        """The absolute URL of `path` on this receiver."""
        return f"http://127.0.0.1:{self.port}{_path(path)}"

    def program(self, path: str, replies: Sequence[Reply] = (), then: Reply | None = None
                ) -> None:
        """Answer the next requests to `path` with `replies` (one each, in order), then every
        later one with `then` (default: the receiver's default). Replaces an earlier program
        of the path; replies of that program not yet used are dropped."""
        key = _path(path)
        self._programs[key] = collections.deque(replies)
        if then is None:
            self._then.pop(key, None)
        else:
            self._then[key] = then

    def requests(self, path: str | None = None) -> list[Received]:
        """The requests so far (to `path`, or to any path), in arrival order."""
        if path is None:
            return list(self._received)
        key = _path(path)
        return [request for request in self._received if request.path == key]

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 10.0,
                         what: str = "a condition") -> None:
        """Until `predicate()` (evaluated now and after every request) holds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._arrival.wait()
        except TimeoutError:
            raise AssertionError(f"{what} did not hold within {timeout} s; received: "
                                 f"{self._received}") from None

    async def wait_for(self, path: str, count: int = 1, *, timeout: float = 10.0
                       ) -> list[Received]:
        """The first `count` requests to `path`, once they have arrived."""
        await self.wait_until(lambda: len(self.requests(path)) >= count, timeout=timeout,
                              what=f"{count} request(s) to {_path(path)}")
        return self.requests(path)[:count]

    async def wait_for_match(self, path: str | None, match: Callable[[Received], bool], *,
                             timeout: float = 10.0, what: str = "a matching request"
                             ) -> Received:
        """The first request (to `path`, or to any path) that `match`es, once it arrived."""
        found: list[Received] = []

        def check() -> bool:
            found[:] = [request for request in self.requests(path) if match(request)][:1]
            return bool(found)

        await self.wait_until(check, timeout=timeout, what=what)
        return found[0]

    async def quiet(self, path: str | None, seconds: float) -> None:
        """Wait `seconds` and fail if any request (to `path`, or to any path) arrives
        meanwhile."""
        before = len(self.requests(path))
        await asyncio.sleep(seconds)
        late = self.requests(path)[before:]
        assert not late, f"unexpected requests within {seconds} s: {late}"

    # -- serving

    async def __aenter__(self) -> Receiver:
        # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only then.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=METHODS)])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(10):
                while not self._server.started:
                    if self._serving.done():
                        self._serving.result()
                        raise RuntimeError("the receiver's uvicorn stopped during start-up")
                    await asyncio.sleep(0.01)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stop()

    async def _stop(self) -> None:
        self._closing.set()  # replies still waiting out a delay end now
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            async with asyncio.timeout(15):
                await self._serving
        if self._socket is not None:
            self._socket.close()

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        path = _path(request.url.path)
        program = self._programs.get(path)
        if program:
            reply = program.popleft()
        else:
            reply = self._then.get(path, self.default)
        self._received.append(Received(
            seq=len(self._received), method=request.method, path=path,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body, at=time.monotonic(), wall=time.time(), reply=reply))
        arrival, self._arrival = self._arrival, asyncio.Event()
        arrival.set()
        if reply.delay_s > 0:
            try:
                await asyncio.wait_for(self._closing.wait(), reply.delay_s)
            except TimeoutError:
                pass
        headers = dict(reply.headers)
        if reply.body_size:
            return StreamingResponse(_filler(reply.body, reply.body_size),
                                     status_code=reply.status, headers=headers)
        return Response(reply.body, status_code=reply.status, headers=headers)


def _path(path: str) -> str:
    return path if path.startswith("/") else f"/{path}"


async def _filler(head: bytes, size: int) -> AsyncIterator[bytes]:
    if head:
        yield head
    while size > 0:
        chunk = min(size, CHUNK)
        size -= chunk
        yield b"x" * chunk
