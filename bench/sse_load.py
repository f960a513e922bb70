"""SSE and WebSocket load generator for the taskcast gateway (see bench/README.md).

One run starts everything it measures and stops it again:

* a private `redis-server` on a free loopback port (`--save '' --appendonly no`), or with
  `--cluster` a 3-node Redis Cluster (3 primaries, `redis+cluster://` URL);
* the gateway, `python -m taskcast serve ... --log-level warning`, pinned with `taskset -c 0`;
  with `--replicas K`, K of them on K ports, all on that core, clients spread over them; with
  `--server raw`, `bench/raw_ws_server.py` in its place (below);
* `--client-procs` client shard processes (default: as few as the fd limit allows), each holding
  its share of the N connections on raw asyncio protocols: a minimal HTTP/1.1 + chunked + SSE
  parser, or with `--transport ws` a hand-made RFC 6455 client on `/tasks/{id}/ws` or `/ws` (no
  HTTP or WebSocket client library);
* a publisher process that drives the tasks through `taskcast.producer.Producer` (its own Redis
  connection) at R events/s for D s, then completes every task at the same rate.

The coordinator (this process), Redis, the shards and the publisher run on `--client-cpu`
(default core 1); only the gateway runs on `--gateway-cpu` (default core 0), so the gateway's
CPU time and RSS (read from /proc) are its own. On a machine shared with other work, `--rt 10`
runs the measured processes SCHED_FIFO (root only) so that other processes cannot take the
pinned cores from them; every run reports how busy each core was and with what.

    .venv/bin/python bench/sse_load.py --clients 5000 --tasks 500 --rate 2000 --duration 10
    .venv/bin/python bench/sse_load.py --clients 20000 --tasks 2000 --idle-only
    .venv/bin/python bench/sse_load.py --clients 5000 --tasks 500 --rate 2000 --duration 10 \
        --transport ws --replicas 2 --cluster
    .venv/bin/python bench/sse_load.py --clients 5000 --tasks 500 --rate 2000 --duration 10 \
        --transport ws --ws-endpoint many --tasks-per-socket 10
    .venv/bin/python bench/sse_load.py --clients 5000 --tasks 500 --rate 2000 --duration 10 \
        --server raw
    .venv/bin/python bench/sse_load.py --churn 10 --clients 2000 --tasks 200 --hold 1
    .venv/bin/python bench/sse_load.py --clients 5000 --tasks 500 --rate 2000 --duration 10 \
        --auth

Watchers and connections. `--clients N` is always N watchers (client-task pairs). A watcher
is what every per-client figure counts: its first event, its terminal state (lost terminal
states are watchers without one), its latency samples, its order checks (versions strictly
rising, progress never falling, SSE `id` = version) and the deliveries that CPU per delivery
divides by. SSE streams and per-task WebSockets carry one watcher each, so there N
connections = N watchers, client i watching task i % T + 1, as always.

`--transport ws --ws-endpoint many --tasks-per-socket K`: N/K sockets on `GET /ws` (N % K == 0,
K <= T). Socket s sends one masked text frame `{"op":"subscribe","task_ids":[...]}` right after
the 101, slot j of it watching task ((s*K + j) % T) + 1 (so every task has N/T watchers, spread
as with K = 1), and expects `{"type":"subscribed","task_ids":[...]}` (a task frame before it, a
second one, or other ids are order violations) and then `{"type":"task","data":...}` frames,
matched to the socket's watchers by `task_id`. An error frame naming task ids fails those
watchers only. It sends no `{"op":"ping"}`: only the subscribe, and pongs to protocol pings.
The server keeps a `/ws` socket open after its tasks finish (it drops finished tasks), so
once every task of a socket is terminal (or failed) the client closes it: a masked close 1000,
and when the server's close frame arrives (anything but 1000 is a violation) the client closes
TCP; a server that drops TCP without a close frame counts a violation too. Per figure:

* connect time: from the start until every socket has the first task frame of each of its
  tasks (the latest first event over all watchers); `time_to_first_event_ms` is per watcher;
* RSS per idle connection and gateway CPU per connection: per socket (ready sockets, i.e.
  with all K first events); `memory.rss_per_idle_watcher_kib` and
  `connect.gateway_cpu_us_per_watcher` divide by watchers instead;
* latency, deliveries, CPU per delivery, lost terminal states, order checks: per watcher;
* `publish.after_terminal`: how long after the report until every socket is closed, which on
  `/ws` means until the server has answered the close the client started after the socket's
  last terminal state (close codes are the server's answers; `violations` there include the
  close checks, which happen after the report). On per-task sockets and SSE it is, as before,
  until the server has closed every finished connection.

`--server raw`: `bench/raw_ws_server.py` instead of `taskcast serve`, started with the same
flags (`--redis-url --prefix --port --log-level`), on the same core, under the same `--rt`,
measured the same way from /proc (CPU, RSS, fds) and probed at `/readyz`. It is a ceiling: the
same endpoints (`/tasks/{id}/events`, `/tasks/{id}/ws`, `/ws`) and bytes on the wire from a
minimal uvloop + asyncio.Protocol server with none of the gateway's guarantees (see its
docstring). It has no taskcast metrics, so the `/metrics` deltas are skipped and marked
`{"skipped": ...}` (and `scenario.gateway_metrics` says so); it serves only the
`taskcast_open_connections` gauges that `--churn` waits on. Not with `--cluster`.

`--churn R` (churn/soak): tasks are created once and never published to (they stay
`submitted`). Each of R rounds: every shard builds fresh clients and connects them all (SSE,
or the WebSocket kind chosen by `--transport ws --ws-endpoint`), each connection until its
first task state(s); holds them `--hold` s (default 1); closes them from the client side (SSE:
TCP close; WebSocket: close 1000, the server's close frame, then TCP close; whatever is still
open after `--close-wait` s is aborted and counted); polls `/metrics` every 0.1 s until the
server's `taskcast_open_connections{transport=...}` (summed over replicas) is 0, at most
`--close-wait` s (the JSON records the value and the wait); waits `--settle` s; reads VmRSS.
`churn` in the JSON has RSS after each round, the growth from round 1 to round R in percent,
`rss_round_last_within_10pct_of_round_1` (true when RSS after round R is at most 110 % of RSS
after round 1; a shrink passes), and per round the gateway CPU per connection for the connect
(until every first state) and for the whole cycle (connect, hold, close, until the gauge is 0,
including the gauge polls), per connection that got its first state(s). Clock ticks are
10 ms: with a few hundred connections a round's CPU figure moves in steps of tens of us.

`--auth` (access control, contract section 7): the gateway runs with a fixed HS256 secret
(`BENCH_JWT_SECRET`, 46 bytes) in `TASKCAST_JWT_SECRET`, the only way the gateway takes a secret
(never as a flag: it would show in `ps`), and every connection presents its own token as
`?token=` (SSE, `/tasks/{id}/ws` and `/ws` alike): `taskcast.tokens.issue` naming exactly the
task(s) of that connection, valid for the whole run, with a `sub` unique per connection, so
that no two connections share a token (a gateway that remembers accepted tokens would otherwise
verify one token for many connections). The coordinator mints every token before the shards
start, outside every timed phase: minting is the generation service's cost, not the gateway's
(the JSON records its time under `auth`). Before connecting, three probes check that the
gateway enforces tokens (`GET /tasks/1` without a token: 401; with a token for task 1: 200;
with a token for another task: 403). Without `--auth` the gateway gets no key: the bench
removes `TASKCAST_JWT_*` and `TASKCAST_AUTH` from the gateway's environment in both modes, so a
key in the caller's shell cannot turn a run into the other mode. `--auth-client-secret S` signs
the clients' tokens with S instead (a check of the check: the gateway refuses them). Any
connection refused by access control (HTTP 401/403, close 4401/4403, a `/ws` error frame
401/403) ends the run with an error; a run that ends with an error prints `FAILED: ...`
instead of figures, meets no target and exits 1. `scenario.auth` is true or false in every
summary. Not with `--server raw` (it checks no tokens).

It prints a JSON summary, then one human-readable line; `--json-out` also writes the JSON.

Child modes (`--shard-child`, `--publisher-child`) are internal: the coordinator spawns them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import orjson

ROOT = Path(__file__).resolve().parent.parent
RAW_SERVER = Path(__file__).resolve().parent / "raw_ws_server.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFIX = "taskcast-bench"
TERMINAL_STATUSES = ("completed", "failed")
PIPE_LIMIT = 1 << 28  # shard reports carry every latency sample on one JSON line
T = TypeVar("T")

# Targets from the issue; each is checked only where the scenario measures it.
TARGET_CPU_US_PER_DELIVERY = 30.0
TARGET_P99_MS = 25.0
TARGET_RSS_KIB_PER_CONN = 15.0
TARGET_CONNECT_S_FOR_5000 = 1.5
TARGET_IDLE_CONNECTIONS = 20_000

# --auth: the gateway's HS256 secret (>= 32 bytes), fixed so that runs are alike. A bench value,
# not a secret: the gateway listens on loopback only and lives for one run.
BENCH_JWT_SECRET = "taskcast-bench-hs256-secret-not-for-production"
# Environment variables that would switch access control on or off in the gateway: the bench
# sets them itself (see --auth) and never passes the caller's on.
GATEWAY_ACCESS_ENV = ("TASKCAST_AUTH", "TASKCAST_JWT_SECRET", "TASKCAST_JWT_PUBLIC_KEY_FILE",
                      "TASKCAST_JWT_AUDIENCE", "TASKCAST_JWT_ISSUER")
# Answers of access control that refuse a connection (contract 7): any of them fails the run.
ACCESS_REFUSALS = (b"401", b"403")
ACCESS_CLOSE_CODES = (4401, 4403)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """uvloop when installed (as the gateway uses it), else the stock loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        raw = stat.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def side_cpu_s(pid: int) -> float:
    """proc_cpu_s for a helper process that may have exited (then 0)."""
    try:
        return proc_cpu_s(pid)
    except (OSError, ValueError, IndexError):
        return 0.0


def core_ticks() -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks per CPU from /proc/stat."""
    ticks: dict[int, tuple[int, int]] = {}
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                numbers = [int(v) for v in values[:8]]
                idle = numbers[3] + numbers[4]
                ticks[int(name[3:])] = (sum(numbers) - idle, sum(numbers))
    return ticks


def core_busy(before: dict[int, tuple[int, int]],
              after: dict[int, tuple[int, int]]) -> dict[str, float | None]:
    """Per-core busy % over a window (all processes, ours and anybody else's)."""
    busy: dict[str, float | None] = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy[f"cpu{cpu}_busy_pct"] = _round(100.0 * (b1 - b0) / max(1, t1 - t0), 1)
    return busy


def _others(phase: dict[str, Any], gateway_cpu: int) -> float | None:
    """Busy % of the gateway's core not explained by the gateway: other processes on the
    machine (not pinned away from it) that compete with the gateway and distort latency."""
    busy = phase["machine"].get(f"cpu{gateway_cpu}_busy_pct")
    own = phase.get("gateway_cpu_util_pct")
    return None if busy is None or own is None else _round(max(0.0, busy - own), 1)


def git_describe() -> dict[str, Any]:
    """Which gateway code was measured: HEAD, and whether src/ had uncommitted changes."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = git("status", "--porcelain", "--", "src").splitlines()
    diff = git("diff", "HEAD", "--", "src")
    import taskcast  # the same sys.path as the gateway and the publisher (PYTHONPATH included)

    return {"head": git("rev-parse", "--short", "HEAD"), "src_uncommitted": changed,
            "src_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
            "src_diff_lines": len(diff.splitlines()),
            "taskcast_imported_from": str(Path(taskcast.__file__).parent)}


GATEWAY_PACKAGES = ("uvicorn", "uvloop", "httptools", "starlette", "sse-starlette", "redis",
                    "hiredis", "orjson", "prometheus-client")


def gateway_versions(python: str) -> dict[str, str]:
    """Python, the gateway's dependencies and redis-server, as the run used them: the project
    does not pin versions, and per-connection memory moved between two fresh installs of the
    same code (bench/README.md)."""
    probe = ("import importlib.metadata as m, json, platform, sys\n"
             "names = sys.argv[1:]\n"
             "found = {n: m.version(n) for n in names}\n"
             "print(json.dumps({'python': platform.python_version(), **found}))")
    versions: dict[str, str] = {}
    try:
        out = subprocess.run([python, "-c", probe, *GATEWAY_PACKAGES], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        versions.update(json.loads(out))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        versions["error"] = f"{type(exc).__name__}: {exc}"
    exe = shutil.which("redis-server")
    if exe is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            line = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                  timeout=10).stdout
            versions["redis-server"] = line.split(" v=", 1)[-1].split()[0]
    return versions


def wait_quiet(timeout: float, threshold: float) -> dict[str, Any]:
    """Wait until every core stayed below `threshold` % busy for 3 s in a row (bounded)."""
    deadline = time.monotonic() + timeout
    streak = 0
    busy: dict[str, float | None] = {}
    while time.monotonic() < deadline:
        before = core_ticks()
        time.sleep(1.0)
        busy = core_busy(before, core_ticks())
        streak = streak + 1 if all((v or 0.0) < threshold for v in busy.values()) else 0
        if streak >= 3:
            return {"quiet": True, "last_second": busy,
                    "waited_s": _round(timeout - (deadline - time.monotonic()), 1)}
    return {"quiet": False, "last_second": busy, "waited_s": timeout}


def foreign_benchmarks(own: set[int]) -> list[str]:
    """Other load generators, gateways and CPU-heavy test runs on this machine (pid: command),
    which would share the cores with this run. `own` are this run's processes."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace").strip()
        if any(name in text for name in ("sse_load.py", "taskcast serve", "pytest",
                                         "raw_ws_server.py")):
            found.append(f"{entry.name}: {text[:160]}")
    return found[:20]


def ancestors() -> set[int]:
    """This process and its parents up to init (the shell that started this run included)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return pids


def children_of(pid: int) -> list[str]:
    """Direct children (pids as text), e.g. `taskset`-started gateways still being replaced."""
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def proc_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return None
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


def distribution(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered) if ordered else None
    return {
        "count": len(ordered),
        "mean": _round(mean),
        "p50": _round(percentile(ordered, 50)),
        "p90": _round(percentile(ordered, 90)),
        "p99": _round(percentile(ordered, 99)),
        "p999": _round(percentile(ordered, 99.9)),
        "max": _round(ordered[-1] if ordered else None),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def emit(message: dict[str, Any]) -> None:
    """One JSON line to the coordinator (child processes only)."""
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=PIPE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        nl = body.find(b"\r\n", pos)
        if nl < 0:
            return bytes(out)
        size = int(body[pos:nl].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += body[nl + 2 : nl + 2 + size]
        pos = nl + 4 + size


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A one-shot HTTP/1.1 GET on loopback (health checks, /metrics)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            raw = await reader.read(-1)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    if any(line.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for line in lines):
        body = dechunk(body)
    return status, body


def parse_metrics(text: bytes) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# --------------------------------------------------------------------------------------------
# client shard: raw asyncio protocols; minimal HTTP/1.1 + chunked + SSE, or WebSocket, parsers
# --------------------------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def ws_accept(key: bytes) -> bytes:
    """The `Sec-WebSocket-Accept` a server must answer to `key` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, unfragmented client frame (control frames: payload <= 125 bytes)."""
    size = len(payload)
    if opcode >= 0x8 and size > 125:
        raise ValueError("a control frame carries at most 125 bytes")
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    if not size:
        return head + key
    stream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        size, "little")
    return head + key + masked


class Watch:
    """One watcher: a connection following one task (a client-task pair).

    Everything counted per client (first event, terminal state, order checks, lost terminal
    states, latency) is kept here: a per-task connection has one, a `/ws` socket K."""

    __slots__ = ("client", "task_id", "last_version", "last_progress", "first_event_at",
                 "terminal_at", "error")

    def __init__(self, client: Client, task_id: int) -> None:
        self.client = client
        self.task_id = task_id
        self.last_version = 0
        self.last_progress = 0
        self.first_event_at = 0.0
        self.terminal_at = 0.0
        self.error = ""


class Client(asyncio.Protocol):
    """One connection watching one task (or, `/ws`, K tasks); no reconnects (a drop is
    reported, not hidden).

    Subclasses parse the transport (`data_received`) and hand each task state to the shard."""

    MULTI = False  # True: one socket, several tasks (events are matched to watches by task id)

    __slots__ = (
        "shard", "replica", "transport", "buf", "head_done", "closing", "ready", "error",
        "watches", "by_task", "awaiting_first", "unfinished", "unsettled", "close_started",
        "token",
    )

    def __init__(self, shard: Shard, task_ids: list[int], replica: int) -> None:
        self.shard = shard
        self.replica = replica
        self.token = ""  # --auth: this connection's token, sent as ?token=
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head_done = False
        self.closing = False
        self.ready: asyncio.Future[None] | None = None
        self.error = ""
        self.watches = [Watch(self, task_id) for task_id in task_ids]
        self.by_task = {watch.task_id: watch for watch in self.watches}
        self.awaiting_first = len(self.watches)  # watches without their first event
        self.unfinished = len(self.watches)  # watches without their terminal state
        self.unsettled = len(self.watches)  # watches neither terminal nor failed
        self.close_started = False  # the client began closing (churn, or /ws when done)

    @property
    def task_id(self) -> int:
        return self.watches[0].task_id

    def request(self) -> bytes:
        raise NotImplementedError

    # asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request())

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.close_started and not self.closing:
            self.closed_by_client()
        elif not self.closing and not self.error:
            if not self.unfinished:
                self.ended_after_terminal()
            else:
                detail = f" ({type(exc).__name__}: {exc})" if exc else ""
                self.shard.client_failed(
                    self, f"closed by server before terminal{self.close_detail()}{detail}")
        self._resolve()

    def ended_after_terminal(self) -> None:
        """The server closed after the terminal state: fine (WebSocket checks the code)."""

    def closed_by_client(self) -> None:
        """The connection ended after the client began closing it (WebSocket checks that the
        server answered the close frame)."""

    def close_detail(self) -> str:
        return ""

    def all_settled(self) -> None:
        """Every task of this connection is terminal (or failed)."""

    def _read_head(self, expected_status: bytes) -> list[bytes] | None:
        """The response head's header lines once complete (consumed from `buf`), else None."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self.fail("response head over 64 KiB")
            return None
        head = bytes(buf[:end])
        del buf[: end + 4]
        status_line, *header_lines = head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            self.fail(f"bad status line {status_line[:60]!r}")
            return None
        if parts[1] != expected_status:
            if parts[1] in ACCESS_REFUSALS:
                self.shard.refused[f"HTTP {parts[1].decode()}"] += 1
            self.fail(f"HTTP {parts[1].decode()}")
            return None
        self.head_done = True
        return header_lines

    # life cycle -----------------------------------------------------------------------

    def _resolve(self) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    def fail(self, reason: str) -> None:
        self.shard.client_failed(self, reason)
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        self._resolve()

    def client_close(self) -> None:
        """Churn: the client ends the connection (SSE: closes TCP)."""
        self.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        self._resolve()


class SSEClient(Client):
    """One `GET /tasks/{id}/events` stream: HTTP/1.1, chunked transfer, SSE blocks."""

    __slots__ = ("sse_buf", "chunked", "ended")

    def __init__(self, shard: Shard, task_ids: list[int], replica: int) -> None:
        super().__init__(shard, task_ids, replica)
        self.sse_buf = b""
        self.chunked = False
        self.ended = False

    def request(self) -> bytes:
        return self.shard.sse_request(self.task_id, self.replica, self.token)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf
        buf += data
        if not self.head_done:
            header_lines = self._read_head(b"200")
            if header_lines is None:
                return
            for line in header_lines:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
        if self.chunked:
            self._dechunk(now)
        elif buf:
            payload = bytes(buf)
            buf.clear()
            self._feed_sse(payload, now)

    def _dechunk(self, now: float) -> None:
        buf = self.buf
        pos, size_total = 0, len(buf)
        while pos < size_total:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            try:
                size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
            except ValueError:
                self.fail(f"bad chunk size line {bytes(buf[pos:nl])[:40]!r}")
                return
            start = nl + 2
            end = start + size
            if end + 2 > size_total:
                break
            pos = end + 2
            if size == 0:
                self.ended = True
                break
            self._feed_sse(bytes(buf[start:end]), now)
        if pos:
            del buf[:pos]
        if self.ended:
            if self.unfinished:
                self.shard.client_failed(self, "stream ended without a terminal state")
            self.close()

    def _feed_sse(self, payload: bytes, now: float) -> None:
        if self.sse_buf:
            payload = self.sse_buf + payload
        if b"\r" in payload:
            payload = payload.replace(b"\r\n", b"\n")
        blocks = payload.split(b"\n\n")
        self.sse_buf = blocks.pop()
        for block in blocks:
            if block:
                self._event(block, now)

    def _event(self, block: bytes, now: float) -> None:
        data: bytes | None = None
        event_type = b""
        event_id = b""
        for line in block.split(b"\n"):
            if not line:
                continue
            if line[0] == 58:  # ":" comment (keep-alive)
                self.shard.keepalives += 1
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data = value if data is None else data + b"\n" + value
            elif name == b"event":
                event_type = value
            elif name == b"id":
                event_id = value
        if data is not None:
            self.shard.on_sse_event(self, event_type, event_id, data, now)


class WSClient(Client):
    """One `GET /tasks/{id}/ws` socket: the RFC 6455 upgrade by hand, then server frames.

    Server frames are unmasked: text (task frames), close (echoed, then the server closes the
    TCP connection), ping (answered with a masked pong). The socket sends nothing else: a
    per-task socket takes no ops. Churn closes it from the client side: a masked close 1000,
    and once the server's close frame has come, the client closes TCP."""

    __slots__ = ("accept", "fragments", "close_code", "close_reason", "close_sent")

    def __init__(self, shard: Shard, task_ids: list[int], replica: int) -> None:
        super().__init__(shard, task_ids, replica)
        self.accept = b""
        self.fragments: bytearray | None = None
        self.close_code = 0
        self.close_reason = ""
        self.close_sent = False

    def request(self) -> bytes:
        key = base64.b64encode(os.urandom(16))
        self.accept = ws_accept(key)
        return self.shard.ws_request(self.task_id, self.replica, key, self.token)

    def opened(self) -> None:
        """After the 101: a per-task socket sends nothing."""

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf
        buf += data
        if not self.head_done:
            header_lines = self._read_head(b"101")
            if header_lines is None:
                return
            for line in header_lines:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-accept":
                    if value.strip() != self.accept:
                        self.fail("wrong Sec-WebSocket-Accept")
                        return
                    break
            else:
                self.fail("101 without Sec-WebSocket-Accept")
                return
            self.opened()
        pos, size = 0, len(buf)
        while size - pos >= 2 and not self.closing:
            b0, b1 = buf[pos], buf[pos + 1]
            length, start = b1 & 0x7F, pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            if b1 & 0x80:
                self.fail("server frame is masked")
                return
            end = start + length
            if end > size:
                break
            pos = end
            self._frame(b0, bytes(buf[start:end]), now)
        if pos:
            del buf[:pos]

    def _frame(self, b0: int, payload: bytes, now: float) -> None:
        opcode, fin = b0 & 0x0F, b0 & 0x80
        if opcode == WS_TEXT or opcode == 0:  # text, or the continuation of a fragmented one
            if opcode == WS_TEXT and fin:
                self.shard.on_ws_text(self, payload, now)
                return
            if opcode == WS_TEXT:
                self.fragments = bytearray(payload)
            elif self.fragments is None:
                self.fail("continuation frame without a first fragment")
                return
            else:
                self.fragments += payload
            if fin:
                whole, self.fragments = bytes(self.fragments), None
                self.shard.on_ws_text(self, whole, now)
        elif opcode == WS_PING:
            self.shard.pings += 1
            if self.transport is not None:
                self.transport.write(ws_client_frame(WS_PONG, payload))
        elif opcode == WS_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_reason = payload[2:].decode(errors="replace")
            self.shard.close_codes[self.close_code] += 1
            if self.close_code in ACCESS_CLOSE_CODES:
                self.shard.refused[f"close {self.close_code}"] += 1
            if self.close_started:
                # The server's answer to the client's close: the handshake is complete, and the
                # client closes TCP (RFC 6455 7.1.1 allows it once both close frames passed).
                if self.close_code != 1000:
                    self.shard.violations[f"close {self.close_code} in answer to the client's "
                                          "close 1000"] += 1
                self.close()
            elif not self.close_sent and self.transport is not None:
                self.close_sent = True  # echo the code; the server then closes TCP
                self.transport.write(ws_client_frame(WS_CLOSE, payload[:2]))
        elif opcode == WS_PONG:
            pass
        else:
            self.shard.other_events[f"ws opcode {opcode}"] += 1

    def start_close(self) -> None:
        """The client's close handshake: a masked close 1000, then wait for the server's."""
        if self.transport is None or self.close_sent or self.closing:
            return
        self.close_sent = self.close_started = True
        self.transport.write(ws_client_frame(WS_CLOSE, (1000).to_bytes(2, "big")))

    def client_close(self) -> None:
        if self.head_done and self.transport is not None and not self.close_sent:
            self.start_close()
        else:
            self.close()  # no WebSocket yet (or the server already closes): close TCP

    def ended_after_terminal(self) -> None:
        if self.close_code != 1000:
            self.shard.violations[f"close {self.close_code or 'missing'} after terminal "
                                  "(expected 1000)"] += 1

    def closed_by_client(self) -> None:
        if not self.close_code:
            self.shard.violations["TCP closed without a close frame in answer to the client's "
                                  "close"] += 1

    def close_detail(self) -> str:
        if not self.close_code:
            return ", no close frame"
        return f", close {self.close_code} {self.close_reason!r}"


class ManyWSClient(WSClient):
    """One `GET /ws` socket watching K tasks: the upgrade, one masked text frame
    `{"op":"subscribe","task_ids":[...]}`, then `subscribed` and task frames. The server does
    not close it after the terminal states (it drops finished tasks), so once every task of
    the socket is terminal (or failed), the client closes it: a masked close 1000, and after
    the server's close frame the client closes TCP. It sends no `{"op":"ping"}`; protocol
    pings are answered as on per-task sockets."""

    MULTI = True

    __slots__ = ("subscribed",)

    def __init__(self, shard: Shard, task_ids: list[int], replica: int) -> None:
        super().__init__(shard, task_ids, replica)
        self.subscribed = False

    def request(self) -> bytes:
        key = base64.b64encode(os.urandom(16))
        self.accept = ws_accept(key)
        return self.shard.ws_many_request(self.replica, key, self.token)

    def opened(self) -> None:
        assert self.transport is not None
        self.transport.write(ws_client_frame(WS_TEXT, orjson.dumps(
            {"op": "subscribe", "task_ids": [watch.task_id for watch in self.watches]})))

    def all_settled(self) -> None:
        self.start_close()


def _identity(value: T) -> T:
    return value


def token_query(token: str) -> str:
    """`?token=...` for a connection with a token (a JWT is URL-safe as it is), else ""."""
    return f"?token={token}" if token else ""


class Shard:
    """The clients of one shard process, and what they saw."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.ports: list[int] = cfg["ports"]
        self.concurrency: int = cfg["concurrency"]
        self.connect_timeout: float = cfg["connect_timeout"]
        kind: type[Client] = SSEClient
        if cfg["transport"] == "ws":
            kind = ManyWSClient if cfg.get("ws_endpoint") == "many" else WSClient
        self.clients: list[Client] = [kind(self, list(task_ids), replica)
                                      for task_ids, replica in cfg["clients"]]
        for client, token in zip(self.clients, cfg.get("tokens") or (), strict=False):
            client.token = token
        self.watches: list[Watch] = [w for client in self.clients for w in client.watches]
        self._requests: dict[tuple[int, int], bytes] = {}
        self.window = False
        self.latencies: dict[int, list[float]] = {r: [] for r in range(len(self.ports))}
        self.terminal_latencies: list[float] = []
        self.deliveries = 0
        self.deliveries_by_replica: Counter[int] = Counter()
        self.pre_window_deliveries = 0
        self.first_events = 0
        self.terminals = 0
        self.dead = 0
        self.keepalives = 0
        self.pings = 0
        self.subscribed = 0
        self.close_codes: Counter[int] = Counter()
        self.last_delivery = 0.0
        self.first_delivery = 0.0
        self.violations: Counter[str] = Counter()
        self.other_events: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # refusals by access control (contract 7)
        self.settled_sent = False
        self.settled_info: dict[str, Any] = {}
        self.window_opened = 0.0
        self.timeline_count: Counter[int] = Counter()
        self.timeline_latency: dict[int, float] = {}
        self.lags: list[float] = []

    def sse_request(self, task_id: int, replica: int, token: str = "") -> bytes:
        if token:  # one request per connection: every connection has a token of its own
            return (f"GET /tasks/{task_id}/events{token_query(token)} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{self.ports[replica]}\r\n"
                    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()
        request = self._requests.get((task_id, replica))
        if request is None:
            request = self._requests[task_id, replica] = (
                f"GET /tasks/{task_id}/events HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.ports[replica]}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
            ).encode()
        return request

    def ws_request(self, task_id: int, replica: int, key: bytes, token: str = "") -> bytes:
        return self._ws_request(f"/tasks/{task_id}/ws{token_query(token)}", replica, key)

    def ws_many_request(self, replica: int, key: bytes, token: str = "") -> bytes:
        return self._ws_request(f"/ws{token_query(token)}", replica, key)

    def _ws_request(self, path: str, replica: int, key: bytes) -> bytes:
        return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.ports[replica]}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key.decode()}\r\n\r\n").encode()

    # events ------------------------------------------------------------------------------

    def on_sse_event(self, client: Client, event_type: bytes, event_id: bytes, data: bytes,
                     now: float) -> None:
        if event_type and event_type != b"message":
            if event_type == b"not_found":
                client.fail("event: not_found")
            else:
                self.other_events[event_type.decode(errors="replace")] += 1
            return
        try:
            task = orjson.loads(data)
        except ValueError:
            self.violations["undecodable event data"] += 1
            return
        self.on_task(client, task, event_id, now)

    def on_ws_text(self, client: Client, payload: bytes, now: float) -> None:
        try:
            frame = orjson.loads(payload)
            kind = frame["type"]
        except (ValueError, KeyError, TypeError):
            self.violations["undecodable frame"] += 1
            return
        if kind == "task":
            if client.MULTI and not cast(ManyWSClient, client).subscribed:
                self.violations["task frame before subscribed"] += 1
            self.on_task(client, frame.get("data"), b"", now)
        elif kind == "error":
            reason = f"error frame {frame.get('code')}: {frame.get('msg')}"
            if frame.get("code") in (401, 403):  # /ws: a subscribe the token does not open
                self.refused[f"error frame {frame.get('code')}"] += 1
            task_ids = frame.get("task_ids")
            if client.MULTI and isinstance(task_ids, list):
                self.errors[_error_class(reason)] += 1  # these tasks only; the others go on
                for task_id in task_ids:
                    watch = client.by_task.get(task_id)
                    if watch is not None:
                        self.watch_failed(watch, reason)
            else:
                client.fail(reason)
        elif kind == "subscribed" and client.MULTI:
            many = cast(ManyWSClient, client)
            self.subscribed += 1
            if many.subscribed:
                self.violations["second subscribed frame"] += 1
            many.subscribed = True
            listed = frame.get("task_ids")
            if not isinstance(listed, list) or sorted(listed) != sorted(many.by_task):
                self.violations["subscribed frame lists other task ids"] += 1
        else:
            self.other_events[f"ws {kind}"] += 1

    def on_task(self, client: Client, task: Any, event_id: bytes, now: float) -> None:
        try:
            version = int(task["version"])
            progress = int(task["progress"])
            status = task["status"]
            updated_at = int(task["updated_at"])
        except (ValueError, KeyError, TypeError):
            self.violations["undecodable task state"] += 1
            return
        if client.MULTI:
            found = client.by_task.get(task.get("task_id"))
            if found is None:
                self.violations["event for a task the socket did not subscribe to"] += 1
                return
            watch = found
        else:
            watch = client.watches[0]
            if task.get("task_id") != watch.task_id:
                self.violations["event for another task"] += 1
        if event_id and event_id != b"%d" % version:
            self.violations["id differs from version"] += 1
        if version <= watch.last_version:
            self.violations["version not increasing (duplicate/regression)"] += 1
        if progress < watch.last_progress:
            self.violations["progress decreased"] += 1
        watch.last_version, watch.last_progress = version, progress
        if not watch.first_event_at:
            watch.first_event_at = now
            self.first_events += 1
            client.awaiting_first -= 1
            if not client.awaiting_first:
                client._resolve()
        latency = now * 1000.0 - updated_at
        if self.window:
            self.deliveries += 1
            self.deliveries_by_replica[client.replica] += 1
            self.latencies[client.replica].append(latency)
            bucket = int(now - self.window_opened)
            self.timeline_count[bucket] += 1
            self.timeline_latency[bucket] = max(self.timeline_latency.get(bucket, 0.0), latency)
            self.last_delivery = now
            if not self.first_delivery:
                self.first_delivery = now
        else:
            self.pre_window_deliveries += 1
        if status in TERMINAL_STATUSES and not watch.terminal_at:
            watch.terminal_at = now
            self.terminals += 1
            if self.window:
                self.terminal_latencies.append(latency)
            client.unfinished -= 1
            if not watch.error:
                self._settle_one(client)
            self._check_settled()

    def _settle_one(self, client: Client) -> None:
        client.unsettled -= 1
        if not client.unsettled:
            client.all_settled()

    def client_failed(self, client: Client, reason: str) -> None:
        """The connection failed: every watch of it without a terminal state is lost."""
        if client.error:
            return
        client.error = reason
        self.errors[_error_class(reason)] += 1
        for watch in client.watches:
            if not watch.terminal_at and not watch.error:
                watch.error = reason
                self.dead += 1
                client.unsettled -= 1
        self._check_settled()

    def watch_failed(self, watch: Watch, reason: str) -> None:
        """One task of a `/ws` socket failed (an error frame naming it)."""
        if watch.error or watch.terminal_at:
            return
        watch.error = reason
        self.dead += 1
        self._settle_one(watch.client)
        self._check_settled()

    def _check_settled(self) -> None:
        if (self.window and not self.settled_sent
                and self.terminals + self.dead >= len(self.watches)):
            self.settled_sent = True
            self.settled_info = {"wall": time.time(), "terminals": self.terminals,
                                 "dead": self.dead, "clients": len(self.watches)}
            emit({"ev": "settled", **self.settled_info})

    # phases ------------------------------------------------------------------------------

    async def connect_all(self) -> dict[str, Any]:
        """Connect every socket, each until it has the first task state of every task it
        watches (or failed)."""
        loop = asyncio.get_running_loop()
        indexes = iter(range(len(self.clients)))

        async def worker() -> None:
            for index in indexes:
                client = self.clients[index]
                client.ready = loop.create_future()
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await loop.create_connection(functools.partial(_identity, client),
                                                     "127.0.0.1", self.ports[client.replica])
                except (OSError, TimeoutError) as exc:
                    self.client_failed(client, f"connect failed: {type(exc).__name__}: {exc}")
                    continue
                await client.ready  # first event(s), or the client failed

        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        timed_out = False
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.gather(*workers)
        except TimeoutError:
            timed_out = True
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        firsts = [w for w in self.watches if w.first_event_at]
        ready_by_replica: Counter[int] = Counter(
            c.replica for c in self.clients if not c.awaiting_first)
        return {
            "ev": "connected",
            "clients": len(self.watches),
            "sockets": len(self.clients),
            "with_first_event": len(firsts),
            "sockets_ready": sum(ready_by_replica.values()),
            "sockets_ready_by_replica": {str(k): v for k, v in ready_by_replica.items()},
            "timed_out": timed_out,
            "first_event_walls": [w.first_event_at for w in firsts],
            "first_event_replicas": [w.client.replica for w in firsts],
            "errors": dict(self.errors),
            "refused": dict(self.refused),
            "error_samples": self._error_samples(),
            "violations": dict(self.violations),
        }

    def open_window(self) -> dict[str, Any]:
        self.window = True
        self.window_opened = time.time()
        self.lags.clear()
        self._check_settled()
        return {"ev": "window_open"}

    def status(self) -> dict[str, Any]:
        open_by_replica: Counter[int] = Counter(
            c.replica for c in self.clients if c.transport is not None)
        return {"ev": "status", "open": sum(open_by_replica.values()),
                "open_by_replica": {str(k): v for k, v in open_by_replica.items()},
                "clients": len(self.watches), "sockets": len(self.clients),
                "errors": dict(self.errors), "refused": dict(self.refused),
                "error_samples": self._error_samples(), "keepalives": self.keepalives,
                "pings": self.pings, "close_codes": {str(k): v for k, v in
                                                     self.close_codes.items()},
                "violations": dict(self.violations)}

    def report(self) -> dict[str, Any]:
        lost: Counter[str] = Counter()
        lost_by_replica: Counter[int] = Counter()
        for watch in self.watches:
            if not watch.terminal_at:
                lost_by_replica[watch.client.replica] += 1
                if watch.error:
                    lost[_error_class(watch.error)] += 1
                elif not watch.first_event_at:
                    lost["no event at all"] += 1
                else:
                    lost["still open, terminal state not received"] += 1
        return {
            "ev": "report",
            "clients": len(self.watches),
            "sockets": len(self.clients),
            "deliveries": self.deliveries,
            "deliveries_by_replica": {str(k): v for k, v in self.deliveries_by_replica.items()},
            "pre_window_deliveries": self.pre_window_deliveries,
            "first_delivery": self.first_delivery,
            "last_delivery": self.last_delivery,
            "terminals": self.terminals,
            "lost": dict(lost),
            "lost_by_replica": {str(k): v for k, v in lost_by_replica.items()},
            "latencies": {str(r): [round(x, 3) for x in values]
                          for r, values in self.latencies.items()},
            "terminal_latencies": [round(x, 3) for x in self.terminal_latencies],
            "violations": dict(self.violations),
            "other_events": dict(self.other_events),
            "keepalives": self.keepalives,
            "pings": self.pings,
            "subscribed_frames": self.subscribed,
            "close_codes": {str(k): v for k, v in self.close_codes.items()},
            "open_at_report": sum(1 for c in self.clients if c.transport is not None),
            "errors": dict(self.errors),
            "refused": dict(self.refused),
            "error_samples": self._error_samples(),
            "loop_lag_ms": distribution([x * 1000.0 for x in self.lags]),
            "settled": self.settled_info,
            "dead": self.dead,
            "window_opened": self.window_opened,
            "timeline": {str(k): [self.timeline_count[k], round(self.timeline_latency[k], 1)]
                         for k in sorted(self.timeline_count)},
        }

    def _error_samples(self) -> list[str]:
        samples: dict[str, str] = {}
        for client in self.clients:
            for watch in client.watches:
                error = client.error or watch.error
                if error:
                    samples.setdefault(_error_class(error), f"task {watch.task_id}: {error}")
                    break
            if len(samples) >= 5:
                break
        return list(samples.values())

    async def close_from_client(self, timeout: float) -> dict[str, Any]:
        """Churn: every open connection is closed by the client (SSE: TCP close; WebSocket:
        close 1000, the server's close frame, then TCP close); bounded, then aborted."""
        started = time.monotonic()
        opened = [c for c in self.clients if c.transport is not None]
        for client in opened:
            client.client_close()
        deadline = started + timeout
        while time.monotonic() < deadline and any(c.transport is not None for c in opened):
            await asyncio.sleep(0.05)
        stuck = [c for c in opened if c.transport is not None]
        for client in stuck:
            client.abort()
        return {"ev": "client_closed", "closed": len(opened) - len(stuck),
                "aborted_after_timeout": len(stuck),
                "took_s": round(time.monotonic() - started, 3),
                "close_codes": {str(k): v for k, v in self.close_codes.items()},
                "violations": dict(self.violations), "errors": dict(self.errors),
                "refused": dict(self.refused),
                "error_samples": self._error_samples()}

    def abort_all(self) -> None:
        for client in self.clients:
            client.abort()

    async def lag_monitor(self) -> None:
        interval = 0.01
        while True:
            started = time.perf_counter()
            await asyncio.sleep(interval)
            if self.window:
                self.lags.append(max(0.0, time.perf_counter() - started - interval))


def _error_class(reason: str) -> str:
    """Group error texts: drop ports, addresses and numbers that differ per client."""
    return re.sub(r"\d+", "N", reason.split(" (")[0] if "closed by server" in reason else reason)


async def shard_main(cfg: dict[str, Any]) -> None:
    if cfg["rt"] > 0:  # above the publisher: a busy publisher must not delay receipt times
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(cfg["rt"] + 1))
    shard = Shard(cfg)
    reader = await stdin_reader()
    lag_task = asyncio.create_task(shard.lag_monitor())
    emit({"ev": "ready", "pid": os.getpid()})
    try:
        while True:
            async with asyncio.timeout(cfg["max_runtime"]):
                line = await reader.readline()
            if not line:
                return  # the coordinator is gone
            command = orjson.loads(line)["cmd"]
            if command == "connect":
                emit(await shard.connect_all())
            elif command == "window":
                emit(shard.open_window())
            elif command == "status":
                emit(shard.status())
            elif command == "report":
                emit(shard.report())
            elif command == "client_close":
                emit(await shard.close_from_client(cfg["close_wait"]))
            elif command == "reset":  # churn: a new round with fresh clients
                shard.abort_all()
                lag_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lag_task
                shard = Shard(cfg)
                lag_task = asyncio.create_task(shard.lag_monitor())
                emit({"ev": "reset"})
            elif command == "close":
                shard.abort_all()
                await asyncio.sleep(0.1)
                emit({"ev": "closed"})
                return
    finally:
        shard.abort_all()
        lag_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag_task


# --------------------------------------------------------------------------------------------
# publisher process
# --------------------------------------------------------------------------------------------


async def publisher_main(cfg: dict[str, Any]) -> None:
    from taskcast.producer import Producer
    from taskcast.script import script_source

    if cfg["rt"] > 0:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(cfg["rt"]))
    task_ids: list[int] = cfg["task_ids"]
    rate: float = cfg["rate"]
    progress_events: int = cfg["progress_events"]
    schedule: list[tuple[int, int | None]] = [
        (task_ids[j % len(task_ids)], j // len(task_ids) + 1) for j in range(progress_events)
    ]
    schedule += [(task_id, None) for task_id in task_ids]  # completions, same pace

    producer = Producer.from_url(cfg["redis_url"], prefix=cfg["prefix"])
    try:
        await producer.redis.script_load(script_source())
        reader = await stdin_reader()
        emit({"ev": "ready", "pid": os.getpid()})
        async with asyncio.timeout(cfg["max_runtime"]):
            line = await reader.readline()
        if line.strip() != b'{"cmd":"go"}':
            return
        if cfg.get("publisher_mode") == "pipeline":
            emit(await _publish_pipelined(producer, schedule, rate))
        else:
            emit(await _publish(producer, schedule, rate, cfg["max_in_flight"]))
        async with asyncio.timeout(cfg["max_runtime"]):
            await reader.readline()  # stay alive (CPU readable) until told to close
        emit({"ev": "closed"})
    finally:
        await producer.close()


async def _publish(producer: Any, schedule: list[tuple[int, int | None]], rate: float,
                   max_in_flight: int) -> dict[str, Any]:
    from taskcast.models import TaskStatus

    gate = asyncio.Semaphore(max_in_flight)
    previous: dict[int, asyncio.Task[None]] = {}
    pending: set[asyncio.Task[None]] = set()
    errors: Counter[str] = Counter()
    samples: list[str] = []
    ok = 0
    terminal_ok = 0
    slowest: list[float] = [0.0, 0.0, 0.0]  # call duration s, its start (wall), task id
    slow_calls = 0

    async def change(task_id: int, progress: int | None,
                     before: asyncio.Task[None] | None) -> None:
        nonlocal ok, terminal_ok, slow_calls
        try:
            if before is not None and not before.done():
                await asyncio.wait([before])  # one task's changes stay in order
            call_start = time.perf_counter()
            call_wall = time.time()
            if progress is None:
                task = await producer.complete(task_id,
                                               image_url=f"https://cdn.example/{task_id}.png")
                terminal_ok += task.status is TaskStatus.COMPLETED
            else:
                await producer.progress(task_id, progress)
            ok += 1
            took = time.perf_counter() - call_start
            slow_calls += took > 0.1
            if took > slowest[0]:
                slowest[:] = [took, call_wall, float(task_id)]
        except Exception as exc:  # counted and reported, never hidden
            errors[type(exc).__name__] += 1
            if len(samples) < 5:
                samples.append(f"task {task_id}: {type(exc).__name__}: {exc}")
        finally:
            gate.release()

    total = len(schedule)
    started = time.perf_counter()
    wall_start = time.time()
    deadline = started + total / rate + 60.0
    sent = 0
    max_lag = 0.0
    while sent < total and time.perf_counter() < deadline:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            await gate.acquire()
            max_lag = max(max_lag, time.perf_counter() - (started + sent / rate))
            task_id, progress = schedule[sent]
            job = asyncio.create_task(change(task_id, progress, previous.get(task_id)))
            previous[task_id] = job
            pending.add(job)
            job.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    issued_in = time.perf_counter() - started
    if pending:
        await asyncio.wait(pending, timeout=30.0)
    return {
        "ev": "result",
        "scheduled": total,
        "sent": sent,
        "ok": ok,
        "terminal_ok": terminal_ok,
        "errors": dict(errors),
        "error_samples": samples,
        "wall_start": wall_start,
        "wall_end": time.time(),
        "issue_s": round(issued_in, 3),
        "achieved_rate": round(sent / issued_in, 1) if issued_in > 0 else None,
        "max_schedule_lag_ms": round(max_lag * 1000.0, 2),
        "slowest_call": {"ms": round(slowest[0] * 1000.0, 2), "wall": slowest[1],
                         "task_id": int(slowest[2])},
        "calls_over_100ms": slow_calls,
        "cpu_s": round(sum(os.times()[:2]), 3),
    }


async def _publish_pipelined(producer: Any, schedule: list[tuple[int, int | None]],
                             rate: float) -> dict[str, Any]:
    """The same schedule, sent as EVALSHA of the shipped script in one pipeline per tick.

    A `Producer` call costs the publisher ~0.2-0.3 ms of CPU; at 2000 events/s that kept the
    load side's core saturated and its scheduling lag in every latency figure. This is the
    contract a non-Python producer uses (README, "Redis contract for producers"): one change
    document per event, in order per task (the pipeline runs in order and ticks run one after
    another)."""
    from taskcast.script import script_source

    redis, keys = producer.redis, producer._changes.keys
    sha = await redis.script_load(script_source())
    publish = producer._changes.publish
    errors: Counter[str] = Counter()
    samples: list[str] = []
    ok = terminal_ok = 0
    total = len(schedule)
    started = time.perf_counter()
    wall_start = time.time()
    deadline = started + total / rate + 60.0
    sent = 0
    max_lag = 0.0
    slowest = [0.0, 0.0]
    while sent < total and time.perf_counter() < deadline:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due <= sent:
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
            continue
        if due - sent < 10 and due < total:
            # Ticks of ~5 ms (10 events at 2000/s): one pipeline per event would cost as much
            # as the Producer calls this mode exists to avoid.
            await asyncio.sleep(max(0.0, min(0.005, started + (sent + 10) / rate
                                             - time.perf_counter())))
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
        max_lag = max(max_lag, time.perf_counter() - (started + sent / rate))
        call_start, call_wall = time.perf_counter(), time.time()
        async with redis.pipeline(transaction=False) as pipe:
            for task_id, progress in schedule[sent:due]:
                change: dict[str, Any] = {"op": "update", "task_id": str(task_id),
                                          "publish": publish}
                if progress is None:
                    change.update(status="completed",
                                  image_url=f"https://cdn.example/{task_id}.png")
                else:
                    change.update(status="processing", progress=progress)
                pipe.evalsha(sha, 2, keys.record(task_id), keys.channel(task_id),
                             json.dumps(change))
            replies = await pipe.execute(raise_on_error=False)
        took = time.perf_counter() - call_start
        if took > slowest[0]:
            slowest = [took, call_wall]
        for (_, progress), reply in zip(schedule[sent:due], replies, strict=True):
            if isinstance(reply, Exception):
                errors[type(reply).__name__] += 1
                if len(samples) < 5:
                    samples.append(f"{type(reply).__name__}: {reply}")
            else:
                ok += 1
                terminal_ok += progress is None
        sent = due
    issued_in = time.perf_counter() - started
    return {
        "ev": "result", "scheduled": total, "sent": sent, "ok": ok, "terminal_ok": terminal_ok,
        "errors": dict(errors), "error_samples": samples, "wall_start": wall_start,
        "wall_end": time.time(), "issue_s": round(issued_in, 3),
        "achieved_rate": round(sent / issued_in, 1) if issued_in > 0 else None,
        "max_schedule_lag_ms": round(max_lag * 1000.0, 2),
        "slowest_call": {"ms": round(slowest[0] * 1000.0, 2), "wall": slowest[1], "task_id": 0},
        "calls_over_100ms": 0,
        "cpu_s": round(sum(os.times()[:2]), 3),
    }


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------


class Child:
    """A shard or publisher process spoken to with JSON lines on stdin/stdout."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.settled = asyncio.Event()
        self.settled_wall = 0.0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                self.replies.put_nowait({"ev": "eof"})
                return
            message = orjson.loads(line)
            if message.get("ev") == "settled":
                self.settled_wall = message["wall"]
                self.settled.set()
            else:
                self.replies.put_nowait(message)

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps({"cmd": command}) + b"\n")
        await self.proc.stdin.drain()

    async def reply(self, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message = await self.replies.get()
        if message.get("ev") == "eof":
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited unexpectedly; see its log")
        return message

    async def request(self, command: str, timeout: float) -> dict[str, Any]:
        await self.send(command)
        return await self.reply(timeout)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send("close")
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def spawn_child(name: str, mode: str, cfg: dict[str, Any], log: IO[bytes],
                      children: list[Child]) -> Child:
    encoded = json.dumps(cfg)
    if len(encoded) > 64_000:  # one argv string may not exceed 128 KiB (MAX_ARG_STRLEN)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            handle.write(encoded)
        encoded = "@" + handle.name
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), mode, encoded,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
        limit=PIPE_LIMIT,
    )
    child = Child(name, proc)
    children.append(child)
    ready = await child.reply(60)
    if ready.get("ev") != "ready":
        raise RuntimeError(f"{name} did not start: {ready}")
    return child


def rt_prefix(priority: int) -> list[str]:
    """`chrt -f PRIO+1` (SCHED_FIFO) for the processes on the latency path, when asked: one
    above the publisher, which shares their core."""
    return ["chrt", "-f", str(priority + 1)] if priority > 0 else []


def redis_rt_prefix(priority: int) -> list[str]:
    """SCHED_FIFO for redis-server one above the client shards that share its core: at equal
    priority a shard busy opening thousands of connections kept Redis off the CPU for seconds
    (the gateway's watchdog then saw no PONG for 5 s and rebuilt its subscription)."""
    return ["chrt", "-f", str(priority + 2)] if priority > 0 else []


def start_redis(workdir: Path, port: int, prefix: list[str],
                extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    return subprocess.Popen(
        [*prefix, exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )


def wait_redis(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("redis-server exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise TimeoutError("redis-server did not answer PING")


def cluster_port(taken: set[int]) -> int:
    """A port for a cluster node whose bus port (port + 10000) is free too: 10000-22000, so
    the bus port stays below 65535 and below the kernel's ephemeral range (tests/servers.py)."""
    for _ in range(10_000):
        port = random.randint(10_000, 22_000)
        pair = {port, port + 10_000}
        if pair & taken or pair & {6379, 16379, 26379}:
            continue
        free = True
        for candidate in pair:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", candidate))
                except OSError:
                    free = False
        if free:
            taken.update(pair)
            return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_cli(port: int, *argv: str, timeout: float = 10.0) -> str:
    exe = shutil.which("redis-cli")
    if exe is None:
        raise SystemExit("redis-cli not found (apt-get install redis-tools)")
    return subprocess.run([exe, "-p", str(port), *argv], capture_output=True, text=True,
                          timeout=timeout, check=False).stdout


def start_redis_cluster(workdir: Path, prefix: list[str], procs: list[subprocess.Popen[bytes]],
                        size: int = 3, timeout: float = 30.0) -> list[int]:
    """`size` cluster-enabled primaries (no replicas), slots spread by `redis-cli --cluster
    create`; returns their ports once every node reports cluster_state:ok. The processes are
    appended to `procs` as they start, so the caller's finally stops them on any failure."""
    taken: set[int] = set()
    ports = [cluster_port(taken) for _ in range(size)]
    for index, port in enumerate(ports):
        node_dir = workdir / f"redis-node{index}"
        node_dir.mkdir()
        procs.append(start_redis(node_dir, port, prefix, [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000"]))
    for port, proc in zip(ports, procs[-size:], strict=True):
        wait_redis(port, proc)
    exe = shutil.which("redis-cli") or "redis-cli"
    created = subprocess.run(
        [exe, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
         "--cluster-replicas", "0", "--cluster-yes"],
        capture_output=True, text=True, timeout=60, check=False)
    if created.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-400:]}"
                           f"{created.stderr[-400:]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all("cluster_state:ok" in redis_cli(port, "CLUSTER", "INFO") for port in ports):
            return ports
        time.sleep(0.1)
    raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


async def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited at start with code {proc.returncode}")
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, _ = await http_get(port, "/readyz", 2.0)
            if status == 200:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError("gateway did not become ready")


async def create_tasks(redis_url: str, task_ids: list[int]) -> None:
    from taskcast.producer import Producer
    from taskcast.script import script_source

    producer = Producer.from_url(redis_url, prefix=PREFIX)
    try:
        # Load the script (on every primary of a cluster) before the concurrent creates, as
        # the publisher does. A cold redis+cluster client sent straight into 100 concurrent
        # calls hits MOVED, drops connections under in-flight EVALSHAs and re-sends them, so
        # some creates fail with EXISTS although they were applied (see bench/README.md).
        await producer.redis.script_load(script_source())
        for start in range(0, len(task_ids), 100):
            await asyncio.gather(*(producer.create(task_id=task_id, type="txt2img",
                                                   angle="front")
                                   for task_id in task_ids[start : start + 100]))
    finally:
        await producer.close()


async def gateway_metrics(port: int) -> dict[str, float]:
    try:
        status, body = await http_get(port, "/metrics", 10.0)
    except (OSError, TimeoutError, ValueError, IndexError):
        return {"metrics_unavailable": 1.0}  # e.g. the gateway is out of file descriptors
    return parse_metrics(body) if status == 200 else {"metrics_status": float(status)}


METRIC_KEYS = {
    "deliveries_sse": 'taskcast_messages_delivered_total{transport="sse"}',
    "deliveries_ws": 'taskcast_messages_delivered_total{transport="ws"}',
    "events_received": "taskcast_events_received_total",
    "events_malformed": "taskcast_events_malformed_total",
    "conflated": "taskcast_updates_conflated_total",
    "dropped": "taskcast_updates_dropped_total",
    "slow_disconnects_sse": 'taskcast_slow_client_disconnects_total{transport="sse"}',
    "slow_disconnects_ws": 'taskcast_slow_client_disconnects_total{transport="ws"}',
    "redis_reconnects": "taskcast_redis_reconnects_total",
}


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {name: after.get(key, 0.0) - before.get(key, 0.0)
             for name, key in METRIC_KEYS.items()}
    for key, value in after.items():
        if key.startswith("taskcast_resyncs_total"):
            reason = key.partition('reason="')[2].rstrip('"}')
            delta[f"resyncs_{reason}"] = value - before.get(key, 0.0)
    refusals = [key for key in after if key.startswith("taskcast_auth_refusals_total")]
    if refusals:  # the series appear with the first refusal (--auth: the access probes)
        delta["auth_refusals"] = sum(after[key] - before.get(key, 0.0) for key in refusals)
    for transport in ("sse", "ws"):
        delta[f"open_connections_{transport}"] = after.get(
            f'taskcast_open_connections{{transport="{transport}"}}', 0.0)
    for gauge in ("taskcast_watched_tasks", "taskcast_redis_subscriptions"):
        if gauge in after:
            delta[gauge.removeprefix("taskcast_")] = after[gauge]
    if "metrics_unavailable" in before or "metrics_unavailable" in after:
        delta["metrics_unavailable"] = 1.0
    return delta


def sum_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Counters and gauges added up over the replicas."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(total)


async def cpu_timeline(pids: Sequence[int], start: float) -> list[tuple[float, float, int]]:
    """(seconds since start, CPU s, VmRSS KiB) of all gateway replicas together, every 0.5 s
    until cancelled."""
    samples: list[tuple[float, float, int]] = []
    try:
        while True:
            samples.append((round(time.time() - start, 2), sum(proc_cpu_s(p) for p in pids),
                            sum(proc_rss_kib(p) for p in pids)))
            await asyncio.sleep(0.5)
    except (asyncio.CancelledError, OSError):
        return samples


def timeline(reports: list[dict[str, Any]], start: float,
             gateway: list[tuple[float, float, int]] | BaseException) -> list[dict[str, Any]]:
    """Per second of the publish window: deliveries, worst latency, gateway CPU share."""
    count: Counter[int] = Counter()
    worst: dict[int, float] = {}
    for report in reports:
        offset = int(report["window_opened"] - start)  # < 1 s: shards opened before `go`
        for key, (n, latency) in report["timeline"].items():
            second = int(key) + offset
            count[second] += n
            worst[second] = max(worst.get(second, 0.0), latency)
    cpu: dict[int, float] = {}
    if isinstance(gateway, list):
        for (t0, c0, _), (_t1, c1, _) in zip(gateway, gateway[1:], strict=False):
            cpu[int(t0)] = cpu.get(int(t0), 0.0) + (c1 - c0)
    seconds = sorted(set(count) | set(cpu))
    return [{"t": s, "deliveries": count.get(s, 0), "max_latency_ms": worst.get(s),
             "gateway_cpu_pct": _round(100.0 * cpu[s], 0) if s in cpu else None}
            for s in seconds]


class PySpy:
    """`py-spy record` on the gateway for one phase (raw collapsed stacks), if asked."""

    def __init__(self, output: Path | None, phase: str, native: bool) -> None:
        self.output = output
        self.phase = phase
        self.native = native
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, phase: str, pid: int) -> None:
        if self.output is None or phase != self.phase:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "250",
             *(["--native"] if self.native else ["--nonblocking"]),
             "--format", "raw", "--output", str(self.output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # let it attach before the phase starts

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None or self.output is None:
            return None
        stop_process(self.proc, signal.SIGINT, 30.0)
        self.proc = None
        if not self.output.exists():
            return {"error": "py-spy wrote no output"}
        return summarize_profile(self.output)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")
                  if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in counter.most_common(top)]

    packages: Counter[str] = Counter()
    for frame, samples in own.items():
        where = frame.rpartition(" (")[2].rstrip(")")
        packages[where.split("/")[0] if "/" in where else where] += samples
    return {"file": str(path), "samples": total, "top_self_pct": share(own),
            "top_inclusive_pct": share(inclusive), "self_pct_by_package": share(packages)}


def scan_log(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"lines": 0}
    lines = path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if " ERROR " in line or "Traceback" in line]
    warnings = [line for line in lines if " WARNING " in line]
    interesting = [line for line in lines if line.strip()]
    return {"lines": len(lines), "error_lines": len(errors), "warning_lines": len(warnings),
            "first_lines": interesting[:12], "error_samples": errors[:8],
            "warning_samples": warnings[:8]}


def raise_nofile(wanted: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    note = ""
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError) as exc:
            note = f"hard limit {hard} could not be raised to {wanted}: {exc}"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard, "wanted": wanted, "note": note}


async def wait_closed(shards: Sequence[Child], timeout: float) -> dict[str, Any]:
    """After the report: how long until every connection that got its terminal state is
    closed. SSE: the server ends the stream; a per-task WebSocket: the server closes with 1000
    (the client echoes it). A `/ws` socket stays open after its tasks finish, so there the
    client starts the close once all its tasks are terminal (close 1000), and this measures
    until the server has answered with its close frame (the client then closes TCP).
    `violations` are all order and close-code violations counted by then (close problems
    show up after the report)."""
    started = time.monotonic()
    statuses: list[dict[str, Any]] = []
    while True:
        statuses = [await shard.request("status", 60) for shard in shards]
        still_open = sum(s["open"] for s in statuses)
        waited = time.monotonic() - started
        if still_open == 0 or waited >= timeout:
            break
        await asyncio.sleep(0.25)
    close_codes: Counter[str] = Counter()
    for status in statuses:
        close_codes.update(status["close_codes"])
    return {"open_after_wait": still_open, "waited_s": _round(waited, 2),
            "timeout_s": timeout, "ws_close_codes": dict(close_codes),
            "errors": dict(sum((Counter(s["errors"]) for s in statuses), Counter())),
            "violations": dict(sum((Counter(s["violations"]) for s in statuses), Counter()))}


def replica_of(client: int, tasks: int, replicas: int, assign: str, per_socket: int = 1) -> int:
    """Which gateway replica client (socket) i connects to.

    `client`: round-robin over the clients (i % K). Client i watches task i % T + 1, so when K
    divides T every watcher of a task lands on the same replica (task affinity: each replica
    subscribes to T/K tasks). `watcher`: the watchers of each task are dealt round-robin over
    the replicas ((i // T) % K), as a balancer without affinity would: every replica then
    subscribes to every task and receives every event from Redis. With `/ws` sockets of
    `per_socket` tasks, i is the socket and its first watcher is i * per_socket."""
    if assign == "watcher":
        return (client * per_socket // tasks) % replicas
    return client % replicas


def socket_tasks(socket_index: int, tasks: int, per_socket: int) -> list[int]:
    """The task ids socket s watches: slot j watches task ((s * K + j) % T) + 1, so every task
    gets N/T watchers in all, spread as with one task per socket (K = 1: task s % T + 1)."""
    first = socket_index * per_socket
    return [(first + slot) % tasks + 1 for slot in range(per_socket)]


def shard_plan(clients: int, tasks: int, requested: int, replicas: int = 1,
               assign: str = "client", per_socket: int = 1) -> list[list[tuple[list[int], int]]]:
    """(task ids, replica) per socket (socket s watches `socket_tasks(s)`; with one task per
    socket, client i watches task i % T + 1), split into shards."""
    sockets = clients // per_socket
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_shard = max(1, soft - 256)
    count = requested or max(1, math.ceil(sockets / per_shard))
    plan = [(socket_tasks(s, tasks, per_socket), replica_of(s, tasks, replicas, assign,
                                                            per_socket))
            for s in range(sockets)]
    return [plan[k::count] for k in range(count)]


class AccessRefused(RuntimeError):
    """Connections refused by the gateway's access control: the run measured nothing."""


def check_refusals(args: argparse.Namespace, connected: Sequence[dict[str, Any]]) -> None:
    """Raise AccessRefused when access control refused any connection of the connect phase
    (HTTP 401/403, close 4401/4403, `/ws` error frame 401/403): figures over refused clients
    would mean nothing."""
    refused: Counter[str] = Counter()
    for reply in connected:
        refused.update(reply["refused"])
    if not refused:
        return
    samples = [s for reply in connected for s in reply["error_samples"]][:1]
    if args.auth_client_secret:
        why = "the clients' tokens are signed with --auth-client-secret, not the gateway's secret"
    elif args.auth:
        why = "the clients' tokens do not open their tasks on this gateway"
    else:
        why = "the gateway requires tokens, and this run has no --auth"
    raise AccessRefused(
        f"access control refused {sum(refused.values())} of {args.clients // args.tasks_per_socket}"
        f" connections ({', '.join(f'{k}: {v}' for k, v in sorted(refused.items()))}"
        f"{'; e.g. ' + samples[0] if samples else ''}): {why}")


def mint_tokens(plan: Sequence[Sequence[tuple[list[int], int]]], secret: str,
                ttl_s: float) -> tuple[list[list[str]], dict[str, Any]]:
    """--auth: one token per connection, as the generation service would hand them out:
    `taskcast.tokens.issue` naming exactly the connection's task(s), HS256, with a `sub` of its
    own (no two connections share a token). Runs before the shards start, outside every timed
    phase. Returns the tokens per shard (in the order of the shard's clients) and a summary."""
    from taskcast.tokens import issue

    started = time.perf_counter()
    tokens = [[issue(secret, ids, ttl_s, claims={"sub": f"bench-{shard}-{index}"})
               for index, (ids, _replica) in enumerate(clients)]
              for shard, clients in enumerate(plan)]
    took = time.perf_counter() - started
    count = sum(len(part) for part in tokens)
    return tokens, {
        "tokens_minted": count,
        "token_bytes_mean": _round(sum(len(t) for part in tokens for t in part) / max(1, count),
                                   1),
        "mint_s": _round(took),
        "mint_us_per_token": _round(took * 1e6 / max(1, count), 1),
        "token_ttl_s": ttl_s,
    }


async def probe_access(gateways: Sequence[GatewayProc]) -> dict[str, Any]:
    """--auth: before any client connects, check that every replica enforces tokens:
    `GET /tasks/1` without a token is 401, with a token for task 1 (the gateway's secret) 200,
    with a token for task 2 only 403. Raises AccessRefused when a replica answers otherwise
    (a gateway without the key would make an "auth" run measure no access control at all)."""
    from taskcast.tokens import issue

    expected = {"without_token": 401, "token_for_task_1": 200, "token_for_task_2_only": 403}
    paths = {"without_token": "/tasks/1",
             "token_for_task_1": "/tasks/1?token=" + issue(BENCH_JWT_SECRET, [1], 60),
             "token_for_task_2_only": "/tasks/1?token=" + issue(BENCH_JWT_SECRET, [2], 60)}
    answers: list[dict[str, int]] = []
    for gateway in gateways:
        answers.append({name: (await http_get(gateway.port, path))[0]
                        for name, path in paths.items()})
        if answers[-1] != expected:
            raise AccessRefused(f"the gateway (replica {gateway.index}) does not enforce tokens "
                                f"as expected: GET /tasks/1 answered {answers[-1]}, expected "
                                f"{expected}")
    return {"expected": expected, "answers": answers[0], "replicas_probed": len(answers)}


class GatewayProc:
    """One gateway replica: `python -m taskcast serve` on its own port, pinned with taskset."""

    def __init__(self, index: int, port: int, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.index = index
        self.port = port
        self.proc = proc
        self.pid = proc.pid
        self.log = log


def run_budget(args: argparse.Namespace) -> float:
    """Seconds the measured part of a run may take (children and coordinator add a margin)."""
    budget: float
    if args.churn:
        budget = args.churn * (args.connect_timeout + args.hold + 2 * args.close_wait
                               + args.settle + 30.0)
    else:
        budget = (args.connect_timeout + args.duration + args.tasks / args.rate + args.grace
                  + args.hold)
    return budget


async def run_churn(args: argparse.Namespace, shards: Sequence[Child],
                    gateways: Sequence[GatewayProc], summary: dict[str, Any]) -> None:
    """`--churn R`: R rounds of: connect N watchers (each connection until its first task
    state), hold `--hold` s, close every connection from the client side, wait (at most
    `--close-wait` s) until the server's `taskcast_open_connections` gauge for the transport
    is 0, wait `--settle` s, read the server's VmRSS. Nothing is published."""
    pids = [g.pid for g in gateways]
    gauge = f'taskcast_open_connections{{transport="{args.transport}"}}'
    sockets = args.clients // args.tasks_per_socket
    polls = 0

    def cpu() -> float:
        return sum(proc_cpu_s(p) for p in pids)

    def rss() -> int:
        return sum(proc_rss_kib(p) for p in pids)

    async def open_gauge() -> float | None:
        """The gauge summed over the replicas; None when /metrics did not answer. A labelled
        gauge appears with its first connection, so before that its absence means 0."""
        nonlocal polls
        polls += 1
        values = [await gateway_metrics(g.port) for g in gateways]
        if any("metrics_unavailable" in v or "metrics_status" in v for v in values):
            return None
        return sum(v.get(gauge, 0.0) for v in values)

    await asyncio.sleep(args.settle)
    rss_start = rss()
    gauge_start = await open_gauge()
    rounds: list[dict[str, Any]] = []
    for number in range(1, args.churn + 1):
        if number > 1:
            for shard in shards:
                await shard.request("reset", 60)
        ticks_start = core_ticks()
        cpu_start = cpu()
        t0 = time.time()
        for shard in shards:
            await shard.send("connect")
        connected = [await shard.reply(args.connect_timeout + 60) for shard in shards]
        check_refusals(args, connected)
        t_connected = time.time()
        cpu_connected = cpu()
        rss_connected = rss()
        firsts = [wall for reply in connected for wall in reply["first_event_walls"]]
        ready = sum(reply["sockets_ready"] for reply in connected)
        await asyncio.sleep(args.hold)
        statuses = [await shard.request("status", 60) for shard in shards]
        closed = [await shard.request("client_close", args.close_wait + 60) for shard in shards]
        polls_before = polls
        gauge_started = time.monotonic()
        while True:
            gauge_value = await open_gauge()
            gauge_waited = time.monotonic() - gauge_started
            if gauge_value == 0 or gauge_waited >= args.close_wait:
                break
            await asyncio.sleep(0.1)
        cpu_closed = cpu()
        ticks_closed = core_ticks()
        t_closed = time.time()
        await asyncio.sleep(args.settle)
        rss_after = rss()
        errors: Counter[str] = Counter()
        violations: Counter[str] = Counter()
        close_codes: Counter[str] = Counter()
        for reply in closed:
            errors.update(reply["errors"])
            violations.update(reply["violations"])
            close_codes.update(reply["close_codes"])
        record: dict[str, Any] = {
            "round": number,
            "connections": sockets,
            "with_first_event": len(firsts),
            "connections_ready": ready,
            "failed": args.clients - len(firsts),
            "connect_time_s": _round(max(firsts) - t0 if len(firsts) == args.clients
                                     else None),
            "open_after_hold": sum(st["open"] for st in statuses),
            "client_close": {
                "closed": sum(reply["closed"] for reply in closed),
                "aborted_after_timeout": sum(reply["aborted_after_timeout"] for reply in closed),
                "took_s": max((reply["took_s"] for reply in closed), default=0.0),
                "ws_close_codes": dict(close_codes),
            },
            "open_gauge_after_close": gauge_value,
            "open_gauge_zero": gauge_value == 0,
            "open_gauge_wait_s": _round(gauge_waited, 2),
            "metrics_polls": polls - polls_before,
            "rss_connected_kib": rss_connected,
            "rss_after_round_kib": rss_after,
            "fds_after_round": sum(proc_fd_count(p) for p in pids),
            "gateway_cpu_connect_s": _round(cpu_connected - cpu_start),
            "gateway_cpu_us_per_connection": _round(
                (cpu_connected - cpu_start) * 1e6 / ready, 1) if ready else None,
            "gateway_cpu_round_s": _round(cpu_closed - cpu_start),
            "gateway_cpu_us_per_connection_cycle": _round(
                (cpu_closed - cpu_start) * 1e6 / ready, 1) if ready else None,
            "round_s": _round(t_closed - t0, 2),
            "connect_s": _round(t_connected - t0, 3),
            "errors": dict(errors),
            "error_samples": [x for reply in closed for x in reply["error_samples"]][:5],
            "violations": dict(violations),
            "machine": core_busy(ticks_start, ticks_closed),
        }
        record["gateway_core_busy_by_others_pct"] = _others(
            {"gateway_cpu_util_pct": _round(100.0 * (cpu_closed - cpu_start)
                                            / max(1e-9, t_closed - t0), 1),
             "machine": record["machine"]}, args.gateway_cpu)
        rounds.append(record)
    first, last = rounds[0]["rss_after_round_kib"], rounds[-1]["rss_after_round_kib"]
    growth = 100.0 * (last - first) / max(1, first)
    summary["churn"] = {
        "rounds": args.churn,
        "transport": args.transport,
        "ws_endpoint": args.ws_endpoint if args.transport == "ws" else None,
        "tasks_per_socket": args.tasks_per_socket,
        "watchers_per_round": args.clients,
        "connections_per_round": sockets,
        "hold_s": args.hold,
        "settle_s": args.settle,
        "close_wait_s": args.close_wait,
        "open_gauge": gauge + (" (sum over replicas)" if len(gateways) > 1 else ""),
        "open_gauge_before_rounds": gauge_start,
        "rss_before_rounds_kib": rss_start,
        "rss_after_round_kib": [r["rss_after_round_kib"] for r in rounds],
        "rss_growth_round_1_to_last_pct": _round(growth, 2),
        "rss_growth_per_round_kib": _round((last - first) / (len(rounds) - 1), 1)
        if len(rounds) > 1 else None,
        "rss_round_last_within_10pct_of_round_1": growth <= 10.0,
        "gateway_cpu_us_per_connection_by_round": [r["gateway_cpu_us_per_connection"]
                                                   for r in rounds],
        "gateway_cpu_us_per_connection_cycle_by_round": [
            r["gateway_cpu_us_per_connection_cycle"] for r in rounds],
        "all_rounds_connected": all(r["failed"] == 0 for r in rounds),
        "all_rounds_open_gauge_zero": all(r["open_gauge_zero"] for r in rounds),
        "per_round": rounds,
    }


async def coordinate(args: argparse.Namespace, redis_url: str, redis_pids: list[int],
                     gateways: list[GatewayProc], workdir: Path,
                     summary: dict[str, Any]) -> None:
    pids = [g.pid for g in gateways]
    task_ids = list(range(1, args.tasks + 1))
    for gateway in gateways:
        await wait_ready(gateway.port, gateway.proc)
    await create_tasks(redis_url, task_ids)

    plan = shard_plan(args.clients, args.tasks, args.client_procs, len(gateways),
                      args.replica_assign, args.tasks_per_socket)
    tokens: list[list[str]] = [[] for _ in plan]
    if args.auth:
        summary["auth"] = {
            "algorithm": "HS256", "secret_bytes": len(BENCH_JWT_SECRET.encode()),
            "gateway_key": "none (--auth-without-key: a control run)" if args.auth_without_key
            else "TASKCAST_JWT_SECRET in the gateway's environment",
            "client_secret": "other (--auth-client-secret)" if args.auth_client_secret
            else "the gateway's",
            "presented_as": "query parameter ?token= (SSE, /tasks/{id}/ws and /ws)",
            "minted_by": "the coordinator, taskcast.tokens.issue, before the shards start "
                         "(outside every timed phase)",
        }
        if not args.auth_without_key:  # the control run's gateway checks nothing
            summary["auth"]["probe"] = await probe_access(gateways)
        tokens, minted = mint_tokens(plan, args.auth_client_secret or BENCH_JWT_SECRET,
                                     run_budget(args) + 1200.0)
        summary["auth"].update(minted)
    assigned: Counter[int] = Counter()
    assigned_sockets: Counter[int] = Counter()
    for shard_clients in plan:
        for ids, index in shard_clients:
            assigned[index] += len(ids)
            assigned_sockets[index] += 1
    summary["scenario"]["client_procs"] = len(plan)
    max_runtime = run_budget(args) + 300.0
    children: list[Child] = []
    profiler = PySpy(args.py_spy, args.py_spy_phase, args.py_spy_native)
    child_log = (workdir / "children.log").open("ab")
    replicas: list[dict[str, Any]] = [
        {"replica": g.index, "port": g.port, "pid": g.pid, "clients": assigned[g.index]}
        for g in gateways]
    if args.tasks_per_socket > 1:
        for replica in replicas:
            replica["sockets"] = assigned_sockets[replica["replica"]]
    # The raw server serves only the open-connection gauges (for --churn): the other figures
    # taken from /metrics would read as zeros, so they are skipped and marked as such.
    skip_metrics = args.server == "raw"

    async def metrics_all() -> list[dict[str, float]]:
        if skip_metrics:
            return [{} for _ in gateways]
        return [await gateway_metrics(g.port) for g in gateways]

    def mdelta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
        if skip_metrics:
            return {"skipped": "--server raw has no taskcast metrics"}
        return metrics_delta(before, after)

    def cpu_all() -> dict[int, float]:
        return {p: proc_cpu_s(p) for p in pids}

    def rss_all() -> dict[int, int]:
        return {p: proc_rss_kib(p) for p in pids}

    try:
        shards = [
            await spawn_child(f"shard {k}", "--shard-child", {
                "ports": [g.port for g in gateways], "clients": shard_clients,
                "tokens": tokens[k],
                "transport": args.transport, "ws_endpoint": args.ws_endpoint,
                "concurrency": max(1, math.ceil(args.connect_concurrency / len(plan))),
                "connect_timeout": args.connect_timeout, "max_runtime": max_runtime,
                "close_wait": args.close_wait, "rt": args.rt,
            }, child_log, children)
            for k, shard_clients in enumerate(plan)
        ]
        if args.churn:
            await run_churn(args, shards, gateways, summary)
            return
        publisher: Child | None = None
        if not args.idle_only:
            publisher = await spawn_child("publisher", "--publisher-child", {
                "redis_url": redis_url, "prefix": PREFIX, "task_ids": task_ids,
                "rate": args.rate, "progress_events": int(args.rate * args.duration),
                "max_in_flight": args.max_in_flight, "max_runtime": max_runtime,
                "publisher_mode": args.publisher,
                "rt": args.rt,
            }, child_log, children)

        await asyncio.sleep(args.settle)
        metrics_start = await metrics_all()
        await asyncio.sleep(0.2)
        rss_before = rss_all()
        fds_before = {p: proc_fd_count(p) for p in pids}
        profiler.start("connect", pids[0])

        # -- connect ------------------------------------------------------------------------
        cpu_before = cpu_all()
        ticks_before = core_ticks()
        t0 = time.time()
        for shard in shards:
            await shard.send("connect")
        connected = [await shard.reply(args.connect_timeout + 60) for shard in shards]
        cpu_connected = cpu_all()
        ticks_connected = core_ticks()
        t_connected = time.time()
        rss_connected = rss_all()
        firsts = [wall for reply in connected for wall in reply["first_event_walls"]]
        firsts_by_replica: dict[int, list[float]] = {g.index: [] for g in gateways}
        for reply in connected:
            for wall, replica in zip(reply["first_event_walls"], reply["first_event_replicas"],
                                     strict=True):
                firsts_by_replica[replica].append(wall)
        connect_errors: Counter[str] = Counter()
        ready_by_replica: Counter[int] = Counter()
        for reply in connected:
            connect_errors.update(reply["errors"])
            ready_by_replica.update({int(k): v for k, v in
                                     reply["sockets_ready_by_replica"].items()})
        # A connection is ready once it has the first state of every task it watches: with
        # one task per socket that is every client with a first event; on /ws sockets of K
        # tasks, RSS and CPU per connection are per socket.
        sockets_ready = sum(reply["sockets_ready"] for reply in connected)
        all_connected = len(firsts) == args.clients
        connect_profile = profiler.stop()
        await asyncio.sleep(args.settle)
        rss_idle = rss_all()
        fds_idle = {p: proc_fd_count(p) for p in pids}
        connect_cpu = sum(cpu_connected.values()) - sum(cpu_before.values())
        summary["connect"] = {
            "transport": args.transport,
            "clients": args.clients,
            "with_first_event": len(firsts),
            "failed": args.clients - len(firsts),
            "connect_time_s": _round(max(firsts) - t0 if all_connected else None),
            "time_to_first_event_ms": distribution([(w - t0) * 1000.0 for w in firsts]),
            "timed_out": any(reply["timed_out"] for reply in connected),
            "errors": dict(connect_errors),
            "error_samples": [s for reply in connected for s in reply["error_samples"]][:8],
            "gateway_cpu_s": _round(connect_cpu),
            "gateway_cpu_us_per_connection": _round(connect_cpu * 1e6 / max(1, sockets_ready),
                                                    1),
            "gateway_cpu_util_pct": _round(
                100.0 * connect_cpu / max(1e-9, t_connected - t0), 1),
            "machine": core_busy(ticks_before, ticks_connected),
        }
        if args.ws_endpoint == "many":
            summary["connect"].update({
                "ws_endpoint": "/ws", "tasks_per_socket": args.tasks_per_socket,
                "sockets": args.clients // args.tasks_per_socket, "sockets_ready": sockets_ready,
                "gateway_cpu_us_per_watcher": _round(connect_cpu * 1e6 / max(1, len(firsts)),
                                                     1),
                "violations": dict(sum((Counter(r["violations"]) for r in connected),
                                       Counter())),
            })
        summary["connect"]["gateway_core_busy_by_others_pct"] = _others(
            summary["connect"], args.gateway_cpu)
        if args.auth:
            summary["connect"]["refused_by_access_control"] = dict(
                sum((Counter(reply["refused"]) for reply in connected), Counter()))
        check_refusals(args, connected)
        metrics_connected = await metrics_all()
        summary["gateway_metrics_connect"] = mdelta(sum_metrics(metrics_start),
                                                    sum_metrics(metrics_connected))
        rss_delta = sum(rss_idle.values()) - sum(rss_before.values())
        summary["memory"] = {
            "rss_before_kib": sum(rss_before.values()),
            "rss_all_connected_kib": sum(rss_connected.values()),
            "rss_idle_kib": sum(rss_idle.values()),
            "fds_before": sum(fds_before.values()),
            "fds_idle": sum(fds_idle.values()),
            "rss_per_idle_connection_kib": _round(rss_delta / max(1, sockets_ready), 2),
        }
        if args.ws_endpoint == "many":
            summary["memory"]["rss_per_idle_watcher_kib"] = _round(
                rss_delta / max(1, len(firsts)), 2)
        for g, replica in zip(gateways, replicas, strict=True):
            mine = firsts_by_replica[g.index]
            ready = ready_by_replica[g.index]
            cpu = cpu_connected[g.pid] - cpu_before[g.pid]
            replica["connect"] = {
                "with_first_event": len(mine),
                "connect_time_s": _round(max(mine) - t0 if len(mine) == replica["clients"]
                                         and mine else None),
                "gateway_cpu_s": _round(cpu),
                "gateway_cpu_us_per_connection": _round(cpu * 1e6 / max(1, ready), 1),
            }
            replica["memory"] = {
                "rss_before_kib": rss_before[g.pid], "rss_idle_kib": rss_idle[g.pid],
                "fds_idle": fds_idle[g.pid],
                "rss_per_idle_connection_kib": _round(
                    (rss_idle[g.pid] - rss_before[g.pid]) / max(1, ready), 2),
            }
            replica["metrics_connect"] = mdelta(metrics_start[g.index],
                                                metrics_connected[g.index])
        if connect_profile is not None:
            summary["profile"] = connect_profile

        if args.idle_only:
            await asyncio.sleep(args.hold)
            statuses = [await shard.request("status", 60) for shard in shards]
            still_open = sum(s["open"] for s in statuses)
            hold_errors: Counter[str] = Counter()
            open_by_replica: Counter[str] = Counter()
            hold_close_codes: Counter[str] = Counter()
            for status in statuses:
                hold_errors.update(status["errors"])
                open_by_replica.update(status["open_by_replica"])
                hold_close_codes.update(status["close_codes"])
            cpu_hold = cpu_all()
            summary["idle"] = {
                "hold_s": args.hold,
                "open_after_hold": still_open,
                "rss_after_hold_kib": sum(rss_all().values()),
                "fds_after_hold": sum(proc_fd_count(p) for p in pids),
                "gateway_cpu_during_hold_s": _round(
                    sum(cpu_hold.values()) - sum(cpu_connected.values())),
                "errors": dict(hold_errors),
                "error_samples": [s for st in statuses for s in st["error_samples"]][:8],
                "keepalive_comments": sum(s["keepalives"] for s in statuses),
                "ws_pings": sum(s["pings"] for s in statuses),
                "ws_close_codes": dict(hold_close_codes),
            }
            metrics_end = await metrics_all()
            summary["gateway_metrics"] = mdelta(sum_metrics(metrics_start),
                                                sum_metrics(metrics_end))
            for g, replica in zip(gateways, replicas, strict=True):
                replica["idle"] = {
                    "open_after_hold": open_by_replica.get(str(g.index), 0),
                    "gateway_cpu_during_hold_s": _round(cpu_hold[g.pid] - cpu_connected[g.pid]),
                }
                replica["metrics"] = mdelta(metrics_start[g.index], metrics_end[g.index])
            return

        # -- publish ------------------------------------------------------------------------
        assert publisher is not None
        for shard in shards:
            await shard.request("window", 30)
        metrics_window = await metrics_all()
        profiler.start("publish", pids[0])
        side_pids = [os.getpid(), *redis_pids, publisher.pid, *(s.pid for s in shards)]
        side_cpu_before = {p: side_cpu_s(p) for p in side_pids}
        cpu_window_start = cpu_all()
        ticks_window_start = core_ticks()
        wall_go = time.time()
        sampler = asyncio.create_task(cpu_timeline(pids, wall_go))
        await publisher.send("go")
        published = await publisher.reply(args.duration + args.tasks / args.rate + 120)
        grace_deadline = time.monotonic() + args.grace
        for shard in shards:
            remaining = grace_deadline - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await shard.settled.wait()
        cpu_window_end = cpu_all()
        ticks_window_end = core_ticks()
        sampler.cancel()
        gateway_timeline = await asyncio.gather(sampler, return_exceptions=True)
        wall_end = time.time()
        side_cpu = {p: side_cpu_s(p) - side_cpu_before[p] for p in side_pids}
        publish_profile = profiler.stop()
        reports = [await shard.request("report", 120) for shard in shards]
        metrics_end = await metrics_all()
        rss_after = rss_all()
        closing = await wait_closed(shards, args.close_wait)
        cpu_closed = sum(cpu_all().values())

        latencies_by_replica: dict[int, list[float]] = {g.index: [] for g in gateways}
        deliveries_by_replica: Counter[int] = Counter()
        lost_by_replica: Counter[int] = Counter()
        for report in reports:
            for replica_key, values in report["latencies"].items():
                latencies_by_replica[int(replica_key)].extend(values)
            deliveries_by_replica.update({int(k): v for k, v in
                                          report["deliveries_by_replica"].items()})
            lost_by_replica.update({int(k): v for k, v in report["lost_by_replica"].items()})
        latencies = [x for values in latencies_by_replica.values() for x in values]
        terminal_latencies = [x for r in reports for x in r["terminal_latencies"]]
        deliveries = sum(r["deliveries"] for r in reports)
        last_delivery = max((r["last_delivery"] for r in reports), default=0.0)
        lost: Counter[str] = Counter()
        violations: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        close_codes: Counter[str] = Counter()
        for report in reports:
            lost.update(report["lost"])
            violations.update(report["violations"])
            errors.update(report["errors"])
            close_codes.update(report["close_codes"])
        settled = all(shard.settled.is_set() for shard in shards)
        window_end = max((s.settled_wall for s in shards), default=0.0) if settled else wall_end
        cpu_window = sum(cpu_window_end.values()) - sum(cpu_window_start.values())
        delivery_span = last_delivery - wall_go if last_delivery else 0.0
        fanout = args.clients / args.tasks
        summary["publish"] = {
            "events_scheduled": published["scheduled"],
            "events_ok": published["ok"],
            "publish_errors": published["errors"],
            "publish_error_samples": published["error_samples"],
            "publisher_achieved_rate": published["achieved_rate"],
            "publisher_max_schedule_lag_ms": published["max_schedule_lag_ms"],
            "publisher_slowest_call_ms": published["slowest_call"]["ms"],
            "publisher_slowest_call_at_s": _round(published["slowest_call"]["wall"] - wall_go)
            if published["slowest_call"]["wall"] else None,
            "publisher_calls_over_100ms": published["calls_over_100ms"],
            "publish_span_s": _round(published["wall_end"] - published["wall_start"]),
            "publisher_start_delay_s": _round(published["wall_start"] - wall_go),
            "deliveries": deliveries,
            "deliveries_expected_without_conflation": int(published["ok"] * fanout),
            "deliveries_per_s": _round(deliveries / delivery_span if delivery_span else None, 1),
            "delivery_span_s": _round(delivery_span),
            "latency_ms": distribution(latencies),
            "terminal_latency_ms": distribution(terminal_latencies),
            "terminal_received": sum(r["terminals"] for r in reports),
            "lost_terminal_states": sum(lost.values()),
            "lost_reasons": dict(lost),
            "all_settled_before_grace_end": settled,
            "grace_s": args.grace,
            "order_violations": dict(violations),
            "client_errors": dict(errors),
            "client_error_samples": [s for r in reports for s in r["error_samples"]][:8],
            "other_events": dict(sum((Counter(r["other_events"]) for r in reports), Counter())),
            "ws_close_codes": dict(close_codes),
            "ws_pings": sum(r["pings"] for r in reports),
            **({"ws_subscribed_frames": sum(r["subscribed_frames"] for r in reports),
                "sockets": sum(r["sockets"] for r in reports)}
               if args.ws_endpoint == "many" else {}),
            "connections_open_at_report": sum(r["open_at_report"] for r in reports),
            "after_terminal": closing,
            "window_s": _round(window_end - wall_go),
            "gateway_cpu_s": _round(cpu_window),
            "gateway_cpu_util_pct": _round(100.0 * cpu_window / max(1e-9, wall_end - wall_go), 1),
            "gateway_cpu_us_per_delivery": _round(cpu_window * 1e6 / deliveries, 2)
            if deliveries else None,
            "rss_after_publish_kib": sum(rss_after.values()),
            # The window above ends with the last terminal state; the per-task WebSockets
            # close after that (close handshake), SSE streams end with the terminal frame.
            "gateway_cpu_us_per_delivery_incl_close": _round(
                (cpu_closed - sum(cpu_window_start.values())) * 1e6 / deliveries, 2)
            if deliveries else None,
        }
        summary["load_side"] = {
            "coordinator_cpu_s": _round(side_cpu[os.getpid()]),
            "redis_cpu_s": _round(sum(side_cpu[p] for p in redis_pids)),
            "redis_cpu_s_per_node": [_round(side_cpu[p]) for p in redis_pids],
            "publisher_cpu_s": _round(side_cpu[publisher.pid]),
            "shards_cpu_s": _round(sum(side_cpu[s.pid] for s in shards)),
            "client_core_util_pct": _round(
                100.0 * sum(side_cpu.values()) / max(1e-9, wall_end - wall_go), 1),
            "shard_loop_lag_ms": [r["loop_lag_ms"] for r in reports],
            "machine": core_busy(ticks_window_start, ticks_window_end),
        }
        summary["publish"]["gateway_core_busy_by_others_pct"] = _others(
            {"gateway_cpu_util_pct": summary["publish"]["gateway_cpu_util_pct"],
             "machine": summary["load_side"]["machine"]}, args.gateway_cpu)
        summary["gateway_metrics"] = mdelta(sum_metrics(metrics_window),
                                            sum_metrics(metrics_end))
        for g, replica in zip(gateways, replicas, strict=True):
            cpu = cpu_window_end[g.pid] - cpu_window_start[g.pid]
            count = deliveries_by_replica[g.index]
            replica["publish"] = {
                "deliveries": count,
                "deliveries_per_s": _round(count / delivery_span if delivery_span else None, 1),
                "latency_ms": distribution(latencies_by_replica[g.index]),
                "lost_terminal_states": lost_by_replica[g.index],
                "gateway_cpu_s": _round(cpu),
                "gateway_cpu_util_pct": _round(100.0 * cpu / max(1e-9, wall_end - wall_go), 1),
                "gateway_cpu_us_per_delivery": _round(cpu * 1e6 / count, 2) if count else None,
                "rss_after_publish_kib": rss_after[g.pid],
            }
            replica["metrics"] = mdelta(metrics_window[g.index], metrics_end[g.index])
        summary["timeline"] = timeline(reports, wall_go, gateway_timeline[0])
        summary["publish"]["shards_settled"] = [r["settled"] for r in reports]
        if publish_profile is not None:
            summary["profile"] = publish_profile
    finally:
        summary["replicas"] = replicas
        with contextlib.suppress(Exception):
            profiler.stop()
        for child in reversed(children):
            with contextlib.suppress(Exception):
                await child.stop()
        child_log.close()


def evaluate(summary: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if args.churn:
        churn = summary.get("churn")
        if churn:
            targets["churn_rss_stable"] = {
                "target": "RSS after the last round <= 110 % of RSS after round 1",
                "measured": f"{churn['rss_growth_round_1_to_last_pct']} %",
                "met": churn["rss_round_last_within_10pct_of_round_1"]}
        return targets
    memory = summary.get("memory", {})
    connect = summary.get("connect", {})
    per_conn = memory.get("rss_per_idle_connection_kib")
    if per_conn is not None:
        targets["rss_per_idle_connection"] = {
            "target": f"<= {TARGET_RSS_KIB_PER_CONN} KiB", "measured": f"{per_conn} KiB",
            "met": per_conn <= TARGET_RSS_KIB_PER_CONN}
    if args.clients == 5000:
        seconds = connect.get("connect_time_s")
        targets["connect_5000"] = {
            "target": f"<= {TARGET_CONNECT_S_FOR_5000} s",
            "measured": f"{seconds} s" if seconds is not None
            else f"{connect.get('failed')} clients never got a first event",
            "met": seconds is not None and seconds <= TARGET_CONNECT_S_FOR_5000}
    if args.idle_only and args.clients >= TARGET_IDLE_CONNECTIONS:
        held = summary.get("idle", {}).get("open_after_hold", 0)
        targets["idle_20000"] = {
            "target": f"{TARGET_IDLE_CONNECTIONS} idle connections held",
            "measured": f"{held} open after {args.hold} s "
                        f"({connect.get('with_first_event')} got a first event)",
            "met": held >= TARGET_IDLE_CONNECTIONS
            and connect.get("with_first_event", 0) >= TARGET_IDLE_CONNECTIONS}
    publish = summary.get("publish")
    if publish:
        lost = publish["lost_terminal_states"]
        targets["lost_terminal_states"] = {"target": "0", "measured": str(lost), "met": lost == 0}
        cpu = publish["gateway_cpu_us_per_delivery"]
        targets["cpu_per_delivery"] = {
            "target": f"<= {TARGET_CPU_US_PER_DELIVERY} us", "measured": f"{cpu} us",
            "met": cpu is not None and cpu <= TARGET_CPU_US_PER_DELIVERY}
        p99 = publish["latency_ms"]["p99"]
        targets["latency_p99"] = {
            "target": f"<= {TARGET_P99_MS} ms", "measured": f"{p99} ms",
            "met": p99 is not None and p99 <= TARGET_P99_MS}
    return targets


def transport_label(args: argparse.Namespace) -> str:
    if args.transport == "ws" and args.ws_endpoint == "many":
        return f"WS /ws K={args.tasks_per_socket} ({args.clients // args.tasks_per_socket} sockets)"
    return str(args.transport).upper()


def failed_line(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """A run that ended with an error reports the error, not figures."""
    mode = f"CHURN {args.churn} rounds " if args.churn else ""
    auth = " auth" if args.auth else ""
    return (f"{mode}{transport_label(args)} N={args.clients} T={args.tasks}{auth} | "
            f"FAILED: {summary['error']}")


def auth_label(args: argparse.Namespace) -> str:
    """--auth in a summary line; the control run says that nothing was checked."""
    if args.auth_without_key:
        return "tokens in the URLs, gateway without a key (control)"
    return "auth (a token per connection, ?token=)"


def churn_line(summary: dict[str, Any], args: argparse.Namespace) -> str:
    parts = [f"CHURN {transport_label(args)} N={args.clients} T={args.tasks} "
             f"{args.churn} rounds, hold {args.hold:g} s"]
    if args.auth:
        parts.append(auth_label(args))
    if args.server == "raw":
        parts.append("raw ceiling server")
    if args.replicas > 1:
        parts.append(f"{args.replicas} replicas")
    churn = summary.get("churn")
    if churn:
        rounds = churn["per_round"]
        parts.append("RSS after each round " + ", ".join(
            str(r) for r in churn["rss_after_round_kib"]) + " KiB")
        parts.append(f"round 1 -> {len(rounds)}: {churn['rss_growth_round_1_to_last_pct']:+} %")
        parts.append("rss_round_last_within_10pct_of_round_1="
                     + str(churn["rss_round_last_within_10pct_of_round_1"]).lower())
        parts.append("CPU us/conn per round (connect) " + ", ".join(
            str(x) for x in churn["gateway_cpu_us_per_connection_by_round"]))
        parts.append("(connect+hold+close) " + ", ".join(
            str(x) for x in churn["gateway_cpu_us_per_connection_cycle_by_round"]))
        failed = sum(r["failed"] for r in rounds)
        parts.append(f"connect failures {failed}"
                     + (f" (WARNING; e.g. {rounds[0]['error_samples'][:1]})" if failed else ""))
        if not churn["all_rounds_open_gauge_zero"]:
            parts.append("WARNING: the open-connection gauge did not return to 0: " + ", ".join(
                f"round {r['round']}: {r['open_gauge_after_close']}" for r in rounds
                if not r["open_gauge_zero"]))
        violations = sum(sum(r["violations"].values()) for r in rounds)
        if violations:
            parts.append(f"violations {violations}")
        worst = max((r["gateway_core_busy_by_others_pct"] or 0.0 for r in rounds), default=0.0)
        if worst > 10.0 and not args.rt:
            parts.append(f"WARNING: other processes kept the gateway core {worst}% busy")
    if args.rt:
        parts.append(f"SCHED_FIFO {args.rt}")
    return " | ".join(parts)


def human_line(summary: dict[str, Any], args: argparse.Namespace) -> str:
    if summary.get("error"):
        return failed_line(summary, args)
    if args.churn:
        return churn_line(summary, args)
    connect = summary.get("connect", {})
    memory = summary.get("memory", {})
    parts = [f"{transport_label(args)} N={args.clients} T={args.tasks}"]
    if args.auth:
        parts.append(auth_label(args))
    if args.server == "raw":
        parts.append("raw ceiling server")
    if args.replicas > 1:
        parts.append(f"{args.replicas} replicas ({args.replica_assign})")
    if args.cluster:
        parts.append("Redis Cluster")
    if args.idle_only:
        parts.append("idle-only")
    else:
        parts.append(f"R={args.rate:g}/s D={args.duration:g}s")
    parts.append(f"connect {connect.get('connect_time_s')} s "
                 f"({connect.get('failed')} failed)")
    parts.append(f"RSS {memory.get('rss_per_idle_connection_kib')} KiB/idle conn")
    if "idle" in summary:
        parts.append(f"{summary['idle']['open_after_hold']} open after hold")
    publish = summary.get("publish")
    if publish:
        latency = publish["latency_ms"]
        parts.append(f"{publish['deliveries_per_s']} deliveries/s")
        parts.append(f"latency p50 {latency['p50']} p99 {latency['p99']} max {latency['max']} ms")
        parts.append(f"lost terminals {publish['lost_terminal_states']}")
        parts.append(f"gateway CPU {publish['gateway_cpu_us_per_delivery']} us/delivery")
    met = [name for name, t in summary.get("targets", {}).items() if t["met"]]
    missed = [name for name, t in summary.get("targets", {}).items() if not t["met"]]
    parts.append(f"targets met: {', '.join(met) or '-'}; not met: {', '.join(missed) or '-'}")
    others = [summary.get(phase, {}).get("gateway_core_busy_by_others_pct")
              for phase in ("connect", "publish")]
    worst = max((x for x in others if x is not None), default=0.0)
    if worst > 10.0 and not args.rt:
        parts.append(f"WARNING: other processes kept the gateway core {worst}% busy")
    if args.replicas > 1:
        for replica in summary.get("replicas", []):
            pub = replica.get("publish", {})
            parts.append(
                f"replica {replica['replica']}: {replica['clients']} clients, "
                f"{replica.get('memory', {}).get('rss_per_idle_connection_kib')} KiB/conn"
                + (f", {pub.get('deliveries_per_s')} deliveries/s, "
                   f"{pub.get('gateway_cpu_us_per_delivery')} us/delivery, "
                   f"p99 {pub.get('latency_ms', {}).get('p99')} ms" if pub else ""))
    if publish and publish["publish_span_s"] > 1.2 * (args.duration + args.tasks / args.rate) + 1:
        parts.append(f"WARNING: the publisher took {publish['publish_span_s']} s "
                     f"(slowest call {publish['publisher_slowest_call_ms']} ms)")
    if args.rt:
        parts.append(f"SCHED_FIFO {args.rt}")
    return " | ".join(parts)


def scenario_extras(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario keys of the newer options, only where they differ from the defaults (so the
    summaries of the original runs keep their shape)."""
    extras: dict[str, Any] = {}
    if args.ws_endpoint == "many":
        extras["ws_endpoint"] = "/ws"
        extras["tasks_per_socket"] = args.tasks_per_socket
        extras["sockets"] = args.clients // args.tasks_per_socket
    if args.server == "raw":
        extras["server"] = "raw (bench/raw_ws_server.py, a ceiling)"
        extras["raw_server_sha1"] = hashlib.sha1(RAW_SERVER.read_bytes()).hexdigest()[:12]
        extras["gateway_metrics"] = ("skipped: the raw server serves only "
                                     "taskcast_open_connections (used by --churn)")
    if args.churn:
        extras.update(churn_rounds=args.churn, hold_s=args.hold, settle_s=args.settle,
                      close_wait_s=args.close_wait)
    return extras


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    cpus = os.sched_getaffinity(0)
    if args.client_cpu not in cpus or args.gateway_cpu not in cpus:
        raise SystemExit(f"cpus {args.gateway_cpu}/{args.client_cpu} not available: {cpus}")
    os.sched_setaffinity(0, {args.client_cpu})  # inherited by redis, shards, publisher
    quiet = wait_quiet(args.wait_quiet, args.quiet_pct) if args.wait_quiet > 0 else None
    limits = raise_nofile(args.clients + 1024)
    python = args.python or str(ROOT / ".venv" / "bin" / "python")
    summary: dict[str, Any] = {
        "scenario": {
            "clients": args.clients, "tasks": args.tasks, "rate": args.rate,
            "duration_s": args.duration, "idle_only": args.idle_only,
            "transport": args.transport, "replicas": args.replicas,
            "replica_assign": args.replica_assign if args.replicas > 1 else None,
            "redis": "cluster of 3 primaries" if args.cluster else "single redis-server",
            "connect_concurrency": args.connect_concurrency, "grace_s": args.grace,
            "gateway_cpu": args.gateway_cpu, "client_cpu": args.client_cpu,
            "machine_quiet_at_start": quiet,
            "sched_fifo_priority": args.rt,
            "gateway_gc_threshold": args.gateway_gc_threshold or "as shipped (taskcast.cli)",
            "auth": args.auth,
            **scenario_extras(args),
            "nofile": limits, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpus": os.cpu_count(), "gateway_python": python,
            "versions": gateway_versions(python),
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "source": git_describe(),
            "other_benchmarks_at_start": foreign_benchmarks(ancestors()),
        },
    }
    workdir = Path(tempfile.mkdtemp(prefix="taskcast-bench-"))
    redis_procs: list[subprocess.Popen[bytes]] = []
    gateways: list[GatewayProc] = []
    try:
        if args.cluster:
            ports = start_redis_cluster(workdir, redis_rt_prefix(args.rt), redis_procs)
            redis_url = f"redis+cluster://127.0.0.1:{ports[0]}/0"
            summary["scenario"]["redis_ports"] = ports
        else:
            redis_port = free_port()
            redis_procs.append(start_redis(workdir, redis_port, redis_rt_prefix(args.rt)))
            wait_redis(redis_port, redis_procs[0])
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        summary["scenario"]["redis_url"] = redis_url
        entry = ["-m", "taskcast"]
        if args.gateway_gc_threshold:
            # What-if experiment only: the same CLI with other GC thresholds (src untouched).
            # taskcast.cli tunes the collector itself since 4917c84; patch that out.
            entry = ["-c", "import gc, sys; import taskcast.cli as cli; "
                     f"cli._tune_gc = lambda: gc.set_threshold({args.gateway_gc_threshold}); "
                     "sys.exit(cli.main(sys.argv[1:]))"]
        if args.server == "raw":
            # The ceiling server in place of `taskcast serve`: same flags, core, priority.
            entry = [str(RAW_SERVER)]
        # Access control is the bench's to choose (--auth), never the caller's shell's.
        gateway_env = {k: v for k, v in os.environ.items() if k not in GATEWAY_ACCESS_ENV}
        if args.auth and not args.auth_without_key:
            gateway_env["TASKCAST_JWT_SECRET"] = BENCH_JWT_SECRET  # secrets: environment only
        # The bench measures how many connections one process holds: no cap, no lifetime.
        gateway_env.setdefault("TASKCAST_MAX_CONNECTIONS", "0")
        gateway_env.setdefault("TASKCAST_MAX_STREAM_S", "0")
        removed = sorted(set(os.environ) & set(GATEWAY_ACCESS_ENV))
        if removed:
            summary["scenario"]["caller_env_not_passed_to_gateway"] = removed
        for index in range(args.replicas):
            port = free_port()
            log_path = workdir / f"gateway{index}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    ["taskset", "-c", str(args.gateway_cpu), *rt_prefix(args.rt), python,
                     *entry, *(["serve"] if args.server == "taskcast" else []),
                     "--redis-url", redis_url, "--prefix", PREFIX, "--port", str(port),
                     "--log-level", "warning"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=gateway_env,
                )
            gateways.append(GatewayProc(index, port, proc, log_path))
        summary["scenario"]["gateway_pid"] = gateways[0].pid
        summary["scenario"]["gateway_pids"] = [g.pid for g in gateways]
        try:
            run_loop(asyncio.wait_for(
                coordinate(args, redis_url, [p.pid for p in redis_procs], gateways, workdir,
                           summary),
                run_budget(args) + 600.0))
        except Exception as exc:  # reported in the summary; the finally still cleans up
            summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["scenario"]["other_benchmarks_at_end"] = foreign_benchmarks(
            ancestors() | {g.pid for g in gateways} | {p.pid for p in redis_procs}
            | {int(c) for c in children_of(os.getpid())})
        exited = {g.index: g.proc.returncode for g in gateways if g.proc.poll() is not None}
        if exited:
            summary["gateway_exited_during_run"] = exited
    finally:
        codes = [stop_process(g.proc) for g in gateways]
        for redis_proc in redis_procs:
            stop_process(redis_proc)
        summary["gateway_exit_code"] = codes[0] if len(codes) == 1 else codes
        logs = [scan_log(g.log) for g in gateways]
        summary["gateway_log"] = logs[0] if len(logs) == 1 else logs
        for replica, log_summary in zip(summary.get("replicas", []), logs, strict=False):
            replica["log"] = {k: log_summary[k] for k in ("lines", "error_lines", "warning_lines")
                              if k in log_summary}
        redis_logs = sorted(workdir.glob("**/redis.log"))
        summary["redis_log_warnings"] = [
            line for path in redis_logs for line in path.read_text(errors="replace").splitlines()
            if " # " in line][:10]
        children_log = workdir / "children.log"
        if children_log.exists() and children_log.stat().st_size:
            summary["children_log_tail"] = children_log.read_text(
                errors="replace").splitlines()[-10:]
        if args.keep_logs:
            summary["logs"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    # A run that ended with an error meets no target (its figures may cover refused clients).
    summary["targets"] = {} if summary.get("error") else evaluate(summary, args)
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500,
                        help="N client connections (SSE streams or WebSockets)")
    parser.add_argument("--transport", choices=("sse", "ws"), default="sse",
                        help="sse: GET /tasks/{id}/events; ws: a raw WebSocket to "
                        "/tasks/{id}/ws (one task per socket, closed 1000 after the terminal), "
                        "or to /ws (see --ws-endpoint)")
    parser.add_argument("--ws-endpoint", choices=("task", "many"), default="task",
                        help="--transport ws: task = GET /tasks/{id}/ws, one task per socket; "
                        "many = GET /ws with one subscribe op of --tasks-per-socket task ids; "
                        "the client closes it (1000) once all its tasks are terminal")
    parser.add_argument("--tasks-per-socket", type=int, default=1, metavar="K",
                        help="--ws-endpoint many: tasks per /ws socket; --clients stays the "
                        "number of watchers (client-task pairs), so sockets = N / K; socket s "
                        "slot j watches task ((s*K + j) %% T) + 1")
    parser.add_argument("--server", choices=("taskcast", "raw"), default="taskcast",
                        help="taskcast: python -m taskcast serve; raw: bench/raw_ws_server.py, "
                        "a minimal uvloop/asyncio.Protocol server with the same endpoints and "
                        "frames (a ceiling; /metrics figures are skipped)")
    parser.add_argument("--churn", type=int, default=0, metavar="ROUNDS",
                        help="churn/soak mode: ROUNDS x (connect N, hold --hold s, close from "
                        "the client side, wait until the server's open-connection gauge is 0 "
                        "(at most --close-wait s), settle --settle s, read VmRSS); no "
                        "publishing")
    parser.add_argument("--replicas", type=int, default=1,
                        help="K gateway processes on K ports, all pinned to --gateway-cpu; "
                        "clients are spread over them (see --replica-assign)")
    parser.add_argument("--replica-assign", choices=("client", "watcher"), default="client",
                        help="client: client i goes to replica i %% K (with K dividing T, all "
                        "watchers of a task share a replica); watcher: each task's watchers "
                        "are dealt over the replicas, so every replica watches every task")
    parser.add_argument("--cluster", action="store_true",
                        help="a 3-node Redis Cluster (3 primaries, on --client-cpu) instead of "
                        "one redis-server; gateways and publisher use redis+cluster://")
    parser.add_argument("--tasks", type=int, default=50, help="T tasks; client i watches i %% T")
    parser.add_argument("--rate", type=float, default=500.0,
                        help="R progress events/s in total, spread round-robin over the tasks")
    parser.add_argument("--duration", type=float, default=5.0, help="D seconds of progress")
    parser.add_argument("--idle-only", action="store_true",
                        help="connect N clients, measure RSS per connection, hold, stop")
    parser.add_argument("--hold", type=float, default=None,
                        help="--idle-only: seconds to hold the connections before checking "
                        "(default 5); --churn: seconds each round holds them (default 1)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds after the last publish to wait for terminal states")
    parser.add_argument("--close-wait", type=float, default=10.0,
                        help="after the report, seconds to wait for the server to close every "
                        "connection that got its terminal state (/ws: for the close handshakes "
                        "the client started); --churn: the bound on the client-side close and "
                        "on the wait for the open-connection gauge to reach 0")
    parser.add_argument("--connect-concurrency", type=int, default=1000,
                        help="clients connecting at once (connect until first event)")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--client-procs", type=int, default=0,
                        help="client shard processes (0: as few as RLIMIT_NOFILE allows)")
    parser.add_argument("--publisher", choices=["producer", "pipeline"], default="producer",
                        help="producer: one Producer call per event (default); pipeline: "
                        "EVALSHA of the shipped script, one pipeline per tick (a lighter load "
                        "side, for latency figures)")
    parser.add_argument("--max-in-flight", type=int, default=64,
                        help="publisher: concurrent script calls at most")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of quiet before RSS readings")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="wait up to this many seconds for a quiet machine before starting "
                        "(other processes on the cores distort every figure)")
    parser.add_argument("--rt", type=int, default=0, metavar="PRIO",
                        help="run the publisher SCHED_FIFO at PRIO and the gateway, "
                        "redis-server and client shards at PRIO+1 (needs root): on a machine "
                        "shared with other work it keeps other processes off the measured path; "
                        "0 = off")
    parser.add_argument("--quiet-pct", type=float, default=15.0,
                        help="--wait-quiet: a core counts as quiet below this busy %%")
    parser.add_argument("--python", help="interpreter for the gateway (default .venv/bin/python)")
    parser.add_argument("--py-spy", type=Path, help="record the gateway with py-spy (raw format)")
    parser.add_argument("--py-spy-phase", choices=("connect", "publish"), default="publish")
    parser.add_argument("--py-spy-native", action="store_true",
                        help="include C frames (e.g. the garbage collector); pauses the "
                        "gateway for each sample, so use it for shares, not for timings")
    parser.add_argument("--gateway-gc-threshold", metavar="G0,G1,G2",
                        help="what-if experiment: start the gateway with gc.set_threshold(...)")
    parser.add_argument("--auth", action="store_true",
                        help="access control on: the gateway gets a fixed HS256 secret "
                        "(TASKCAST_JWT_SECRET) and every connection presents a token of its own "
                        "for exactly its task(s) as ?token= (minted before the connect phase)")
    parser.add_argument("--auth-client-secret", metavar="SECRET",
                        help="--auth: sign the clients' tokens with SECRET instead of the "
                        "gateway's secret (to check that refused clients fail the run)")
    parser.add_argument("--auth-without-key", action="store_true",
                        help="--auth's control run: the same tokens in the same URLs, but the "
                        "gateway gets no key (what the longer requests cost without checks)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.gateway_gc_threshold and not re.fullmatch(r"\d+(,\d+){0,2}",
                                                      args.gateway_gc_threshold):
        parser.error("--gateway-gc-threshold takes up to three integers: G0,G1,G2")
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if min(args.clients, args.tasks) < 1 or args.rate <= 0 or args.duration < 0:
        parser.error("--clients, --tasks and --rate must be positive")
    if args.tasks > args.clients:
        parser.error("--tasks must not exceed --clients")
    if args.hold is None:
        args.hold = 1.0 if args.churn else 5.0
    if args.tasks_per_socket < 1:
        parser.error("--tasks-per-socket must be at least 1")
    if args.tasks_per_socket > 1 and args.ws_endpoint != "many":
        parser.error("--tasks-per-socket needs --transport ws --ws-endpoint many")
    if args.ws_endpoint == "many":
        if args.transport != "ws":
            parser.error("--ws-endpoint many needs --transport ws")
        if args.clients % args.tasks_per_socket:
            parser.error("--clients must be a multiple of --tasks-per-socket (N watchers on "
                         "N/K sockets)")
        if args.tasks_per_socket > args.tasks:
            parser.error("--tasks-per-socket must not exceed --tasks (a socket's tasks differ)")
    if args.churn < 0:
        parser.error("--churn takes a number of rounds")
    if args.churn and args.idle_only:
        parser.error("--churn and --idle-only are different modes")
    if args.server == "raw" and (args.cluster or args.gateway_gc_threshold):
        parser.error("--server raw speaks redis:// only and has no GC option")
    if args.auth and args.server == "raw":
        parser.error("--auth needs --server taskcast: the raw server checks no tokens")
    if args.auth_client_secret is not None and not args.auth:
        parser.error("--auth-client-secret needs --auth")
    if args.auth_without_key and (not args.auth or args.auth_client_secret is not None):
        parser.error("--auth-without-key needs --auth (and no --auth-client-secret)")
    if args.py_spy is not None and args.churn:
        parser.error("--py-spy profiles the connect or publish phase; --churn has neither")
    if not args.idle_only and not args.churn and args.rate * args.duration / args.tasks > 99:
        parser.error("rate*duration/tasks must be <= 99: progress must rise by 1..99 per task")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    children: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, None]]] = {
        "--shard-child": shard_main, "--publisher-child": publisher_main}
    if argv and argv[0] in children:
        raw = argv[1]
        if raw.startswith("@"):  # a config too long for argv, in a file (see spawn_child)
            path = Path(raw[1:])
            raw = path.read_text()
            path.unlink()
        run_loop(children[argv[0]](json.loads(raw)))
        return 0
    args = parse_args(argv)
    summary = orchestrate(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(human_line(summary, args))
    if summary.get("error"):
        print(f"sse_load.py: FAILED: {summary['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
