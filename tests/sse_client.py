"""A small Server-Sent Events client for tests.

httpx-sse hides what these tests need to see (comments, `retry:`-only blocks, whether the body
ended cleanly), so this parses the wire format itself over httpx's `aiter_lines`, and checks a
transcript against the SSE contract: per task, strictly increasing versions that end with the
terminal state, `id:` equal to the version, no event name on task events, and on a multi-task
stream a closing `event: end` / `id: done`.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

TASK_FIELDS = [
    "task_id", "status", "progress", "type", "angle", "image", "error_message", "version",
    "updated_at",
]
TERMINAL = ("completed", "failed")
KEEPALIVE = "keep-alive"


@dataclass
class Frame:
    """One block of lines up to a blank line: an event, a `retry:` block or a comment."""

    id: str | None = None
    event: str | None = None
    data_lines: list[str] = field(default_factory=list)
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        return "\n".join(self.data_lines)

    @property
    def is_task(self) -> bool:
        """A task state: data without an event name."""
        return self.event is None and bool(self.data_lines)

    @property
    def is_keepalive(self) -> bool:
        return self.comments == [KEEPALIVE] and not self.data_lines and self.id is None

    def task(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


async def iter_frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """The frames of an SSE body in order (a trailing frame without its blank line too)."""
    frame, started = Frame(), False
    async for line in response.aiter_lines():
        if line == "":
            if started:
                yield frame
            frame, started = Frame(), False
            continue
        if line.startswith(":"):
            if not started:  # a comment line on its own (a keep-alive): a frame of its own
                yield Frame(comments=[line[1:].removeprefix(" ")])
                continue
            frame.comments.append(line[1:].removeprefix(" "))
            continue
        started = True
        name, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else ""
        if name == "data":
            frame.data_lines.append(value)
        elif name == "id":
            frame.id = value
        elif name == "event":
            frame.event = value
        elif name == "retry":
            frame.retry = int(value)
        else:
            frame.other.append(line)
    if started:
        frame.other.append("<no blank line after the last frame>")
        yield frame


@dataclass
class Transcript:
    """Everything one connection saw."""

    path: str
    status: int | None = None
    headers: httpx.Headers | None = None
    body: bytes = b""
    frames: list[Frame] = field(default_factory=list)
    ended: bool = False  # the server ended the body cleanly
    error: str | None = None  # the connection broke instead (or the client gave up)

    def task_frames(self) -> list[Frame]:
        return [frame for frame in self.frames if frame.is_task]

    def tasks(self) -> list[dict[str, Any]]:
        return [frame.task() for frame in self.task_frames()]

    def by_task(self) -> dict[int, list[dict[str, Any]]]:
        result: dict[int, list[dict[str, Any]]] = {}
        for task in self.tasks():
            result.setdefault(task["task_id"], []).append(task)
        return result

    def keepalives(self) -> int:
        return sum(frame.is_keepalive for frame in self.frames)

    def summary(self) -> str:
        versions = {
            task_id: [(t["version"], t["status"]) for t in tasks]
            for task_id, tasks in sorted(self.by_task().items())
        }
        others = [(f.event, f.id, f.data[:40]) for f in self.frames
                  if not f.is_task and not f.is_keepalive and f.retry is None]
        return (f"{self.path}: status={self.status} ended={self.ended} error={self.error} "
                f"keepalives={self.keepalives()} others={others} versions={versions}")


class Follower:
    """One SSE connection, read in the background until the server ends it (or `stop_when`).

    `ready` is set once every task in `expect` has had at least one state, so a test can start
    changing tasks after the client is known to be following them.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        path: str,
        *,
        expect: Iterable[int] = (),
        headers: Mapping[str, str] | None = None,
        stop_when: Callable[[Frame, Transcript], bool] | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.headers = dict(headers or {})
        self.expect = set(expect)
        self.stop_when = stop_when
        self.transcript = Transcript(path)
        self.connected = asyncio.Event()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[Transcript] | None = None
        if not self.expect:
            self.ready.set()

    def start(self) -> Follower:
        self.task = asyncio.create_task(self.run(), name=f"sse {self.path}")
        return self

    async def run(self) -> Transcript:
        t = self.transcript
        seen: set[int] = set()
        try:
            async with self.client.stream("GET", self.path, headers=self.headers) as response:
                t.status, t.headers = response.status_code, response.headers
                self.connected.set()
                if response.status_code != 200:
                    t.body = await response.aread()
                    t.ended = True
                    return t
                async for frame in iter_frames(response):
                    t.frames.append(frame)
                    if frame.is_task and self.expect:
                        seen.add(frame.task()["task_id"])
                        if seen >= self.expect:
                            self.ready.set()
                    if self.stop_when is not None and self.stop_when(frame, t):
                        t.error = "stopped by the client"
                        return t
                t.ended = True
        except httpx.HTTPError as exc:
            t.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.connected.set()
        return t

    async def result(self, timeout: float) -> Transcript:
        """The transcript once the stream is over; a hang fails with what was seen so far."""
        assert self.task is not None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.task)
        except TimeoutError:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            raise AssertionError(f"stream did not end: {self.transcript.summary()}") from None

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def read_stream(client: httpx.AsyncClient, path: str, *, timeout: float = 20,
                      headers: Mapping[str, str] | None = None) -> Transcript:
    follower = Follower(client, path, headers=headers).start()
    return await follower.result(timeout)


# --- checks ---------------------------------------------------------------------------------


def task_shape_problems(frame: Frame) -> list[str]:
    task = frame.task()
    problems = []
    if list(task) != TASK_FIELDS:
        problems.append(f"fields {list(task)}")
    if not isinstance(task.get("image"), dict) or sorted(task["image"]) != [
        "image_base64", "image_url"
    ]:
        problems.append(f"image {task.get('image')!r}")
    if frame.id != str(task.get("version")):
        problems.append(f"id {frame.id!r} but version {task.get('version')!r}")
    return problems


def stream_problems(
    transcript: Transcript,
    task_ids: Iterable[int],
    *,
    retry_ms: int | None = 2000,
    multi: bool = False,
    terminal: bool = True,
) -> list[str]:
    """What is wrong with a finished stream, as readable lines (empty when all is well).

    Every task in `task_ids` must have at least one state; per task versions strictly increase;
    with `terminal` the last state of each is completed/failed and the body ended cleanly
    (after `event: end` / `id: done` on a multi-task stream).
    """
    wanted = set(task_ids)
    t = transcript
    problems: list[str] = []
    if t.status != 200:
        return [f"status {t.status}: {t.body[:200]!r}"]
    # The `retry:` hint rides in the first event (issue 13): never a block without data,
    # which generic parsers (httpx-sse) hand out as an event with empty data.
    events = [frame for frame in t.frames if frame.data_lines]
    if events and events[0].retry is None:
        problems.append("the first event carries no retry: line")
    elif events and retry_ms is not None and events[0].retry != retry_ms:
        problems.append(f"retry {events[0].retry} != {retry_ms}")
    problems += [f"frame {index}: a retry: block without data" for index, frame
                 in enumerate(t.frames) if frame.retry is not None and not frame.data_lines]
    finished: set[int] = set()
    last_version: dict[int, int] = {}
    for index, frame in enumerate(t.frames):
        if frame.other:
            problems.append(f"frame {index}: unexpected lines {frame.other}")
        if frame.is_keepalive:
            continue
        if not frame.is_task:
            if multi and frame.event == "end" and index == len(t.frames) - 1:
                continue
            problems.append(f"frame {index}: unexpected {frame}")
            continue
        problems += [f"frame {index}: {p}" for p in task_shape_problems(frame)]
        task = frame.task()
        task_id, version = task["task_id"], task["version"]
        if task_id not in wanted:
            problems.append(f"frame {index}: task {task_id} was not asked for")
        if task_id in finished:
            problems.append(f"frame {index}: task {task_id} v{version} after its terminal state")
        if version <= last_version.get(task_id, 0):
            problems.append(f"frame {index}: task {task_id} v{version} not newer than "
                            f"v{last_version[task_id]}")
        last_version[task_id] = max(version, last_version.get(task_id, 0))
        if task["status"] in TERMINAL:
            finished.add(task_id)
    unseen = wanted - set(last_version)
    if unseen:
        problems.append(f"no state at all for tasks {sorted(unseen)}")
    if terminal:
        unfinished = wanted - finished
        if unfinished:
            problems.append(f"no terminal state for tasks {sorted(unfinished)}")
        if not t.ended:
            problems.append(f"the body did not end cleanly: {t.error}")
        if multi:
            last = t.frames[-1] if t.frames else Frame()
            if (last.event, last.id, last.data) != ("end", "done", "{}"):
                problems.append(f"a multi-task stream must close with event: end / id: done, "
                                f"not {last}")
    if problems:
        problems.append(t.summary())
    return problems


# --- other helpers ----------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text exposition, or None when it is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def read_metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    async with asyncio.timeout(10):
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return metric(response.text, name, **labels)


async def wait_for_metric(client: httpx.AsyncClient, name: str, check: Callable[[float], bool],
                          *, timeout: float = 10, **labels: str) -> float:
    """Poll /metrics until `check(value)` holds (a missing sample counts as 0)."""
    value = 0.0
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = await read_metric(client, name, **labels) or 0.0
                if check(value):
                    return value
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{name}{labels} stayed at {value}") from None


def numsub(cli: Callable[..., str], channels: list[str]) -> dict[str, int]:
    """`PUBSUB NUMSUB` through redis-cli: subscribers per channel."""
    lines = cli("PUBSUB", "NUMSUB", *channels).split()
    return {lines[i]: int(lines[i + 1]) for i in range(0, len(lines), 2)}


def stalled_client(port: int, path: str) -> socket.socket:
    """A raw TCP client that sends one GET and then never reads: its receive buffer is made
    small so the server's writes back up quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    return sock
