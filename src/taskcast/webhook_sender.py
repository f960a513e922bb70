"""One webhook POST, made safely: the SSRF guard, a pinned address, bounded everything.

- The target is checked after resolving it (webhook_targets.py) and the connection goes to the
  address that was checked; the `Host` header and the TLS server name (SNI, the certificate
  check) keep the URL's host.
- At most `per_host` requests to one host at once; more wait for a turn. The wait is not part
  of the attempt: a backlog does not turn into timeouts (and duplicates).
- `timeout_s` bounds the attempt itself: resolving, connecting, sending, the answer, and what
  is read of the body; at most `max_response_bytes` of the body are read.
- Redirects are not followed (a 3xx is an answer like any other); no cookies, no proxy from
  the environment: the request goes from this process to the checked address.

HTTP/1.1 is spoken with h11 over asyncio streams, with a small keep-alive pool per host and
address. An HTTP client library was measured first: httpx/httpcore cost 1.5-2 ms of CPU per
POST here, and httpcore's pool leaks a connection slot whenever a request is cancelled
(encode/httpcore#1093), which after enough timeouts left a host with no slot at all. Owning
the connection, an attempt that times out simply closes it.
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import certifi
import h11

from taskcast.webhook_targets import TargetPolicy, TargetRefused

IDLE_S = 30.0  # an idle kept-alive connection older than this is closed rather than reused




@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to.

    outcome: "delivered" (2xx), "gone" (410), "retry" (a timeout, a connection error, any
    other status), "refused" (the target is not allowed; nothing was sent), "skipped" (not
    sent: still_wanted() said no once the turn came)."""

    outcome: str
    status: int | None = None
    retry_after_s: float | None = None
    error: str = ""
    duration_s: float = 0.0


def classify(status: int) -> str:
    """The outcome of an HTTP status. Every status but 2xx and 410 is retried, 4xx included:
    a receiver deployed with the wrong secret (401) or not yet deployed (404) is fixed within
    the horizon more often than not, and dropping a terminal state would break the guarantee;
    a receiver that wants no more says 410."""
    if 200 <= status < 300:
        return "delivered"
    if status == 410:
        return "gone"
    return "retry"


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


class _HostTurns:
    """A semaphore per host, dropped when nobody holds or waits for it."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._turns: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def __call__(self, host: str) -> _Turn:
        semaphore, users = self._turns.get(host, (asyncio.Semaphore(self.per_host), 0))
        self._turns[host] = (semaphore, users + 1)
        try:
            await semaphore.acquire()
        except BaseException:
            self._leave(host)
            raise
        return _Turn(self, host, semaphore)

    def _leave(self, host: str) -> None:
        semaphore, users = self._turns[host]
        if users <= 1:
            del self._turns[host]
        else:
            self._turns[host] = (semaphore, users - 1)


@dataclass(slots=True)
class _Turn:
    turns: _HostTurns
    host: str
    semaphore: asyncio.Semaphore

    def release(self) -> None:
        self.semaphore.release()
        self.turns._leave(self.host)


class WebhookSender:
    """Makes webhook POSTs; close() when done."""

    def __init__(self, policy: TargetPolicy, *, timeout_s: float = 10.0, per_host: int = 10,
                 max_response_bytes: int = 65_536,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._turns = _HostTurns(per_host)
        self._ssl = ssl_context or ssl.create_default_context(cafile=certifi.where())
        # Idle connections by (scheme, host, port, address): reused only for the host (and
        # certificate) they were opened for, and only to the address that was checked.
        self._idle: dict[tuple[str, str, int, str], list[_Connection]] = {}

    async def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str], *,
                   still_wanted: Callable[[], bool] | None = None) -> Attempt:
        """POST `body` to `url`; never raises for what the network or the receiver does.
        `still_wanted` is asked once this request's turn has come: False gives up (outcome
        "skipped", nothing sent)."""
        try:
            scheme, host, port, target = _split(url)
        except ValueError as exc:
            return Attempt("refused", error=str(exc))
        turn = await self._turns(host)
        try:
            if still_wanted is not None and not still_wanted():
                return Attempt("skipped")
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout_s):
                    checked = await self.policy.check(scheme, host, port,
                                                      timeout_s=self.timeout_s)
                    status, wait = await self._exchange(
                        (scheme, host, port, checked.address), target, body, headers)
            except TargetRefused as exc:
                return Attempt("refused", error=str(exc), duration_s=time.monotonic() - started)
            except TimeoutError:
                return Attempt("retry", error=f"no answer within {self.timeout_s:g} s",
                               duration_s=time.monotonic() - started)
            except (OSError, h11.ProtocolError) as exc:  # ConnectionError, ssl.SSLError too
                return Attempt("retry", error=f"{type(exc).__name__}: {exc}"[:300],
                               duration_s=time.monotonic() - started)
            outcome = classify(status)
            return Attempt(outcome, status, wait if outcome == "retry" else None,
                           "" if outcome == "delivered" else f"HTTP {status}",
                           time.monotonic() - started)
        finally:
            turn.release()

    async def _exchange(self, key: tuple[str, str, int, str], target: str, body: bytes,
                        headers: dict[str, str]) -> tuple[int, float | None]:
        """One request and its answer: (status, Retry-After seconds). A kept-alive connection
        that turns out closed by the other side is replaced once."""
        scheme, host, port, _ = key
        default_port = 443 if scheme == "https" else 80
        host_header = _bracketed(host) + ("" if port == default_port else f":{port}")
        request = [
            h11.Request(method="POST", target=target, headers=[
                ("host", host_header), ("content-type", "application/json"),
                ("content-length", str(len(body))), ("user-agent", "taskcast-webhooks"),
                *headers.items()]),
            h11.Data(data=body), h11.EndOfMessage()]
        for _ in range(2):
            connection = self._take(key)
            reused = connection is not None
            if connection is None:
                connection = await _Connection.open(key, self._ssl)
            try:
                answer = await connection.exchange(request, self.max_response_bytes)
            except BaseException as exc:
                connection.close()
                if reused and isinstance(exc, _ClosedBeforeAnswer):
                    continue  # the server closed an idle connection: once more, on a new one
                raise
            if connection.kept_alive:
                self._idle.setdefault(key, []).append(connection)
            else:
                connection.close()
            return answer
        raise ConnectionError("the connection closed before an answer")

    def _take(self, key: tuple[str, str, int, str]) -> _Connection | None:
        pool = self._idle.get(key)
        while pool:
            connection = pool.pop()
            if connection.fresh():
                return connection
            connection.close()
        self._idle.pop(key, None)
        return None


class _ClosedBeforeAnswer(ConnectionError):
    """The peer closed the connection before any byte of an answer."""


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = field(default_factory=time.monotonic)
    kept_alive: bool = False  # the last exchange left it ready for another

    @classmethod
    async def open(cls, key: tuple[str, str, int, str], context: ssl.SSLContext
                   ) -> _Connection:
        scheme, host, port, address = key
        if scheme == "https":
            reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=host.strip("[]"))
        else:
            reader, writer = await asyncio.open_connection(address, port)
        return cls(reader, writer)

    def fresh(self) -> bool:
        return (time.monotonic() - self.idle_since < IDLE_S and not self.reader.at_eof()
                and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, request: list[h11.Event], cap: int) -> tuple[int, float | None]:
        self.kept_alive = False
        for outgoing in request:
            data = self.protocol.send(outgoing)
            if data:
                self.writer.write(data)
        await self.writer.drain()
        status, wait, read, answered = 0, None, 0, False
        while True:
            event = self.protocol.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.reader.read(65_536)
                if not chunk and not answered:
                    raise _ClosedBeforeAnswer("the connection closed before an answer")
                self.protocol.receive_data(chunk)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                answered = True
                status = event.status_code
                for name, value in event.headers:
                    if name == b"retry-after":
                        wait = retry_after(value.decode("latin-1"), time.time())
            elif isinstance(event, h11.Data):
                read += len(event.data)
                if read >= cap:
                    self.writer.close()  # the rest is not read; the connection is not reused
                    break
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        self.kept_alive = (self.protocol.our_state is h11.DONE
                           and self.protocol.their_state is h11.DONE
                           and not self.writer.is_closing())
        if self.kept_alive:
            self.protocol.start_next_cycle()
            self.idle_since = time.monotonic()
        return status, wait


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an absolute http(s) URL; ValueError if it is
    not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("invalid URL") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("http", "https") or not host:
        raise ValueError("not an absolute http(s) URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
