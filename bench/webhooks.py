"""Webhooks (issue 14, bench/README.md "Issue 14: webhooks"): N tasks completing within a
window of S seconds, each with a webhook to a local receiver. Does every terminal message
arrive, how late (from the change to the receiver), and what does a delivery cost the gateway?

    .venv/bin/python bench/webhooks.py                       # 1000 tasks, 1 s, one run
    .venv/bin/python bench/webhooks.py --runs 3
    .venv/bin/python bench/webhooks.py --runs 3 --fail-first # the retry path
    .venv/bin/python bench/webhooks.py --tasks 5000 --window 5 --json-out /tmp/wh.json

Each run starts its own processes and stops them at the end:

* a redis-server on a free loopback port (tests/servers.py RedisServer);
* a receiver, a process of its own (this file with `--receiver-child`): a raw asyncio
  (uvloop) HTTP/1.1 server with keep-alive that, for every POST, takes time.time() once the
  whole request is read, keeps the body and the `webhook-id`, and answers 204 at once (with
  `--fail-first`: 503 to the first attempt at each `webhook-id`, 204 to the next). It parses
  nothing but the request head; the bodies are decoded only when the results are fetched;
* ONE gateway, a process of its own: `.venv/bin/taskcast serve --port P --redis-url U
  --prefix X --log-level warning` with TASKCAST_WEBHOOK_SECRET (a fresh whsec_ secret) and
  TASKCAST_WEBHOOK_ALLOWED_HOSTS=127.0.0.1; no other TASKCAST_* variable of the caller is
  passed on. It listens on 127.0.0.1, so it starts without a key. Every other webhook
  setting is the gateway's default (10 requests per host at once, recheck 15 s, ...) unless
  --per-host or --recheck-s is given.

Then, in this process (uvloop, one `Producer.from_url`, max_concurrency --concurrency):

1. the gateway is ready (/healthz answers, it leases all 16 webhook buckets, its wake
   subscription is on); --warmup tasks (20) are created, completed and delivered, so that
   the gateway's one-time costs (imports on the first request, its HTTP transport and SSL
   context) stay out of the window;
2. N tasks are created with `webhook_url` = the receiver (default events: completed, failed),
   --concurrency creates at once. Outside the measured window;
3. idle: every index entry has been looked at (no entry due any more: each unfinished task is
   scheduled `recheck_s` ahead), then the gateway's CPU over --idle-s seconds is read as a
   baseline (background loops: lease renewals, the 1 s sweep, pings);
4. the window: the gateway's and redis-server's CPU (utime+stime from /proc/PID/stat, 10 ms
   ticks) are read, then the N completions (`Producer.complete(id, image_url=...)`) are
   started evenly over --window seconds (completion i at i*S/N, each its own asyncio task;
   at most --concurrency talk to Redis at once);
5. the end: wait (at most --grace s) until the receiver has answered 2xx to a message for
   each of the N tasks, then (at most 10 s) until the webhook index is empty (the gateway
   recorded each delivery and dropped its entry: the end of its work), then the CPU again.

Reported per run (a markdown row, and a JSON summary with --json-out): terminal messages
received (tasks with a 2xx-answered `task.completed` message) against N; duplicates (2xx
answered more than once for a task) and any message that is not the task's completed version
(wrong type, older version); latency from the change (`data.updated_at` in the body: Redis's
TIME in ms, floored, so latencies read 0-1 ms high; same machine, same clock) to the
receiver's arrival time, p50/p90/p99/max over the first 2xx-answered arrival of each task
(with --fail-first also the first attempt's); the time from the first completion call to the
last such arrival; the gateway's CPU over the window (first completion to empty index) and
per delivered message; its idle CPU rate; redis-server's CPU over the window; the gateway's
own counters (`taskcast_webhook_deliveries_total`, `taskcast_webhook_lag_seconds`); the load
average at the start and end of the window; the gateway's log lines at warning and above,
among them its failed looks at a task ("webhook of task N failed|postponed"), before and in
the window, and the latency of the tasks they hit. The first three messages' signatures are
checked with `standardwebhooks` after the run (not in the receiver's path). When --grace runs
out, the summary also has `pending_at_timeout`: the `webhook_last_error` and
`webhook_attempts` the gateway wrote on the records still pending, and the states of its TCP
connections to the receiver (and, with --py-spy-dump, a `py-spy dump` of it).

`--httpx-baseline` measures instead what the gateway's HTTP client alone costs per POST (see
httpx_baseline()); `--gateway-flag=--webhook-timeout-s=2` (repeatable) passes a flag on to
`taskcast serve` for what-if runs; `--py-spy PREFIX` profiles the gateway over the window.

Nothing is pinned to a core and nothing runs SCHED_FIFO: on a shared machine, read the load
average beside the CPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
TASKCAST = str(ROOT / ".venv" / "bin" / "taskcast")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
WEBHOOK_BUCKETS = 16


# -- the receiver (a child process) -----------------------------------------------------------


class Receiver:
    """What the receiver process holds: every POST's arrival, answer, id and body."""

    def __init__(self, fail_first: bool) -> None:
        self.fail_first = fail_first
        self.records: list[tuple[float, int, str, bytes]] = []
        self.samples: list[dict[str, Any]] = []  # headers and body of the first messages
        self.attempted: set[str] = set()
        self.accepted: set[str] = set()
        self.connections = 0  # opened by the gateway (and the bench's control client)


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: what the gateway's httpx sends."""

    def __init__(self, state: Receiver) -> None:
        self.state = state
        self.buf = bytearray()
        self.head: bytes | None = None
        self.need = 0
        self.transport: Any = None  # uvloop's transports are no asyncio.Transport

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.state.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                self.need = 0
                for line in self.head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self.need = int(value)
            if len(self.buf) < self.need:
                return
            body = bytes(self.buf[:self.need])
            del self.buf[:self.need]
            head, self.head = self.head, None
            self.request(head, body)

    def request(self, head: bytes, body: bytes) -> None:
        arrived = time.time()
        request_line = head.split(b"\r\n", 1)[0]
        if request_line.startswith(b"GET /_"):
            self.control(request_line.split(b" ")[1].decode())
            return
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        message_id = headers.get("webhook-id", "")
        state = self.state
        status = 204
        if state.fail_first and message_id not in state.attempted:
            status = 503
        state.attempted.add(message_id)
        self.transport.write(NO_CONTENT if status == 204 else UNAVAILABLE)
        if status == 204:
            state.accepted.add(message_id)
        state.records.append((arrived, status, message_id, body))
        if len(state.samples) < 3 and status == 204:
            state.samples.append({"headers": headers, "body": body.decode()})

    def control(self, path: str) -> None:
        state = self.state
        if path == "/_stats":
            reply: Any = {"requests": len(state.records), "accepted_ids": len(state.accepted),
                          "connections": state.connections}
        elif path == "/_results":
            reply = {"records": [decoded(*record) for record in state.records],
                     "samples": state.samples, "connections": state.connections}
        else:
            reply = {"error": path}
        data = orjson.dumps(reply)
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(data) + data)


def decoded(arrived: float, status: int, message_id: str, body: bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(body)
        data = message["data"]
        return {"arrived": arrived, "answer": status, "id": message_id,
                "type": message["type"], "task_id": data["task_id"],
                "version": data["version"], "updated_at": data["updated_at"],
                "status": data["status"]}
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        return {"arrived": arrived, "answer": status, "id": message_id,
                "error": f"{type(exc).__name__}: {exc}", "body": body[:200].decode("replace")}


async def receiver_main(port: int, fail_first: bool) -> None:
    state = Receiver(fail_first)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ReceiverProtocol(state), "127.0.0.1", port,
                                      backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("READY", flush=True)
    async with server:
        await stop.wait()


def run_loop(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# -- the orchestration ---------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (10 ms ticks)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def tcp_states(pid: int, port: int) -> dict[str, int]:
    """The states of the process's TCP sockets connected to 127.0.0.1:port (from
    /proc/PID/net/tcp and its fds)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    names = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "02": "SYN_SENT",
             "04": "FIN_WAIT1", "05": "FIN_WAIT2", "09": "LAST_ACK", "0A": "LISTEN"}
    states: collections.Counter[str] = collections.Counter()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
            states[names.get(fields[3], fields[3])] += 1
    return dict(states)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("redis", "hiredis", "httpx", "httpcore", "uvicorn", "uvloop", "orjson",
                 "starlette", "standardwebhooks"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                         check=False).stdout
    found["redis-server"] = out.split(" v=", 1)[-1].split()[0] if " v=" in out else out
    return found


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.splitlines()
    return {"nproc": os.cpu_count(), "cpu": model, "head": head, "src_uncommitted": dirty,
            "versions": versions()}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values),
            "mean": statistics.fmean(values)}


def parse_metrics(text: str) -> dict[str, float]:
    wanted = ("taskcast_webhook_deliveries_total", "taskcast_webhook_lag_seconds_sum",
              "taskcast_webhook_lag_seconds_count", "taskcast_webhook_request_seconds_sum",
              "taskcast_webhook_request_seconds_count", "taskcast_webhook_buckets",
              "taskcast_webhook_retries_pending")
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


LOOK_FAILED = re.compile(r" taskcast\.webhooks: webhook of task (\d+) (failed|postponed)")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Unavailable|Refused)\b.*")


def scan_log(path: Path, window_start: float) -> dict[str, Any]:
    """The gateway's log lines at WARNING and above, the tasks whose look failed (the
    webhook service logs "webhook of task N failed|postponed"), how many of those failures
    were logged before the window (during creation) and in it, and the last line of each
    traceback (digits as N), counted. Log times are local time, to the ms."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    records = [line for line in lines if " WARNING " in line or " ERROR " in line
               or " CRITICAL " in line]
    failed_looks: list[int] = []
    in_window = 0
    for line in records:
        if m := LOOK_FAILED.search(line):
            failed_looks.append(int(m.group(1)))
            when = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            in_window += when + int(line[20:23]) / 1000 >= window_start
    exceptions = collections.Counter(
        re.sub(r"\d+", "N", line) for line in lines if EXCEPTION_LINE.match(line))
    return {"lines": len(lines), "records": len(records), "first": records[:5],
            "failed_looks": len(failed_looks), "failed_looks_in_window": in_window,
            "failed_look_tasks": sorted(set(failed_looks)),
            "exceptions": dict(exceptions.most_common(8))}


def stop(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def start_receiver(port: int, fail_first: bool, log_path: Path) -> subprocess.Popen[bytes]:
    """The receiver process; its output goes to a file (a pipe nobody reads could fill up
    and stop it)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), "--receiver-child", str(port),
             *(["--fail-first"] if fail_first else [])],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


async def receiver_ready(receiver: subprocess.Popen[bytes], log_path: Path) -> None:
    async def ready() -> bool:
        if receiver.poll() is not None:
            raise RuntimeError(f"receiver exited: {log_path.read_text(errors='replace')}")
        return log_path.read_bytes().startswith(b"READY")

    await wait_for(ready, 20, "receiver")


async def wait_for(check: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `check()` (async, truthy when done) until it is; returns the seconds waited."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(interval)
    return time.monotonic() - started


async def one_run(args: argparse.Namespace, index: int, workdir: Path) -> dict[str, Any]:
    import httpx
    from standardwebhooks import Webhook
    from tests.servers import RedisServer, free_port

    from taskcast.connection import connect
    from taskcast.keys import TaskKeys
    from taskcast.producer import Producer

    summary: dict[str, Any] = {"run": index}
    prefix = f"whbench{index}"
    keys = TaskKeys(prefix)
    redis_server = RedisServer(workdir / f"redis{index}")
    redis_server.start()
    assert redis_server.process is not None
    redis_pid = redis_server.process.pid
    receiver_port, gateway_port = free_port(), free_port()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver = start_receiver(receiver_port, args.fail_first, workdir / f"receiver{index}.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCAST_")}
    env.update({"TASKCAST_WEBHOOK_SECRET": secret,
                "TASKCAST_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"})
    gateway_argv = [TASKCAST, "serve", "--port", str(gateway_port),
                    "--redis-url", redis_server.url, "--prefix", prefix,
                    "--log-level", "warning"]
    if args.per_host is not None:
        gateway_argv += ["--webhook-per-host", str(args.per_host)]
    if args.recheck_s is not None:
        gateway_argv += ["--webhook-recheck-s", str(args.recheck_s)]
    gateway_argv += args.gateway_flag
    log_path = workdir / f"gateway{index}.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(gateway_argv, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=ROOT, env=env)
    summary["gateway_argv"] = gateway_argv[1:]
    redis = connect(redis_server.url, timeout=30.0)
    producer = Producer.from_url(redis_server.url, prefix=prefix,
                                 max_concurrency=args.concurrency)
    control = httpx.AsyncClient(timeout=30.0, trust_env=False)
    gateway_base = f"http://127.0.0.1:{gateway_port}"
    receiver_base = f"http://127.0.0.1:{receiver_port}"
    try:
        await receiver_ready(receiver, workdir / f"receiver{index}.log")

        async def gateway_ready() -> bool:
            if gateway.poll() is not None:
                raise RuntimeError(f"gateway exited {gateway.returncode}: "
                                   f"{log_path.read_text()[-2000:]}")
            try:
                if (await control.get(gateway_base + "/healthz")).status_code != 200:
                    return False
            except httpx.TransportError:
                return False
            owners = await redis.mget([keys.webhook_owner(b) for b in range(WEBHOOK_BUCKETS)])
            subscribed = (await redis.pubsub_numsub(keys.webhook_wake))[0][1]
            return all(owners) and subscribed >= 1

        summary["gateway_ready_s"] = round(await wait_for(gateway_ready, 30, "gateway"), 2)

        # -- creation, outside the window
        url = f"http://127.0.0.1:{receiver_port}/hook"
        created_at = time.monotonic()
        gate = asyncio.Semaphore(args.concurrency)

        async def create_one() -> int:
            async with gate:
                return (await producer.create(type="bench", webhook_url=url)).task_id

        async def accepted_ids() -> int:
            return int((await control.get(receiver_base + "/_stats")).json()["accepted_ids"])

        # A warm-up: the gateway's first deliveries import modules and build its HTTP
        # transport (an SSL context, too); that one-time cost stays out of the window.
        warmup_ids = set(await asyncio.gather(*(create_one() for _ in range(args.warmup))))
        warmup_cpu0 = proc_cpu_s(gateway.pid)
        for task_id in warmup_ids:
            await producer.complete(task_id, image_url="https://cdn.example/warmup.png")

        async def warmed_up() -> bool:
            return await accepted_ids() >= len(warmup_ids)

        await wait_for(warmed_up, args.grace, "warm-up")
        summary["warmup"] = {"tasks": len(warmup_ids),
                             "gateway_cpu_s": round(proc_cpu_s(gateway.pid) - warmup_cpu0, 2)}
        created_at = time.monotonic()
        task_ids = list(await asyncio.gather(*(create_one() for _ in range(args.tasks))))
        summary["create_s"] = round(time.monotonic() - created_at, 2)

        index_keys = [keys.webhooks(b) for b in range(WEBHOOK_BUCKETS)]

        async def nothing_due() -> bool:
            now = int(time.time() * 1000)
            pipe = redis.pipeline(transaction=False)
            for key in index_keys:
                pipe.zcount(key, "-inf", now)
            return sum(await pipe.execute()) == 0

        summary["idle_wait_s"] = round(await wait_for(nothing_due, 60, "idle"), 2)
        pipe = redis.pipeline(transaction=False)
        for key in index_keys:
            pipe.zrange(key, 0, 0, withscores=True)
        firsts = [entry[0][1] for entry in await pipe.execute() if entry]
        next_recheck_ms = min(firsts) if firsts else None
        idle0 = proc_cpu_s(gateway.pid)
        await asyncio.sleep(args.idle_s)
        idle_cpu = proc_cpu_s(gateway.pid) - idle0
        summary["gateway_idle_cpu_ms_per_s"] = round(idle_cpu / args.idle_s * 1000, 1)

        # -- the window
        spy = None
        if args.py_spy is not None:  # a profile of the gateway over the window (it costs CPU)
            spy = subprocess.Popen(
                [args.py_spy_bin, "record", "--pid", str(gateway.pid), "--format", "raw",
                 "--rate", "250", "-o", f"{args.py_spy}.run{index}.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
        load_start = loadavg()
        gateway_cpu0, redis_cpu0 = proc_cpu_s(gateway.pid), proc_cpu_s(redis_pid)
        split0 = proc_cpu_split(gateway.pid)
        step = args.window / args.tasks
        started_wall = time.time()
        started = time.monotonic()
        call_times: list[tuple[float, float]] = []
        completed: dict[int, tuple[int, int]] = {}  # task -> (version, updated_at)

        async def complete_at(i: int, task_id: int) -> None:
            delay = started + i * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.time()
            task = await producer.complete(task_id,
                                           image_url=f"https://cdn.example/{task_id}.png")
            call_times.append((t0, time.time()))
            completed[task_id] = (task.version, task.updated_at)

        await asyncio.gather(*(complete_at(i, t) for i, t in enumerate(task_ids)))
        calls_done = time.time()

        async def all_accepted() -> bool:
            return await accepted_ids() >= len(warmup_ids) + args.tasks

        timed_out = None
        try:
            await wait_for(all_accepted, args.grace, "deliveries", interval=0.02)
        except TimeoutError:
            timed_out = f"not every message was answered 2xx within --grace {args.grace} s"
            # What the gateway wrote on the records of the tasks still pending, and what
            # its process holds open toward the receiver.
            pipe = redis.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hmget(keys.record(task_id), ["webhook_version", "webhook_attempts",
                                                  "webhook_last_error", "version"])
            errors: collections.Counter[str] = collections.Counter()
            attempts: collections.Counter[int] = collections.Counter()
            for delivered_version, tries, error, version in await pipe.execute():
                if delivered_version != version:
                    errors[re.sub(r"\d+", "N", (error or b"").decode())] += 1
                    attempts[int(tries or 0)] += 1
            summary["pending_at_timeout"] = {
                "last_errors": dict(errors.most_common(5)),
                "attempts": dict(sorted(attempts.items())),
                "gateway_tcp_to_receiver": tcp_states(gateway.pid, receiver_port)}
            if args.py_spy_dump:  # where the gateway's tasks are waiting
                dump = workdir / f"stall{index}.txt"
                summary["pending_at_timeout"]["py_spy_dump"] = str(dump)
                with dump.open("wb") as out:
                    await asyncio.to_thread(subprocess.run, [
                        args.py_spy_bin, "dump", "--pid", str(gateway.pid), "--locals"],
                        stdout=out, stderr=subprocess.STDOUT, check=False)

        async def index_empty() -> bool:
            pipe = redis.pipeline(transaction=False)
            for key in index_keys:
                pipe.zcard(key)
            return sum(await pipe.execute()) == 0

        with contextlib.suppress(TimeoutError):
            await wait_for(index_empty, 10.0, "index", interval=0.02)
        ended = time.time()
        gateway_cpu = proc_cpu_s(gateway.pid) - gateway_cpu0
        split1 = proc_cpu_split(gateway.pid)
        redis_cpu = proc_cpu_s(redis_pid) - redis_cpu0
        load_end = loadavg()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait, 30)
        left_in_index = 0 if await index_empty() else sum(
            [await redis.zcard(key) for key in index_keys])

        results = (await control.get(receiver_base + "/_results")).json()
        metrics = parse_metrics((await control.get(gateway_base + "/metrics")).text)
    finally:
        await control.aclose()
        await producer.close()
        await redis.aclose()
        summary["gateway_exit_code"] = stop(gateway)
        stop(receiver)
        redis_server.stop()
    summary["gateway_log"] = scan_log(log_path, started_wall)
    if args.keep_logs:  # every message the receiver got, and what each completion returned
        (workdir / f"records{index}.json").write_text(json.dumps(
            {"records": results["records"], "started": started_wall,
             "completed": {str(k): v for k, v in completed.items()},
             "calls": call_times}))

    # -- the figures
    records = [r for r in results["records"] if r.get("task_id") not in warmup_ids]
    expected = set(task_ids)
    bad = [r for r in records if "error" in r]
    first_ok: dict[int, dict[str, Any]] = {}
    first_any: dict[int, dict[str, Any]] = {}
    ok_count: dict[int, int] = {}
    wrong: list[dict[str, Any]] = []
    for r in sorted((r for r in records if "error" not in r), key=lambda r: r["arrived"]):
        tid = r["task_id"]
        first_any.setdefault(tid, r)
        version, updated_at = completed.get(tid, (-1, -1))
        if (tid not in expected or r["type"] != "task.completed" or r["version"] != version
                or r["updated_at"] != updated_at or r["id"] != f"msg_{tid}_{version}"):
            wrong.append(r)
        if r["answer"] == 204:
            first_ok.setdefault(tid, r)
            ok_count[tid] = ok_count.get(tid, 0) + 1
    delivered = [first_ok[t] for t in task_ids if t in first_ok
                 and first_ok[t]["type"] == "task.completed"]
    latency = [(r["arrived"] - r["updated_at"] / 1000) * 1000 for r in delivered]
    first_attempt = [(first_any[t]["arrived"] - first_any[t]["updated_at"] / 1000) * 1000
                     for t in task_ids if t in first_any]
    troubled = set(summary["gateway_log"]["failed_look_tasks"]) & expected
    summary["gateway_log"]["failed_look_tasks"] = len(troubled)
    latency_troubled = [(r["arrived"] - r["updated_at"] / 1000) * 1000 for r in delivered
                        if r["task_id"] in troubled]
    last_arrival = max((r["arrived"] for r in delivered), default=started_wall)
    verified = 0
    for sample in results["samples"]:
        Webhook(secret).verify(sample["body"], sample["headers"])  # raises if it does not
        verified += 1
    summary.update({
        "tasks": args.tasks, "window_s": args.window, "fail_first": args.fail_first,
        "received": len(delivered), "missing": sorted(expected - set(first_ok))[:20],
        "missing_count": len(expected - set(first_ok)),
        "duplicates": sum(n - 1 for n in ok_count.values()),
        "requests": len(records), "receiver_connections": results["connections"],
        "answered_503": sum(1 for r in records if r["answer"] == 503),
        "unexpected_messages": len(wrong), "unexpected_first": wrong[:5],
        "undecodable": len(bad), "signatures_verified": verified,
        "latency_ms": {k: round(v, 1) for k, v in spread(latency).items()},
        "latency_ms_tasks_with_a_failed_look": {
            k: round(v, 1) for k, v in spread(latency_troubled).items()},
        "first_attempt_latency_ms": ({k: round(v, 1) for k, v in spread(first_attempt).items()}
                                     if args.fail_first else {}),
        "calls_span_s": round(max(t1 for _, t1 in call_times) - started_wall, 3),
        "calls_done_after_s": round(calls_done - started_wall, 3),
        "call_ms": {k: round(v * 1000, 1) for k, v in spread(
            [t1 - t0 for t0, t1 in call_times]).items()},
        "last_delivery_after_s": round(last_arrival - started_wall, 3),
        "window_end_after_s": round(ended - started_wall, 3),
        "gateway_cpu_s": round(gateway_cpu, 2),
        "gateway_cpu_user_sys_s": [round(split1[0] - split0[0], 2),
                                   round(split1[1] - split0[1], 2)],
        "gateway_cpu_per_delivery_us": round(gateway_cpu / max(1, len(delivered)) * 1e6, 1),
        "redis_cpu_s": round(redis_cpu, 2),
        "loadavg_start": load_start, "loadavg_end": load_end,
        "left_in_index": left_in_index,
        "next_recheck_after_window_start_s": (
            round(next_recheck_ms / 1000 - started_wall, 1) if next_recheck_ms else None),
        "gateway_metrics": metrics,
    })
    if timed_out:
        summary["error"] = timed_out
    return summary


async def httpx_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """`--httpx-baseline`: what the gateway's HTTP client alone costs per POST, in this
    process: the same httpx transport settings as webhook_sender.WebhookSender (one
    AsyncHTTPTransport, retries 0, no env, a pool of 10 connections) POSTing a body like its
    own (273 bytes) with the three Standard Webhooks headers to the same receiver, one at a
    time and 10 at once (the gateway's default per-host concurrency); CPU from getrusage."""
    import resource

    import httpx
    from tests.servers import free_port

    port = free_port()
    receiver_log = Path(tempfile.mkstemp(prefix="taskcast-webhooks-receiver-")[1])
    receiver = start_receiver(port, False, receiver_log)
    transport = httpx.AsyncHTTPTransport(retries=0, trust_env=False, http2=False,
                                         limits=httpx.Limits(max_connections=10,
                                                             max_keepalive_connections=10))
    body = orjson.dumps({"type": "task.completed", "timestamp": "2026-12-07T00:00:00.000Z",
                         "data": {"task_id": 1, "status": "completed", "progress": 100,
                                  "type": "bench", "angle": "",
                                  "image": {"image_base64": "",
                                            "image_url": "https://cdn.example/1.png"},
                                  "error_message": "", "version": 2,
                                  "updated_at": 1796617604322}})
    headers = {"host": f"127.0.0.1:{port}", "content-type": "application/json",
               "user-agent": "taskcast-webhooks", "webhook-id": "msg_1_2",
               "webhook-timestamp": "1796617604", "webhook-signature": "v1," + "A" * 44}

    async def post() -> None:
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/hook", headers=headers,
                                content=body)
        response = await transport.handle_async_request(request)
        async for _ in response.stream:  # type: ignore[union-attr]
            pass
        await response.aclose()

    def cpu() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime

    found: dict[str, Any] = {"body_bytes": len(body)}
    try:
        await receiver_ready(receiver, receiver_log)
        for _ in range(100):
            await post()
        for label, width in (("one_at_a_time", 1), ("ten_at_once", 10)):
            gate = asyncio.Semaphore(width)

            async def turn() -> None:
                async with gate:  # noqa: B023 (awaited before the loop moves on)
                    await post()

            (u0, s0), w0 = cpu(), time.monotonic()
            await asyncio.gather(*(turn() for _ in range(args.tasks)))
            (u1, s1), w1 = cpu(), time.monotonic()
            found[label] = {"cpu_us": round((u1 - u0 + s1 - s0) / args.tasks * 1e6),
                            "user_us": round((u1 - u0) / args.tasks * 1e6),
                            "sys_us": round((s1 - s0) / args.tasks * 1e6),
                            "posts_per_s": round(args.tasks / (w1 - w0))}
    finally:
        await transport.aclose()
        stop(receiver)
        receiver_log.unlink()
    return found


async def sender_bursts(args: argparse.Namespace) -> None:
    """`--sender-bursts K`: taskcast's own WebhookSender (in this process, per-host 10, the
    request timeout --sender-timeout) sends K bursts of --tasks concurrent POSTs to a healthy
    receiver; the burst is more than the timeout lets through, so many attempts time out
    (cancelled by the sender's asyncio.timeout). After each burst: the outcomes, the httpcore
    pool of the receiver's host (a private attribute: `Requests: N active` with nothing under
    way are slots that never come back), and one more POST on its own. Stops at the first
    single POST that is not delivered."""
    from tests.servers import free_port

    from taskcast.webhook_sender import WebhookSender
    from taskcast.webhook_targets import TargetPolicy

    port = free_port()
    receiver_log = Path(tempfile.mkstemp(prefix="taskcast-webhooks-receiver-")[1])
    receiver = start_receiver(port, False, receiver_log)
    sender = WebhookSender(TargetPolicy("127.0.0.1"), timeout_s=args.sender_timeout,
                           per_host=args.per_host or 10)
    url = f"http://127.0.0.1:{port}/hook"
    body = orjson.dumps({"type": "task.completed", "data": {"task_id": 1, "version": 2,
                                                            "updated_at": 0}})
    try:
        await receiver_ready(receiver, receiver_log)
        for burst in range(1, args.sender_bursts + 1):
            outcomes: collections.Counter[str] = collections.Counter()

            async def one(i: int) -> None:
                attempt = await sender.post(url, body, {"webhook-id": f"msg_{i}"})
                outcomes[f"{attempt.outcome} {attempt.error}".strip()] += 1  # noqa: B023

            await asyncio.gather(*(one(i) for i in range(args.tasks)))
            await asyncio.sleep(0.2)
            # The httpx-based sender (before the h11 rewrite) kept httpcore pools; taskcast's
            # own HTTP/1.1 since then keeps idle connections only (nothing can leak there).
            pools = [repr(t._pool) for t in getattr(sender, "_transports", {}).values()]
            single = await sender.post(url, body, {"webhook-id": "msg_single"})
            print(json.dumps({"burst": burst, "outcomes": dict(outcomes), "pool": pools,
                              "single_post": f"{single.outcome} {single.error}".strip()}),
                  flush=True)
            if single.outcome != "delivered":
                break
    finally:
        await sender.close()
        stop(receiver)
        receiver_log.unlink()


HEADER = ("| run | received / expected | duplicates | latency p50 / p90 / p99 / max | "
          "last delivery after | gateway CPU | CPU per delivery | gateway idle | redis CPU | "
          "load avg start → end | failed looks (gateway log) |")
HEADER_FAIL = HEADER.replace("| duplicates |", "| duplicates | 503s | first attempt p50 / p99 |")


def row(s: dict[str, Any]) -> str:
    lat = s.get("latency_ms", {})
    cells = [str(s["run"]), f"{s['received']} / {s['tasks']}", str(s["duplicates"])]
    if s["fail_first"]:
        first = s.get("first_attempt_latency_ms", {})
        cells += [str(s["answered_503"]),
                  f"{first.get('p50', '-')} / {first.get('p99', '-')} ms"]
    cells += [f"{lat.get('p50', '-')} / {lat.get('p90', '-')} / {lat.get('p99', '-')} / "
              f"{lat.get('max', '-')} ms",
              f"{s['last_delivery_after_s']} s", f"{s['gateway_cpu_s']} s",
              f"{s['gateway_cpu_per_delivery_us']:.0f} µs",
              f"{s['gateway_idle_cpu_ms_per_s']} ms/s", f"{s['redis_cpu_s']} s",
              f"{s['loadavg_start']} → {s['loadavg_end']}",
              f"{s['gateway_log']['failed_looks']} ({s['gateway_log']['failed_looks_in_window']}"
              " in the window)"]
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000, help="N tasks (one webhook each)")
    parser.add_argument("--window", type=float, default=1.0,
                        help="S: the completions are started evenly over S seconds")
    parser.add_argument("--runs", type=int, default=1, help="K runs, each with fresh processes")
    parser.add_argument("--fail-first", action="store_true",
                        help="the receiver answers 503 to the first attempt at each message "
                        "(the retry path: the gateway retries 0.5-1 s later)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="the producer's max_concurrency (calls talking to Redis at once)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds to wait after the completions for every message")
    parser.add_argument("--warmup", type=int, default=20,
                        help="tasks created, completed and delivered before anything is "
                        "measured (the gateway's first deliveries import modules and build "
                        "its HTTP transport)")
    parser.add_argument("--idle-s", type=float, default=2.0,
                        help="seconds of idle gateway CPU measured before the window")
    parser.add_argument("--per-host", type=int,
                        help="the gateway's --webhook-per-host (default: its own, 10)")
    parser.add_argument("--recheck-s", type=float,
                        help="the gateway's --webhook-recheck-s (default: its own, 15)")
    parser.add_argument("--gateway-flag", action="append", default=[], metavar="--FLAG=VALUE",
                        help="another `taskcast serve` flag for a what-if run (repeat), e.g. "
                        "--gateway-flag=--webhook-timeout-s=2")
    parser.add_argument("--py-spy", metavar="PREFIX",
                        help="record the gateway with py-spy over the window (raw folded "
                        "stacks in PREFIX.runK.txt); the CPU figures then include its pauses")
    parser.add_argument("--py-spy-dump", action="store_true",
                        help="when --grace runs out, `py-spy dump --locals` the gateway into "
                        "the temporary directory (see --keep-logs)")
    parser.add_argument("--py-spy-bin", default="py-spy", help="the py-spy executable")
    parser.add_argument("--httpx-baseline", action="store_true",
                        help="instead of the scenario: the CPU of --tasks POSTs through the "
                        "gateway's httpx transport settings, in this process (see "
                        "httpx_baseline)")
    parser.add_argument("--sender-bursts", type=int, default=0, metavar="K",
                        help="instead of the scenario: K bursts of --tasks POSTs through "
                        "taskcast's WebhookSender in this process (see sender_bursts)")
    parser.add_argument("--sender-timeout", type=float, default=10.0,
                        help="--sender-bursts: the sender's request timeout (the gateway's "
                        "default is 10 s)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON summaries here")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory: the gateway's log and, per run, "
                        "recordsK.json (every message the receiver got)")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.window <= 0 or args.runs < 1 or args.concurrency < 1:
        parser.error("--tasks, --window, --runs and --concurrency must be positive")
    return args


async def orchestrate(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="taskcast-webhooks-bench-"))
    summaries = []
    try:
        print(json.dumps({"machine": machine(), "loadavg": loadavg()}), flush=True)
        header = HEADER_FAIL if args.fail_first else HEADER
        print(header)
        print("|" + "---|" * (header.count("|") - 1), flush=True)
        for index in range(1, args.runs + 1):
            try:
                summary = await one_run(args, index, workdir)
            except Exception as exc:
                summary = {"run": index, "error": f"{type(exc).__name__}: {exc}"}
                print(f"run {index} FAILED: {summary['error']}", file=sys.stderr, flush=True)
                summaries.append(summary)
                continue
            summaries.append(summary)
            print(row(summary), flush=True)
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--receiver-child":
        run_loop(receiver_main(int(argv[1]), "--fail-first" in argv[2:]))
        return 0
    sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    if args.sender_bursts:
        run_loop(sender_bursts(args))
        return 0
    if args.httpx_baseline:
        print(json.dumps({"loadavg": loadavg()}))
        for _ in range(args.runs):
            print(json.dumps(run_loop(httpx_baseline(args))), flush=True)
        print(json.dumps({"loadavg": loadavg()}))
        return 0
    summaries = run_loop(orchestrate(args))
    for summary in summaries:
        print(json.dumps(summary))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summaries, indent=2) + "\n")
    # Duplicates are allowed (at least once) and reported; a missing or wrong message is not.
    failed = [s for s in summaries if s.get("error") or s.get("missing_count")
              or s.get("unexpected_messages")]
    for s in failed:
        print(f"run {s['run']}: {s.get('error') or 'missing or unexpected messages'}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
