"""examples/nginx/taskcast.conf in front of a real gateway: Debian's nginx runs the shipped file
(only its listen port, upstream address, log directory and the numbers of its limits replaced)
and real REST, SSE and WebSocket clients go through it.

Every test starts its own nginx (a few milliseconds), so each gets fresh per-IP limit counters
and its own log files: all clients here share one address, 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.tokens import issue
from tests.servers import ROOT, Gateway, RedisServer, free_port, run_gateway
from tests.sse_client import Follower, Transcript, stream_problems
from tests.test_ws import close_code, recv

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SHIPPED = ROOT / "examples" / "nginx" / "taskcast.conf"
BOUND_S = 10.0  # only against hangs
SECRET = "x" * 48
TOO_MANY = {"code": 429, "msg": "too many requests", "data": None}
NOT_FOUND = {"code": 404, "msg": "task not found", "data": None}

# The shipped numbers, which the tests replace (each must occur exactly as often as listed, so a
# change to the file that these substitutions would miss fails here instead of going untested).
SHIPPED_LIMITS = {
    "streams": ("limit_conn taskcast_streams 20;", 4),
    "connect_rate": ("zone=taskcast_connects:10m rate=10r/s;", 1),
    "connect_burst": ("zone=taskcast_connects burst=20 nodelay;", 4),
    "rest_rate": ("zone=taskcast_rest:10m rate=20r/s;", 1),
    "rest_burst": ("zone=taskcast_rest burst=40 nodelay;", 1),
    "header_timeout": ("client_header_timeout 10s;", 1),
}


@dataclass
class Limits:
    """The numbers a test puts into the shipped directives (generous unless a test says)."""

    streams: int = 100
    connect_rate: str = "1000r/s"
    connect_burst: int = 1000
    rest_rate: str = "1000r/s"
    rest_burst: int = 1000
    header_timeout: str = "10s"


@dataclass
class Nginx:
    port: int
    logs: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.logs / "taskcast.access.log"

    @property
    def error_log(self) -> Path:
        return self.logs / "taskcast.error.log"

    def log_text(self, path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""


def _replace(text: str, old: str, new: str, count: int) -> str:
    found = text.count(old)
    assert found == count, f"{SHIPPED.name}: {old!r} occurs {found} times, expected {count}"
    return text.replace(old, new)


def render(port: int, upstream_port: int, logs: Path, limits: Limits) -> str:
    """The shipped file with this test's port, upstream, log directory and limit numbers."""
    text = SHIPPED.read_text()
    text = _replace(text, "listen 8080;", f"listen 127.0.0.1:{port};", 1)
    text = _replace(text, "server 127.0.0.1:8000 ", f"server 127.0.0.1:{upstream_port} ", 1)
    text = _replace(text, "/var/log/nginx/", f"{logs}/", 2)
    new = {
        "streams": f"limit_conn taskcast_streams {limits.streams};",
        "connect_rate": f"zone=taskcast_connects:10m rate={limits.connect_rate};",
        "connect_burst": f"zone=taskcast_connects burst={limits.connect_burst} nodelay;",
        "rest_rate": f"zone=taskcast_rest:10m rate={limits.rest_rate};",
        "rest_burst": f"zone=taskcast_rest burst={limits.rest_burst} nodelay;",
        "header_timeout": f"client_header_timeout {limits.header_timeout};",
    }
    for name, (old, count) in SHIPPED_LIMITS.items():
        text = _replace(text, old, new[name], count)
    return text


def main_conf(tmp: Path, site: Path) -> str:
    """An nginx.conf that runs in `tmp` as the current user and includes the site at http{}."""
    # As root, nginx switches its workers to `nobody`, which could not use the test's temporary
    # directory (pytest makes it 0700): keep them root. As anyone else there is no switch.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {tmp / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
            f"error_log {tmp / 'main.error.log'} notice;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n{temp}\n    access_log off;\n    include {site};\n}}\n")


def require_nginx() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"nginx is not installed ({NGINX} is missing): tests/test_nginx.py runs "
                    "Debian's nginx in front of a gateway. scripts/test installs it as root; "
                    "otherwise run 'sudo apt-get install nginx'.")


@asynccontextmanager
async def run_nginx(tmp: Path, upstream_port: int, limits: Limits | None = None
                    ) -> AsyncIterator[Nginx]:
    """nginx with the shipped site in front of the gateway on `upstream_port`, answering on a
    free port of its own."""
    require_nginx()
    tmp.mkdir(parents=True, exist_ok=True)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    site = tmp / "taskcast.conf"
    site.write_text(render(port, upstream_port, logs, limits or Limits()))
    conf = tmp / "nginx.conf"
    conf.write_text(main_conf(tmp, site))
    output = tmp / "nginx.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [NGINX, "-p", f"{tmp}/", "-c", str(conf), "-e", str(tmp / "startup.log")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    nginx = Nginx(port=port, logs=logs, process=process)
    try:
        await wait_answering(nginx, tmp)
        yield nginx
    finally:
        if process.poll() is None:
            process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                process.wait(BOUND_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(BOUND_S)


async def wait_answering(nginx: Nginx, tmp: Path) -> None:
    """Until nginx answers /metrics (a 404 of its own: touches neither a limit nor the
    gateway); fail with its logs if it exits first."""
    async with httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as client:
        async with asyncio.timeout(BOUND_S):
            while True:
                if nginx.process.poll() is not None:
                    logs = "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')}"
                                     for path in sorted(tmp.glob("*.log")) + [tmp / "nginx.out"]
                                     if path.exists())
                    pytest.fail(f"nginx exited {nginx.process.returncode}:\n{logs}")
                with suppress(httpx.TransportError):
                    if (await client.get("/metrics")).status_code == 404:
                        return
                await asyncio.sleep(0.02)


@pytest.fixture
async def nginx(tmp_path: Path, gateway: Gateway) -> AsyncIterator[Nginx]:
    async with run_nginx(tmp_path / "nginx", gateway.port) as running:
        yield running


@pytest.fixture
async def client(nginx: Nginx) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as http:
        yield http


def ws_connect(url: str, **options: Any) -> Any:
    return connect(url, proxy=None, open_timeout=BOUND_S, close_timeout=BOUND_S,
                   max_size=None, **options)


async def wait_for(check: Callable[[], bool], what: str) -> None:
    """Poll `check()` until it is true, for at most BOUND_S."""
    try:
        async with asyncio.timeout(BOUND_S):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def has_progress(transcript: Transcript, progress: int) -> Callable[[], bool]:
    return lambda: any(task["progress"] == progress for task in transcript.tasks())


# --- the shipped file -----------------------------------------------------------------------------


def test_the_shipped_file_is_valid_as_it_is(tmp_path: Path) -> None:
    """`nginx -t` accepts the file unchanged (listen 8080, upstream 127.0.0.1:8000), inside an
    http {} like Debian's conf.d/. Only the log directory moves into tmp."""
    require_nginx()
    site = tmp_path / "taskcast.conf"
    site.write_text(_replace(SHIPPED.read_text(), "/var/log/nginx/", f"{tmp_path}/", 2))
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_conf(tmp_path, site))
    result = subprocess.run([NGINX, "-t", "-p", f"{tmp_path}/", "-c", str(conf),
                             "-e", str(tmp_path / "startup.log")],
                            capture_output=True, text=True, timeout=BOUND_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "syntax is ok" in result.stderr


# --- REST -----------------------------------------------------------------------------------------


async def test_rest_through_nginx(client: httpx.AsyncClient, producer: Producer) -> None:
    task = await producer.create(type="txt2img", angle="front")
    await producer.progress(task.task_id, 30)

    response = await client.get(f"/tasks/{task.task_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200 and body["msg"] == "success"
    assert body["data"]["task_id"] == task.task_id
    assert (body["data"]["status"], body["data"]["progress"]) == ("processing", 30)
    etag = response.headers["etag"]
    assert etag == f'"{body["data"]["version"]}"'

    # ETag/304 survive the proxy (REST goes over kept-alive upstream connections).
    unchanged = await client.get(f"/tasks/{task.task_id}", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""

    missing = await client.get("/tasks/987654321")
    assert missing.status_code == 404
    assert missing.json() == NOT_FOUND

    # /metrics is not served through the proxy (scrape each gateway directly).
    metrics = await client.get("/metrics")
    assert metrics.status_code == 404
    assert metrics.json() == {"code": 404, "msg": "not found", "data": None}


async def test_no_gateway_answers_502_in_json(tmp_path: Path) -> None:
    """With nothing listening upstream, nginx's own 502 comes in the gateway's JSON shape."""
    async with run_nginx(tmp_path / "nginx", free_port()) as nginx, \
            httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as client:
        for path in ("/tasks/1", "/tasks/1/events"):
            response = await client.get(path)
            assert response.status_code == 502, (path, response.text)
            assert response.json() == {"code": 502, "msg": "bad gateway", "data": None}


# --- SSE ------------------------------------------------------------------------------------------


async def test_sse_single_task_is_live_through_nginx(client: httpx.AsyncClient,
                                                    producer: Producer) -> None:
    """Each state arrives while the task is still running (nothing waits in a proxy buffer),
    and the stream ends after the terminal state."""
    task = await producer.create(type="txt2img", angle="front")
    task_id = task.task_id
    await producer.progress(task_id, 10)
    follower = Follower(client, f"/tasks/{task_id}/events", expect=[task_id]).start()
    try:
        async with asyncio.timeout(BOUND_S):
            await follower.ready.wait()
        t = follower.transcript
        assert t.status == 200, t.summary()
        assert t.headers is not None
        assert t.headers["content-type"].startswith("text/event-stream")
        assert t.headers["cache-control"] == "no-store"
        assert t.tasks()[0]["progress"] == 10

        # The task is still processing: each state must reach the client now, not with the
        # end of the stream.
        for progress in (40, 70):
            await producer.progress(task_id, progress)
            await wait_for(has_progress(t, progress),
                           f"progress {progress} through nginx while the task runs")
            assert not t.ended
        await producer.complete(task_id, image_url=f"https://cdn.example/{task_id}.png")
        transcript = await follower.result(BOUND_S)
    finally:
        await follower.stop()

    assert stream_problems(transcript, [task_id]) == []
    assert [f["progress"] for f in transcript.tasks()] == [10, 40, 70, 100]


async def test_sse_multi_task_stream_ends_with_end_through_nginx(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    done = await producer.create(type="txt2img", angle="front")
    await producer.fail(done.task_id, "out of GPU memory")
    running = await producer.create(type="img2img", angle="side")
    await producer.progress(running.task_id, 20)
    ids = [done.task_id, running.task_id]

    follower = Follower(client, f"/events?task_id={ids[0]},{ids[1]}", expect=ids).start()
    try:
        async with asyncio.timeout(BOUND_S):
            await follower.ready.wait()
        await producer.progress(running.task_id, 60)
        await producer.complete(running.task_id, image_url="https://cdn.example/x.png")
        transcript = await follower.result(BOUND_S)
    finally:
        await follower.stop()

    assert stream_problems(transcript, ids, multi=True) == []
    last = transcript.frames[-1]
    assert (last.event, last.id) == ("end", "done")


# --- WebSocket ------------------------------------------------------------------------------------


async def test_ws_subscribe_through_nginx(nginx: Nginx, producer: Producer) -> None:
    task = await producer.create(type="txt2img", angle="front")
    task_id = task.task_id
    # A browser on the proxy's origin sends Origin with the proxy's host:port; the gateway
    # accepts it because nginx passes Host as the client sent it ($http_host).
    origin = {"Origin": nginx.url}
    async with ws_connect(nginx.ws_url + "/ws", additional_headers=origin) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "task_ids": [task_id]}).decode())
        assert await recv(ws) == {"type": "subscribed", "task_ids": [task_id]}
        first = await recv(ws)
        assert first["type"] == "task" and first["data"]["status"] == "submitted"

        await producer.progress(task_id, 50)
        frame = await recv(ws)
        assert (frame["data"]["status"], frame["data"]["progress"]) == ("processing", 50)
        await producer.complete(task_id, image_url="https://cdn.example/w.png")
        frame = await recv(ws)
        assert frame["data"]["status"] == "completed"

        await ws.send(orjson.dumps({"op": "ping"}).decode())
        assert await recv(ws) == {"type": "pong"}


async def test_per_task_ws_closes_1000_through_nginx(nginx: Nginx, producer: Producer) -> None:
    task = await producer.create(type="txt2img", angle="front")
    task_id = task.task_id
    await producer.progress(task_id, 25)
    async with ws_connect(f"{nginx.ws_url}/tasks/{task_id}/ws") as ws:
        current = await recv(ws)
        assert (current["type"], current["data"]["progress"]) == ("task", 25)
        await producer.progress(task_id, 75)
        assert (await recv(ws))["data"]["progress"] == 75
        await producer.complete(task_id, image_url="https://cdn.example/p.png")
        final = await recv(ws)
        assert final["data"]["status"] == "completed"
        assert await close_code(ws) == 1000


# --- what nginx adds: limits and timeouts ---------------------------------------------------------


async def test_rest_request_limit_answers_429(tmp_path: Path, gateway: Gateway,
                                              producer: Producer) -> None:
    """limit_req on REST, with rate 1r/m and burst 5: the first 6 requests pass, the next are
    refused at once with 429 in the gateway's JSON shape; streams are not counted there."""
    task = await producer.create(type="txt2img", angle="front")
    limits = Limits(rest_rate="1r/m", rest_burst=5)
    async with run_nginx(tmp_path / "nginx", gateway.port, limits) as nginx, \
            httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as client:
        statuses = []
        for _ in range(10):
            response = await client.get(f"/tasks/{task.task_id}")
            statuses.append(response.status_code)
            if response.status_code == 429:
                refused = response
        assert statuses == [200] * 6 + [429] * 4
        assert refused.json() == TOO_MANY
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["retry-after"] == "1"

        # Streams have their own limits: the REST budget being spent does not refuse them.
        await producer.complete(task.task_id, image_url="https://cdn.example/r.png")
        stream = await client.get(f"/tasks/{task.task_id}/events")
        assert stream.status_code == 200
        assert '"status":"completed"' in stream.text


async def test_stream_connection_limit_answers_429(tmp_path: Path, gateway: Gateway,
                                                   producer: Producer) -> None:
    """limit_conn on streams and sockets together, at 2 per address: a third SSE stream or a
    WebSocket is refused with 429; when one ends, a new one is accepted again."""
    task = await producer.create(type="txt2img", angle="front")
    task_id = task.task_id
    path = f"/tasks/{task_id}/events"
    async with run_nginx(tmp_path / "nginx", gateway.port, Limits(streams=2)) as nginx, \
            httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as client:
        followers = [Follower(client, path, expect=[task_id]).start() for _ in range(2)]
        try:
            async with asyncio.timeout(BOUND_S):
                for follower in followers:
                    await follower.ready.wait()

            refused = await client.get(path)
            assert refused.status_code == 429
            assert refused.json() == TOO_MANY
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(nginx.ws_url + "/ws"):
                    pass
            assert info.value.response.status_code == 429

            # One stream ends: nginx frees its slot once it sees the client go.
            await followers[0].stop()
            async with asyncio.timeout(BOUND_S):
                while True:
                    async with client.stream("GET", path) as again:
                        if again.status_code == 200:
                            break
                        assert again.status_code == 429
                    await asyncio.sleep(0.02)
        finally:
            for follower in followers:
                await follower.stop()


async def test_stream_connect_rate_limit_answers_429(tmp_path: Path, gateway: Gateway,
                                                     producer: Producer) -> None:
    """limit_req on stream and socket connects (rate 1r/m, burst 2): streams that each end at
    once still cannot be reopened in a loop."""
    task = await producer.create(type="txt2img", angle="front")
    await producer.complete(task.task_id, image_url="https://cdn.example/c.png")
    limits = Limits(connect_rate="1r/m", connect_burst=2)
    async with run_nginx(tmp_path / "nginx", gateway.port, limits) as nginx, \
            httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as client:
        statuses = [(await client.get(f"/tasks/{task.task_id}/events")).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 200]
        assert (await client.get(f"/events?task_id={task.task_id}")).status_code == 429
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(f"{nginx.ws_url}/tasks/{task.task_id}/ws"):
                pass
        assert info.value.response.status_code == 429
        # REST is another budget.
        assert (await client.get(f"/tasks/{task.task_id}")).status_code == 200


async def test_unfinished_request_header_is_dropped(tmp_path: Path, gateway: Gateway) -> None:
    """client_header_timeout (1 s here): a client that never finishes its request header is
    disconnected by nginx; the gateway never sees it."""
    async with run_nginx(tmp_path / "nginx", gateway.port, Limits(header_timeout="1s")) as nginx:
        reader, writer = await asyncio.open_connection("127.0.0.1", nginx.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            await writer.drain()
            async with asyncio.timeout(BOUND_S):
                rest = await reader.read()  # until nginx closes the connection
            assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


# --- tokens never reach nginx's logs --------------------------------------------------------------


@pytest.fixture
async def keyed_gateway(redis_server: RedisServer, prefix: str) -> AsyncIterator[Gateway]:
    settings = Settings(redis_url=redis_server.url, prefix=prefix, jwt_secret=SECRET)
    async with run_gateway(settings) as running:
        yield running


async def test_tokens_stay_out_of_the_access_log(tmp_path: Path, keyed_gateway: Gateway,
                                                 producer: Producer) -> None:
    task = await producer.create(type="txt2img", angle="front")
    task_id = task.task_id
    await producer.complete(task_id, image_url="https://cdn.example/t.png")
    token = issue(SECRET, [task_id], ttl_s=120)
    limits = Limits(rest_rate="1r/m", rest_burst=4)
    async with run_nginx(tmp_path / "nginx", keyed_gateway.port, limits) as nginx, \
            httpx.AsyncClient(base_url=nginx.url, timeout=BOUND_S) as client:
        # Authorization passes through untouched; without a token the gateway refuses.
        assert (await client.get(f"/tasks/{task_id}")).status_code == 401
        bearer = await client.get(f"/tasks/{task_id}",
                                  headers={"Authorization": f"Bearer {token}"})
        assert bearer.status_code == 200, bearer.text
        assert (await client.get(f"/tasks/{task_id}?token={token}")).status_code == 200
        stream = await client.get(f"/tasks/{task_id}/events?token={token}")
        assert stream.status_code == 200 and '"status":"completed"' in stream.text
        async with ws_connect(f"{nginx.ws_url}/tasks/{task_id}/ws?token={token}") as ws:
            assert (await recv(ws))["data"]["status"] == "completed"
            assert await close_code(ws) == 1000
        # Past the REST limit, with the token in the URL: refused, and logged without it.
        statuses = [(await client.get(f"/tasks/{task_id}?token={token}")).status_code
                    for _ in range(3)]
        assert statuses[-1] == 429, statuses

        # One line per request, written as each ends: the 5 above and the 3 of the burst (a
        # limit refusal reaches the error log, if at all, before its access log line).
        log = nginx.access_log

        def task_lines() -> list[str]:
            return [line for line in nginx.log_text(log).splitlines() if "/tasks/" in line]

        await wait_for(lambda: len(task_lines()) >= 8, "8 task lines in the access log")
        for text, name in ((nginx.log_text(log), "access log"),
                           (nginx.log_text(nginx.error_log), "error log")):
            assert token not in text, f"the token is in nginx's {name}:\n{text}"
            assert token.split(".")[2] not in text  # not even its signature
            assert "token=" not in text, text
        access = "\n".join(task_lines())
        assert f'"GET /tasks/{task_id} HTTP/1.1" 401' in access
        assert access.count(f'"GET /tasks/{task_id} HTTP/1.1" 200') >= 3
        assert f'"GET /tasks/{task_id}/events HTTP/1.1" 200' in access
        assert f'"GET /tasks/{task_id}/ws HTTP/1.1" 101' in access
        assert f'"GET /tasks/{task_id} HTTP/1.1" 429' in access
