"""Access control (contract section 7) over a real gateway, redis-server, HTTP and WebSocket
clients: every transport against every kind of token, the order 401 -> 422 -> 403 -> Redis,
token expiry on open streams and sockets, the `auth` op, auth turned off, the public
endpoints, and the refusal counts in /metrics.

Transports: REST `GET /tasks/{id}`, SSE `/tasks/{id}/events` and `/events?task_id=`, `/ws`
(token at the upgrade by header or `?token=`, or in an `auth` frame) and `/tasks/{id}/ws`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from taskcast.connection import connect as redis_connect
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, run_gateway
from tests.sse_client import Follower, metric, read_stream, stream_problems
from tests.test_ws import Frame, frames_before_pong, recv, send
from tests.test_ws import ws_connect as ws_open

BOUND_S = 10.0
SECRET = "k" * 64  # HS256/384/512
OTHER_SECRET = "z" * 64
AUD = "taskcast-tests"
ISS = "https://issuer.test"
REALM = 'Bearer realm="taskcast"'
INVALID_TOKEN = f'{REALM}, error="invalid_token", error_description="'
INSUFFICIENT_SCOPE = f'{REALM}, error="insufficient_scope"'
UNAUTHORIZED = {"code": 401, "msg": "unauthorized", "data": None}
FORBIDDEN = {"code": 403, "msg": "forbidden", "data": None}
BIG_ID = 2**60 + 12_345  # above 2^53: JavaScript cannot hold it, tokens carry it as a string
NEVER_CREATED = 987_654_321
OMIT = object()  # a claim left out of a token

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()


def public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


RSA_PEM = public_pem(RSA_KEY)


# -- tokens ----------------------------------------------------------------------------------------


def token(tasks: Any = OMIT, *, exp: Any = None, ttl: float = 60, key: Any = SECRET,
          algorithm: str = "HS256", aud: Any = AUD, iss: Any = ISS, **extra: Any) -> str:
    """A token for the gateways here (aud and iss match the shared gateway's; the others
    do not check them)."""
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + ttl if exp is None else exp,
                               "tasks": tasks, "aud": aud, "iss": iss, **extra}
    payload = {name: value for name, value in payload.items() if value is not OMIT}
    return jwt.encode(payload, key, algorithm=algorithm)


def b64json(value: Any) -> str:
    return base64.urlsafe_b64encode(
        json.dumps(value, separators=(",", ":")).encode()).rstrip(b"=").decode()


def hand_made(alg: str, payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token PyJWT refuses to mint: `alg: none` (no signature), or an HS256 one keyed with
    something that is not a secret (the public key's PEM text)."""
    signing_input = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(payload)}"
    signature = b"" if hmac_key is None else hmac.new(
        hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def full_claims(tasks: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"tasks": tasks, "iat": now, "exp": now + 60, "aud": AUD, "iss": ISS}


def oversized(tasks: Any) -> str:
    """A correctly signed token over 8192 bytes: refused for its size alone."""
    return token(tasks, pad="p" * 8300)


def exp_of(value: str) -> int:
    exp: int = jwt.decode(value, options={"verify_signature": False})["exp"]
    return exp


def short_exp(min_life_s: float = 1.0) -> int:
    """An exp that leaves the token at least `min_life_s` (and less than one more second)."""
    return math.ceil(time.time() + min_life_s)


async def until(unix_time: float) -> None:
    """Sleep until the wall clock passes `unix_time` (bounded by the caller)."""
    while (left := unix_time - time.time()) > 0:
        await asyncio.sleep(left)


# -- fixtures --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tasks:
    done: int  # completed
    big: int  # completed, id above 2^53
    other: int  # completed, named by no token of the matrix


@pytest.fixture(scope="module")
def module_prefix(redis_server: RedisServer) -> str:
    return f"auth-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def prefix(module_prefix: str) -> str:
    """Overrides conftest's: the `producer` fixture writes under the shared gateway's prefix
    (tasks get fresh ids, so tests do not collide)."""
    return module_prefix


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    files = {"rsa": folder / "rsa.pem", "p256": folder / "p256.pem",
             "p384": folder / "p384.pem", "ed25519": folder / "ed25519.pem"}
    files["rsa"].write_bytes(RSA_PEM)
    for name, private_key in (("p256", P256_KEY), ("p384", P384_KEY),
                              ("ed25519", ED25519_KEY)):
        files[name].write_bytes(public_pem(private_key))
    return files


def auth_settings(redis_server: RedisServer, prefix: str, key_files: dict[str, Path],
                  **changes: Any) -> Settings:
    """Secret and RSA public key, audience and issuer required, no leeway."""
    base = Settings(redis_url=redis_server.url, prefix=prefix, jwt_secret=SECRET,
                    jwt_public_key_file=str(key_files["rsa"]), jwt_audience=AUD,
                    jwt_issuer=ISS, jwt_leeway_s=0)
    return base.with_changes(**changes)


@pytest.fixture(scope="module")
async def shared(redis_server: RedisServer, module_prefix: str, key_files: dict[str, Path]
                 ) -> AsyncIterator[Gateway]:
    """One gateway with access control for the module (starting one costs ~0.2 s)."""
    async with run_gateway(auth_settings(redis_server, module_prefix, key_files)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
async def tasks(redis_server: RedisServer, module_prefix: str) -> AsyncIterator[Tasks]:
    client = redis_connect(redis_server.url)
    producer = Producer(client, prefix=module_prefix)
    try:
        done = (await producer.create(type="txt2img")).task_id
        await producer.complete(done, image_url="https://cdn.test/done.png")
        await producer.create(task_id=BIG_ID)
        await producer.complete(BIG_ID, image_url="https://cdn.test/big.png")
        other = (await producer.create()).task_id
        await producer.complete(other, image_url="https://cdn.test/other.png")
        yield Tasks(done=done, big=BIG_ID, other=other)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def http(shared: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """One client for the module: building one (its TLS context) costs ~20 ms."""
    async with http_client(shared) as client:
        yield client


# -- clients ---------------------------------------------------------------------------------------


def http_client(gateway: Gateway) -> httpx.AsyncClient:
    """A client that opens a connection per request. run_gateway's listening socket has
    proto 0, so asyncio does not set TCP_NODELAY on its connections, and each answer on a
    kept-alive one waits ~40 ms for a delayed ACK: this module would be several times slower."""
    return httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S,
                             limits=httpx.Limits(max_keepalive_connections=0))


def bearer(value: str | None) -> dict[str, str]:
    return {} if value is None else {"Authorization": f"Bearer {value}"}


def with_token(path: str, value: str | None) -> str:
    if value is None:
        return path
    return f"{path}{'&' if '?' in path else '?'}token={value}"


def ws_connect(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> Any:
    return ws_open(gateway, path, additional_headers=headers or None)


async def read_until_closed(ws: ClientConnection, bound_s: float = BOUND_S
                            ) -> tuple[list[Frame], int | None, str]:
    """Every frame until the gateway closes, and its close code and reason."""
    frames: list[Frame] = []
    async with asyncio.timeout(bound_s):
        try:
            while True:
                message = await ws.recv()
                assert isinstance(message, str)
                frames.append(orjson.loads(message))
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return frames, None, ""
            return frames, exc.rcvd.code, exc.rcvd.reason


async def until_task(ws: ClientConnection, task_id: int, version: int) -> list[Frame]:
    """Frames until the state of `task_id` at `version` (inclusive)."""
    frames = []
    while True:
        frame = await recv(ws)
        frames.append(frame)
        if frame["type"] == "task" and frame["data"]["task_id"] == task_id and \
                frame["data"]["version"] >= version:
            return frames


def http_outcome(status: int | None, headers: httpx.Headers | None, body: bytes,
                 presented: str | None) -> str:
    """The outcome, "401" or "403", once the contract's body and challenge are checked;
    otherwise what came instead."""
    assert headers is not None
    if status == 401:
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == UNAUTHORIZED
        challenge = headers["www-authenticate"]
        if presented is None:
            assert challenge == REALM
        else:
            assert challenge.startswith(INVALID_TOKEN) and challenge.endswith('"'), challenge
            if len(presented) > 8:
                assert presented not in challenge
        return "401"
    if status == 403:
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == FORBIDDEN
        assert headers["www-authenticate"] == INSUFFICIENT_SCOPE
        return "403"
    return f"HTTP {status}: {body[:300]!r}"


async def via_rest(client: httpx.AsyncClient, task_id: int, value: str | None, how: str) -> str:
    path = f"/tasks/{task_id}"
    headers = bearer(value) if how == "header" else {}
    if how == "query":
        path = with_token(path, value)
    response = await client.get(path, headers=headers)
    if response.status_code == 200:
        assert response.json()["data"]["task_id"] == task_id
        return "ok"
    return http_outcome(response.status_code, response.headers, response.content, value)


async def via_sse(client: httpx.AsyncClient, task_id: int, value: str | None, how: str,
                  multi: bool) -> str:
    path = f"/events?task_id={task_id}" if multi else f"/tasks/{task_id}/events"
    headers = bearer(value) if how == "header" else {}
    if how == "query":
        path = with_token(path, value)
    transcript = await read_stream(client, path, headers=headers, timeout=BOUND_S)
    if transcript.status == 200:
        problems = stream_problems(transcript, [task_id], multi=multi)
        return "ok" if not problems else "; ".join(problems)
    return http_outcome(transcript.status, transcript.headers, transcript.body, value)


async def subscribe_outcome(ws: ClientConnection, task_id: int) -> str:
    """Subscribe to one completed task: "ok" (subscribed, then its state), "401"/"403"
    (an error frame, nothing subscribed, the socket still answers), or what came instead."""
    await send(ws, {"op": "subscribe", "task_ids": [task_id]})
    first = await recv(ws)
    if first.get("type") == "error" and first.get("code") == 401:
        assert first["msg"].startswith("unauthorized"), first
        assert await frames_before_pong(ws) == []
        return "401"
    if first.get("type") == "error" and first.get("code") == 403:
        assert first == {"type": "error", "code": 403, "msg": "forbidden",
                         "task_ids": [task_id]}
        assert await frames_before_pong(ws) == []  # no `subscribed`, no state
        return "403"
    if first != {"type": "subscribed", "task_ids": [task_id]}:
        return f"frame {first}"
    state = await recv(ws)
    assert state["type"] == "task" and state["data"]["task_id"] == task_id, state
    assert state["data"]["status"] == "completed"
    return "ok"


async def via_ws(gateway: Gateway, task_id: int, value: str | None, how: str) -> str:
    """`/ws` with the token at the upgrade (header or query) or in an `auth` frame."""
    path = with_token("/ws", value) if how == "query" else "/ws"
    headers = bearer(value) if how == "header" else {}
    async with ws_connect(gateway, path, headers) as ws:
        try:
            if how == "auth":
                await send(ws, {"op": "auth"} if value is None else {"op": "auth", "token": value})
                reply = await recv(ws)
                if reply.get("type") == "error":
                    assert reply["code"] == 401 and reply["msg"].startswith("unauthorized"), reply
                    # the socket stays open, and still has no token
                    assert await subscribe_outcome(ws, task_id) == "401"
                    return "401"
                assert value is not None
                assert reply == {"type": "authenticated", "exp": exp_of(value)}
            outcome = await subscribe_outcome(ws, task_id)
            if outcome == "401" and value is not None and how != "auth":
                return "401 in a frame, but the upgrade's invalid token must close with 4401"
            return outcome
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code == 4401 and value is not None and how != "auth":
                return "401"
            return f"closed {code} {exc.rcvd.reason if exc.rcvd else ''}"


async def via_task_ws(gateway: Gateway, task_id: int, value: str | None, how: str) -> str:
    path = f"/tasks/{task_id}/ws"
    if how == "query":
        path = with_token(path, value)
    headers = bearer(value) if how == "header" else {}
    async with ws_connect(gateway, path, headers) as ws:
        frames, code, _ = await read_until_closed(ws)
    if code in (4401, 4403):
        assert frames == [], frames  # closed right after the accept, before any state
        return {4401: "401", 4403: "403"}[code]
    if code == 1000 and frames and all(
            frame["type"] == "task" and frame["data"]["task_id"] == task_id for frame in frames
    ) and frames[-1]["data"]["status"] == "completed":
        return "ok"
    return f"closed {code} after {frames}"


TRANSPORTS = ["rest-header", "rest-query", "sse-header", "sse-query", "events-header",
              "events-query", "ws-header", "ws-query", "ws-auth", "taskws-header",
              "taskws-query"]


async def attempt(transport: str, gateway: Gateway, client: httpx.AsyncClient, task_id: int,
                  value: str | None) -> str:
    kind, _, how = transport.partition("-")
    async with asyncio.timeout(BOUND_S * 2):
        if kind == "rest":
            return await via_rest(client, task_id, value, how)
        if kind in ("sse", "events"):
            return await via_sse(client, task_id, value, how, multi=kind == "events")
        if kind == "ws":
            return await via_ws(gateway, task_id, value, how)
        return await via_task_ws(gateway, task_id, value, how)


# -- every transport, every kind of token ---------------------------------------------------------


@dataclass(frozen=True)
class Case:
    make: Callable[[Tasks], str | None]
    expect: str
    ask: Callable[[Tasks], int] = lambda tasks: tasks.done


CASES: dict[str, Case] = {
    "no-token": Case(lambda t: None, "401"),
    "malformed-abc": Case(lambda t: "abc", "401"),
    "malformed-a.b.c": Case(lambda t: "a.b.c", "401"),
    "bad-signature": Case(lambda t: token("*", key=OTHER_SECRET), "401"),
    "bad-signature-rsa": Case(lambda t: token("*", key=OTHER_RSA_KEY, algorithm="RS256"), "401"),
    "tampered-payload": Case(
        lambda t: ".".join([token([t.other]).split(".")[0], b64json(full_claims("*")),
                            token([t.other]).split(".")[2]]), "401"),
    "alg-none": Case(lambda t: hand_made("none", full_claims("*"), None), "401"),
    "hs256-keyed-with-public-pem": Case(
        lambda t: hand_made("HS256", full_claims("*"), RSA_PEM), "401"),
    "expired": Case(lambda t: token([t.done], exp=int(time.time()) - 10), "401"),
    "nbf-in-future": Case(lambda t: token([t.done], nbf=int(time.time()) + 3600), "401"),
    "wrong-aud": Case(lambda t: token([t.done], aud="someone-else"), "401"),
    "no-aud": Case(lambda t: token([t.done], aud=OMIT), "401"),
    "wrong-iss": Case(lambda t: token([t.done], iss="https://evil.test"), "401"),
    "no-exp": Case(lambda t: token([t.done], exp=OMIT), "401"),
    "too-large": Case(lambda t: oversized("*"), "401"),
    "malformed-tasks-string": Case(lambda t: token("7"), "401"),
    "malformed-tasks-float": Case(lambda t: token([1.5, t.done]), "401"),
    "not-covering": Case(lambda t: token([t.other]), "403"),
    "no-tasks-claim": Case(lambda t: token(), "403"),
    "empty-tasks": Case(lambda t: token([]), "403"),
    "covering": Case(lambda t: token([t.other, t.done]), "ok"),
    "star": Case(lambda t: token("*"), "ok"),
    "string-id": Case(lambda t: token([str(t.done)]), "ok"),
    "big-id-as-string": Case(lambda t: token([str(t.big)]), "ok", lambda t: t.big),
    "big-id-as-int": Case(lambda t: token([t.big]), "ok", lambda t: t.big),
    "big-id-not-covering": Case(lambda t: token([t.big + 1]), "403", lambda t: t.big),
    "rs256": Case(lambda t: token([t.done], key=RSA_KEY, algorithm="RS256"), "ok"),
    "rs512": Case(lambda t: token("*", key=RSA_KEY, algorithm="RS512"), "ok"),
    "hs512": Case(lambda t: token([t.done], algorithm="HS512"), "ok"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CASES))
async def test_every_transport_against_every_kind_of_token(
        shared: Gateway, http: httpx.AsyncClient, tasks: Tasks, transport: str, case: str
) -> None:
    spec = CASES[case]
    value = spec.make(tasks)
    assert await attempt(transport, shared, http, spec.ask(tasks), value) == spec.expect


# -- order of the answers -----------------------------------------------------------------------


async def test_rest_and_sse_answer_401_then_422_then_403(
        shared: Gateway, http: httpx.AsyncClient, tasks: Tasks) -> None:
    narrow = token([tasks.done])
    int_parsing = {"type": "int_parsing", "loc": ["path", "task_id"],
                   "msg": "Input should be a valid integer, unable to parse string as an "
                          "integer", "input": "abc"}
    for path in ("/tasks/abc", "/tasks/abc/events"):
        no_token = await http.get(path)
        assert http_outcome(no_token.status_code, no_token.headers, no_token.content,
                            None) == "401"
        garbage = await http.get(path, headers=bearer("abc"))
        assert http_outcome(garbage.status_code, garbage.headers, garbage.content,
                            "abc") == "401"
        malformed = await http.get(path, headers=bearer(narrow))
        assert malformed.status_code == 422, malformed.text
        assert malformed.json() == {"detail": [int_parsing]}
    # /events: 401, then 422 (malformed id, no id, a flag), then 403
    for query in ("task_id=abc", "", f"task_id={tasks.done}&image_base64=maybe",
                  f"task_id={tasks.other}&task_id=-1"):
        refused = await http.get(f"/events?{query}")
        assert http_outcome(refused.status_code, refused.headers, refused.content,
                            None) == "401"
        malformed = await http.get(f"/events?{query}", headers=bearer(narrow))
        assert malformed.status_code == 422, (query, malformed.text)
    # a malformed flag on a covered id is 422 too, an uncovered id with a good flag is 403
    flag = await http.get(f"/tasks/{tasks.done}?image_base64=maybe", headers=bearer(narrow))
    assert flag.status_code == 422
    for path in (f"/tasks/{tasks.other}", f"/tasks/{tasks.other}/events",
                 f"/events?task_id={tasks.other}"):
        forbidden = await http.get(path, headers=bearer(narrow))
        assert http_outcome(forbidden.status_code, forbidden.headers, forbidden.content,
                            narrow) == "403"
    # a covered id is answered as in v1: 200, 404, 304
    assert (await http.get(f"/tasks/{NEVER_CREATED}",
                           headers=bearer(token([NEVER_CREATED])))).status_code == 404
    assert (await http.get(f"/tasks/{NEVER_CREATED}/events",
                           headers=bearer(token([NEVER_CREATED])))).status_code == 404
    ok = await http.get(f"/tasks/{tasks.done}", headers=bearer(narrow))
    assert ok.status_code == 200
    not_modified = await http.get(f"/tasks/{tasks.done}", headers={
        **bearer(narrow), "If-None-Match": ok.headers["etag"]})
    assert not_modified.status_code == 304
    # ...but an ETag does not get past a missing token
    no_token = await http.get(f"/tasks/{tasks.done}",
                              headers={"If-None-Match": ok.headers["etag"]})
    assert no_token.status_code == 401
    # a HEAD is gated like a GET
    assert (await http.head(f"/tasks/{tasks.done}")).status_code == 401
    assert (await http.head(f"/tasks/{tasks.done}/events")).status_code == 401


async def test_events_needs_every_asked_id_covered(
        shared: Gateway, http: httpx.AsyncClient, tasks: Tasks) -> None:
    both = f"/events?task_id={tasks.done}&task_id={tasks.other}"
    one = token([tasks.done])
    refused = await http.get(both, headers=bearer(one))
    assert http_outcome(refused.status_code, refused.headers, refused.content, one) == "403"
    refused = await http.get(f"/events?task_id={tasks.done},{tasks.other}", headers=bearer(one))
    assert refused.status_code == 403
    transcript = await read_stream(http, both, headers=bearer(token([tasks.done, tasks.other])),
                                   timeout=BOUND_S)
    assert stream_problems(transcript, [tasks.done, tasks.other], multi=True) == []


async def test_per_task_websocket_closes_4401_then_4422_then_4403(
        shared: Gateway, tasks: Tasks) -> None:
    narrow = token([tasks.done])
    for path, headers, expected in [
        ("/tasks/abc/ws", {}, 4401),
        ("/tasks/abc/ws", bearer("abc"), 4401),
        ("/tasks/abc/ws", bearer(narrow), 4422),
        (f"/tasks/{tasks.other}/ws", bearer(narrow), 4403),
        (f"/tasks/{NEVER_CREATED}/ws", bearer(narrow), 4403),
        (f"/tasks/{NEVER_CREATED}/ws", bearer(token([NEVER_CREATED])), 4404),
    ]:
        async with ws_connect(shared, path, headers) as ws:
            frames, code, _ = await read_until_closed(ws)
        assert (path, code, frames) == (path, expected, [])


async def test_403_is_the_same_whether_or_not_the_task_exists(
        shared: Gateway, http: httpx.AsyncClient, tasks: Tasks) -> None:
    narrow = token([tasks.done])
    for template in ("/tasks/{}", "/tasks/{}/events", "/events?task_id={}"):
        existing = await http.get(template.format(tasks.other), headers=bearer(narrow))
        missing = await http.get(template.format(NEVER_CREATED), headers=bearer(narrow))
        assert existing.status_code == missing.status_code == 403
        assert existing.content == missing.content
        assert {name: value for name, value in existing.headers.items() if name != "date"} == \
            {name: value for name, value in missing.headers.items() if name != "date"}
    async with ws_connect(shared, "/ws", bearer(narrow)) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [tasks.other]})
        existing_frame = await recv(ws)
        await send(ws, {"op": "subscribe", "task_ids": [NEVER_CREATED]})
        missing_frame = await recv(ws)
    assert existing_frame == {"type": "error", "code": 403, "msg": "forbidden",
                              "task_ids": [tasks.other]}
    assert missing_frame == {**existing_frame, "task_ids": [NEVER_CREATED]}


async def test_refusals_are_decided_before_redis_is_read(own_redis: RedisServer,
                                                          prefix: str) -> None:
    settings = Settings(redis_url=own_redis.url, prefix=prefix, jwt_secret=SECRET,
                        jwt_leeway_s=0, redis_timeout_s=0.5)
    client = redis_connect(own_redis.url)
    try:
        created = await Producer(client, prefix=prefix).create()
    finally:
        await client.aclose()
    covered, uncovered = created.task_id, created.task_id + 1
    grant = token([covered])
    async with run_gateway(settings) as gateway, http_client(gateway) as http:
        assert (await http.get(f"/tasks/{covered}", headers=bearer(grant))).status_code == 200
        own_redis.kill()
        # REST: a covered id needs Redis (500); nothing else does
        assert (await http.get(f"/tasks/{covered}", headers=bearer(grant))).status_code == 500
        for path in (f"/tasks/{uncovered}", f"/tasks/{uncovered}/events",
                     f"/events?task_id={uncovered}", f"/events?task_id={covered}"
                     f"&task_id={uncovered}"):
            forbidden = await http.get(path, headers=bearer(grant))
            assert http_outcome(forbidden.status_code, forbidden.headers, forbidden.content,
                                grant) == "403", path
            no_token = await http.get(path)
            assert http_outcome(no_token.status_code, no_token.headers, no_token.content,
                                None) == "401", path
            bad = await http.get(path, headers=bearer(token([uncovered], key=OTHER_SECRET)))
            assert bad.status_code == 401, path
        assert (await http.get("/tasks/abc", headers=bearer(grant))).status_code == 422
        for path, headers, expected in [(f"/tasks/{uncovered}/ws", bearer(grant), 4403),
                                        (f"/tasks/{covered}/ws", {}, 4401),
                                        ("/ws", bearer("abc"), 4401)]:
            async with ws_connect(gateway, path, headers) as ws:
                _, code, _ = await read_until_closed(ws)
            assert code == expected, path
        async with ws_connect(gateway, "/ws", bearer(grant)) as ws:
            await send(ws, {"op": "subscribe", "task_ids": [uncovered]})
            assert await recv(ws) == {"type": "error", "code": 403, "msg": "forbidden",
                                      "task_ids": [uncovered]}


# -- presenting the token ------------------------------------------------------------------------


async def test_the_header_wins_over_the_query_parameter(
        shared: Gateway, http: httpx.AsyncClient, tasks: Tasks) -> None:
    good, garbage = token([tasks.done]), "garbage"
    paths = [f"/tasks/{tasks.done}", f"/tasks/{tasks.done}/events",
             f"/events?task_id={tasks.done}"]
    for path in paths:
        multi = path.startswith("/events")
        # valid header, garbage query: served
        transcript = await read_stream(http, with_token(path, garbage), headers=bearer(good),
                                       timeout=BOUND_S)
        assert transcript.status == 200, (path, transcript.body)
        if "events" in path:
            assert stream_problems(transcript, [tasks.done], multi=multi) == []
        # garbage header, valid query: refused
        refused = await http.get(with_token(path, good), headers=bearer(garbage))
        assert http_outcome(refused.status_code, refused.headers, refused.content,
                            garbage) == "401", path
        # the header names another task: 403, although the query's token covers this one
        refused = await http.get(with_token(path, good), headers=bearer(token([tasks.other])))
        assert refused.status_code == 403, path
    # the same on both WebSockets
    async with ws_connect(shared, with_token(f"/tasks/{tasks.done}/ws", garbage),
                          bearer(good)) as ws:
        frames, code, _ = await read_until_closed(ws)
    assert code == 1000 and frames[-1]["data"]["status"] == "completed"
    async with ws_connect(shared, with_token(f"/tasks/{tasks.done}/ws", good),
                          bearer(garbage)) as ws:
        assert (await read_until_closed(ws))[1] == 4401
    async with ws_connect(shared, with_token("/ws", garbage), bearer(good)) as ws:
        assert await subscribe_outcome(ws, tasks.done) == "ok"
    async with ws_connect(shared, with_token("/ws", good), bearer(garbage)) as ws:
        assert (await read_until_closed(ws))[1] == 4401


async def test_bearer_scheme_is_case_insensitive_and_basic_is_no_bearer_token(
        http: httpx.AsyncClient, tasks: Tasks) -> None:
    good = token([tasks.done])
    path = f"/tasks/{tasks.done}"
    assert (await http.get(path, headers={"Authorization": f"bearer {good}"})).status_code == 200
    assert (await http.get(path, headers={"Authorization": f"BEARER {good}"})).status_code == 200
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    response = await http.get(path, headers=basic)
    assert http_outcome(response.status_code, response.headers, response.content,
                        None) == "401"
    assert (await http.get(with_token(path, good), headers=basic)).status_code == 200
    # an empty bearer token or token parameter is presented, and refused as invalid
    for headers, query_path in [({"Authorization": "Bearer"}, path),
                                ({}, f"{path}?token=")]:
        response = await http.get(query_path, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith(INVALID_TOKEN)


async def test_two_token_parameters_are_refused(shared: Gateway, http: httpx.AsyncClient,
                                                tasks: Tasks) -> None:
    good = token([tasks.done])
    twice = f"token={good}&token={good}"
    for path in (f"/tasks/{tasks.done}?{twice}", f"/tasks/{tasks.done}/events?{twice}",
                 f"/events?task_id={tasks.done}&{twice}"):
        response = await http.get(path)
        assert http_outcome(response.status_code, response.headers, response.content,
                            "x" * 9) == "401", path
        assert response.headers["www-authenticate"].startswith(INVALID_TOKEN)
    for path in (f"/ws?{twice}", f"/tasks/{tasks.done}/ws?{twice}"):
        async with ws_connect(shared, path) as ws:
            frames, code, _ = await read_until_closed(ws)
        assert (code, frames) == (4401, []), path


# -- key kinds and gateway configurations ---------------------------------------------------------


async def all_http_outcomes(gateway: Gateway, task_id: int, value: str | None) -> list[str]:
    async with http_client(gateway) as client:
        return [await attempt(transport, gateway, client, task_id, value)
                for transport in ("rest-header", "sse-query", "events-header", "ws-query",
                                  "ws-auth", "taskws-header")]


async def test_a_gateway_with_only_the_public_key(
        redis_server: RedisServer, module_prefix: str, key_files: dict[str, Path],
        tasks: Tasks) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix,
                        jwt_public_key_file=str(key_files["rsa"]), jwt_leeway_s=0)
    async with run_gateway(settings) as gateway:
        assert await all_http_outcomes(
            gateway, tasks.done, token([tasks.done], key=RSA_KEY, algorithm="RS384")) == \
            ["ok"] * 6
        pem_keyed = hand_made("HS256", full_claims("*"), RSA_PEM)
        assert await all_http_outcomes(gateway, tasks.done, pem_keyed) == ["401"] * 6
        # and a token signed with a secret this gateway does not have
        assert await all_http_outcomes(gateway, tasks.done, token("*")) == ["401"] * 6


@pytest.mark.parametrize(("key_file", "private_key", "algorithm"), [
    ("p256", P256_KEY, "ES256"), ("p384", P384_KEY, "ES384"), ("ed25519", ED25519_KEY, "EdDSA"),
])
async def test_ec_and_eddsa_public_keys(
        redis_server: RedisServer, module_prefix: str, key_files: dict[str, Path],
        tasks: Tasks, key_file: str, private_key: Any, algorithm: str) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix,
                        jwt_public_key_file=str(key_files[key_file]), jwt_leeway_s=0)
    async with run_gateway(settings) as gateway, http_client(gateway) as http:
        good = token([tasks.done], key=private_key, algorithm=algorithm)
        assert await via_rest(http, tasks.done, good, "header") == "ok"
        assert await via_task_ws(gateway, tasks.done, good, "query") == "ok"
        for other in (token([tasks.done], key=RSA_KEY, algorithm="RS256"), token([tasks.done]),
                      token([tasks.done], key=ec.generate_private_key(ec.SECP256R1()),
                            algorithm="ES256")):
            assert await via_rest(http, tasks.done, other, "header") == "401"


async def test_aud_and_iss_are_ignored_when_not_configured(
        redis_server: RedisServer, module_prefix: str, tasks: Tasks) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix, jwt_secret=SECRET,
                        jwt_leeway_s=0)
    async with run_gateway(settings) as gateway:
        for value in (token([tasks.done], aud="anyone", iss="anybody"),
                      token([tasks.done], aud=["a", "b"], iss=OMIT),
                      token([tasks.done], aud=OMIT, iss=OMIT)):
            assert await all_http_outcomes(gateway, tasks.done, value) == ["ok"] * 6


async def test_leeway_lets_a_just_expired_token_in_and_extends_the_stream(
        redis_server: RedisServer, module_prefix: str, producer: Producer) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix, jwt_secret=SECRET,
                        jwt_leeway_s=1)
    task = (await producer.create()).task_id
    async with run_gateway(settings) as gateway, http_client(gateway) as http:
        if time.time() % 1 > 0.5:
            await until(math.ceil(time.time()) + 0.01)
        exp = math.floor(time.time())  # already past by the wall clock, within the leeway
        value = token([task], exp=exp)
        transcript = await read_stream(http, f"/tasks/{task}/events", headers=bearer(value),
                                       timeout=BOUND_S)
        ended_at = time.time()
        assert transcript.status == 200, transcript.body
        assert transcript.frames[-1].event == "token_expired"
        assert ended_at >= exp + 1 - 0.05  # exp plus the leeway, not exp
        await until(exp + 1.05)
        assert (await http.get(f"/tasks/{task}", headers=bearer(value))).status_code == 401


# -- SSE: token expiry -----------------------------------------------------------------------------


async def sse_expiry(client: httpx.AsyncClient, producer: Producer, exp: int,
                     multi: bool) -> None:
    """A stream gets its states, then `event: token_expired` (data `{}`) at exp, and ends."""
    first = (await producer.create()).task_id
    second = (await producer.create()).task_id
    watched = [first, second] if multi else [first]
    value = token(watched, exp=exp)
    path = (f"/events?task_id={first}&task_id={second}" if multi
            else f"/tasks/{first}/events")
    follower = Follower(client, with_token(path, value), expect=watched).start()
    try:
        async with asyncio.timeout(BOUND_S):
            await follower.ready.wait()
        await producer.progress(first, 30)
        transcript = await follower.result(BOUND_S)
    finally:
        await follower.stop()
    ended_at = time.time()
    assert transcript.status == 200
    assert transcript.ended, transcript.summary()
    last = transcript.frames[-1]
    assert (last.event, last.data, last.id) == ("token_expired", "{}", None), \
        transcript.summary()
    assert [frame for frame in transcript.frames[:-1]
            if not frame.is_task and frame.retry is None and not frame.is_keepalive] == []
    assert [task["progress"] for task in transcript.by_task()[first]] == [0, 30]
    assert ended_at >= exp - 0.05  # not before the token's exp


async def ws_expiry(gateway: Gateway, producer: Producer, exp: int, how: str) -> None:
    """A /ws socket with a token from the upgrade or an `auth` op closes 4401 at exp."""
    task = (await producer.create()).task_id
    value = token([task], exp=exp)
    path = with_token("/ws", value) if how == "query" else "/ws"
    async with ws_connect(gateway, path, bearer(value) if how == "header" else {}) as ws:
        if how == "auth":
            await send(ws, {"op": "auth", "token": value})
            assert await recv(ws) == {"type": "authenticated", "exp": exp}
        await send(ws, {"op": "subscribe", "task_ids": [task]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [task]}
        assert (await recv(ws))["data"]["version"] == 1
        await producer.progress(task, 20)
        assert (await recv(ws))["data"]["progress"] == 20
        frames, code, reason = await read_until_closed(ws)
    assert time.time() >= exp - 0.05
    assert (frames, code) == ([], 4401)
    assert "expired" in reason


async def ws_refreshed(gateway: Gateway, producer: Producer, exp: int) -> None:
    """A refresh before exp keeps the socket open past the first token's exp."""
    task = (await producer.create()).task_id
    async with ws_connect(gateway, with_token("/ws", token([task], exp=exp))) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [task]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [task]}
        await recv(ws)  # the current state
        fresh = token([task], ttl=60)
        await send(ws, {"op": "auth", "token": fresh})
        assert await recv(ws) == {"type": "authenticated", "exp": exp_of(fresh)}
        await until(exp + 0.5)
        assert await frames_before_pong(ws) == []  # still open, nothing lost
        await producer.progress(task, 55)
        state = await recv(ws)
        assert (state["type"], state["data"]["progress"]) == ("task", 55)


async def task_ws_expiry(gateway: Gateway, producer: Producer, exp: int) -> None:
    """/tasks/{id}/ws closes 4401 when its token expires mid-stream."""
    task = (await producer.create()).task_id
    async with ws_connect(gateway, f"/tasks/{task}/ws", bearer(token([task], exp=exp))) as ws:
        assert (await recv(ws))["data"]["version"] == 1
        await producer.progress(task, 60)
        assert (await recv(ws))["data"]["progress"] == 60
        frames, code, reason = await read_until_closed(ws)
    assert time.time() >= exp - 0.05
    assert (frames, code) == ([], 4401)
    assert "expired" in reason


@pytest.mark.parametrize("stack", ["taskcast", "uvicorn"])
async def test_token_expiry_ends_every_push_connection_at_exp(
        shared: Gateway, redis_server: RedisServer, module_prefix: str,
        key_files: dict[str, Path], producer: Producer, stack: str) -> None:
    """SSE streams end with `token_expired`, WebSockets close 4401, a refreshed socket stays;
    all at once on one token lifetime. `uvicorn`: its h11 and websockets-sansio protocols,
    where taskcast writes through plain ASGI instead of its direct paths."""
    async with contextlib.AsyncExitStack() as stack_:
        if stack == "taskcast":
            gateway = shared
        else:
            gateway = await stack_.enter_async_context(run_gateway(
                auth_settings(redis_server, module_prefix, key_files), http="h11",
                ws="websockets-sansio"))
        client = await stack_.enter_async_context(http_client(gateway))
        before = {transport: await expired_in_use(client, transport)
                  for transport in ("sse", "ws")}
        exp = short_exp(0.8)
        scenarios = {
            "sse single": sse_expiry(client, producer, exp, multi=False),
            "sse multi": sse_expiry(client, producer, exp, multi=True),
            "ws header": ws_expiry(gateway, producer, exp, "header"),
            "ws query": ws_expiry(gateway, producer, exp, "query"),
            "ws auth": ws_expiry(gateway, producer, exp, "auth"),
            "ws refreshed": ws_refreshed(gateway, producer, exp),
            "task ws": task_ws_expiry(gateway, producer, exp),
        }
        results = await asyncio.gather(*scenarios.values(), return_exceptions=True)
        failures = []
        for name, result in zip(scenarios, results, strict=True):
            if isinstance(result, BaseException):
                result.add_note(f"scenario: {name}")
                failures.append(result)
        if failures:
            raise BaseExceptionGroup(f"{len(failures)} scenario(s) failed", failures)
        assert await expired_in_use(client, "sse") == before["sse"] + 2
        assert await expired_in_use(client, "ws") == before["ws"] + 4  # not the refreshed one


async def expired_in_use(client: httpx.AsyncClient, transport: str) -> float:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return metric(response.text, "taskcast_auth_refusals_total", transport=transport,
                  reason="expired_in_use") or 0.0


async def test_no_token_expired_event_when_the_task_finishes_first(
        redis_server: RedisServer, module_prefix: str, producer: Producer) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix, jwt_secret=SECRET,
                        jwt_leeway_s=0)
    task = (await producer.create()).task_id
    exp = short_exp(0.8)
    async with run_gateway(settings) as gateway, http_client(gateway) as http:
        followers = [Follower(http, path, expect=[task], headers=bearer(token([task], exp=exp)))
                     .start() for path in (f"/tasks/{task}/events", f"/events?task_id={task}")]
        async with asyncio.timeout(BOUND_S):
            for follower in followers:
                await follower.ready.wait()
        await producer.complete(task, image_url="https://cdn.test/x.png")
        for follower, multi in zip(followers, (False, True), strict=True):
            transcript = await follower.result(BOUND_S)
            assert stream_problems(transcript, [task], multi=multi) == []
            assert all(frame.event != "token_expired" for frame in transcript.frames)
        async with ws_connect(gateway, f"/tasks/{task}/ws", bearer(token([task], exp=exp))) as ws:
            frames, code, _ = await read_until_closed(ws)
        assert code == 1000 and frames[-1]["data"]["status"] == "completed"
        await until(exp + 0.3)
        # the ended streams' timers were cancelled: nothing counted at exp
        for transport in ("sse", "ws"):
            assert await expired_in_use(http, transport) == 0


# -- /ws -------------------------------------------------------------------------------------------


async def test_ws_refresh_with_a_narrower_token_unsubscribes_what_it_drops(
        shared: Gateway, producer: Producer) -> None:
    kept, dropped = (await producer.create()).task_id, (await producer.create()).task_id
    async with ws_connect(shared, "/ws", bearer(token([kept, dropped]))) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [kept, dropped]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [kept, dropped]}
        assert {(await recv(ws))["data"]["task_id"] for _ in range(2)} == {kept, dropped}
        narrower = token([kept])
        await send(ws, {"op": "auth", "token": narrower})
        assert await recv(ws) == {"type": "authenticated", "exp": exp_of(narrower)}
        assert await recv(ws) == {"type": "unsubscribed", "task_ids": [dropped]}
        await producer.progress(dropped, 10)
        await producer.progress(kept, 10)
        frames = await until_task(ws, kept, 2)
        frames += await frames_before_pong(ws)
        assert [frame for frame in frames
                if frame["type"] == "task" and frame["data"]["task_id"] == dropped] == []
        # and the narrower token does not open it again
        await send(ws, {"op": "subscribe", "task_ids": [dropped]})
        assert await recv(ws) == {"type": "error", "code": 403, "msg": "forbidden",
                                  "task_ids": [dropped]}
        # a wider token does
        await send(ws, {"op": "auth", "token": token("*")})
        assert (await recv(ws))["type"] == "authenticated"
        assert await frames_before_pong(ws) == []  # nothing unsubscribed by a wider token
        await send(ws, {"op": "subscribe", "task_ids": [dropped]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [dropped]}
        assert (await recv(ws))["data"]["progress"] == 10


async def test_ws_failed_refresh_keeps_the_previous_token(
        shared: Gateway, producer: Producer) -> None:
    first, second = (await producer.create()).task_id, (await producer.create()).task_id
    async with ws_connect(shared, "/ws") as ws:
        good = token([first, second])
        await send(ws, {"op": "auth", "token": good})
        assert await recv(ws) == {"type": "authenticated", "exp": exp_of(good)}
        await send(ws, {"op": "subscribe", "task_ids": [first]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [first]}
        await recv(ws)
        for bad in ("garbage", token([first], exp=int(time.time()) - 5),
                    token([first], key=OTHER_SECRET), oversized("*"), "", 42, None):
            await send(ws, {"op": "auth", "token": bad})
            reply = await recv(ws)
            assert (reply["type"], reply["code"]) == ("error", 401), (bad, reply)
            assert reply["msg"].startswith("unauthorized")
        await send(ws, {"op": "subscribe", "task_ids": [second]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [second]}
        await recv(ws)
        await producer.progress(first, 70)
        frames = await until_task(ws, first, 2)
        assert frames[-1]["data"]["progress"] == 70


async def test_ws_subscribe_with_uncovered_ids_subscribes_the_others(
        shared: Gateway, producer: Producer) -> None:
    a, b, uncovered = [(await producer.create()).task_id for _ in range(3)]
    async with ws_connect(shared, "/ws", bearer(token([a, b, NEVER_CREATED + 1]))) as ws:
        await send(ws, {"op": "subscribe",
                        "task_ids": [a, uncovered, b, NEVER_CREATED, uncovered]})
        frames = await frames_before_pong(ws)
        assert frames[0] == {"type": "error", "code": 403, "msg": "forbidden",
                             "task_ids": [uncovered, NEVER_CREATED]}
        assert frames[1] == {"type": "subscribed", "task_ids": [a, b]}
        states = frames[2:]
        while len(states) < 2:  # the states may follow the pong
            states.append(await recv(ws))
        assert all(frame["type"] == "task" for frame in states), states
        assert sorted(frame["data"]["task_id"] for frame in states) == sorted([a, b])
        await producer.progress(uncovered, 5)
        await producer.progress(b, 5)
        later = await until_task(ws, b, 2)
        assert all(frame["data"]["task_id"] != uncovered for frame in later)
        # a covered id that does not exist is answered as in v1
        await send(ws, {"op": "subscribe", "task_ids": [NEVER_CREATED + 1]})
        assert await recv(ws) == {"type": "error", "code": 404, "msg": "task not found",
                                  "task_ids": [NEVER_CREATED + 1]}
        assert await recv(ws) == {"type": "subscribed", "task_ids": []}
        # every id uncovered: the 403 frame alone
        await send(ws, {"op": "subscribe", "task_ids": [uncovered]})
        assert await frames_before_pong(ws) == [
            {"type": "error", "code": 403, "msg": "forbidden", "task_ids": [uncovered]}]


async def test_ws_without_a_token_answers_pings_but_not_subscribes(
        shared: Gateway, producer: Producer) -> None:
    task = (await producer.create()).task_id
    async with ws_connect(shared, "/ws") as ws:
        assert await frames_before_pong(ws) == []
        await send(ws, {"op": "subscribe", "task_ids": [task]})
        reply = await recv(ws)
        assert (reply["type"], reply["code"], reply["task_ids"]) == ("error", 401, [task])
        assert reply["msg"].startswith("unauthorized")
        await send(ws, {"op": "unsubscribe", "task_ids": [task]})
        assert await recv(ws) == {"type": "unsubscribed", "task_ids": [task]}
        await producer.progress(task, 1)
        assert await frames_before_pong(ws) == []  # nothing was subscribed


async def test_ws_with_a_huge_exp_is_answered_not_dropped(
        shared: Gateway, producer: Producer) -> None:
    """A valid token whose exp does not fit in 64 bits: the `auth` op answers (authenticated,
    or a 401 error frame); a bad frame never drops the connection (contract 6)."""
    task = (await producer.create()).task_id
    far = token([task], exp=2**64)
    async with ws_connect(shared, "/ws") as ws:
        await send(ws, {"op": "auth", "token": far})
        try:
            reply = await recv(ws)
        except ConnectionClosed as exc:
            pytest.fail(f"the gateway dropped the socket: {exc!r}")
        assert reply in ({"type": "authenticated", "exp": 2**64},) or (
            reply["type"], reply["code"]) == ("error", 401), reply
        assert await frames_before_pong(ws) == []


async def test_a_far_future_exp_serves_streams_normally(
        shared: Gateway, http: httpx.AsyncClient, tasks: Tasks) -> None:
    for exp in (2**40, 2**63 - 1, 2**64):
        far = token([tasks.done], exp=exp)
        for transport in ("rest-header", "sse-query", "events-header", "ws-query",
                          "taskws-header"):
            assert await attempt(transport, shared, http, tasks.done, far) == "ok", \
                (exp, transport)


async def test_ws_auth_timeout(redis_server: RedisServer, module_prefix: str,
                               producer: Producer) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix, jwt_secret=SECRET,
                        jwt_leeway_s=0, ws_auth_timeout_s=0.5)
    task = (await producer.create()).task_id
    async with run_gateway(settings) as gateway:
        opened = time.time()
        silent = await ws_connect(gateway, "/ws")
        failed = await ws_connect(gateway, "/ws")
        authed = await ws_connect(gateway, "/ws")
        upgraded = await ws_connect(gateway, with_token("/ws", token([task])))
        try:
            assert await frames_before_pong(silent) == []
            await send(failed, {"op": "auth", "token": "garbage"})
            assert (await recv(failed))["code"] == 401
            await send(authed, {"op": "auth", "token": token([task])})
            assert (await recv(authed))["type"] == "authenticated"
            for ws in (silent, failed):
                frames, code, reason = await read_until_closed(ws)
                assert (frames, code) == ([], 4401)
                assert "token" in reason
            assert time.time() >= opened + 0.5 - 0.05
            await until(opened + 1.0)
            for ws in (authed, upgraded):  # a valid token in time: the deadline is off
                await send(ws, {"op": "subscribe", "task_ids": [task]})
                assert await recv(ws) == {"type": "subscribed", "task_ids": [task]}
            async with http_client(gateway) as http:
                response = await http.get("/metrics")
            assert metric(response.text, "taskcast_auth_refusals_total", transport="ws",
                          reason="no_token_in_time") == 2
        finally:
            for ws in (silent, failed, authed, upgraded):
                await ws.close()


# -- /tasks/{id}/ws --------------------------------------------------------------------------------


async def test_task_ws_streams_covered_states_then_closes_1000(
        shared: Gateway, producer: Producer) -> None:
    task = (await producer.create()).task_id
    async with ws_connect(shared, f"/tasks/{task}/ws", bearer(token([task]))) as ws:
        assert (await recv(ws))["data"]["version"] == 1
        await producer.progress(task, 40)
        assert (await recv(ws))["data"]["progress"] == 40
        await producer.complete(task, image_url="https://cdn.test/t.png")
        frames, code, _ = await read_until_closed(ws)
    assert code == 1000
    assert frames[-1]["data"]["status"] == "completed"


# -- auth off, public endpoints -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no-key", "auth-off"])
async def test_without_access_control_everything_is_open(
        redis_server: RedisServer, module_prefix: str, producer: Producer, tasks: Tasks,
        mode: str) -> None:
    settings = Settings(redis_url=redis_server.url, prefix=module_prefix)
    if mode == "auth-off":
        settings = settings.with_changes(auth="off", jwt_secret=SECRET)
    async with run_gateway(settings) as gateway, http_client(gateway) as http:
        for value in (None, "garbage", token([tasks.other])):
            for transport in ("rest-header", "rest-query", "sse-header", "events-query",
                              "ws-header", "ws-query", "taskws-query"):
                assert await attempt(transport, gateway, http, tasks.done, value) == "ok", \
                    (transport, value)
        async with ws_connect(gateway, "/ws") as ws:
            for value in ("garbage", token([tasks.done]), None):
                await send(ws, {"op": "auth", "token": value})
                assert await recv(ws) == {"type": "authenticated", "exp": None}
            assert await subscribe_outcome(ws, tasks.done) == "ok"
        response = await http.get("/metrics")
        assert "taskcast_auth_refusals_total{" not in response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/taskcast.js",
                                  "/metrics"])
async def test_operational_endpoints_stay_public(http: httpx.AsyncClient, path: str) -> None:
    for headers in ({}, bearer("garbage")):
        response = await http.get(path, headers=headers)
        assert response.status_code == 200, (path, response.text[:200])
        assert "www-authenticate" not in response.headers


# -- /metrics -------------------------------------------------------------------------------------


async def test_refusals_are_counted_by_transport_and_reason(
        redis_server: RedisServer, module_prefix: str, key_files: dict[str, Path],
        producer: Producer, tasks: Tasks) -> None:
    settings = auth_settings(redis_server, module_prefix, key_files, ws_auth_timeout_s=1.0)
    live = (await producer.create()).task_id
    done = tasks.done
    async with run_gateway(settings) as gateway, http_client(gateway) as http:
        # Started first, they run out while the rest happens: expired_in_use (sse and ws) and
        # no_token_in_time (ws).
        exp = short_exp(0.8)
        stream = Follower(http, f"/tasks/{live}/events", expect=[live],
                          headers=bearer(token([live], exp=exp))).start()
        expiring = await ws_connect(gateway, "/ws", bearer(token([live], exp=exp)))
        silent = await ws_connect(gateway, "/ws")
        rest_tokens = {
            "missing": None,
            "malformed": "abc",
            "signature": token([done], key=OTHER_SECRET),
            "algorithm": hand_made("none", full_claims("*"), None),
            "expired": token([done], exp=int(time.time()) - 10),
            "not_yet_valid": token([done], nbf=int(time.time()) + 3600),
            "audience": token([done], aud="other"),
            "issuer": token([done], iss="https://evil.test"),
            "claims": token("7"),
            "too_large": oversized([done]),
            "forbidden": token([tasks.other]),
        }
        for value in rest_tokens.values():
            response = await http.get(f"/tasks/{done}", headers=bearer(value))
            assert response.status_code in (401, 403)
        assert (await http.get(f"/tasks/{done}")).status_code == 401  # missing: twice
        assert (await http.get(f"/tasks/{done}", headers=bearer(token([done])))).status_code \
            == 200  # not counted
        # SSE
        assert (await http.get(f"/tasks/{done}/events")).status_code == 401
        assert (await http.get(f"/events?task_id={done}",
                               headers=bearer(token([tasks.other])))).status_code == 403
        # WebSockets
        async with ws_connect(gateway, "/ws?token=abc") as ws:
            assert (await read_until_closed(ws))[1] == 4401  # malformed
        async with ws_connect(gateway, f"/tasks/{done}/ws") as ws:
            assert (await read_until_closed(ws))[1] == 4401  # missing
        async with ws_connect(gateway, f"/tasks/{done}/ws", bearer(token([tasks.other]))) as ws:
            assert (await read_until_closed(ws))[1] == 4403  # forbidden
        async with ws_connect(gateway, "/ws") as ws:
            await send(ws, {"op": "subscribe", "task_ids": [done]})
            assert (await recv(ws))["code"] == 401  # missing
            await send(ws, {"op": "auth", "token": token([done], key=OTHER_SECRET)})
            assert (await recv(ws))["code"] == 401  # signature
            await send(ws, {"op": "auth", "token": token([done])})
            assert (await recv(ws))["type"] == "authenticated"
            await send(ws, {"op": "subscribe", "task_ids": [tasks.other]})
            assert (await recv(ws))["code"] == 403  # forbidden
        # let the timers run out
        transcript = await stream.result(BOUND_S)
        assert transcript.frames[-1].event == "token_expired"
        assert (await read_until_closed(expiring))[1] == 4401
        assert (await read_until_closed(silent))[1] == 4401
        response = await http.get("/metrics")
    counted = {(sample.labels["transport"], sample.labels["reason"]): sample.value
               for family in text_string_to_metric_families(response.text)
               for sample in family.samples if sample.name == "taskcast_auth_refusals_total"}
    expected = {("rest", reason): 1.0 for reason in rest_tokens}
    expected[("rest", "missing")] = 2.0
    expected.update({
        ("sse", "missing"): 1.0, ("sse", "forbidden"): 1.0, ("sse", "expired_in_use"): 1.0,
        ("ws", "malformed"): 1.0, ("ws", "missing"): 2.0, ("ws", "forbidden"): 2.0,
        ("ws", "signature"): 1.0, ("ws", "expired_in_use"): 1.0,
        ("ws", "no_token_in_time"): 1.0,
    })
    assert {key: value for key, value in counted.items() if value} == expected

