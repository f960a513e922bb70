"""Access control from the command line and in the logs (contract section 7), with real
processes: `taskcast serve` refuses to expose open tasks on a network address and refuses keys
that cannot work; `taskcast token issue` mints tokens the gateway accepts; and no token ever
reaches a log line, neither in `taskcast serve --log-level debug` nor in uvicorn's access log
and WebSocket handshake lines (which log URLs, query strings included).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from taskcast.connection import connect as redis_connect
from taskcast.producer import Producer
from taskcast.redaction import REDACTED, redact
from taskcast.settings import Settings
from taskcast.tokens import Verifier
from tests.servers import (
    ROOT,
    RedisServer,
    clean_environ,
    free_port,
    kill,
    run_gateway,
    start_serve,
    wait_until_answering,
)

SECRET = "c" * 48
OTHER_SECRET = "d" * 48
STARTUP_BOUND_S = 20
EXIT_BOUND_S = 10
BOUND_S = 10.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()


def private_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return pem


def public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def taskcast(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m taskcast ARGS` with the TASKCAST_* variables of `env` only."""
    return subprocess.run([sys.executable, "-m", "taskcast", *args], cwd=ROOT,
                          env={**clean_environ(), **(env or {})}, capture_output=True,
                          text=True, timeout=60, check=False)


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


# -- taskcast serve: start-up refusals -------------------------------------------------------------


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "serve.log"


def refused_start(args: list[str], env: dict[str, str], log_file: Path) -> str:
    """Run `taskcast serve`, expect exit status 2 before it serves; its output."""
    process = start_serve(["--redis-url", "memory://", "--port", str(free_port()), *args],
                          log_file, {**clean_environ(), **env})
    try:
        returncode = process.wait(STARTUP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"taskcast serve did not refuse to start:\n{log_file.read_text()}")
    finally:
        kill(process, EXIT_BOUND_S)
    log = log_file.read_text(errors="replace")
    assert returncode == 2, log
    assert "Traceback" not in log
    return log


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "gateway.example"])
def test_serve_without_a_key_refuses_a_network_address(log_file: Path, host: str) -> None:
    log = refused_start(["--host", host], {}, log_file)
    assert "TASKCAST_JWT_SECRET" in log
    assert "TASKCAST_AUTH=off" in log
    assert "refusing to serve" in log


def test_serve_with_auth_on_explicitly_and_no_key_refuses_too(log_file: Path) -> None:
    log = refused_start(["--host", "0.0.0.0"], {"TASKCAST_AUTH": "on"}, log_file)
    assert "TASKCAST_AUTH=off" in log


@pytest.mark.parametrize(("env", "words"), [
    ({"TASKCAST_JWT_SECRET": "s" * 31}, ["32"]),
    ({"TASKCAST_JWT_SECRET": "é" * 15}, ["32"]),  # 30 bytes
    ({"TASKCAST_JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem"}, ["public key"]),
    ({"TASKCAST_JWT_SECRET": SECRET, "TASKCAST_JWT_LEEWAY_S": "31"}, ["leeway"]),
    ({"TASKCAST_AUTH": "maybe"}, ["TASKCAST_AUTH"]),
], ids=["short-secret", "short-utf8-secret", "missing-pem", "leeway-31", "auth-maybe"])
def test_serve_refuses_keys_that_cannot_work(log_file: Path, env: dict[str, str],
                                             words: list[str]) -> None:
    log = refused_start([], env, log_file)
    for word in words:
        assert word in log
    secret = env.get("TASKCAST_JWT_SECRET")
    if secret:
        assert secret not in log  # the secret itself is never printed


@pytest.mark.parametrize("what", ["garbage", "private-key", "P-521"])
def test_serve_refuses_an_unusable_public_key_file(log_file: Path, tmp_path: Path,
                                                   what: str) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes({"garbage": b"not a key\n", "private-key": private_pem(P256_KEY),
                     "P-521": public_pem(ec.generate_private_key(ec.SECP521R1()))}[what])
    log = refused_start([], {"TASKCAST_JWT_PUBLIC_KEY_FILE": str(pem)}, log_file)
    assert "access control" in log


@asynccontextmanager
async def serving(args: list[str], env: dict[str, str], log_file: Path
                  ) -> AsyncIterator[httpx.AsyncClient]:
    """`taskcast serve ARGS` answering /healthz on 127.0.0.1; SIGTERM and exit 0 after."""
    port = free_port()
    process = start_serve([*args, "--port", str(port)], log_file, {**clean_environ(), **env})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_until_answering(client, process, log_file, "/healthz", STARTUP_BOUND_S)
            yield client
        process.send_signal(signal.SIGTERM)
        assert process.wait(EXIT_BOUND_S) == 0, log_file.read_text(errors="replace")
    finally:
        kill(process, EXIT_BOUND_S)


@pytest.mark.parametrize(("args", "env", "summary"), [
    (["--host", "0.0.0.0"], {"TASKCAST_AUTH": "off"}, "access control: off"),
    (["--host", "0.0.0.0", "--auth", "off"], {}, "access control: off"),
    (["--host", "0.0.0.0", "--auth", "off"], {"TASKCAST_JWT_SECRET": SECRET},
     "access control: off"),
    (["--host", "127.0.0.1"], {}, "access control: none configured"),
    ([], {}, "access control: none configured"),  # the default host is loopback
], ids=["auth-off-env", "auth-off-flag", "auth-off-with-a-key", "loopback", "default-host"])
async def test_serve_starts_open_when_allowed(log_file: Path, args: list[str],
                                              env: dict[str, str], summary: str) -> None:
    async with serving(["--redis-url", "memory://", *args], env, log_file) as client:
        response = await client.get("/tasks/1")  # open: no token needed
        assert response.status_code == 404, response.text
    log = log_file.read_text(errors="replace")
    assert summary in log
    assert SECRET not in log


async def test_serve_with_a_key_on_all_interfaces_requires_tokens(log_file: Path) -> None:
    env = {"TASKCAST_JWT_SECRET": SECRET}
    async with serving(["--redis-url", "memory://", "--host", "0.0.0.0"], env,
                       log_file) as client:
        refused = await client.get("/tasks/1")
        assert refused.status_code == 401
        assert refused.json() == {"code": 401, "msg": "unauthorized", "data": None}
        token = taskcast("token", "issue", "--task", "1", "--ttl", "60", env=env).stdout.strip()
        assert (await client.get("/tasks/1", headers={
            "Authorization": f"Bearer {token}"})).status_code == 404  # covered: as in v1
        for path in ("/healthz", "/readyz", "/openapi.json", "/taskcast.js", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
    log = log_file.read_text(errors="replace")
    assert "access control: tokens required (HS secret)" in log
    assert SECRET not in log


# -- taskcast token issue --------------------------------------------------------------------------


def issued(*args: str, env: dict[str, str]) -> str:
    result = taskcast("token", "issue", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout.endswith("\n")
    return lines[0]


def test_token_issue_prints_a_token_the_gateway_accepts() -> None:
    before = time.time()
    token = issued("--task", "1", "--task", "2", "--ttl", "60",
                   env={"TASKCAST_JWT_SECRET": SECRET})
    grant = Verifier(secret=SECRET, leeway_s=0).verify(token)
    assert grant.tasks == {1, 2} and not grant.every_task
    assert math.ceil(before + 60) <= grant.exp <= math.ceil(time.time() + 60)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    # another gateway's secret refuses it
    with pytest.raises(Exception, match="bad signature"):
        Verifier(secret=OTHER_SECRET).verify(token)


def test_token_issue_all_ids_above_2_53_aud_iss_and_algorithm() -> None:
    env = {"TASKCAST_JWT_SECRET": "e" * 64, "TASKCAST_JWT_AUDIENCE": "gw",
           "TASKCAST_JWT_ISSUER": "svc"}
    every = issued("--all", "--ttl", "30", "--algorithm", "HS512", env=env)
    grant = Verifier(secret="e" * 64, audience="gw", issuer="svc").verify(every)
    assert grant.every_task
    assert claims_of(every)["tasks"] == "*"
    assert jwt.get_unverified_header(every)["alg"] == "HS512"
    big = issued("--task", str(2**53 + 1), "--task", "7", "--ttl", "30",
                 "--jwt-audience", "other", env=env)
    assert claims_of(big)["tasks"] == [str(2**53 + 1), 7]
    assert claims_of(big)["aud"] == "other"  # the flag wins over the variable
    assert Verifier(secret="e" * 64, audience="other").verify(big).tasks == {2**53 + 1, 7}


def test_token_issue_extra_claims() -> None:
    token = issued("--task", "1", "--ttl", "60", "--claim", 'sub="u1"', "--claim", "n=5",
                   "--claim", 'tasks="*"', "--claim", "exp=99999999999",
                   env={"TASKCAST_JWT_SECRET": SECRET})
    payload = claims_of(token)
    assert payload["sub"] == "u1"
    assert payload["n"] == 5
    assert payload["tasks"] == [1]  # --claim cannot widen the token
    assert payload["exp"] < time.time() + 120  # nor make it last longer
    assert Verifier(secret=SECRET).verify(token).tasks == {1}


@pytest.mark.parametrize(("private_key", "algorithm", "expected"), [
    (RSA_KEY, None, "RS256"),
    (RSA_KEY, "RS512", "RS512"),
    (P256_KEY, "ES256", "ES256"),
    (ED25519_KEY, "EdDSA", "EdDSA"),
])
def test_token_issue_with_a_private_key_file(tmp_path: Path, private_key: Any,
                                             algorithm: str | None, expected: str) -> None:
    key_file = tmp_path / "private.pem"
    key_file.write_bytes(private_pem(private_key))
    env = {"TASKCAST_JWT_PRIVATE_KEY_FILE": str(key_file),
           "TASKCAST_JWT_SECRET": SECRET}  # the private key file wins
    args = ["--task", "9", "--ttl", "60"] + (["--algorithm", algorithm] if algorithm else [])
    token = issued(*args, env=env)
    assert jwt.get_unverified_header(token)["alg"] == expected
    assert Verifier(public_key_pem=public_pem(private_key)).verify(token).tasks == {9}


@pytest.mark.parametrize(("args", "env", "words"), [
    (["--ttl", "60"], {"TASKCAST_JWT_SECRET": SECRET}, ["--task", "--all"]),
    (["--task", "1", "--all", "--ttl", "60"], {"TASKCAST_JWT_SECRET": SECRET},
     ["--task", "--all"]),
    (["--task", "1", "--ttl", "60"], {}, ["TASKCAST_JWT_SECRET"]),
    (["--task", "1", "--ttl", "0"], {"TASKCAST_JWT_SECRET": SECRET}, ["ttl"]),
    (["--task", "1", "--ttl", "nan"], {"TASKCAST_JWT_SECRET": SECRET}, ["ttl"]),
    (["--task", "abc", "--ttl", "60"], {"TASKCAST_JWT_SECRET": SECRET}, []),
    (["--task", "-1", "--ttl", "60"], {"TASKCAST_JWT_SECRET": SECRET}, []),
    (["--task", "1", "--ttl", "60", "--claim", "sub"], {"TASKCAST_JWT_SECRET": SECRET},
     ["--claim"]),
    (["--task", "1", "--ttl", "60", "--claim", "sub=u1"], {"TASKCAST_JWT_SECRET": SECRET},
     ["--claim"]),
    (["--task", "1", "--ttl", "60", "--claim", "=1"], {"TASKCAST_JWT_SECRET": SECRET},
     ["--claim"]),
    (["--task", "1", "--ttl", "60", "--algorithm", "XS256"], {"TASKCAST_JWT_SECRET": SECRET},
     []),
    (["--task", "1", "--ttl", "60"], {"TASKCAST_JWT_PRIVATE_KEY_FILE": "/nonexistent.pem"},
     ["TASKCAST_JWT_PRIVATE_KEY_FILE"]),
], ids=["neither", "both", "no-key", "ttl-0", "ttl-nan", "task-abc", "task-negative",
        "claim-no-value", "claim-not-json", "claim-no-name", "unknown-algorithm",
        "missing-private-key"])
def test_token_issue_refusals_exit_2(args: list[str], env: dict[str, str],
                                     words: list[str]) -> None:
    result = taskcast("token", "issue", *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


@pytest.mark.parametrize("algorithm", ["ES256", "HS256"])
def test_token_issue_with_a_key_that_does_not_fit_the_algorithm_exits_2(
        tmp_path: Path, algorithm: str) -> None:
    key_file = tmp_path / "private.pem"
    key_file.write_bytes(private_pem(RSA_KEY))
    result = taskcast("token", "issue", "--task", "1", "--ttl", "60", "--algorithm", algorithm,
                      env={"TASKCAST_JWT_PRIVATE_KEY_FILE": str(key_file)})
    # main(): "2 unusable settings"; a key/algorithm mismatch is one, not a crash
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""


# -- tokens never reach the logs -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("GET /tasks/1?token=abc.def.ghi HTTP/1.1", f"GET /tasks/1?token={REDACTED} HTTP/1.1"),
    ("/events?task_id=1&token=abc&x=1", f"/events?task_id=1&token={REDACTED}&x=1"),
    ("/ws?TOKEN=abc", f"/ws?TOKEN={REDACTED}"),
    ('"WebSocket /ws?token=abc" [accepted]', f'"WebSocket /ws?token={REDACTED}" [accepted]'),
    ("/x%3Ftoken%3Dabc", f"/x%3Ftoken%3D{REDACTED}"),
    ("Authorization: Bearer abc.def-_ghi=", f"Authorization: Bearer {REDACTED}"),
    # the gateway takes the scheme in any case (RFC 7235), so the log must hide it too
    ("Authorization: BEARER abc.def", f"Authorization: BEARER {REDACTED}"),
    ("GET /tasks/1 HTTP/1.1", "GET /tasks/1 HTTP/1.1"),
    ("/x?mytoken=abc", "/x?mytoken=abc"),  # not a token parameter
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


# The test's own clients log their URLs, tokens included: that is this process's client
# side, not the gateway's (whose process has no such clients).
CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client")


class Capture(logging.Handler):
    """Every record of the gateway's side, formatted, as a server's handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(CLIENT_LOGGERS):
            self.lines.append(self.format(record))


@contextmanager
def captured_logs() -> Iterator[Capture]:
    """A handler on the root logger and on uvicorn's (which may not propagate), attached
    before the gateway starts, like a server's handlers; everything at DEBUG."""
    capture = Capture()
    names = ["", "uvicorn", "uvicorn.access", "uvicorn.error", "taskcast"]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    for name in ("", "uvicorn", "uvicorn.access"):
        logging.getLogger(name).addHandler(capture)
    try:
        yield capture
    finally:
        for name in ("", "uvicorn", "uvicorn.access"):
            logging.getLogger(name).removeHandler(capture)
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.propagate = propagate


async def exercise(base_url: str, ws_url: str, task_id: int, valid: str, invalid: str) -> None:
    """REST, SSE and WebSocket requests with the tokens in the query and in the header."""
    async with httpx.AsyncClient(base_url=base_url, timeout=BOUND_S) as client:
        for value, expected in ((valid, 200), (invalid, 401)):
            bearer = {"Authorization": f"Bearer {value}"}
            for path in (f"/tasks/{task_id}", f"/tasks/{task_id}/events",
                         f"/events?task_id={task_id}"):
                joined = f"{path}{'&' if '?' in path else '?'}token={value}"
                for url, headers in ((joined, {}), (path, bearer)):
                    response = await client.get(url, headers=headers)
                    assert response.status_code == expected, (url, response.text)
            # with the token twice (refused), and with a Basic header next to it
            response = await client.get(f"/tasks/{task_id}?token={value}&token={value}")
            assert response.status_code == 401
    for value in (valid, invalid):
        for path in (f"/ws?token={value}", f"/tasks/{task_id}/ws?token={value}"):
            async with connect(ws_url + path, proxy=None, open_timeout=BOUND_S) as ws:
                if path.startswith("/ws") and value == valid:
                    await ws.send(orjson.dumps({"op": "subscribe",
                                                "task_ids": [task_id]}).decode())
                    assert orjson.loads(await ws.recv())["type"] == "subscribed"
                    await ws.close()
                    continue
                try:
                    async with asyncio.timeout(BOUND_S):
                        while True:
                            await ws.recv()
                except ConnectionClosed:
                    pass
        async with connect(ws_url + "/ws", proxy=None, open_timeout=BOUND_S,
                           additional_headers={"Authorization": f"Bearer {value}"}) as ws:
            try:  # the invalid one is closed with 4401 at once
                await ws.send(orjson.dumps({"op": "auth", "token": value}).decode())
                async with asyncio.timeout(BOUND_S):
                    await ws.recv()
            except ConnectionClosed:
                pass


def leaks(text: str, *tokens: str) -> list[str]:
    """The parts of `tokens` found in `text` (whole tokens, payloads or signatures)."""
    found = []
    for token in tokens:
        for part in (token, *token.split(".")[1:]):
            if part in text:
                found.append(part[:20] + "...")
    return found


def unredacted_token_parameters(text: str) -> list[str]:
    return [match.group(0) for match in re.finditer(r"token=(?!\[redacted\])[^&\s\"']+", text)]


async def completed_task(redis_url: str, prefix: str) -> int:
    client = redis_connect(redis_url)
    try:
        producer = Producer(client, prefix=prefix)
        task_id = (await producer.create()).task_id
        await producer.complete(task_id, image_url="https://cdn.test/log.png")
        return task_id
    finally:
        await client.aclose()


async def test_taskcast_serve_debug_logs_never_contain_tokens(own_redis: RedisServer,
                                                              log_file: Path) -> None:
    env = {"TASKCAST_JWT_SECRET": SECRET}
    task_id = await completed_task(own_redis.url, "taskcast")
    valid = taskcast("token", "issue", "--task", str(task_id), "--ttl", "60",
                     env=env).stdout.strip()
    invalid = jwt.encode({"tasks": [task_id], "exp": int(time.time()) + 60}, OTHER_SECRET,
                         algorithm="HS256")
    async with serving(["--redis-url", own_redis.url, "--log-level", "debug"], env,
                       log_file) as client:
        base_url = str(client.base_url).rstrip("/")
        await exercise(base_url, base_url.replace("http://", "ws://"), task_id, valid, invalid)
    log = log_file.read_text(errors="replace")
    assert "DEBUG" in log  # the level took effect
    assert "access refused" in log  # the refusals were logged, without their tokens
    assert leaks(log, valid, invalid) == []
    assert unredacted_token_parameters(log) == []
    assert SECRET not in log


@pytest.mark.parametrize("stack", ["taskcast", "uvicorn-h11"])
async def test_access_log_and_handshake_lines_are_redacted(
        settings: Settings, stack: str) -> None:
    task_id = await completed_task(settings.redis_url, settings.prefix)
    valid = jwt.encode({"tasks": [task_id], "exp": int(time.time()) + 60}, SECRET,
                       algorithm="HS256")
    invalid = jwt.encode({"tasks": [task_id], "exp": int(time.time()) + 60}, OTHER_SECRET,
                         algorithm="HS256")
    servers: dict[str, Any] = {} if stack == "taskcast" else {"http": "h11",
                                                              "ws": "websockets-sansio"}
    with captured_logs() as capture:
        async with run_gateway(settings.with_changes(jwt_secret=SECRET), access_log=True,
                               log_level="debug", log_config=None, **servers) as gateway:
            await exercise(gateway.url, gateway.ws_url, task_id, valid, invalid)
    text = "\n".join(capture.lines)
    assert f"/tasks/{task_id}?token={REDACTED}" in text, text[-2000:]  # URLs were logged
    if stack == "uvicorn-h11":
        assert f'"WebSocket /ws?token={REDACTED}"' in text, text[-2000:]
    assert leaks(text, valid, invalid) == []
    assert unredacted_token_parameters(text) == []


async def test_a_token_parameter_the_gateway_accepts_is_never_logged(
        settings: Settings) -> None:
    """Only a parameter spelled `token` carries a token (`%74oken` is not one), and the log
    hides the value of any spelling of it anyway: the client still sent a credential."""
    task_id = await completed_task(settings.redis_url, settings.prefix)
    valid = jwt.encode({"tasks": [task_id], "exp": int(time.time()) + 60}, SECRET,
                       algorithm="HS256")
    with captured_logs() as capture:
        async with run_gateway(settings.with_changes(jwt_secret=SECRET), access_log=True,
                               log_level="info", log_config=None) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as client:
                response = await client.get(f"/tasks/{task_id}?x=token=&%74oken={valid}")
                accepted = await client.get(f"/tasks/{task_id}?x=1&token={valid}")
    assert response.status_code == 401
    assert accepted.status_code == 200
    assert leaks("\n".join(capture.lines), valid) == []
