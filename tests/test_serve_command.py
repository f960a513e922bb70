"""`python -m taskcast serve` as a real process: it serves, is ready on `memory://`, and exits 0
on SIGTERM. The port comes from `--port` or from `TASKCAST_PORT`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import (
    clean_environ,
    free_port,
    kill,
    start_serve,
    wait_ready,
    wait_until_answering,
)

MEMORY = ["--redis-url", "memory://"]
STARTUP_BOUND_S = 20
EXIT_BOUND_S = 10


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "serve.log"


@pytest.mark.parametrize("port_from", ["flag", "env"])
async def test_serve_answers_on_memory_store_and_exits_0_on_sigterm(
    log_file: Path, port_from: str
) -> None:
    port = free_port()
    env = clean_environ()
    if port_from == "flag":
        args = [*MEMORY, "--port", str(port)]
    else:
        args = MEMORY
        env["TASKCAST_PORT"] = str(port)
    process = start_serve(args, log_file, env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_until_answering(client, process, log_file, "/healthz", STARTUP_BOUND_S)

            async with asyncio.timeout(10):
                missing = await client.get("/tasks/1")
                ready = await wait_ready(client)
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/json"
            assert missing.json() == {"code": 404, "msg": "task not found", "data": None}
            assert ready.status_code == 200
            assert ready.json() == {"code": 200, "msg": "ready",
                                    "data": {"redis": "ok", "pubsub": "ok"}}

        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"taskcast serve did not exit within {EXIT_BOUND_S} s of SIGTERM")
        log = log_file.read_text(errors="replace")
        assert returncode == 0, log
        assert "Traceback" not in log
    finally:
        kill(process, EXIT_BOUND_S)


def test_serve_with_a_malformed_port_variable_exits_2_with_a_message(log_file: Path) -> None:
    env = clean_environ()
    env["TASKCAST_PORT"] = "eighty"
    process = start_serve(MEMORY, log_file, env)
    try:
        returncode = process.wait(STARTUP_BOUND_S)
        log = log_file.read_text(errors="replace")
        assert returncode == 2, log
        assert "TASKCAST_PORT" in log
        assert "Traceback" not in log
    finally:
        kill(process, EXIT_BOUND_S)


@pytest.mark.parametrize("command", ["serve", "demo", "token"])
def test_help_of_every_command_prints(command: str) -> None:
    """`taskcast serve --help` raised TypeError (a literal "%" in a setting's help text, which
    argparse %-formats); every flag must appear in the help."""
    result = subprocess.run([sys.executable, "-m", "taskcast", command, "--help"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: taskcast" in result.stdout
    if command != "token":
        assert "--max-stream-s" in result.stdout and "90-100 %" in result.stdout
        assert "--timeout-sweep-s" in result.stdout
