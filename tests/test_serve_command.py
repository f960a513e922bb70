"""`python -m taskcast serve` as a real process: it serves, is ready on `memory://`, and exits 0
on SIGTERM. The port comes from `--port` or from `TASKCAST_PORT`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_BOUND_S = 20
EXIT_BOUND_S = 10


def clean_environ() -> dict[str, str]:
    """The caller's environment without TASKCAST_* variables that could steer the server."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("TASKCAST_")}


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "serve.log"


def start_serve(args: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "taskcast", "serve", "--redis-url", "memory://", *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )


async def wait_until_healthy(client: httpx.AsyncClient, process: subprocess.Popen[bytes],
                             log_file: Path) -> None:
    async with asyncio.timeout(STARTUP_BOUND_S):
        while True:
            if process.poll() is not None:
                pytest.fail(f"taskcast serve exited {process.returncode}:\n"
                            f"{log_file.read_text(errors='replace')}")
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(EXIT_BOUND_S)


@pytest.mark.parametrize("port_from", ["flag", "env"])
async def test_serve_answers_on_memory_store_and_exits_0_on_sigterm(
    log_file: Path, port_from: str
) -> None:
    port = free_port()
    env = clean_environ()
    if port_from == "flag":
        args = ["--port", str(port)]
    else:
        args = []
        env["TASKCAST_PORT"] = str(port)
    process = start_serve(args, env, log_file)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_until_healthy(client, process, log_file)

            async with asyncio.timeout(10):
                missing = await client.get("/tasks/1")
                ready = await client.get("/readyz")
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/json"
            assert missing.json() == {"code": 404, "msg": "task not found", "data": None}
            assert ready.status_code == 200
            assert ready.json() == {"code": 200, "msg": "ready", "data": {"redis": "ok"}}

        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"taskcast serve did not exit within {EXIT_BOUND_S} s of SIGTERM")
        log = log_file.read_text(errors="replace")
        assert returncode == 0, log
        assert "Traceback" not in log
    finally:
        stop(process)


def test_serve_with_a_malformed_port_variable_exits_2_with_a_message(log_file: Path) -> None:
    env = clean_environ()
    env["TASKCAST_PORT"] = "eighty"
    process = start_serve([], env, log_file)
    try:
        returncode = process.wait(STARTUP_BOUND_S)
        log = log_file.read_text(errors="replace")
        assert returncode == 2, log
        assert "TASKCAST_PORT" in log
        assert "Traceback" not in log
    finally:
        stop(process)
