"""`taskcast watch ID [ID ...] --url URL`: follow tasks through a gateway (contract 9).
What the user sees is in _DESCRIPTION and _EPILOG (the `--help` text); the choices behind it:

- `--json` lines carry `image_base64` as the gateway sent it: a script gets the image from the
  terminal line (`jq -r .image.image_base64 | base64 -d`) without asking again, at the cost of
  lines as large as the image. The bars and plain lines ask the gateway to leave the image out
  unless `--save-dir` needs it.
- Text from a producer (error messages) is shown with non-printable characters escaped: it can
  neither break the one-line-per-state rule nor send escape sequences to the terminal.
- Elapsed time counts from the start of the watch: the task object has no creation time.
- The token is never printed, and goes only to the gateway's origin (image downloads too).

The client (taskcast.client) does the watching: reconnects, fallbacks between transports,
every version at most once and in order per task, the terminal state last.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import os
import sys
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urljoin, urlsplit

from taskcast.errors import InvalidTaskId
from taskcast.ids import parse_task_id
from taskcast.models import Task, TaskStatus

if TYPE_CHECKING:  # imported when a watch runs: `taskcast serve` and `task` need neither
    import httpx
    from rich.console import RenderableType
    from rich.live import Live

EXIT_COMPLETED = 0
EXIT_FAILED = 1  # a task failed, or a completed task's image could not be saved
EXIT_USAGE = 2
EXIT_REFUSED = 3  # a task not found, or the token refused (401/403)
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130

TOKEN_ENV = "TASKCAST_TOKEN"
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0

_DESCRIPTION = """\
Follow tasks through a gateway until every one has completed or failed.

On a terminal: a live progress bar per task with its status, percentage, the time since
the watch started (it stops when the task ends), and the error message of a failed task.
Otherwise: one line per state received, "ID STATUS PROGRESS%", with "error: MESSAGE" after
it for a failed task (non-printable characters escaped, so a state is always one line).
With --json: one task object (as the gateway sends it, image_base64 included) per line
for every state received, wherever stdout goes.

--save-dir writes each completed task's image as DIR/<task_id>.png, decoded from its
image_base64, else downloaded from its image_url (a path is resolved against --url; the
token is sent only to the gateway's own origin)."""

_EPILOG = """\
exit status: 0 every task completed; 1 a task failed, or a completed task's
image could not be saved; 2 usage error; 3 a task not found, or the token refused
(401/403); 4 the gateway could not be reached.

The token: prefer the TASKCAST_TOKEN environment variable; a --token on the command line
shows in `ps` and in the shell's history."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `watch` subcommand and its options."""
    watch = commands.add_parser(
        "watch", help="follow tasks through a gateway: live progress bars on a terminal, "
        "plain lines or JSON lines otherwise", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    watch.add_argument("task_ids", nargs="+", type=_task_id, metavar="ID",
                       help="the tasks to follow")
    watch.add_argument("--url", required=True, type=_gateway_url,
                       help="the gateway, e.g. http://127.0.0.1:8000")
    watch.add_argument("--token", default=None,
                       help=f"access token (default: ${TOKEN_ENV}; on the command line it "
                       "shows in `ps`)")
    watch.add_argument("--json", action="store_true",
                       help="one task object per line for every state received (with "
                       "image_base64 as the gateway sent it)")
    watch.add_argument("--save-dir", type=Path, metavar="DIR",
                       help="write each completed task's image as DIR/<task_id>.png")
    watch.add_argument("--transport", choices=("auto", "sse", "ws", "poll"), default="auto",
                       help="auto (default): SSE, then WebSocket, then polling")
    watch.add_argument("--give-up-after", type=_seconds, default=10.0, metavar="SECONDS",
                       help="exit with status 4 after this long without an answer from the "
                       "gateway (default 10)")


def run(args: argparse.Namespace) -> int:
    """Watch until every task is terminal; the exit status (module docstring, epilog)."""
    from taskcast.client import AccessRefused, GatewayUnreachable, TaskNotFound

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.save_dir is not None:
        try:
            args.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _complain(f"--save-dir: {exc}", EXIT_USAGE, token)
    try:
        return asyncio.run(_watch(args, token))
    except TaskNotFound as exc:
        return _complain(f"task {exc.task_id} not found (never created, or expired)",
                         EXIT_REFUSED, token)
    except AccessRefused as exc:
        return _complain(f"the gateway refused access ({exc})", EXIT_REFUSED, token)
    except GatewayUnreachable as exc:
        return _complain(str(exc), EXIT_UNREACHABLE, token)
    except BrokenPipeError:
        # The reader went away (`| head -1`): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _watch(args: argparse.Namespace, token: str | None) -> int:
    from taskcast.client import AsyncClient

    task_ids: list[int] = list(dict.fromkeys(args.task_ids))
    view: _View
    if args.json:
        view = _JsonLines()
    elif sys.stdout.isatty():
        view = _Bars(task_ids)
    else:
        view = _PlainLines()
    saver = None if args.save_dir is None else _Saver(args.save_dir, args.url, token,
                                                      view.note)
    failed = False
    async with AsyncClient(args.url, token=token, give_up_after_s=args.give_up_after) as client:
        with view:
            try:
                # aclosing: a failing write (a reader gone) must close the stream now, not
                # at interpreter exit, after the HTTP client it uses has been closed.
                async with aclosing(client.watch(task_ids, transport=args.transport,
                                                 image_base64=args.json or saver is not None)
                                    ) as states:
                    async for task in states:
                        view.show(task)
                        failed |= task.status is TaskStatus.FAILED
                        if saver is not None and task.status is TaskStatus.COMPLETED:
                            saver.save(task)
            except BaseException:  # an error or Ctrl-C: no waiting for downloads
                if saver is not None:
                    await saver.finish(abort=True)
                raise
            saved = await saver.finish() if saver is not None else True
    return EXIT_FAILED if failed or not saved else EXIT_COMPLETED


# -- the three ways of showing states ---------------------------------------------------------


class _View(Protocol):
    def __enter__(self) -> object: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def show(self, task: Task) -> None:
        """A new state of a task."""

    def note(self, task_id: int, text: str, problem: bool) -> None:
        """What became of a task's image: the bars show it in the task's row, the line
        views print the problems on stderr (stdout stays one line per state)."""


class _Lines:
    """Base of the line views: nothing to set up; notes are problems only, on stderr."""

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass

    def note(self, task_id: int, text: str, problem: bool) -> None:
        if problem:
            print(f"taskcast watch: task {task_id}: {text}", file=sys.stderr, flush=True)


class _JsonLines(_Lines):
    def show(self, task: Task) -> None:
        sys.stdout.buffer.write(task.to_json() + b"\n")
        sys.stdout.buffer.flush()


class _PlainLines(_Lines):
    def show(self, task: Task) -> None:
        line = f"{task.task_id} {task.status.value} {task.progress}%"
        if task.status is TaskStatus.FAILED:
            line += f" error: {printable(task.error_message)}"
        print(line, flush=True)


_STATUS_STYLES = {"waiting": "dim", "submitted": "yellow", "processing": "cyan",
                  "completed": "green", "failed": "bold red"}


class _Row:
    def __init__(self) -> None:
        self.state: Task | None = None
        self.ended_at: float | None = None
        self.note = ""
        self.note_style = ""


class _Bars:
    """A live table on the terminal, one row per task, redrawn a few times a second (rich
    reads the rows from its refresh thread: rows are only ever replaced, never added)."""

    BAR_WIDTH = 30

    def __init__(self, task_ids: list[int]) -> None:
        self.started_at = time.monotonic()
        self.rows = {task_id: _Row() for task_id in task_ids}
        self._live: Live | None = None

    def __enter__(self) -> _Bars:
        from rich.live import Live

        self._live = Live(get_renderable=self.render, refresh_per_second=8)
        self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()  # draws the rows once more, and leaves them on the screen

    def show(self, task: Task) -> None:
        row = self.rows[task.task_id]
        if task.is_terminal and row.ended_at is None:
            row.ended_at = time.monotonic()
        row.state = task

    def note(self, task_id: int, text: str, problem: bool) -> None:
        row = self.rows[task_id]
        row.note, row.note_style = text, "red" if problem else "dim"

    def render(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1))
        for justify in ("right", "left", "left", "right", "right"):
            table.add_column(justify=justify, no_wrap=True)
        table.add_column(overflow="fold")
        now = time.monotonic()
        for task_id, row in self.rows.items():
            task = row.state
            status = task.status.value if task else "waiting"
            progress = task.progress if task else 0
            failed = task is not None and task.status is TaskStatus.FAILED
            message = Text()
            if failed and task is not None:
                message.append(f"error: {printable(task.error_message)}", "red")
            if row.note:
                message.append((" " if message else "") + printable(row.note), row.note_style)
            table.add_row(
                Text(str(task_id), "bold"),
                Text(status, _STATUS_STYLES[status]),
                ProgressBar(total=100, completed=progress, width=self.BAR_WIDTH,
                            complete_style="red" if failed else "bar.complete"),
                Text(f"{progress:>3}%"),
                Text(_clock((row.ended_at or now) - self.started_at), "dim"),
                message,
            )
        return table


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02}:{whole % 60:02}"


def printable(text: str) -> str:
    """`text` with every non-printable character (newlines, ESC, ...) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


# -- saving images ----------------------------------------------------------------------------


class _Saver:
    """Writes each completed task's image as DIR/<task_id>.png: decoded from `image_base64`
    at once, or downloaded from `image_url` (absolute, or relative to the gateway's URL) in the
    background while the watch goes on. The token goes along only to the gateway's own origin
    (and httpx drops it on a redirect elsewhere)."""

    def __init__(self, directory: Path, base_url: str, token: str | None,
                 notify: Callable[[int, str, bool], None]) -> None:
        self.directory = directory
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self.notify = notify
        self.ok = True
        self._downloads: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None

    def save(self, task: Task) -> None:
        path = self.directory / f"{task.task_id}.png"
        try:
            data = task.image_data()
        except (binascii.Error, ValueError) as exc:
            self._failed(task.task_id, f"image_base64 does not decode ({exc})")
            return
        if data is not None:
            self._write(task.task_id, path, data)
        elif task.image_url:
            self.notify(task.task_id, "downloading the image...", False)
            self._downloads.append(asyncio.create_task(
                self._download(task.task_id, task.image_url, path)))
        else:
            self._failed(task.task_id, "completed without an image: nothing saved")

    async def finish(self, *, abort: bool = False) -> bool:
        """Wait for the downloads (or cancel them); True when every image was saved."""
        try:
            if not abort:
                await asyncio.gather(*self._downloads)
        finally:
            for download in self._downloads:
                download.cancel()
            if self._http is not None:
                await self._http.aclose()
        return self.ok

    async def _download(self, task_id: int, image_url: str, path: Path) -> None:
        import httpx

        url = urljoin(self.base_url, image_url)
        if urlsplit(url).scheme not in ("http", "https"):
            self._failed(task_id, f"image_url {printable(image_url)!r} is not http(s)")
            return
        headers = {}
        if self.token and _origin(url) == _origin(self.base_url):
            headers["Authorization"] = f"Bearer {self.token}"
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True)
        try:
            async with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    self._failed(task_id, f"GET {url}: HTTP {response.status_code}")
                    return
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_DOWNLOAD_BYTES:
                        self._failed(task_id, f"GET {url}: over {MAX_DOWNLOAD_BYTES} bytes")
                        return
        except httpx.HTTPError as exc:
            self._failed(task_id, f"GET {url}: {exc!r}")
            return
        self._write(task_id, path, bytes(data))

    def _write(self, task_id: int, path: Path, data: bytes) -> None:
        part = path.with_name(f".{path.name}.part")
        try:
            part.write_bytes(data)
            part.replace(path)  # a reader never sees half an image
        except OSError as exc:
            self._failed(task_id, f"cannot write {path}: {exc}")
            return
        self.notify(task_id, f"saved {path}", False)

    def _failed(self, task_id: int, why: str) -> None:
        self.ok = False
        self.notify(task_id, f"image not saved: {why}", True)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.rpartition("@")[2].lower()


# -- arguments and messages -------------------------------------------------------------------


def _task_id(raw: str) -> int:
    try:
        return parse_task_id(raw)
    except InvalidTaskId as exc:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a task id (0..2^63-1)") from exc


def _gateway_url(raw: str) -> str:
    try:
        parts = urlsplit(raw)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, a broken IPv6 address
        usable = False
    if not usable:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an http:// or https:// URL")
    return raw


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a positive number of seconds")
    return value


def _complain(message: str, status: int, token: str | None) -> int:
    if token:
        message = message.replace(token, "<token>")
    print(f"taskcast watch: {message}", file=sys.stderr, flush=True)
    return status
