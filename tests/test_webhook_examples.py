"""The webhook receiver examples (examples/webhook_receiver.py, examples/webhook_receiver.mjs),
run as their headers say against a real redis-server and a gateway that delivers webhooks.

Each receiver is a subprocess on a free port with the gateway's secret in
TASKCAST_WEBHOOK_SECRET; the gateway runs in the test's event loop (loopback allowed as a
webhook target) and POSTs the tasks' states to it, signed. What is checked is what a user of
the receiver would see: one line per verified message, in order, the terminal state last;
forged messages answered 401 and never printed; repeats of a webhook-id and older versions
answered 204 and not printed; a cancelled task answered 410, after which taskcast stops.

The Node receiver needs node, npm and the `standardwebhooks` package, installed with npm into a
temporary folder this module owns (its own npm cache too; nothing global, nothing in the
repository). When npm cannot install it the test fails with npm's output: the Node example has
then not been checked, which is not a pass.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from standardwebhooks import Webhook

from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import RedisServer, eventually, free_port, run_gateway
from tests.test_examples import BOUND_S, EXAMPLES, Example, Spawn

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()  # the gateway's and receivers'
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()  # a forger's
EVENTS = ["start", "progress", "completed", "failed"]
BIG_ID = 2**53 + 1  # above JavaScript's exact integers: the Node receiver must not round it
CANCELLED_ID = 2**53 + 3  # the receivers are started with --cancelled CANCELLED_ID
REPLAY_ID = 777  # a task only the test's own (validly signed) messages are about
NPM_BOUND_S = 120.0  # npm install, registry included
LINE = re.compile(r"task\.(\w+) task_id=(\d+) status=(\w+) progress=(\d+) version=(\d+)")


@pytest.fixture(scope="module")
def node_receiver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/webhook_receiver.mjs copied into a temporary folder with `standardwebhooks@1`
    installed next to it (Node resolves packages from the script's folder), ready to run."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("the Node receiver needs node and npm on PATH (Node 20); they are missing, "
                    "so examples/webhook_receiver.mjs cannot be checked", pytrace=False)
    folder = tmp_path_factory.mktemp("webhook-receiver-node")
    shutil.copy(EXAMPLES / "webhook_receiver.mjs", folder / "webhook_receiver.mjs")
    env = {**os.environ, "npm_config_cache": str(folder / ".npm-cache"),
           "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false"}
    argv = [npm, "install", "--prefix", str(folder), "--no-package-lock", "--no-audit",
            "--no-fund", "standardwebhooks@1"]
    problem = "did not finish"
    try:
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=NPM_BOUND_S, check=False)
        output = f"--- stdout:\n{done.stdout[-2000:]}\n--- stderr:\n{done.stderr[-2000:]}"
        if done.returncode == 0 and (folder / "node_modules" / "standardwebhooks").is_dir():
            return folder / "webhook_receiver.mjs"
        problem = f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as exc:
        output = f"{exc.stdout!r:.2000}\n{exc.stderr!r:.2000}"
        problem = f"did not finish in {NPM_BOUND_S:g} s"
    pytest.fail(f"`npm install standardwebhooks@1` {problem}: is the npm registry reachable? "
                f"examples/webhook_receiver.mjs was not checked.\n{output}", pytrace=False)


@dataclass
class Command:
    """How to run one receiver: the program and script, and the folder to run it in."""

    argv: tuple[str, ...]
    cwd: Path


@pytest.fixture(params=["python", "node"])
def receiver(request: pytest.FixtureRequest) -> Command:
    if request.param == "python":
        return Command((sys.executable, str(EXAMPLES / "webhook_receiver.py")), EXAMPLES)
    script: Path = request.getfixturevalue("node_receiver")
    return Command((shutil.which("node") or "node", str(script)), script.parent)


async def start_receiver(spawn: Spawn, command: Command, *args: str) -> tuple[Example, str]:
    """The receiver running on a free port with SECRET, answering: (its run, its URL)."""
    port = free_port()
    run = await spawn(*command.argv, "--port", str(port), *args,
                      env={"TASKCAST_WEBHOOK_SECRET": SECRET}, cwd=command.cwd)
    url = f"http://127.0.0.1:{port}/webhooks"
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        try:
            async with asyncio.timeout(BOUND_S):
                while run.process.returncode is None:
                    try:
                        await http.get(url)  # any answer (405): it is listening
                        return run, url
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
        except TimeoutError:
            pass
    await run.kill()
    pytest.fail(f"the receiver did not answer on {url}\n{run.transcript()}")


async def logged(run: Example, text: str) -> None:
    """Wait until `text` appears on the receiver's stderr."""
    try:
        async with asyncio.timeout(BOUND_S):
            while not any(text in line for line in run.stderr):
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    assert any(text in line for line in run.stderr), f"{text!r} not logged\n{run.transcript()}"


def message(kind: str, task_id: int, status: str, progress: int, version: int) -> bytes:
    """A body shaped like taskcast's (compact JSON, the whole task object)."""
    return json.dumps({
        "type": f"task.{kind}", "timestamp": "2030-01-01T00:00:00.000Z",
        "data": {"task_id": task_id, "status": status, "progress": progress, "type": "",
                 "angle": "", "image": {"image_base64": "", "image_url": ""},
                 "error_message": "", "version": version, "updated_at": 1893456000000},
    }, separators=(",", ":")).encode()


def signed(body: bytes, webhook_id: str, secret: str = SECRET,
           age_s: float = 0.0) -> dict[str, str]:
    """Standard Webhooks headers for `body`, as a sender with `secret` makes them."""
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=age_s)
    return {"content-type": "application/json", "webhook-id": webhook_id,
            "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(webhook_id, when, body)}


def printed(run: Example) -> dict[int, list[tuple[str, str, int, int]]]:
    """The receiver's lines, (kind, status, progress, version) per task in printed order;
    every stdout line must be one."""
    seen: dict[int, list[tuple[str, str, int, int]]] = {}
    for line in run.stdout:
        match = LINE.fullmatch(line)
        assert match, f"unexpected output {line!r}\n{run.transcript()}"
        seen.setdefault(int(match[2]), []).append(
            (match[1], match[3], int(match[4]), int(match[5])))
    return seen


async def test_receiver_prints_verified_messages_in_order_and_nothing_else(
    redis_server: RedisServer, prefix: str, producer: Producer, redis: aioredis.Redis,
    spawn: Spawn, receiver: Command
) -> None:
    run, url = await start_receiver(spawn, receiver, "--cancelled", str(CANCELLED_ID))

    # Forgeries first: one taken would be printed before anything else, and its version 99
    # would hide every real message of BIG_ID.
    forged = message("completed", BIG_ID, "completed", 100, 99)
    genuine = message("start", BIG_ID, "processing", 1, 2)
    swapped = signed(genuine, "msg_forged_5")
    attempts: list[tuple[bytes, dict[str, str]]] = [
        (forged, signed(forged, "msg_forged_1", secret=OTHER_SECRET)),  # another secret
        (forged, {"content-type": "application/json"}),  # no signature at all
        (forged, signed(genuine, "msg_forged_3")),  # the body changed after signing
        (forged, signed(forged, "msg_forged_4", age_s=600)),  # too old: a replay
        (genuine, {**swapped, "webhook-id": "msg_forged_6"}),  # signed for another id
    ]
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        for body, headers in attempts:
            response = await http.post(url, content=body, headers=headers)
            assert response.status_code == 401, run.transcript()

        settings = Settings(redis_url=redis_server.url, prefix=prefix, webhook_secret=SECRET,
                            webhook_allowed_hosts="127.0.0.1", auth="off")
        async with run_gateway(settings):
            hooked: dict[str, Any] = {"webhook_url": url, "webhook_events": EVENTS}
            big = (await producer.create(task_id=BIG_ID, **hooked)).task_id
            failing = (await producer.create(**hooked)).task_id
            cancelled = (await producer.create(task_id=CANCELLED_ID, **hooked)).task_id

            # One change at a time, each message seen before the next change: all of them.
            await producer.progress(big, 10)
            await run.printed(f"task.start task_id={big} status=processing progress=10"
                              " version=2")
            await producer.progress(big, 50)
            await run.printed(f"task.progress task_id={big} status=processing progress=50"
                              " version=3")
            await producer.complete(big, image_url="https://cdn.example/1.png")
            await run.printed(f"task.completed task_id={big} status=completed progress=100"
                              " version=4")

            # Changes in quick succession: progress may be conflated, the end comes last.
            for percent in (20, 60):
                await producer.progress(failing, percent)
                await asyncio.sleep(0.05)
            await producer.fail(failing, "out of GPU memory")
            await run.printed(f"task.failed task_id={failing} status=failed progress=60"
                              " version=4")

            # 410: taskcast marks the task gone and sends nothing more for it.
            await producer.progress(cancelled, 10)
            await logged(run, f"410 cancelled: task_id={cancelled}")
            record = TaskKeys(prefix).record(cancelled)

            async def gone() -> bool:
                return await redis.hget(record, "webhook_state") == b"gone"

            await eventually(gone, f"task {cancelled} marked gone after the 410", BOUND_S)
            await producer.complete(cancelled, image_url="https://cdn.example/3.png")

            # Validly signed, as a retry or a replay would be: a repeated webhook-id and an
            # older version are answered 204 and dropped. The receiver handles messages in
            # the order it took them, so once the last one is printed, a line for either
            # would have been printed before it.
            replays = [
                ("msg_replay_a", message("progress", REPLAY_ID, "processing", 30, 3)),
                ("msg_replay_a", message("progress", REPLAY_ID, "processing", 30, 3)),
                ("msg_replay_b", message("start", REPLAY_ID, "processing", 10, 2)),
                ("msg_replay_c", message("completed", REPLAY_ID, "completed", 100, 4)),
            ]
            for webhook_id, body in replays:
                response = await http.post(url, content=body, headers=signed(body, webhook_id))
                assert response.status_code == 204, run.transcript()
            await run.printed(f"task.completed task_id={REPLAY_ID} status=completed"
                              " progress=100 version=4")

    lines = printed(run)
    assert lines[big] == [("start", "processing", 10, 2), ("progress", "processing", 50, 3),
                          ("completed", "completed", 100, 4)], run.transcript()
    ending = lines[failing]
    assert ending[-1] == ("failed", "failed", 60, 4), run.transcript()
    versions = [version for *_, version in ending]
    assert versions == sorted(set(versions)), run.transcript()  # once each, in order
    for kind, status, _, version in ending[:-1]:
        assert status == "processing" and version in (2, 3), run.transcript()
        assert kind == "progress" or (kind, version) == ("start", ending[0][3])
    assert lines[REPLAY_ID] == [("progress", "processing", 30, 3),
                                ("completed", "completed", 100, 4)], run.transcript()
    assert set(lines) == {big, failing, REPLAY_ID}, run.transcript()  # none for the others

    stderr = "\n".join(run.stderr)
    assert stderr.count("401 rejected") == len(attempts), run.transcript()
    assert stderr.count(f"410 cancelled: task_id={cancelled}") == 1, run.transcript()
    assert stderr.count("204 duplicate webhook-id msg_replay_a") == 1, run.transcript()
    assert stderr.count(f"204 older: task_id={REPLAY_ID} version=2") == 1, run.transcript()


async def test_receiver_exits_2_without_a_whsec_secret(spawn: Spawn, receiver: Command) -> None:
    bad = "not-a-whsec-secret-1234"
    for env in ({}, {"TASKCAST_WEBHOOK_SECRET": bad}):
        run = await spawn(*receiver.argv, "--port", str(free_port()), env=env,
                          cwd=receiver.cwd)
        assert await run.finish() == 2, run.transcript()
        assert "TASKCAST_WEBHOOK_SECRET" in "\n".join(run.stderr), run.transcript()
        assert bad not in run.output + "\n".join(run.stderr)
