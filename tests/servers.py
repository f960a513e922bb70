"""Real servers for tests: redis-server processes on free ports, uvicorn on an unused port, and
`taskcast serve` as a process of its own."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from taskcast.app import GatewayApp, create_app
from taskcast.server import uvicorn_config
from taskcast.settings import Settings

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process that a test may stop, kill, pause and start again on its port."""

    def __init__(self, workdir: Path, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log"), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cli("PING", check=False).strip() == "PONG":
                return
            if self.process.poll() is not None:
                log = (self.workdir / "redis.log").read_text()
                raise RuntimeError(f"redis-server exited: {log}")
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on {self.port} did not answer PING")

    def cli(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=10, check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(result.stderr)
        return result.stdout

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown."""
        if self.process and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing its connections cleanly."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: a hung server that accepts nothing and answers nothing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)


@dataclass
class Gateway:
    app: Starlette
    server: uvicorn.Server
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@asynccontextmanager
async def run_gateway(settings: Settings, port: int | None = None, *, demo: bool = False,
                      **uvicorn_overrides: object) -> AsyncIterator[Gateway]:
    """A real uvicorn serving the app (with the demo's routes if `demo`) on 127.0.0.1, in the
    test's event loop."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then (without
    # it a request on a kept-alive connection waits ~40 ms for the delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    bound_port = int(sock.getsockname()[1])
    app = create_app(settings, demo=demo)
    config = uvicorn_config(GatewayApp(app), settings,
                            **{"log_level": "warning", **uvicorn_overrides})
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during start-up")
                await asyncio.sleep(0.01)
        yield Gateway(app=app, server=server, port=bound_port)
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


async def wait_ready(client: httpx.AsyncClient, bound_s: float = 15) -> httpx.Response:
    """Poll /readyz until 200 (the pub/sub connection comes up a moment after start-up, or
    after a Redis restart), within `bound_s`; returns that answer."""
    async with asyncio.timeout(bound_s):
        while True:
            response = await client.get("/readyz")
            if response.status_code == 200:
                return response
            await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     bound_s: float = 15.0) -> None:
    """Poll `check` until it holds; an AssertionError naming `what` after `bound_s`."""
    try:
        async with asyncio.timeout(bound_s):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {bound_s:g} s") from None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port(taken: set[int]) -> int:
    """A port for a cluster node whose bus port (port + 10000) is free as well.

    redis-server refuses a cluster node above 55535 (its bus port would not fit), so nodes get
    ports from 10000-22000: the bus ports then stay below the kernel's ephemeral range too.
    """
    for _ in range(10_000):
        port = random.randint(10_000, 22_000)
        pair = {port, port + 10_000}
        if pair & taken or pair & {6379, 16379, 26379}:
            continue
        if all(_bindable(candidate) for candidate in pair):
            taken.update(pair)
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes:
    """A real Redis Cluster of three primaries (no replicas) on free ports."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        taken: set[int] = set()
        self.nodes = [
            RedisServer(workdir / f"node{index}", port=cluster_port(taken), extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            ])
            for index in range(size)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout: float = 30.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=True,
            )
            self.wait_ok(timeout)
        except BaseException:
            self.stop()  # no node left running behind a failed start
            raise

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in node.cli("CLUSTER", "INFO", check=False)
                   for node in self.nodes):
                return
            time.sleep(0.1)
        raise TimeoutError("cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@asynccontextmanager
async def loopback_connections(count: int, bound_s: float = 10
                               ) -> AsyncIterator[list[tuple[asyncio.Transport,
                                                             asyncio.StreamReader]]]:
    """`count` real TCP connections over loopback: each the server side's transport with the
    reader of its client, which never writes and reads only when a test does."""
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(writer.transport)  # type: ignore[arg-type]

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pairs: list[tuple[asyncio.Transport, asyncio.StreamReader]] = []
    clients: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            clients.append(writer)
            async with asyncio.timeout(bound_s):
                pairs.append((await accepted.get(), reader))
        yield pairs
    finally:
        for transport, _ in pairs:
            transport.close()
        for writer in clients:
            writer.close()
        server.close()
        await server.wait_closed()


# --- `taskcast serve` as a real process --------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """The caller's environment without TASKCAST_* variables that could steer the server."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("TASKCAST_")}


def start_serve(args: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None
                ) -> subprocess.Popen[bytes]:
    """`python -m taskcast serve ARGS` from the repository root, its output in `log_file`;
    `env` defaults to clean_environ()."""
    with log_file.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "taskcast", "serve", *args],
            cwd=ROOT, env=dict(clean_environ() if env is None else env),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )


async def wait_until_answering(client: httpx.AsyncClient, process: subprocess.Popen[bytes],
                               log_file: Path, path: str, bound_s: float) -> None:
    """Poll `path` until it answers 200; fail with the server's log if it exits first."""
    async with asyncio.timeout(bound_s):
        while True:
            if process.poll() is not None:
                pytest.fail(f"taskcast serve exited {process.returncode}:\n"
                            f"{log_file.read_text(errors='replace')}")
            try:
                if (await client.get(path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


def kill(process: subprocess.Popen[bytes], bound_s: float) -> None:
    """Clean-up: SIGKILL the process if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
        process.wait(bound_s)
