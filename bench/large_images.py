"""Large images (issue 12, bench/README.md "Issue 12: large images"): what a completion with a
big image costs Redis, and whether a burst of them reaches every watcher without a pub/sub
disconnect.

    .venv/bin/python bench/large_images.py                      # both parts
    .venv/bin/python bench/large_images.py --part slowlog --repeat 10
    .venv/bin/python bench/large_images.py --part burst --tasks 200 --image-mib 4

Part `slowlog`: a private redis-server on a free loopback port (as the tests start it, plus
`slowlog-log-slower-than 0`). Per case, `--repeat` completions (after one unmeasured warm-up),
each on a task of its own; for each: SLOWLOG RESET, the completion, SLOWLOG GET. Figures per
completion: the EVALSHA entry, the SET of the upload, every entry of the completion added up
(SET, EVALSHA, the producer's DEL of the moved upload and ZREM from the timeouts index; not
the commands the script calls, which Redis 7 logs too, under client `?:0`, and whose time is
inside the EVALSHA entry's), and Redis's on-CPU time over the call from
/proc/PID/task/*/schedstat (ns), which also counts what SLOWLOG leaves out: reading the
argument off the socket, parsing it, writing the reply. Cases:

* `staged`: Producer.complete(image_base64=raw bytes): SET of the raw bytes, then EVALSHA with
  `image_bytes` (the shipped script, lua/apply_change.lua);
* `inline`: EVALSHA of the same script with `image_base64` inside the JSON change document
  (the slow path the script still accepts from producers in other languages);
* `inline-before`: the same call to the script as it was before issue 12 (`--legacy-rev`, read
  with `git show`), which JSON-decodes the image and JSON-encodes it again to publish it.

Image sizes are given as base64 bytes (`--sizes-kib`, default 1 MiB and 4 MiB of base64, i.e.
768 KiB and 3 MiB raw; `--raw-sizes-kib` adds sizes given as raw bytes, default 4 MiB raw =
5.33 MiB of base64). No subscriber is attached in this part, so PUBLISH costs only its encoding.

Part `burst`: another private redis-server with the default configuration (so the default
`client-output-buffer-limit pubsub 32mb 8mb 60`), a gateway (`python -m taskcast serve`, a
process of its own, `TASKCAST_MAX_CONNECTIONS=0`), `--tasks` tasks with one SSE watcher each
(`GET /tasks/{id}/events`, a raw asyncio HTTP/1.1 + chunked + SSE client, in a child process
of this script so that decoding 200 images does not hold up the producer and the samplers),
then all completions at once through one `Producer.from_url` (defaults: max_concurrency 50,
wait_s 30), each with an image of `--image-mib` MiB of base64 of its own (a shared random base
with the task id written into its first and last 8 bytes). Checked: every watcher's completed
state carries its image (decoded length and SHA-256 against what was sent), the gateway's
`taskcast_redis_reconnects_total` (must stay 0), its pub/sub connection's client id before and
after (CLIENT LIST: the same id = never dropped), Redis's log for output-buffer kills, and
sampled every 20 ms during the burst: INFO clients `client_recent_max_output_buffer` and the
`omem` of the gateway's pub/sub connection; and every 50 ms the time a `GET /healthz` takes (the
gateway's event-loop stalls as a client sees them). Reported: wall time from the first call to
the last watcher's image, the calls' own wall time, CPU of the gateway, Redis, the producer
(this process) and the watchers.

It prints a JSON summary (`--json-out` also writes it) and one line per case.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, free_port  # noqa: E402

from taskcast.connection import connect  # noqa: E402
from taskcast.keys import TaskKeys  # noqa: E402
from taskcast.producer import Producer  # noqa: E402
from taskcast.script import script_source  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
PREFIX = "bench"
LEGACY_REV = "919f7b9"  # the last commit before issue 12 changed the update script
PYTHON = str(ROOT / ".venv" / "bin" / "python")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("redis", "hiredis", "uvicorn", "orjson", "starlette"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                         check=False).stdout
    found["redis-server"] = out.split(" v=", 1)[-1].split()[0] if " v=" in out else out
    return found


def git_head() -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    return {"head": git("rev-parse", "--short", "HEAD"),
            "src_uncommitted": git("status", "--porcelain", "--", "src").splitlines()}


def redis_cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of a process, from schedstat (ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def proc_cpu_s(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


# -- part a: Redis time per completion ------------------------------------------------------


async def slowlog_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir / "slowlog", extra_args=[
        "--slowlog-log-slower-than", "0", "--slowlog-max-len", "1024"])
    server.start()
    assert server.process is not None
    pid = server.process.pid
    client = connect(server.url, timeout=30.0)
    producer = Producer(client, prefix=PREFIX)
    keys = TaskKeys(PREFIX)
    current_sha = await client.script_load(script_source())
    legacy_source = subprocess.run(
        ["git", "show", f"{args.legacy_rev}:src/taskcast/lua/apply_change.lua"], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout
    legacy_sha = await client.script_load(legacy_source)
    next_legacy_id = iter(range(10**9, 2 * 10**9))
    base = os.urandom(max([*args.sizes_kib, *args.raw_sizes_kib]) * KIB)

    async def new_task(case: str) -> int:
        if case == "inline-before":
            task_id = next(next_legacy_id)
            await client.evalsha(legacy_sha, 2, keys.record(task_id), keys.channel(task_id),
                                 orjson.dumps({"op": "create", "task_id": str(task_id)}))
            return task_id
        return (await producer.create()).task_id

    def completion(case: str, task_id: int, raw: bytes) -> Callable[[], Awaitable[Any]]:
        if case == "staged":
            return lambda: producer.complete(task_id, image_base64=raw)
        sha = current_sha if case == "inline" else legacy_sha
        document = orjson.dumps({"op": "update", "task_id": str(task_id),
                                 "status": "completed",
                                 "image_base64": base64.b64encode(raw).decode("ascii")})
        return lambda: client.evalsha(sha, 2, keys.record(task_id), keys.channel(task_id),
                                      document)

    sizes = [(f"{kib / 1024:g} MiB base64", kib * KIB // 4 * 3) for kib in args.sizes_kib]
    sizes += [(f"{kib / 1024:g} MiB raw", kib * KIB) for kib in args.raw_sizes_kib]
    results: list[dict[str, Any]] = []
    try:
        for label, raw_len in sizes:
            raw = base[:raw_len]
            for case in args.cases:
                rows: list[dict[str, float]] = []
                for attempt in range(args.repeat + 1):
                    task_id = await new_task(case)
                    call = completion(case, task_id, raw)
                    await client.slowlog_reset()
                    cpu0 = redis_cpu_ns(pid)
                    await call()
                    cpu1 = redis_cpu_ns(pid)
                    entries = await client.slowlog_get(128)
                    status = await client.hget(keys.record(task_id), "status")
                    if status != b"completed":
                        raise RuntimeError(f"{case} {label}: task {task_id} is {status!r}")
                    by_name: dict[str, float] = {}
                    for entry in entries:
                        name = entry["command"].split(b" ", 1)[0].decode().upper()
                        # Redis 7 also logs the commands a script calls (client "?:0"); their
                        # time is inside the EVALSHA entry's.
                        if name == "SLOWLOG" or entry["client_address"] == b"?:0":
                            continue
                        by_name[name] = by_name.get(name, 0.0) + float(entry["duration"])
                    if attempt == 0:
                        continue  # warm-up
                    rows.append({"evalsha_us": by_name.get("EVALSHA", 0.0),
                                 "set_us": by_name.get("SET", 0.0),
                                 "all_entries_us": sum(by_name.values()),
                                 "redis_cpu_us": (cpu1 - cpu0) / 1000.0,
                                 "commands": len(by_name)})
                results.append({
                    "image": label, "raw_bytes": raw_len,
                    "base64_bytes": (raw_len + 2) // 3 * 4, "case": case,
                    "completions": len(rows),
                    **{name: stats([row[name] for row in rows])
                       for name in ("evalsha_us", "set_us", "all_entries_us", "redis_cpu_us")},
                    "commands_logged": sorted({n for n in by_name}),
                })
                r = results[-1]
                print(f"{label:>18} {case:>13}: EVALSHA {r['evalsha_us']['median']:>9.1f} us, "
                      f"SET {r['set_us']['median']:>7.1f} us, all entries "
                      f"{r['all_entries_us']['median']:>9.1f} us "
                      f"[{r['all_entries_us']['min']}-{r['all_entries_us']['max']}], "
                      f"Redis CPU {r['redis_cpu_us']['median']:>9.1f} us "
                      f"[{r['redis_cpu_us']['min']}-{r['redis_cpu_us']['max']}]", flush=True)
    finally:
        await client.aclose()
        server.stop()
    return {"redis_config": {"slowlog-log-slower-than": 0}, "repeat": args.repeat,
            "legacy_rev": args.legacy_rev, "results": results}


# -- part b: a burst of completions, one SSE watcher each -------------------------------------


class Watcher:
    """One SSE stream on /tasks/{id}/events over a raw socket: HTTP/1.1, chunked, SSE."""

    def __init__(self, port: int, task_id: int) -> None:
        self.port = port
        self.task_id = task_id
        self.first = asyncio.Event()
        self.versions: list[int] = []
        self.final: dict[str, Any] | None = None
        self.image_len = -1
        self.image_sha256 = ""
        self.done_at: float | None = None
        self.error: str | None = None

    async def run(self) -> None:
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                           limit=1 << 20)
            writer.write(f"GET /tasks/{self.task_id}/events HTTP/1.1\r\nHost: bench\r\n"
                         "Accept: text/event-stream\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            if b"transfer-encoding: chunked" not in head.lower():
                raise RuntimeError("not chunked")
            buf = bytearray()
            scan = 0
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    break
                buf += (await reader.readexactly(size + 2))[:-2]
                while (end := buf.find(b"\n\n", scan)) >= 0:
                    self.frame(bytes(buf[:end]))
                    del buf[:end + 2]
                    scan = 0
                scan = max(0, len(buf) - 1)
        except Exception as exc:  # reported per watcher
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.first.set()
            if writer is not None:
                writer.close()

    def frame(self, frame: bytes) -> None:
        for line in frame.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            task = orjson.loads(line[6:])
            self.versions.append(task["version"])
            self.first.set()
            if task["status"] == "completed":
                raw = base64.b64decode(task["image"]["image_base64"])
                self.image_len = len(raw)
                self.image_sha256 = hashlib.sha256(raw).hexdigest()
                self.done_at = time.monotonic()
                self.final = {k: v for k, v in task.items() if k != "image"}


def image_of(base: bytes, task_id: int) -> bytes:
    stamp = task_id.to_bytes(8, "big")
    return stamp + base[8:-8] + stamp


async def gateway_metric(port: int, name: str, **labels: str) -> float:
    body = (await http_get(port, "/metrics"))[1].decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                     if labels else "")
    for line in body.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def pubsub_clients(client: Any) -> list[dict[str, Any]]:
    return [c for c in await client.client_list() if int(c.get("sub", 0)) > 0
            or int(c.get("psub", 0)) > 0 or int(c.get("ssub", 0) or 0) > 0]


async def watchers_child(port: int, ids_file: Path, grace: float) -> None:
    """`--watchers-child`: one Watcher per task id in `ids_file`; prints READY once every
    stream has its first state, then one JSON line with what each watcher received."""
    task_ids = [int(line) for line in ids_file.read_text().split()]
    watchers = [Watcher(port, task_id) for task_id in task_ids]
    runs = [asyncio.create_task(w.run()) for w in watchers]
    async with asyncio.timeout(60):
        for w in watchers:
            await w.first.wait()
    print("READY", flush=True)
    cpu = time.process_time()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await asyncio.gather(*runs)
    print(json.dumps({"cpu_s": round(time.process_time() - cpu, 2), "watchers": [
        {"task_id": w.task_id, "versions": w.versions, "error": w.error,
         "image_len": w.image_len, "image_sha256": w.image_sha256, "done_at": w.done_at}
        for w in watchers]}), flush=True)


async def burst_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir / "burst")
    server.start()
    assert server.process is not None
    redis_pid = server.process.pid
    admin = connect(server.url, timeout=30.0)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCAST_")}
    env.update(TASKCAST_MAX_CONNECTIONS="0", TASKCAST_MAX_STREAM_S="0")
    log_path = workdir / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(
            [args.python, "-m", "taskcast", "serve", "--redis-url", server.url, "--prefix",
             PREFIX, "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    producer = Producer.from_url(server.url, prefix=PREFIX)
    keys = TaskKeys(PREFIX)
    child: asyncio.subprocess.Process | None = None
    summary: dict[str, Any] = {"tasks": args.tasks, "image_base64_bytes": args.image_mib * MIB,
                               "producer": "Producer.from_url defaults (max_concurrency 50, "
                                           "wait_s 30)"}
    try:
        async with asyncio.timeout(30):
            while (await http_get(port, "/readyz"))[0] != 200:
                if gateway.poll() is not None:
                    raise RuntimeError(f"gateway exited: {log_path.read_text()}")
                await asyncio.sleep(0.1)
        summary["redis_config"] = {"client-output-buffer-limit": (await admin.config_get(
            "client-output-buffer-limit"))["client-output-buffer-limit"]}
        task_ids = [(await producer.create()).task_id for _ in range(args.tasks)]
        ids_file = workdir / "task_ids"
        ids_file.write_text("\n".join(map(str, task_ids)))
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--watchers-child", "--port", str(port), "--ids-file",
            str(ids_file), "--grace", str(args.grace), stdout=asyncio.subprocess.PIPE,
            limit=1 << 26)
        assert child.stdout is not None
        async with asyncio.timeout(90):
            ready = await child.stdout.readline()
            if ready.strip() != b"READY":
                raise RuntimeError(f"the watchers did not start: {ready[:300]!r}")
            channels = [keys.channel(t) for t in task_ids]
            while not all(n == 1 for _, n in await admin.pubsub_numsub(*channels)):
                await asyncio.sleep(0.05)
        subscribers_before = await pubsub_clients(admin)
        reconnects_before = await gateway_metric(port, "taskcast_redis_reconnects_total")
        image_resyncs_before = await gateway_metric(port, "taskcast_resyncs_total",
                                                    reason="image")
        base = os.urandom(args.image_mib * MIB // 4 * 3)
        expected = {t: hashlib.sha256(image_of(base, t)).hexdigest() for t in task_ids}

        samples: dict[str, Any] = {"client_recent_max_output_buffer": 0, "pubsub_omem": 0,
                                   "samples": 0, "healthz_max_ms": 0.0, "healthz_probes": 0}
        sampling = True

        async def sample_redis() -> None:
            while sampling:
                info = await admin.info("clients")
                samples["client_recent_max_output_buffer"] = max(
                    samples["client_recent_max_output_buffer"],
                    int(info["client_recent_max_output_buffer"]))
                for c in await pubsub_clients(admin):
                    samples["pubsub_omem"] = max(samples["pubsub_omem"], int(c["omem"]))
                samples["samples"] += 1
                await asyncio.sleep(0.02)

        async def probe_gateway() -> None:
            """How long GET /healthz waits: the gateway's event loop stalls, as a client
            sees them (this process's own loop adds its lag, which is small here)."""
            while sampling:
                sent = time.perf_counter()
                await http_get(port, "/healthz")
                samples["healthz_max_ms"] = max(samples["healthz_max_ms"],
                                                round((time.perf_counter() - sent) * 1e3, 1))
                samples["healthz_probes"] += 1
                await asyncio.sleep(0.05)

        async def complete(task_id: int) -> None:
            await producer.complete(task_id, image_base64=image_of(base, task_id))

        samplers = [asyncio.create_task(sample_redis()), asyncio.create_task(probe_gateway())]
        cpu = {"gateway": proc_cpu_s(gateway.pid), "redis": proc_cpu_s(redis_pid),
               "producer": proc_cpu_s(os.getpid())}
        started = time.monotonic()
        outcomes = await asyncio.gather(*(complete(t) for t in task_ids), return_exceptions=True)
        calls_done = time.monotonic()
        async with asyncio.timeout(args.grace + 60):
            answer = json.loads(await child.stdout.readline())
            await child.wait()
        report = answer["watchers"]
        ended = time.monotonic()
        cpu = {name: round(proc_cpu_s_or(pid, cpu[name]) - cpu[name], 2) for name, pid in
               (("gateway", gateway.pid), ("redis", redis_pid), ("producer", os.getpid()))}
        cpu["watchers"] = answer["cpu_s"]
        sampling = False
        await asyncio.gather(*samplers)
        failures = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        delivered = [w for w in report if w["done_at"] is not None]
        wrong = [w["task_id"] for w in delivered
                 if (w["image_len"], w["image_sha256"]) != (len(base), expected[w["task_id"]])]
        subscribers_after = await pubsub_clients(admin)
        redis_log = (server.workdir / "redis.log").read_text(errors="replace")
        done_times = [w["done_at"] for w in delivered]
        summary.update({
            "completion_failures": len(failures), "failure_examples": failures[:3],
            "watchers_with_image": len(delivered),
            "watchers_with_wrong_image": wrong,
            "watcher_errors": [w["error"] for w in report if w["error"]][:3],
            "order_ok": all(w["versions"] == sorted(set(w["versions"])) for w in report),
            "wall_s_first_call_to_last_image": round(max(done_times) - started, 3)
            if done_times else None,
            "wall_s_calls": round(calls_done - started, 3),
            "wall_s_until_streams_ended": round(ended - started, 3),
            "cpu_s": cpu,
            "gateway_redis_reconnects": await gateway_metric(
                port, "taskcast_redis_reconnects_total") - reconnects_before,
            "gateway_image_resyncs": await gateway_metric(
                port, "taskcast_resyncs_total", reason="image") - image_resyncs_before,
            "pubsub_client_ids_before": [c["id"] for c in subscribers_before],
            "pubsub_client_ids_after": [c["id"] for c in subscribers_after],
            "pubsub_connection_kept": [c["id"] for c in subscribers_before]
            == [c["id"] for c in subscribers_after],
            "redis_log_output_buffer_kills": [
                line for line in redis_log.splitlines() if "output buffer" in line][:5],
            "sampled_during_burst": samples,
            "gateway_log_tail": log_path.read_text(errors="replace").splitlines()[-5:],
        })
        print(f"burst {args.tasks} x {args.image_mib} MiB: {len(delivered)}/{args.tasks} "
              f"watchers got their image ({len(wrong)} wrong), {len(failures)} failed calls, "
              f"calls {summary['wall_s_calls']} s, last image after "
              f"{summary['wall_s_first_call_to_last_image']} s; reconnects "
              f"{summary['gateway_redis_reconnects']}, pub/sub connection kept "
              f"{summary['pubsub_connection_kept']}, max omem (pub/sub) "
              f"{samples['pubsub_omem']} B, client_recent_max_output_buffer "
              f"{samples['client_recent_max_output_buffer']} B, /healthz max "
              f"{samples['healthz_max_ms']} ms, CPU {cpu}", flush=True)
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        await producer.close()
        await admin.aclose()
        gateway.terminate()
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(5)
        server.stop()
    return summary


def proc_cpu_s_or(pid: int, default: float) -> float:
    """proc_cpu_s of a process that may have exited (then `default`)."""
    try:
        return proc_cpu_s(pid)
    except (OSError, ValueError, IndexError):
        return default


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """One GET on a connection of its own: (status, body); (0, b"") when refused."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


async def main(args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "scenario": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                     "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
                     "versions": versions(), "source": git_head(), "argv": sys.argv[1:]},
    }
    with tempfile.TemporaryDirectory(prefix="taskcast-large-images-") as tmp:
        if args.part in ("slowlog", "all"):
            summary["slowlog"] = await slowlog_part(args, Path(tmp))
        if args.part in ("burst", "all"):
            summary["burst"] = await burst_part(args, Path(tmp))
    summary["scenario"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["slowlog", "burst", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=10, help="completions per case (slowlog)")
    parser.add_argument("--cases", nargs="+", default=["staged", "inline", "inline-before"],
                        choices=["staged", "inline", "inline-before"])
    parser.add_argument("--sizes-kib", nargs="*", type=int, default=[1024, 4096],
                        help="image sizes as base64 KiB (slowlog)")
    parser.add_argument("--raw-sizes-kib", nargs="*", type=int, default=[4096],
                        help="image sizes as raw KiB (slowlog)")
    parser.add_argument("--legacy-rev", default=LEGACY_REV,
                        help="git revision whose update script is the `inline-before` case")
    parser.add_argument("--tasks", type=int, default=200, help="tasks and watchers (burst)")
    parser.add_argument("--image-mib", type=int, default=4, help="MiB of base64 (burst)")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds after the calls for every watcher to get its image")
    parser.add_argument("--python", default=PYTHON, help="the gateway's interpreter")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--watchers-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.watchers_child:
        asyncio.run(watchers_child(arguments.port, arguments.ids_file, arguments.grace))
        sys.exit(0)
    result = asyncio.run(main(arguments))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if arguments.json_out:
        arguments.json_out.write_text(text + "\n")
