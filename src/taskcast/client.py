"""A Python client of the gateway (contract section 9): HTTP and WebSocket only, no Redis.

    async with AsyncClient("http://127.0.0.1:8000", token=...) as client:
        task = await client.wait(42)                      # the terminal state
        async for state in client.watch([1, 2, 3]):      # every new state of each task
            print(state.task_id, state.status, state.progress)

`Client` is the blocking twin, for code that is not asyncio.

The guarantee of `watch`: for each task, every state it yields is newer than the one before
(a version at most once, in order), the terminal state always arrives and is the task's last,
and the iteration ends once every task is terminal. Intermediate states may be skipped, as
the push transports may conflate them. It survives gateway restarts, Redis restarts and
network errors: it reconnects with capped, jittered backoff, resuming from the versions it has.

Transports: "sse" (one `/events` stream for all tasks), "ws" (one `/ws` socket), "poll"
(`GET /tasks/{id}` with ETag), or "auto": SSE, then WebSocket, then polling, moving on when a
transport is blocked or buffered (no first state within `first_event_timeout_s`, or refused
by a proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal

import httpx
import orjson
import websockets
from httpx_sse import aconnect_sse

from taskcast.aio import Backoff
from taskcast.errors import TaskcastError, TaskNotFound
from taskcast.ids import parse_task_id_value
from taskcast.models import Task

Transport = Literal["auto", "sse", "ws", "poll"]
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]] | None
TRANSPORTS: tuple[str, ...] = ("sse", "ws", "poll")

__all__ = ["AccessRefused", "AsyncClient", "Client", "GatewayUnreachable", "Task",
           "TaskNotFound", "Transport"]


class ClientError(TaskcastError):
    """Base of the client's own errors."""


class AccessRefused(ClientError):
    """The gateway refused the token: `status` 401 (missing, invalid or expired, and a new one
    did not help) or 403 (the token does not name these tasks: `task_ids`)."""

    def __init__(self, status: int, message: str, task_ids: list[int] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.task_ids = task_ids or []


class GatewayUnreachable(ClientError):
    """No answer from the gateway for `give_up_after_s` (connection refused, timeouts, 5xx)."""


class _Retry(Exception):
    """A transport ended early (network error, 5xx, restart): reconnect after a backoff, or
    after `delay_s` when the server said (SSE `retry:`)."""

    def __init__(self, why: str, delay_s: float | None = None) -> None:
        super().__init__(why)
        self.delay_s = delay_s


class _Blocked(Exception):
    """The transport does not work through whatever is in between (no first state in time,
    a proxy refusing it): "auto" moves on to the next one."""


class _TokenRefused(Exception):
    """401 / 4401 / `token_expired`: get a fresh token and reconnect at once."""


class AsyncClient:
    """The gateway at `base_url` (e.g. "http://127.0.0.1:8000"), for asyncio code.

    `token`: None (access control off), a string, or a function (sync or async) returning
    one; a function is called again whenever the gateway refuses or expires the token.
    `give_up_after_s`: how long without any answer from the gateway before raising
    GatewayUnreachable (None: keep trying). Backoff between attempts grows from
    `min_backoff_s` to `max_backoff_s`, each delay jittered (50-100 %).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: TokenSource = None,
        timeout_s: float = 10.0,
        first_event_timeout_s: float = 5.0,
        poll_interval_s: float = 1.0,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        give_up_after_s: float | None = 60.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None
        self.first_event_timeout_s = first_event_timeout_s
        self.poll_interval_s = poll_interval_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        self._own_http = http is None
        # Reads are bounded too (a gateway that accepts and never answers is unreachable);
        # the SSE stream lifts the read bound once its headers have come (_sse).
        self._timeout_s = timeout_s
        self._http = http or httpx.AsyncClient(base_url=self.base_url,
                                               timeout=httpx.Timeout(timeout_s))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client (unless the caller passed its own)."""
        if self._own_http:
            await self._http.aclose()

    # -- the API ------------------------------------------------------------------------------

    async def get(self, task_id: int, *, image_base64: bool = True) -> Task:
        """The task's current state (REST). Raises TaskNotFound, AccessRefused, or
        GatewayUnreachable (after retrying for `give_up_after_s`); InvalidTaskId (a
        ValueError) for an id that is not a non-negative int64."""
        task_id = parse_task_id_value(task_id, ("task_id",))
        deadline = _Deadline(self.give_up_after_s)
        backoff = Backoff(self.min_backoff_s, self.max_backoff_s, floor=0.5)
        refreshed = False
        while True:
            try:
                response = await self._http.get(
                    f"/tasks/{task_id}", headers=await self._headers(),
                    params=None if image_base64 else {"image_base64": "false"})
            except httpx.TransportError as exc:
                deadline.check(f"GET /tasks/{task_id}: {exc!r}")
                await asyncio.sleep(backoff.next())
                continue
            if response.status_code == 200:
                return _task(response.json()["data"])
            if response.status_code == 404:
                raise TaskNotFound(task_id)
            if response.status_code == 401 and not refreshed and self._refreshable:
                refreshed = True
                await self._refresh_token()
                continue
            if response.status_code in (401, 403):
                raise AccessRefused(response.status_code, _message(response), [task_id])
            deadline.check(f"GET /tasks/{task_id}: HTTP {response.status_code}")
            await asyncio.sleep(backoff.next())

    async def wait(self, task_id: int, *, timeout: float | None = None,
                   transport: Transport = "auto", image_base64: bool = True) -> Task:
        """The task's terminal state (completed or failed), following it live; raises
        TimeoutError after `timeout` seconds (None: no limit)."""
        last: Task | None = None
        async with asyncio.timeout(timeout):
            async for state in self.watch([task_id], transport=transport,
                                          image_base64=image_base64):
                last = state
        assert last is not None and last.is_terminal
        return last

    async def watch(self, task_ids: Iterable[int], *, transport: Transport = "auto",
                    image_base64: bool = True) -> AsyncGenerator[Task, None]:
        """Each new state of these tasks as it happens (see the module's guarantee), ending
        after every task's terminal state. Raises TaskNotFound for an unknown task,
        AccessRefused, GatewayUnreachable, or ValueError for an unknown transport."""
        if transport not in ("auto", *TRANSPORTS):
            raise ValueError(f"transport must be auto, sse, ws or poll, not {transport!r}")
        # Refused here, not retried: the gateway would answer 422 forever.
        wanted = list(dict.fromkeys(parse_task_id_value(task_id, ("task_ids", index))
                                    for index, task_id in enumerate(task_ids)))
        known: dict[int, int] = {}
        finished: set[int] = set()
        order = list(TRANSPORTS) if transport == "auto" else [transport]
        index = 0
        deadline = _Deadline(self.give_up_after_s)
        backoff = Backoff(self.min_backoff_s, self.max_backoff_s, floor=0.5)
        refreshed = False  # a fresh token that has not been followed by any state yet
        while len(finished) < len(wanted):
            pending = [task_id for task_id in wanted if task_id not in finished]
            kind = order[index]
            progressed = False
            try:
                # aclosing: a consumer that stops early closes the connection now, not when
                # the interpreter collects the generator (after the HTTP client is closed).
                async with contextlib.aclosing(self._transport(
                        kind, pending, known, image_base64, deadline)) as states:
                    async for task in states:
                        progressed = True
                        refreshed = False
                        backoff.reset()
                        if task.task_id in finished or task.task_id not in pending:
                            continue
                        if task.version <= known.get(task.task_id, -1) and not task.is_terminal:
                            continue  # seen already (a reconnect starts from the current state)
                        # A terminal state at or below a version seen means Redis lost the record
                        # and it was re-created: the end must still arrive (contract 4).
                        known[task.task_id] = task.version
                        if task.is_terminal:
                            finished.add(task.task_id)
                        yield task
            except _TokenRefused:
                if not self._refreshable or refreshed:  # a fresh token refused too: give up
                    raise AccessRefused(401, "the token was refused or expired",
                                        pending) from None
                await self._refresh_token()
                refreshed = True
                continue
            except _Blocked as exc:
                if transport == "auto" and index + 1 < len(order):
                    index += 1  # this transport does not get through: the next one
                    continue
                deadline.check(f"{kind}: {exc}")
                await asyncio.sleep(backoff.next())
            except _Retry as exc:
                if not progressed:
                    deadline.check(f"{kind}: {exc}")
                delay = backoff.next()
                await asyncio.sleep(delay if exc.delay_s is None else max(exc.delay_s, delay))

    # -- transports ---------------------------------------------------------------------------

    def _transport(self, kind: str, task_ids: list[int], known: dict[int, int],
                   image_base64: bool, deadline: _Deadline) -> AsyncGenerator[Task, None]:
        """States from one connection of that kind; each transport calls deadline.reset()
        whenever the gateway answers (a quiet stream is not an unreachable gateway)."""
        if kind == "sse":
            return self._sse(task_ids, image_base64, deadline)
        if kind == "ws":
            return self._ws(task_ids, image_base64, deadline)
        return self._poll(task_ids, image_base64, deadline)

    async def _sse(self, task_ids: list[int], image_base64: bool, deadline: _Deadline
                   ) -> AsyncGenerator[Task, None]:
        params: list[tuple[str, str]] = [("task_id", str(task_id)) for task_id in task_ids]
        if not image_base64:
            params.append(("image_base64", "false"))
        retry_s: float | None = None
        got_first = connected = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    # Connect and headers within first_event_timeout_s: a proxy that holds
                    # the whole response back counts as blocking SSE. Then reads are unbounded
                    # (keep-alives and states come when they come).
                    async with asyncio.timeout(self.first_event_timeout_s):
                        source = await stack.enter_async_context(aconnect_sse(
                            self._http, "GET", "/events", params=params,
                            headers=await self._headers(),
                            timeout=httpx.Timeout(self._timeout_s, read=None)))
                except TimeoutError:
                    raise _Blocked("no answer to the stream request in time") from None
                if source.response.status_code == 404:
                    raise TaskNotFound(await self._which_is_unknown(task_ids))
                _check_http(source.response, task_ids, streaming=True)
                deadline.reset()
                connected = True
                events = source.aiter_sse()
                while True:
                    try:
                        if got_first:
                            event = await anext(events)
                        else:  # a buffering proxy holds the first event back
                            async with asyncio.timeout(self.first_event_timeout_s):
                                event = await anext(events)
                    except StopAsyncIteration:
                        deadline.reset()  # the gateway ended it: it was there just now
                        raise _Retry("the stream ended", retry_s) from None
                    except TimeoutError:
                        raise _Blocked("no first event in time (a buffering proxy?)") from None
                    deadline.reset()
                    if event.retry is not None:
                        retry_s = event.retry / 1000
                    if event.event in ("", "message"):
                        if not event.data:
                            continue  # a comment-only block, as some parsers hand them out
                        got_first = True
                        yield _task(orjson.loads(event.data))
                    elif event.event == "end":
                        return
                    elif event.event == "token_expired":
                        raise _TokenRefused()
                    elif event.event == "not_found":
                        raise TaskNotFound(int(event.data.split(",")[0]))
        except httpx.TransportError as exc:
            if connected:  # a quiet stream that broke: the gateway was there until now
                deadline.reset()
            raise _Retry(repr(exc), retry_s) from None

    async def _ws(self, task_ids: list[int], image_base64: bool, deadline: _Deadline
                  ) -> AsyncGenerator[Task, None]:
        url = "ws" + self.base_url[len("http"):] + "/ws"
        if not image_base64:
            url += "?image_base64=false"
        headers = await self._headers()
        try:
            async with websockets.connect(url, additional_headers=headers, max_size=None,
                                          open_timeout=self.first_event_timeout_s) as socket:
                deadline.reset()
                await socket.send(orjson.dumps({"op": "subscribe",
                                                "task_ids": task_ids}).decode())
                remaining = set(task_ids)
                got_first = False
                while remaining:
                    try:
                        if got_first:
                            raw = await socket.recv()
                        else:
                            async with asyncio.timeout(self.first_event_timeout_s):
                                raw = await socket.recv()
                    except TimeoutError:
                        raise _Blocked("no first frame in time") from None
                    deadline.reset()
                    frame = orjson.loads(raw)
                    kind = frame.get("type")
                    if kind == "task":
                        got_first = True
                        task = _task(frame["data"])
                        if task.is_terminal:
                            remaining.discard(task.task_id)
                        yield task
                    elif kind == "error":
                        _raise_ws_error(frame)
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AccessRefused(status, "refused at the WebSocket upgrade",
                                    task_ids) from None
            raise _Blocked(f"the upgrade was answered {status}") from None
        except websockets.ConnectionClosed as exc:
            deadline.reset()  # the socket was open until now, however quiet
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            if code == 4401:
                raise _TokenRefused() from None
            if code == 4403:
                raise AccessRefused(403, "forbidden", task_ids) from None
            raise _Retry(f"closed with {code}") from None
        except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
            raise _Retry(repr(exc)) from None

    async def _poll(self, task_ids: list[int], image_base64: bool, deadline: _Deadline
                    ) -> AsyncGenerator[Task, None]:
        etags: dict[int, str] = {}
        remaining = list(task_ids)
        params = None if image_base64 else {"image_base64": "false"}
        while remaining:
            for task_id in list(remaining):
                headers = await self._headers()
                if task_id in etags:
                    headers["If-None-Match"] = etags[task_id]
                try:
                    response = await self._http.get(f"/tasks/{task_id}", headers=headers,
                                                    params=params)
                except httpx.TransportError as exc:
                    raise _Retry(repr(exc)) from None
                if response.status_code < 500:
                    deadline.reset()
                if response.status_code == 304:
                    continue
                _check_http(response, [task_id], streaming=False)
                etags[task_id] = response.headers.get("etag", "")
                task = _task(response.json()["data"])
                if task.is_terminal:
                    remaining.remove(task_id)
                yield task
            if remaining:
                await asyncio.sleep(self.poll_interval_s)

    async def _which_is_unknown(self, task_ids: list[int]) -> int:
        """The first of these ids the gateway does not know (an /events 404 names none)."""
        for task_id in task_ids:
            try:
                await self.get(task_id, image_base64=False)
            except TaskNotFound:
                return task_id
        return task_ids[0]

    # -- tokens -------------------------------------------------------------------------------

    @property
    def _refreshable(self) -> bool:
        return callable(self._token_source)

    async def _refresh_token(self) -> None:
        source = self._token_source
        assert callable(source)
        token = source()
        self._token = await token if inspect.isawaitable(token) else token

    async def _headers(self) -> dict[str, str]:
        if self._token is None and self._refreshable:
            await self._refresh_token()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}


class Client:
    """The blocking twin of AsyncClient: the same arguments, calls, guarantee and errors.
    Each call runs on an event loop of this client's own; `watch` is a plain iterator."""

    def __init__(self, base_url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(base_url, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client and the event loop."""
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._async.aclose())
            self._loop.close()

    def get(self, task_id: int, *, image_base64: bool = True) -> Task:
        """As AsyncClient.get."""
        return self._loop.run_until_complete(self._async.get(task_id, image_base64=image_base64))

    def wait(self, task_id: int, *, timeout: float | None = None,
             transport: Transport = "auto", image_base64: bool = True) -> Task:
        """As AsyncClient.wait."""
        return self._loop.run_until_complete(self._async.wait(
            task_id, timeout=timeout, transport=transport, image_base64=image_base64))

    def watch(self, task_ids: Iterable[int], *, transport: Transport = "auto",
              image_base64: bool = True) -> Iterator[Task]:
        """As AsyncClient.watch, as a blocking iterator."""
        states = self._async.watch(task_ids, transport=transport, image_base64=image_base64)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(states))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(states.aclose())


# -- helpers ------------------------------------------------------------------------------------


class _Deadline:
    """GatewayUnreachable once `bound_s` has passed without an answer from the gateway."""

    def __init__(self, bound_s: float | None) -> None:
        self.bound_s = bound_s
        self.reset()

    def reset(self) -> None:
        self.since = asyncio.get_running_loop().time()

    def check(self, why: str) -> None:
        if self.bound_s is not None and (
                asyncio.get_running_loop().time() - self.since > self.bound_s):
            raise GatewayUnreachable(f"no answer from the gateway for {self.bound_s} s ({why})")


def _task(data: dict[str, Any]) -> Task:
    return Task.from_json(orjson.dumps(data))


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("msg", ""))
    except ValueError:
        return response.text[:200]


def _check_http(response: httpx.Response, task_ids: list[int], *, streaming: bool) -> None:
    """Map a non-200 answer: 404 TaskNotFound, 401 _TokenRefused, 403 AccessRefused, 429 and
    other 4xx from something in between _Blocked, 5xx _Retry."""
    status = response.status_code
    if status == 200:
        if streaming and not response.headers.get("content-type", "").startswith(
                "text/event-stream"):
            kind = response.headers.get("content-type")
            raise _Blocked(f"a 200 that is not an event stream ({kind})")
        return
    if status == 404:
        raise TaskNotFound(task_ids[0])
    if status == 401:
        raise _TokenRefused()
    if status == 403:
        raise AccessRefused(403, "forbidden", task_ids)
    if status >= 500 or status == 429:
        raise _Retry(f"HTTP {status}", _retry_after(response))
    raise _Blocked(f"HTTP {status}")


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after", "")
    return float(raw) if raw.isdigit() else None


def _raise_ws_error(frame: dict[str, Any]) -> None:
    code = frame.get("code")
    ids = [int(task_id) for task_id in frame.get("task_ids") or []]
    if code == 404:
        raise TaskNotFound(ids[0] if ids else -1)
    if code == 401:
        raise _TokenRefused()
    if code == 403:
        raise AccessRefused(403, str(frame.get("msg", "forbidden")), ids)
    raise _Retry(f"error frame {code}: {frame.get('msg')}")
