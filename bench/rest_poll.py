"""REST polling throughput: `GET /tasks/{id}` on taskcast (poll cache on, and off) against a
naive FastAPI service and a Starlette hello world, all measured in one run.

    .venv/bin/python bench/rest_poll.py --json-out bench/results/rest-poll.json
    .venv/bin/python bench/rest_poll.py --duration 2 --warmup 1          # a quick check
    .venv/bin/python bench/rest_poll.py --runs 3 --only taskcast,taskcast-nocache

Needs `wrk`, `redis-server` and `taskset`, and FastAPI for the naive row (`pip install -e
.[bench] -c constraints.txt`). Expects a 2-core machine (or more): the server runs on core 0,
wrk and Redis on core 1.

Set-up, once per invocation: a private redis-server on a free loopback port (`--save ''
--appendonly no`, `taskset -c 1`), stopped at the end, and these tasks, written with
taskcast.producer.Producer (timeout_s one day, so nothing times out during a long run):

* task 1: created, then progress 40 (processing);
* task 2: created, progress 40, completed with `image_base64` of 75,000 random bytes (100,000
  characters of base64; over 64 KiB, so the producer stages it: the record has `image_bytes`
  and the raw bytes are in `P:task:{2}:image`);
* tasks 100000..109999: created, then progress 40, by concurrent producer calls.

Rows (servers), each started fresh per run, pinned with `taskset -c 0`, measured, stopped:

* `taskcast`: `taskcast serve` with the defaults (poll cache on), `TASKCAST_AUTH=off`;
* `taskcast-nocache`: the same with `TASKCAST_POLL_WATCH_S=0` (every poll reads Redis);
* `fastapi`: bench/naive_fastapi.py (HGETALL per request) on uvicorn (uvloop, httptools);
* `hello`: bench/hello_starlette.py (no Redis) on the same uvicorn: the framework's ceiling.

`TASKCAST_*` variables of the calling environment are not passed on to the servers.

Columns (URLs), each checked once with one HTTP request (status, body, ETag; a failed check
stops the script), then warmed up with the very wrk command for `--warmup` seconds (which
fills the poll cache), then timed with `taskset -c 1 wrk -t1 -c64 -d8s --latency`:

* processing: `GET /tasks/1`;
* completed: `GET /tasks/2` (~100 KB body);
* 304: `GET /tasks/1` with `If-None-Match: "<version of task 1>"` (taskcast rows only);
* no image: `GET /tasks/2?image_base64=false` (taskcast rows only);
* round-robin: tasks 100000..109999 in turn (a wrk Lua script); the server's RSS (VmRSS of the
  process holding the listening socket) is read before the warm-up and after the timed run.

Every wrk run's "Non-2xx or 3xx responses" and socket errors are printed; a measurement with
any, or whose average response size does not match the checked response, is flagged in the
table. With `--runs N` the whole table is measured N times, the rows interleaved, in reverse
order every other run (A B B A ...).

Prints a markdown table (req/s, p99 latency in parentheses); `--json-out` also writes every
figure, the raw wrk output, and the versions and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import redis

from taskcast.connection import connect
from taskcast.producer import Producer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: taskcast, uvicorn
PREFIX = "bench"
PROCESSING_ID = 1
COMPLETED_ID = 2
ROUND_ROBIN_FIRST = 100_000
ROUND_ROBIN_TASKS = 10_000
IMAGE_RAW_BYTES = 75_000  # 100,000 characters of base64
TASK_TIMEOUT_S = 86_400
SERVER_CORE = "0"
LOAD_CORE = "1"  # wrk and Redis

ROUND_ROBIN_LUA = f"""\
-- bench/rest_poll.py: tasks {ROUND_ROBIN_FIRST}..{ROUND_ROBIN_FIRST + ROUND_ROBIN_TASKS - 1}
-- in turn; one counter per wrk thread (with -t1, one).
i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "/tasks/" .. ({ROUND_ROBIN_FIRST} + i % {ROUND_ROBIN_TASKS}))
end
"""


class BenchError(RuntimeError):
    """A check failed: the script stops (after stopping what it started)."""


# -- rows and columns --------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    lua: bool = False


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    columns: tuple[str, ...]


COLUMN_KEYS = ("processing", "completed", "not_modified", "no_image", "round_robin")
COLUMN_TITLES = {
    "processing": "`GET /tasks/1` (processing)",
    "completed": "completed, ~100 KB image",
    "not_modified": "304 with `If-None-Match`",
    "no_image": "`?image_base64=false`",
    "round_robin": "10,000 tasks round-robin",
}
ROWS = (
    Row("taskcast", "`taskcast serve` (poll cache on)", COLUMN_KEYS),
    Row("taskcast-nocache", "`taskcast serve`, `TASKCAST_POLL_WATCH_S=0`", COLUMN_KEYS),
    Row("fastapi", "naive FastAPI + redis.asyncio (HGETALL)",
        ("processing", "completed", "round_robin")),
    Row("hello", "Starlette hello world (no Redis)", ("processing",)),
)


def columns_for(version: int) -> dict[str, Column]:
    return {
        "processing": Column("processing", COLUMN_TITLES["processing"], f"/tasks/{PROCESSING_ID}"),
        "completed": Column("completed", COLUMN_TITLES["completed"], f"/tasks/{COMPLETED_ID}"),
        "not_modified": Column("not_modified", COLUMN_TITLES["not_modified"],
                               f"/tasks/{PROCESSING_ID}",
                               (("If-None-Match", f'"{version}"'),)),
        "no_image": Column("no_image", COLUMN_TITLES["no_image"],
                           f"/tasks/{COMPLETED_ID}?image_base64=false"),
        "round_robin": Column("round_robin", COLUMN_TITLES["round_robin"], "/", lua=True),
    }


# -- results -----------------------------------------------------------------------------------


@dataclass
class WrkResult:
    command: list[str]
    returncode: int
    requests_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # avg, max, p50, p75, p90, p99
    requests: int = 0
    duration_s: float = 0.0
    bytes_read: float = 0.0
    avg_response_bytes: float = 0.0
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    output: str = ""

    def problems(self) -> list[str]:
        found = []
        if self.returncode != 0:
            found.append(f"wrk exited {self.returncode}")
        if self.requests == 0:
            found.append("no requests completed")
        if self.non_2xx_3xx:
            found.append(f"{self.non_2xx_3xx} non-2xx/3xx responses")
        errors = {name: count for name, count in self.socket_errors.items() if count}
        if errors:
            found.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))
        return found


@dataclass
class Measurement:
    column: str
    check: dict[str, Any]
    warmup: WrkResult | None
    timed: WrkResult
    problems: list[str]


@dataclass
class RowResult:
    run: int
    row: str
    title: str
    pid: int
    command: list[str]
    start_s: float
    rss_kib: dict[str, int] = field(default_factory=dict)
    measurements: dict[str, Measurement] = field(default_factory=dict)


# -- wrk -----------------------------------------------------------------------------------------

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(output: str, result: WrkResult) -> None:
    """Fills `result` from wrk's --latency output; missing lines leave zeros (and a
    requests == 0 problem)."""
    if match := re.search(rf"^\s*Latency\s+{_TIME}\s+\S+\s+{_TIME}", output, re.M):
        result.latency_ms["avg"] = _ms(match[1], match[2])
        result.latency_ms["max"] = _ms(match[3], match[4])
    for pct, value, unit in re.findall(rf"^\s*(50|75|90|99)%\s+{_TIME}\s*$", output, re.M):
        result.latency_ms[f"p{pct}"] = _ms(value, unit)
    if match := re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+)([KMGT]?B) read",
                          output):
        result.requests = int(match[1])
        result.duration_s = _ms(match[2], match[3]) / 1000
        result.bytes_read = float(match[4]) * _SIZE_UNITS[match[5]]
        result.avg_response_bytes = result.bytes_read / result.requests if result.requests else 0
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                          output):
        result.socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                                        map(int, match.groups()), strict=True))
    else:
        result.socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        result.non_2xx_3xx = int(match[1])
    if match := re.search(r"Requests/sec:\s+([0-9.]+)", output):
        result.requests_per_s = float(match[1])


def run_wrk(port: int, column: Column, seconds: int, connections: int,
            lua_path: Path) -> WrkResult:
    command = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
               "--latency"]
    for name, value in column.headers:
        command += ["-H", f"{name}: {value}"]
    if column.lua:
        command += ["-s", str(lua_path)]
    command.append(f"http://127.0.0.1:{port}{column.path}")
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               timeout=seconds + 60)
    result = WrkResult(command=command, returncode=completed.returncode,
                       output=completed.stdout + completed.stderr)
    parse_wrk(completed.stdout, result)
    return result


# -- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def listening_pid(root: int, port: int) -> int:
    """The process (`root` or a descendant, the deepest first) holding the socket that
    listens on `port`: the uvicorn process itself, whatever launcher is in front of it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    for pid in [*reversed(_descendants(root)), root]:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise BenchError(f"no process under pid {root} listens on port {port}")


def stop_process(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        print(f"{name} (pid {process.pid}) ignored SIGTERM for 20 s: SIGKILL", file=sys.stderr)
        process.kill()
        process.wait(10)


@contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir),
         "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (workdir / "redis.log").read_text(errors="replace")[-2000:]
                    raise BenchError(f"redis-server did not start: {log}") from None
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        stop_process(process, "redis-server")


def server_command(row: Row, redis_url: str, port: int) -> tuple[list[str], dict[str, str]]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("TASKCAST_", "NAIVE_"))}
    pin = ["taskset", "-c", SERVER_CORE]
    if row.key in ("taskcast", "taskcast-nocache"):
        env["TASKCAST_AUTH"] = "off"
        if row.key == "taskcast-nocache":
            env["TASKCAST_POLL_WATCH_S"] = "0"
        return [*pin, str(BIN / "taskcast"), "serve", "--redis-url", redis_url,
                "--prefix", PREFIX, "--port", str(port), "--log-level", "warning"], env
    module = {"fastapi": "naive_fastapi:app", "hello": "hello_starlette:app"}[row.key]
    env.update(NAIVE_REDIS_URL=redis_url, NAIVE_PREFIX=PREFIX)
    return [*pin, str(BIN / "uvicorn"), module, "--app-dir", str(ROOT / "bench"),
            "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--log-level", "warning", "--no-access-log"], env


def http_get(port: int, path: str, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


@contextmanager
def server(row: Row, redis_url: str, workdir: Path
           ) -> Iterator[tuple[int, int, list[str], float]]:
    """Starts the row's server; yields (port, pid of the listening process, command, seconds
    until it answered)."""
    port = free_port()
    command, env = server_command(row, redis_url, port)
    log_path = workdir / f"{row.key}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    started = time.monotonic()
    ready_path = "/readyz" if row.key.startswith("taskcast") else f"/tasks/{PROCESSING_ID}"
    try:
        while True:
            try:
                if http_get(port, ready_path)[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() - started > 30:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"{row.key} did not become ready on port {port} "
                                 f"(exit {process.poll()}):\n{tail}")
            time.sleep(0.05)
        startup = time.monotonic() - started
        yield port, listening_pid(process.pid, port), command, startup
    finally:
        stop_process(process, row.key)
        if process.returncode not in (0, -signal.SIGTERM):
            tail = log_path.read_text(errors="replace")[-2000:]
            print(f"warning: {row.key} exited {process.returncode}:\n{tail}", file=sys.stderr)


# -- set-up --------------------------------------------------------------------------------------


@dataclass
class Seeded:
    version_processing: int
    version_completed: int
    image_base64: str
    seconds_first_tasks: float
    seconds_round_robin_tasks: float


async def seed(redis_url: str) -> Seeded:
    producer = Producer(connect(redis_url, max_connections=64), prefix=PREFIX,
                        max_concurrency=64)
    try:
        started = time.perf_counter()
        await producer.create(task_id=PROCESSING_ID, timeout_s=TASK_TIMEOUT_S)
        processing = await producer.progress(PROCESSING_ID, 40)
        image = base64.b64encode(os.urandom(IMAGE_RAW_BYTES)).decode("ascii")
        await producer.create(task_id=COMPLETED_ID, timeout_s=TASK_TIMEOUT_S)
        await producer.progress(COMPLETED_ID, 40)
        completed = await producer.complete(COMPLETED_ID, image_base64=image)
        first = time.perf_counter() - started

        async def one(task_id: int) -> None:
            await producer.create(task_id=task_id, timeout_s=TASK_TIMEOUT_S)
            await producer.progress(task_id, 40)

        started = time.perf_counter()
        await asyncio.gather(*(one(task_id) for task_id in range(
            ROUND_ROBIN_FIRST, ROUND_ROBIN_FIRST + ROUND_ROBIN_TASKS)))
        many = time.perf_counter() - started
    finally:
        await producer.close()
    return Seeded(processing.version, completed.version, image, first, many)


# -- checks --------------------------------------------------------------------------------------


def _task(body: bytes) -> dict[str, Any]:
    document = orjson.loads(body)
    if not (isinstance(document, dict) and document.get("code") == 200
            and document.get("msg") == "success" and isinstance(document.get("data"), dict)):
        raise BenchError(f"not the seed's 200 envelope: {body[:300]!r}")
    data: dict[str, Any] = document["data"]
    return data


def check(row: Row, column: Column, port: int, seeded: Seeded) -> dict[str, Any]:
    """One request per column before wrk: the answer must be what the column claims to
    measure. Returns what was seen (status, body size, ETag)."""
    paths = ([f"/tasks/{ROUND_ROBIN_FIRST}", f"/tasks/{ROUND_ROBIN_FIRST + ROUND_ROBIN_TASKS - 1}"]
             if column.lua else [column.path])
    seen: dict[str, Any] = {}
    for path in paths:
        status, headers, body = http_get(port, path, dict(column.headers))
        seen = {"path": path, "status": status, "body_bytes": len(body),
                "etag": headers.get("etag"), "headers": dict(column.headers)}
        what = f"{row.key} {column.key}: GET {path} {dict(column.headers) or ''}"
        expected_status = 304 if column.key == "not_modified" else 200
        if status != expected_status:
            raise BenchError(f"{what} answered {status}, not {expected_status}: {body[:300]!r}")
        if row.key == "hello":
            continue
        if column.key == "not_modified":
            if headers.get("etag") != f'"{seeded.version_processing}"' or body:
                raise BenchError(f"{what}: 304 with ETag {headers.get('etag')} "
                                 f"and {len(body)} body bytes")
            continue
        task = _task(body)
        image = task["image"]["image_base64"]
        if column.key in ("processing", "round_robin"):
            ok = task["status"] == "processing" and task["progress"] == 40
        elif column.key == "completed":
            ok = task["status"] == "completed" and image == seeded.image_base64
        else:  # no_image
            ok = (task["status"] == "completed" and image == ""
                  and headers.get("etag") == f'"{seeded.version_completed}-no-image-base64"')
        if not ok:
            raise BenchError(f"{what}: unexpected answer (ETag {headers.get('etag')}): "
                             f"{body[:300]!r}")
    return seen


def size_problem(column: Column, checked: dict[str, Any], result: WrkResult) -> str | None:
    """The average response wrk read must fit the checked answer (a 304 column that turned
    into 200s, an image column that lost its image...). Headers add a few hundred bytes."""
    if not result.requests:
        return None
    body = checked["body_bytes"]
    low, high = body * 0.9, body + 2048
    if not low <= result.avg_response_bytes <= high:
        return (f"average response {result.avg_response_bytes:,.0f} B, the checked one had "
                f"a {body:,} B body")
    return None


# -- measuring -----------------------------------------------------------------------------------


def measure_row(run: int, row: Row, args: argparse.Namespace, redis_url: str, workdir: Path,
                seeded: Seeded, lua_path: Path) -> RowResult:
    columns = columns_for(seeded.version_processing)
    with server(row, redis_url, workdir) as (port, pid, command, startup):
        result = RowResult(run=run, row=row.key, title=row.title, pid=pid, command=command,
                           start_s=round(startup, 3))
        result.rss_kib["ready"] = rss_kib(pid)
        for key in row.columns:
            column = columns[key]
            checked = check(row, column, port, seeded)
            if column.lua:
                result.rss_kib["before_round_robin"] = rss_kib(pid)
            warmup = (run_wrk(port, column, args.warmup, args.connections, lua_path)
                      if args.warmup > 0 else None)
            if column.lua:
                result.rss_kib["after_round_robin_warmup"] = rss_kib(pid)
            timed = run_wrk(port, column, args.duration, args.connections, lua_path)
            if column.lua:
                result.rss_kib["after_round_robin"] = rss_kib(pid)
            problems = timed.problems()
            if warmup is not None:
                problems += [f"warm-up: {problem}" for problem in warmup.problems()]
            if (problem := size_problem(column, checked, timed)) is not None:
                problems.append(problem)
            result.measurements[key] = Measurement(key, checked, warmup, timed, problems)
            latency = timed.latency_ms
            errors = sum(timed.socket_errors.values())
            print(f"[run {run}] {row.key:16} {key:12} {timed.requests_per_s:>10,.0f} req/s  "
                  f"p50 {latency.get('p50', 0):6.2f} ms  p99 {latency.get('p99', 0):6.2f} ms  "
                  f"non-2xx/3xx {timed.non_2xx_3xx}  socket errors {errors}"
                  + (f"  PROBLEMS: {'; '.join(problems)}" if problems else ""),
                  file=sys.stderr, flush=True)
        result.rss_kib["end"] = rss_kib(pid)
    return result


# -- output --------------------------------------------------------------------------------------


def cell(measurement: Measurement | None, notes: list[str]) -> str:
    if measurement is None:
        return "-"
    timed = measurement.timed
    text = f"{timed.requests_per_s:,.0f} ({timed.latency_ms.get('p99', 0):.2f} ms)"
    if measurement.problems:
        notes.append("; ".join(measurement.problems))
        text += f" **⚠{len(notes)}**"
    return text


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def table(results: list[RowResult], runs: int) -> tuple[str, list[str]]:
    head = ["server", *COLUMN_TITLES.values(), "RSS before → after round-robin (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    order = {row.key: index for index, row in enumerate(ROWS)}
    for result in sorted(results, key=lambda r: (r.run, order[r.row])):
        title = result.title + (f" (run {result.run})" if runs > 1 else "")
        cells = [cell(result.measurements.get(key), notes) for key in COLUMN_KEYS]
        rss = ("-" if "before_round_robin" not in result.rss_kib else
               f"{mib(result.rss_kib['before_round_robin'])} → "
               f"{mib(result.rss_kib['after_round_robin'])}")
        lines.append("| " + " | ".join([title, *cells, rss]) + " |")
    return "\n".join(lines), notes


def median_table(results: list[RowResult]) -> str:
    head = ["server (median of runs)", *COLUMN_TITLES.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        mine = [result for result in results if result.row == row.key]
        if not mine:
            continue
        cells = []
        for key in COLUMN_KEYS:
            rates = [r.measurements[key].timed.requests_per_s for r in mine
                     if key in r.measurements]
            p99s = [r.measurements[key].timed.latency_ms.get("p99", 0) for r in mine
                    if key in r.measurements]
            cells.append(f"{statistics.median(rates):,.0f} ({statistics.median(p99s):.2f} ms)"
                         if rates else "-")
        lines.append("| " + " | ".join([row.title, *cells]) + " |")
    return "\n".join(lines)


def _command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10,
                                   check=False)
    except OSError as exc:
        return f"unavailable: {exc}"
    return (completed.stdout or completed.stderr).strip()


def environment() -> dict[str, Any]:
    packages = {}
    for name in ("taskcast", "uvicorn", "starlette", "fastapi", "pydantic", "redis", "hiredis",
                 "uvloop", "httptools", "orjson"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    redis_version = _command_output(["redis-server", "--version"])
    wrk_version = _command_output(["wrk", "-v"]).splitlines()
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    git = {"commit": _command_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
           "dirty": bool(_command_output(["git", "-C", str(ROOT), "status", "--porcelain",
                                          "--untracked-files=no"]))}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": packages,
        "redis_server": (match[1] if (match := re.search(r"v=(\S+)", redis_version))
                         else redis_version),
        "wrk": wrk_version[0] if wrk_version else "",
        "nproc": _command_output(["nproc"]),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
        "git": git,
    }


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=8, help="timed seconds per URL")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of the same wrk command before each timed run (0: none)")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument("--only", default=",".join(row.key for row in ROWS),
                        help="rows, comma-separated: " + ", ".join(row.key for row in ROWS))
    parser.add_argument("--runs", type=int, default=1,
                        help="measure the whole table N times, rows interleaved (A B B A)")
    parser.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = set(keys) - {row.key for row in ROWS}
    if unknown or not keys:
        parser.error(f"--only: unknown rows {sorted(unknown)}; choose from "
                     + ", ".join(row.key for row in ROWS))
    args.rows = [row for row in ROWS if row.key in keys]
    if args.duration < 1 or args.warmup < 0 or args.connections < 1 or args.runs < 1:
        parser.error("--duration, --connections and --runs must be >= 1, --warmup >= 0")
    return args


def preflight(rows: list[Row]) -> None:
    for tool in ("wrk", "redis-server", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 cores: the server on core 0, wrk and Redis on core 1")
    if any(row.key == "fastapi" for row in rows):
        try:
            metadata.version("fastapi")
        except metadata.PackageNotFoundError:
            raise BenchError("the fastapi row needs FastAPI: pip install -e '.[bench]' "
                             "-c constraints.txt (or --only without fastapi)") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight(args.rows)
    env = environment()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in env['loadavg_start'])} "
          f"({env['nproc']} cores; this wants an idle machine)", file=sys.stderr)
    results: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="rest-poll-") as tmp:
        workdir = Path(tmp)
        lua_path = workdir / "round_robin.lua"
        lua_path.write_text(ROUND_ROBIN_LUA)
        with redis_server(workdir) as (redis_url, redis_process):
            started = time.perf_counter()
            seeded = asyncio.run(seed(redis_url))
            print(f"set-up: tasks {PROCESSING_ID} and {COMPLETED_ID} in "
                  f"{seeded.seconds_first_tasks:.2f} s, {ROUND_ROBIN_TASKS:,} round-robin tasks "
                  f"in {seeded.seconds_round_robin_tasks:.2f} s (task {PROCESSING_ID} version "
                  f"{seeded.version_processing}, task {COMPLETED_ID} version "
                  f"{seeded.version_completed})", file=sys.stderr, flush=True)
            setup_s = time.perf_counter() - started
            for run in range(1, args.runs + 1):
                rows = args.rows if run % 2 else list(reversed(args.rows))
                for row in rows:
                    results.append(measure_row(run, row, args, redis_url, workdir, seeded,
                                               lua_path))
            redis_rss = rss_kib(redis_process.pid)
    env["loadavg_end"] = os.getloadavg()

    body, notes = table(results, args.runs)
    print(f"\nREST polling, {env['date']}: req/s (p99 latency). Server on core 0; "
          f"`wrk -t1 -c{args.connections} -d{args.duration}s --latency` and redis-server "
          f"{env['redis_server']} on core 1. Each URL was checked with one request, then "
          f"warmed up with the same wrk command for {args.warmup} s (this fills the poll "
          f"cache) before the timed {args.duration} s.\n")
    print(body)
    if args.runs > 1:
        print()
        print(median_table(results))
    print()
    for index, note in enumerate(notes, 1):
        print(f"⚠{index}: {note}")
    wrk_runs = sum(1 + (m.warmup is not None) for r in results for m in r.measurements.values())
    if not notes:
        print(f"No non-2xx/3xx responses, socket errors or size mismatches in {wrk_runs} wrk "
              "runs (warm-ups included).")
    packages = env["packages"]
    print(f"\nPython {env['python']}, uvicorn {packages['uvicorn']}, starlette "
          f"{packages['starlette']}, fastapi {packages['fastapi']}, redis-py {packages['redis']}, "
          f"hiredis {packages['hiredis']}, uvloop {packages['uvloop']}, httptools "
          f"{packages['httptools']}, redis-server {env['redis_server']}, {env['wrk']}; "
          f"{env['nproc']} × {env['cpu_model']}; load average "
          f"{' '.join(f'{x:.2f}' for x in env['loadavg_start'])} at start.")

    if args.json_out is not None:
        document = {
            "environment": env,
            "options": {"duration_s": args.duration, "warmup_s": args.warmup,
                        "connections": args.connections, "runs": args.runs,
                        "rows": [row.key for row in args.rows]},
            "setup": {"seconds_total": round(setup_s, 3),
                      "seconds_first_tasks": round(seeded.seconds_first_tasks, 3),
                      "seconds_round_robin_tasks": round(seeded.seconds_round_robin_tasks, 3),
                      "version_processing": seeded.version_processing,
                      "version_completed": seeded.version_completed,
                      "image_base64_chars": len(seeded.image_base64),
                      "round_robin_tasks": ROUND_ROBIN_TASKS,
                      "redis_rss_kib_at_end": redis_rss,
                      "round_robin_lua": ROUND_ROBIN_LUA},
            "results": [asdict(result) for result in results],
            "table": body,
            "notes": notes,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {args.json_out}", file=sys.stderr)
    return 1 if notes else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"rest_poll: FAILED: {exc}", file=sys.stderr)
        sys.exit(2)
