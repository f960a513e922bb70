"""One webhook POST, made safely: the SSRF guard, a pinned address, bounded everything.

- The target is checked after resolving it (webhook_targets.py) and the connection goes to the
  address that was checked: the URL's host is replaced by it, the `Host` header and the TLS
  server name (SNI, certificate check) keep the real name.
- At most `per_host` requests to one host at once; more wait for a turn, within the timeout.
- `timeout_s` bounds the whole attempt (resolving, connecting, sending, the response headers
  and what is read of the body); at most `max_response_bytes` of the body are read.
- Redirects are not followed (a 3xx is an answer like any other); no cookies are kept, no
  proxy from the environment is used: the request goes from this process to the checked address.

Requests go through httpx's transport directly (public API), not an httpx client, which would
keep cookies and read proxy settings.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections import OrderedDict
from dataclasses import dataclass

import httpx

from taskcast.webhook_targets import TargetPolicy, TargetRefused

MAX_TRANSPORTS = 256  # hosts with an idle connection pool kept open


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to.

    outcome: "delivered" (2xx), "gone" (410), "retry" (a timeout, a connection error, any
    other status), "refused" (the target is not allowed; nothing was sent)."""

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

    @property
    def busy_hosts(self) -> int:
        """Hosts with a request under way or waiting."""
        return len(self._turns)


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
                 max_response_bytes: int = 65_536) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._turns = _HostTurns(per_host)
        self._per_host = per_host
        # One pool per host (and scheme, port): a connection is only reused for the host it
        # was opened (and its certificate checked) for, though the URL names an address.
        self._transports: OrderedDict[tuple[str, str, int], httpx.AsyncHTTPTransport] = (
            OrderedDict())

    async def close(self) -> None:
        """Close every pooled connection."""
        transports, self._transports = list(self._transports.values()), OrderedDict()
        for transport in transports:
            await transport.aclose()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST `body` to `url`; never raises for what the network or the receiver does."""
        started = time.monotonic()
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            return Attempt("refused", error="invalid URL")
        if parsed.scheme not in ("http", "https") or not parsed.host:
            return Attempt("refused", error="not an absolute http(s) URL")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = parsed.host
        turn = None
        try:
            async with asyncio.timeout(self.timeout_s):
                turn = await self._turns(host)
                target = await self.policy.check(parsed.scheme, host, port,
                                                 timeout_s=self.timeout_s)
                attempt = await self._send(parsed, target.address, port, body, headers)
        except TargetRefused as exc:
            return Attempt("refused", error=str(exc), duration_s=time.monotonic() - started)
        except TimeoutError:
            return Attempt("retry", error=f"no answer within {self.timeout_s:g} s",
                           duration_s=time.monotonic() - started)
        except (httpx.TransportError, ConnectionError, OSError) as exc:
            return Attempt("retry", error=f"{type(exc).__name__}: {exc}"[:300],
                           duration_s=time.monotonic() - started)
        finally:
            if turn is not None:
                turn.release()
        return Attempt(attempt.outcome, attempt.status, attempt.retry_after_s, attempt.error,
                       time.monotonic() - started)

    async def _send(self, url: httpx.URL, address: str, port: int, body: bytes,
                    headers: dict[str, str]) -> Attempt:
        host_header = url.host if (url.port is None) else f"{_bracketed(url.host)}:{url.port}"
        request = httpx.Request(
            "POST", url.copy_with(host=address),
            headers={"host": host_header, "content-type": "application/json",
                     "user-agent": "taskcast-webhooks", **headers},
            content=body,
            extensions={"timeout": {"connect": self.timeout_s, "read": self.timeout_s,
                                    "write": self.timeout_s, "pool": self.timeout_s},
                        **({"sni_hostname": url.host} if url.scheme == "https" else {})})
        response = await self._transport(url.scheme, url.host, port).handle_async_request(
            request)
        try:
            read = 0
            async for chunk in response.stream:  # type: ignore[union-attr]
                read += len(chunk)
                if read >= self.max_response_bytes:
                    break  # the rest is not read; the connection is not reused
        finally:
            await response.aclose()
        status = response.status_code
        outcome = classify(status)
        wait = retry_after(response.headers.get("retry-after"), time.time()) if (
            outcome == "retry") else None
        return Attempt(outcome, status, wait, "" if outcome == "delivered" else f"HTTP {status}")

    def _transport(self, scheme: str, host: str, port: int) -> httpx.AsyncHTTPTransport:
        key = (scheme, host, port)
        transport = self._transports.get(key)
        if transport is None:
            transport = httpx.AsyncHTTPTransport(
                retries=0, trust_env=False, http2=False,
                limits=httpx.Limits(max_connections=self._per_host,
                                    max_keepalive_connections=self._per_host))
            self._transports[key] = transport
            if len(self._transports) > MAX_TRANSPORTS:
                _, oldest = self._transports.popitem(last=False)
                asyncio.get_running_loop().create_task(oldest.aclose())
        else:
            self._transports.move_to_end(key)
        return transport


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
