"""`taskcast watch` (contract 9, issue 13 item 2) as a real process against a real gateway
(uvicorn, redis-server), the tasks driven by a Producer: JSON lines, plain lines, progress bars
in a real terminal (tmux), `--save-dir`, the token, and every exit status.

The driving tests go in lockstep: each change waits for the line it causes before the next one
is made, so every state is seen (the client may skip intermediate states otherwise)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from taskcast.cli import main
from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.tokens import issue
from tests.servers import ROOT, Gateway, clean_environ, free_port, run_gateway

BOUND_S = 15.0
SECRET = "w" * 64
TASK_FIELDS = {"task_id", "status", "progress", "type", "angle", "image", "error_message",
               "version", "updated_at"}
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
LARGE_IMAGE = b"\x89PNG\r\n\x1a\n" + os.urandom(100_000)  # staged by the producer (> 64 KiB)
TMUX = shutil.which("tmux")  # scripts/test installs Debian's tmux where it is missing


class Watch:
    """`python -m taskcast watch ARGS` with its stdout and stderr piped."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: object, env: dict[str, str] | None = None) -> Watch:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "taskcast", "watch", *map(str, args), cwd=ROOT,
            env={**clean_environ(), **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=2**25)
        return cls(process)

    async def line(self) -> str:
        """The next line of stdout, without its newline."""
        assert self.process.stdout is not None
        async with asyncio.timeout(BOUND_S):
            raw = await self.process.stdout.readline()
        assert raw.endswith(b"\n"), f"stdout ended; stderr: {await self.stderr()}"
        return raw[:-1].decode()

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        async with asyncio.timeout(BOUND_S):
            return (await self.process.stderr.read()).decode()

    async def end(self) -> tuple[int, str, str]:
        """Exit status, the rest of stdout, and stderr."""
        try:
            async with asyncio.timeout(BOUND_S):
                out, err = await self.process.communicate()
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()


async def watch_to_end(*args: object, env: dict[str, str] | None = None
                       ) -> tuple[int, str, str]:
    return await (await Watch.start(*args, env=env)).end()


@asynccontextmanager
async def auth_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """A gateway whose access control takes HS256 tokens signed with SECRET."""
    async with run_gateway(settings.with_changes(jwt_secret=SECRET)) as gateway:
        yield gateway


# -- what a script reads ------------------------------------------------------------------------


async def test_json_lines_are_task_objects_in_version_order_terminal_last(
        gateway: Gateway, producer: Producer) -> None:
    a = (await producer.create(type="render", angle="front")).task_id
    b = (await producer.create()).task_id
    watch = await Watch.start(a, b, "--url", gateway.url, "--json")
    first = [json.loads(await watch.line()) for _ in range(2)]
    assert sorted(state["task_id"] for state in first) == sorted([a, b])
    seen = list(first)
    for task_id, change in [(a, producer.progress(a, 30)), (b, producer.progress(b, 10)),
                            (a, producer.progress(a, 80)),
                            (a, producer.complete(a, image_base64=IMAGE)),
                            (b, producer.complete(b, image_url="https://cdn.test/b.png"))]:
        await change
        state = json.loads(await watch.line())
        assert state["task_id"] == task_id
        seen.append(state)
    status, rest, err = await watch.end()
    assert (status, rest) == (0, ""), err
    for state in seen:
        assert set(state) == TASK_FIELDS and set(state["image"]) == {"image_base64",
                                                                     "image_url"}
    for task_id in (a, b):
        states = [state for state in seen if state["task_id"] == task_id]
        versions = [state["version"] for state in states]
        assert versions == sorted(set(versions)), versions  # each at most once, increasing
        assert [state["status"] for state in states][-1] == "completed"
        assert all(state["status"] not in ("completed", "failed") for state in states[:-1])
    a_states = [(s["status"], s["progress"]) for s in seen if s["task_id"] == a]
    assert a_states == [("submitted", 0), ("processing", 30), ("processing", 80),
                        ("completed", 100)]
    assert seen[0 if first[0]["task_id"] == a else 1]["type"] == "render"
    terminal_a = [s for s in seen if s["task_id"] == a][-1]
    assert base64.b64decode(terminal_a["image"]["image_base64"]) == IMAGE  # as received
    terminal_b = [s for s in seen if s["task_id"] == b][-1]
    assert terminal_b["image"] == {"image_base64": "", "image_url": "https://cdn.test/b.png"}


@pytest.mark.parametrize("transport", ["auto", "sse", "ws", "poll"])
async def test_plain_lines_one_per_state_with_the_error_of_a_failure(
        gateway: Gateway, producer: Producer, transport: str) -> None:
    a = (await producer.create()).task_id
    b = (await producer.create()).task_id
    watch = await Watch.start(a, b, "--url", gateway.url, "--transport", transport)
    assert {await watch.line(), await watch.line()} == {f"{a} submitted 0%",
                                                        f"{b} submitted 0%"}
    await producer.progress(a, 30)
    assert await watch.line() == f"{a} processing 30%"
    await producer.progress(b, 60)
    assert await watch.line() == f"{b} processing 60%"
    await producer.complete(a, image_base64=IMAGE)
    assert await watch.line() == f"{a} completed 100%"
    await producer.fail(b, "GPU out of memory\n\x1b[2Jretry later")
    # Escaped: one line per state, and no escape sequence reaches whoever reads it.
    assert await watch.line() == f"{b} failed 60% error: GPU out of memory\\n\\x1b[2Jretry later"
    assert await watch.end() == (1, "", "")


async def test_already_terminal_tasks_print_their_state_and_exit_at_once(
        gateway: Gateway, producer: Producer) -> None:
    a = (await producer.create()).task_id
    await producer.complete(a, image_url="/a.png")
    status, out, err = await watch_to_end(a, a, "--url", gateway.url)  # a repeated id: once
    assert (status, out, err) == (0, f"{a} completed 100%\n", "")


# -- --save-dir ---------------------------------------------------------------------------------


async def test_save_dir_writes_decoded_and_downloaded_images(
        settings: Settings, producer: Producer, tmp_path: Path) -> None:
    """Decoded from image_base64 (inline and staged), downloaded from an absolute URL (no
    token sent to that other origin) and from a path on the gateway (token sent: the gateway
    serves /tasks/{id} only with it)."""
    requests: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(IMAGE) + IMAGE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ids = [(await producer.create()).task_id for _ in range(4)]
    inline, staged, absolute, relative = ids
    token = issue(SECRET, ids, 60)
    async with server, auth_gateway(settings) as gateway:
        watch = await Watch.start(*ids, "--url", gateway.url + "/", "--save-dir",
                                  tmp_path / "images", env={"TASKCAST_TOKEN": token})
        for _ in ids:
            await watch.line()
        await producer.complete(inline, image_base64=IMAGE)
        await producer.complete(staged, image_base64=base64.b64encode(LARGE_IMAGE).decode())
        await producer.complete(absolute, image_url=f"http://127.0.0.1:{port}/x.png?s=1")
        await producer.complete(relative, image_url=f"/tasks/{relative}?image_base64=false")
        status, out, err = await watch.end()
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            expected = (await http.get(f"/tasks/{relative}?image_base64=false",
                                       headers={"Authorization": f"Bearer {token}"})).content
    assert status == 0, err
    assert err == ""
    assert token not in out
    images = tmp_path / "images"
    assert sorted(path.name for path in images.iterdir()) == sorted(f"{i}.png" for i in ids)
    assert (images / f"{inline}.png").read_bytes() == IMAGE
    assert (images / f"{staged}.png").read_bytes() == LARGE_IMAGE
    assert (images / f"{absolute}.png").read_bytes() == IMAGE
    assert (images / f"{relative}.png").read_bytes() == expected
    assert json.loads(expected)["data"]["status"] == "completed"
    assert len(requests) == 1 and requests[0].startswith(b"GET /x.png?s=1 HTTP/1.1\r\n")
    assert b"authorization" not in requests[0].lower()


async def test_an_image_that_cannot_be_downloaded_exits_1_and_says_why(
        gateway: Gateway, producer: Producer, tmp_path: Path) -> None:
    saved = (await producer.create()).task_id
    missing = (await producer.create()).task_id
    await producer.complete(saved, image_base64=IMAGE)
    await producer.complete(missing, image_url="/no/such/image.png")
    status, out, err = await watch_to_end(saved, missing, "--url", gateway.url,
                                          "--save-dir", tmp_path)
    assert status == 1
    assert f"task {missing}: image not saved: GET {gateway.url}/no/such/image.png: HTTP 404" \
        in err
    assert (tmp_path / f"{saved}.png").read_bytes() == IMAGE
    assert not (tmp_path / f"{missing}.png").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{saved}.png"]


# -- exit statuses --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["watch"],                                                   # no id
    ["watch", "1"],                                              # no --url
    ["watch", "1", "--url", "ftp://127.0.0.1:1"],
    ["watch", "1", "--url", "127.0.0.1:8000"],
    ["watch", "1", "--url", "http://127.0.0.1:port"],
    ["watch", "1", "--url", "http://[::1"],
    ["watch", "-1", "--url", "http://127.0.0.1:1"],
    ["watch", "x", "--url", "http://127.0.0.1:1"],
    ["watch", str(2**63), "--url", "http://127.0.0.1:1"],
    ["watch", "1", "--url", "http://127.0.0.1:1", "--transport", "pigeon"],
    ["watch", "1", "--url", "http://127.0.0.1:1", "--give-up-after", "0"],
    ["watch", "1", "--url", "http://127.0.0.1:1", "--give-up-after", "nan"],
    ["watch", "1", "--url", "http://127.0.0.1:1", "--colour"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: taskcast" in capsys.readouterr().err


def test_help_says_where_the_token_should_come_from(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["watch", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "TASKCAST_TOKEN" in text and "`ps`" in text
    assert "4 the gateway could not be reached" in text


async def test_a_save_dir_that_cannot_be_made_exits_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    status, out, err = await watch_to_end(1, "--url", "http://127.0.0.1:1",
                                          "--save-dir", tmp_path / "file" / "images")
    assert (status, out) == (2, "")
    assert err.startswith("taskcast watch: --save-dir: ")


async def test_unknown_task_exits_3(gateway: Gateway, producer: Producer) -> None:
    known = (await producer.create()).task_id
    unknown = known + 1000
    for args in ([unknown], [known, unknown]):
        status, out, err = await watch_to_end(*args, "--url", gateway.url)
        assert status == 3, err
        assert err == f"taskcast watch: task {unknown} not found (never created, or expired)\n"


@pytest.mark.parametrize("refusal", ["other task", "bad signature", "no token"])
async def test_a_refused_token_exits_3_without_printing_it(
        settings: Settings, producer: Producer, refusal: str) -> None:
    mine = (await producer.create()).task_id
    theirs = (await producer.create()).task_id
    token = {"other task": issue(SECRET, [theirs], 60),
             "bad signature": issue("v" * 64, [mine], 60), "no token": ""}[refusal]
    async with auth_gateway(settings) as gateway:
        status, out, err = await watch_to_end(mine, "--url", gateway.url, "--token", token)
    assert (status, out) == (3, ""), err
    assert err.startswith("taskcast watch: the gateway refused access (40")
    assert ("(403: " if refusal == "other task" else "(401: ") in err
    assert not token or token not in err


async def test_a_valid_token_from_the_environment_or_the_flag_is_used(
        settings: Settings, producer: Producer) -> None:
    task_id = (await producer.create()).task_id
    await producer.fail(task_id, "no GPU")
    token = issue(SECRET, [task_id], 60)
    async with auth_gateway(settings) as gateway:
        from_env = await watch_to_end(task_id, "--url", gateway.url,
                                      env={"TASKCAST_TOKEN": token})
        from_flag = await watch_to_end(task_id, "--url", gateway.url, "--token", token,
                                       env={"TASKCAST_TOKEN": "not-a-token"})
    assert from_env == from_flag == (1, f"{task_id} failed 0% error: no GPU\n", "")


async def test_nothing_listening_exits_4_after_give_up_after() -> None:
    port = free_port()
    status, out, err = await watch_to_end(1, 2, "--url", f"http://127.0.0.1:{port}",
                                          "--give-up-after", "1")
    assert (status, out) == (4, "")
    assert err.startswith("taskcast watch: no answer from the gateway for 1.0 s (")


async def test_ctrl_c_exits_130_quietly(gateway: Gateway, producer: Producer) -> None:
    task_id = (await producer.create()).task_id
    watch = await Watch.start(task_id, "--url", gateway.url)
    assert await watch.line() == f"{task_id} submitted 0%"
    watch.process.send_signal(signal.SIGINT)
    assert await watch.end() == (130, "", "")


async def test_a_reader_that_goes_away_ends_the_watch_without_a_traceback(
        gateway: Gateway, producer: Producer) -> None:
    task_id = (await producer.create()).task_id
    command = (f"{shlex.quote(sys.executable)} -m taskcast watch {task_id} --url {gateway.url} "
               "--json | head -n 1; echo watch exited ${PIPESTATUS[0]} >&2")
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=ROOT, env=clean_environ(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    async with asyncio.timeout(BOUND_S):
        first = await process.stdout.readline()
    assert json.loads(first)["status"] == "submitted"  # head has it, and exits
    for progress in range(10, 101, 10):  # writes until one finds the pipe closed
        await producer.progress(task_id, progress)
        await asyncio.sleep(0.05)
    async with asyncio.timeout(BOUND_S):
        out, err = await process.communicate()
    assert (out, err) == (b"", b"watch exited 1\n")


# -- a real terminal ------------------------------------------------------------------------------


class Tmux:
    """A tmux server of this test's own (its socket in the test's directory) running one
    command in a pane."""

    def __init__(self, directory: Path) -> None:
        if TMUX is None:
            pytest.fail("tmux is missing: apt-get install tmux (scripts/test does)")
        self.socket = str(directory / "tmux.socket")

    async def run(self, *args: str) -> str:
        assert TMUX is not None
        process = await asyncio.create_subprocess_exec(
            TMUX, "-S", self.socket, "-f", "/dev/null", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**clean_environ(), "LANG": "C.UTF-8", "TERM": "xterm-256color"})
        async with asyncio.timeout(BOUND_S):
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return out.decode()

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-t", "watch")

    async def screen_when(self, ready: Callable[[str], bool]) -> str:
        """The screen once `ready` holds for it (fails with the last screen after BOUND_S)."""
        screen = ""
        try:
            async with asyncio.timeout(BOUND_S):
                while not ready(screen := await self.screen()):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            pytest.fail(f"the screen never got there:\n{screen}")
        return screen


def row(screen: str, task_id: int) -> str:
    [line] = [line for line in screen.splitlines() if re.match(rf"\s*{task_id} ", line)]
    return line


def bar(task_id: int, status: str, percent: int, rest: str = "") -> re.Pattern[str]:
    """A row: id, status, bar, percentage, elapsed time, then `rest`."""
    return re.compile(rf"\s*{task_id} +{status} +[━╸╺ ]+ +{percent}% +\d+:\d\d:\d\d *{rest}$")


async def test_progress_bars_in_a_real_terminal(gateway: Gateway, producer: Producer,
                                                tmp_path: Path) -> None:
    a, b, c = [(await producer.create()).task_id for _ in range(3)]
    tmux = Tmux(tmp_path)
    command = (f"{sys.executable} -m taskcast watch {a} {b} {c} --url {gateway.url}; "
               "echo exit status $?; sleep 600")
    await tmux.run("new-session", "-d", "-s", "watch", "-x", "110", "-y", "12", "-c",
                   str(ROOT), "sh", "-c", command)
    try:
        screen = await tmux.screen_when(lambda s: s.count("submitted") == 3)
        for task_id in (a, b, c):
            assert bar(task_id, "submitted", 0).match(row(screen, task_id)), screen
        await producer.progress(a, 40)
        await producer.progress(b, 70)
        screen = await tmux.screen_when(lambda s: "40%" in s and "70%" in s)
        assert bar(a, "processing", 40).match(row(screen, a)), screen
        assert bar(b, "processing", 70).match(row(screen, b)), screen
        assert bar(c, "submitted", 0).match(row(screen, c)), screen
        assert "━" in row(screen, a)  # a drawn bar, not a line of text
        await producer.complete(a, image_base64=IMAGE)
        await producer.fail(b, "GPU out of memory")
        await producer.complete(c, image_url="https://cdn.test/c.png")
        screen = await tmux.screen_when(lambda s: "exit status" in s)
        assert bar(a, "completed", 100).match(row(screen, a)), screen
        assert bar(b, "failed", 70, "error: GPU out of memory").match(row(screen, b)), screen
        assert bar(c, "completed", 100).match(row(screen, c)), screen
        assert "exit status 1" in screen
        # Drawn in place: each task's row once, not a new row per update.
        assert [line for line in screen.splitlines() if line.strip()][:3] == [
            row(screen, a), row(screen, b), row(screen, c)]
    finally:
        await tmux.run("kill-server")
