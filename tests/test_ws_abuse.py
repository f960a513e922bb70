"""Bad and abusive WebSocket clients: each gets its documented answer (close_codes.py), and the
gateway goes on serving everybody else.

After every case a second client subscribes to a task and receives its state over a new socket,
so a case that wedged the hub, the broker or the event loop shows up here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from taskcast.keys import TaskKeys
from taskcast.models import Task
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, RedisServer, run_gateway
from tests.test_ws import (
    BOUND_S,
    Frame,
    Tracker,
    close_code,
    frames_before_pong,
    metric,
    numsub,
    recv,
    send,
    subscribe,
    wait_numsub,
    ws_connect,
)

INT64_MAX = 2**63 - 1
INT_PARSING_MSG = "Input should be a valid integer, unable to parse string as an integer"


async def assert_still_serving(gateway: Gateway, producer: Producer) -> None:
    """A new client on a new socket subscribes to a new task and gets its state."""
    task = await producer.create(type="txt2img", angle="check")
    async with ws_connect(gateway) as ws:
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}


async def assert_error_frame(ws: ClientConnection, code: int) -> Frame:
    """The next frame is an error with `code`; the socket stays open and answers a ping."""
    frame = await recv(ws)
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame["msg"], str) and frame["msg"], frame
    assert await frames_before_pong(ws) == []
    return frame


@asynccontextmanager
async def gateway_with(settings: Settings, server: dict[str, Any] | None = None,
                       **changes: Any) -> AsyncIterator[Gateway]:
    async with run_gateway(settings.with_changes(**changes), **(server or {})) as gateway:
        yield gateway


# -- error frames: the connection stays open ------------------------------------------------


@pytest.mark.parametrize("text", [
    "{op: ping}", "", " ", "subscribe", '{"op": "ping"', "{'op': 'ping'}", '{"op":"ping"}x',
    "NaN",
])
async def test_a_frame_that_is_not_json_gets_error_400(
    gateway: Gateway, producer: Producer, text: str
) -> None:
    async with ws_connect(gateway) as ws:
        await ws.send(text)
        await assert_error_frame(ws, 400)
    await assert_still_serving(gateway, producer)


@pytest.mark.parametrize("text", ["[1]", '"x"', "1", "null", "true", "[]", '[{"op":"ping"}]'])
async def test_a_json_frame_that_is_not_an_object_gets_error_400(
    gateway: Gateway, producer: Producer, text: str
) -> None:
    async with ws_connect(gateway) as ws:
        await ws.send(text)
        await assert_error_frame(ws, 400)
    await assert_still_serving(gateway, producer)


@pytest.mark.parametrize("payload", [b'{"op":"ping"}', b"\x00\xff\x10", b""])
async def test_a_binary_frame_gets_error_400(
    gateway: Gateway, producer: Producer, payload: bytes
) -> None:
    async with ws_connect(gateway) as ws:
        await ws.send(payload)
        await assert_error_frame(ws, 400)
    await assert_still_serving(gateway, producer)


@pytest.mark.parametrize("frame", [
    {"op": "subscribe_all", "task_ids": [1]}, {"op": "PING"}, {"op": None}, {}, {"op": 1},
    {"op": ["subscribe"], "task_ids": [1]}, {"type": "subscribe", "task_ids": [1]},
])
async def test_an_unknown_op_gets_error_405(
    gateway: Gateway, producer: Producer, frame: dict[str, Any]
) -> None:
    async with ws_connect(gateway) as ws:
        await send(ws, frame)
        error = await assert_error_frame(ws, 405)
        assert error["op"] == frame.get("op")
    await assert_still_serving(gateway, producer)


MALFORMED_TASK_IDS: list[Any] = [None, [], {}, 5, "1,2", {"1": 1}]


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("task_ids", ["missing", *MALFORMED_TASK_IDS])
async def test_missing_empty_or_non_list_task_ids_get_error_422(
    gateway: Gateway, producer: Producer, op: str, task_ids: Any
) -> None:
    frame = {"op": op} if task_ids == "missing" else {"op": op, "task_ids": task_ids}
    async with ws_connect(gateway) as ws:
        await send(ws, frame)
        error = await assert_error_frame(ws, 422)
        assert error["op"] == op
    await assert_still_serving(gateway, producer)


@pytest.mark.parametrize("task_ids", ["missing", [], 5])
async def test_missing_empty_or_non_list_task_ids_422_carries_a_detail(
    gateway: Gateway, task_ids: Any
) -> None:
    frame = {"op": "subscribe"}
    if task_ids != "missing":
        frame["task_ids"] = task_ids
    async with ws_connect(gateway) as ws:
        await send(ws, frame)
        error = await assert_error_frame(ws, 422)
        assert isinstance(error.get("detail"), list) and error["detail"], error
        assert all(item["loc"][0] == "task_ids" for item in error["detail"])


def bound(kind: str, op: str, value: int, index: int = 0) -> dict[str, Any]:
    word = "greater than or equal to" if op == "ge" else "less than or equal to"
    limit = 0 if op == "ge" else INT64_MAX
    return {"type": kind, "loc": ["task_ids", index], "msg": f"Input should be {word} {limit}",
            "input": value, "ctx": {op: limit}}


def int_type(value: Any, index: int = 0) -> dict[str, Any]:
    return {"type": "int_type", "loc": ["task_ids", index],
            "msg": "Input should be a valid integer", "input": value}


def int_parsing(value: str, index: int = 0) -> dict[str, Any]:
    return {"type": "int_parsing", "loc": ["task_ids", index], "msg": INT_PARSING_MSG,
            "input": value}


@pytest.mark.parametrize(("task_ids", "detail"), [
    ([-1], bound("greater_than_equal", "ge", -1)),
    ([1.5], int_type(1.5)),
    (["abc"], int_parsing("abc")),
    ([True], int_type(True)),
    ([False], int_type(False)),
    ([2**63], bound("less_than_equal", "le", 2**63)),
    ([2**64 - 1], bound("less_than_equal", "le", 2**64 - 1)),
    ([1.0], int_type(1.0)),
    ([None], int_type(None)),
    ([[1]], int_type([1])),
    ([{"id": 1}], int_type({"id": 1})),
    (["-1"], bound("greater_than_equal", "ge", "-1")),
    (["1.5"], int_parsing("1.5")),
    ([" 7"], int_parsing(" 7")),
    (["9223372036854775808"], bound("less_than_equal", "le", "9223372036854775808")),
    (["1" * 5000], bound("less_than_equal", "le", "1" * 5000)),  # beyond int()'s 4300 digits
    ([1, 2, -3], bound("greater_than_equal", "ge", -3, index=2)),
], ids=lambda value: repr(value)[:30])
async def test_ids_that_are_not_non_negative_int64_get_error_422_with_detail(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str,
    task_ids: list[Any], detail: dict[str, Any]
) -> None:
    async with ws_connect(gateway) as ws:
        await send(ws, {"op": "subscribe", "task_ids": task_ids})
        error = await assert_error_frame(ws, 422)
        assert error["op"] == "subscribe"
        assert error["detail"] == [detail]
        # Nothing of a rejected frame is applied, not even its valid ids.
        if task_ids == [1, 2, -3]:
            assert await numsub(redis_server, prefix, 1) == 0
        await send(ws, {"op": "unsubscribe", "task_ids": task_ids})
        assert (await assert_error_frame(ws, 422))["detail"] == [detail]
    await assert_still_serving(gateway, producer)


async def test_string_ids_are_accepted_as_decimal_text(gateway: Gateway, producer: Producer
                                                       ) -> None:
    task = await producer.create()
    async with ws_connect(gateway) as ws:
        await send(ws, {"op": "subscribe", "task_ids": [str(task.task_id)]})
        assert await recv(ws) == {"type": "subscribed", "task_ids": [task.task_id]}
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}


async def test_many_bad_frames_on_one_socket_leave_it_working(
    gateway: Gateway, producer: Producer
) -> None:
    """Error frames do not accumulate into a close: the socket still subscribes afterwards."""
    task = await producer.create()
    async with ws_connect(gateway) as ws:
        for text in ("nope", "[1]", '{"op":"x"}', '{"op":"subscribe"}',
                     '{"op":"subscribe","task_ids":[-1]}'):
            await ws.send(text)
        codes = [(await recv(ws))["code"] for _ in range(5)]
        assert codes == [400, 400, 405, 422, 422]
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}


async def subscribe_to_a_corrupt_record(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> tuple[ClientConnection, int]:
    """A socket that follows a good task and then subscribes to a record a plain-HSET producer
    broke (an unknown status): (the socket, the good task's id)."""
    good = await producer.create()
    await asyncio.to_thread(redis_server.cli, "HSET", TaskKeys(prefix).record(4242),
                            "status", "done", "version", "3")
    ws = await ws_connect(gateway)
    await subscribe(ws, [good.task_id])
    assert await recv(ws) == {"type": "task", "data": good.to_dict()}
    await send(ws, {"op": "subscribe", "task_ids": [4242]})
    return ws, good.task_id


async def test_a_corrupt_record_in_redis_does_not_disturb_other_clients(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    ws, _ = await subscribe_to_a_corrupt_record(gateway, producer, redis_server, prefix)
    try:
        with contextlib.suppress(ConnectionClosed):
            await frames_before_pong(ws)
    finally:
        await ws.close()
    await assert_still_serving(gateway, producer)


async def test_a_corrupt_record_gets_an_error_frame_or_a_1011_close(
    gateway: Gateway, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    ws, good = await subscribe_to_a_corrupt_record(gateway, producer, redis_server, prefix)
    try:
        try:
            frame = await recv(ws)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1011, f"dropped: {exc!r}"
        else:
            assert frame["type"] == "error", frame  # the socket goes on with the good task
            assert frame["code"] == 500 and frame["task_ids"] == [4242], frame
            assert await recv(ws) == {"type": "subscribed", "task_ids": []}
            final = await producer.complete(good, image_url="https://cdn.example/ok.png")
            assert await recv(ws) == {"type": "task", "data": final.to_dict()}
    finally:
        await ws.close()


# -- closes ---------------------------------------------------------------------------------


async def test_a_frame_over_ws_max_frame_bytes_closes_1009(
    settings: Settings, producer: Producer
) -> None:
    async with gateway_with(settings, ws_max_frame_bytes=1024) as gateway:
        async with ws_connect(gateway) as ws:
            # Exactly at the limit is fine (a ping padded with JSON whitespace) ...
            await ws.send('{"op":"ping"}'.ljust(1024))
            assert await recv(ws) == {"type": "pong"}
            # ... one byte more is not.
            await ws.send('{"op":"ping"}'.ljust(1025))
            assert await close_code(ws) == 1009
        await assert_still_serving(gateway, producer)


async def test_a_frame_over_the_default_frame_limit_closes_1009(
    gateway: Gateway, producer: Producer
) -> None:
    async with ws_connect(gateway) as ws:
        await send(ws, {"op": "ping", "padding": "x" * Settings().ws_max_frame_bytes})
        assert await close_code(ws) == 1009
    await assert_still_serving(gateway, producer)


async def test_more_subscriptions_than_ws_max_subscriptions_close_4413(
    settings: Settings, producer: Producer, redis_server: RedisServer, prefix: str
) -> None:
    ids = [(await producer.create()).task_id for _ in range(8)]
    async with gateway_with(settings, ws_max_subscriptions=5) as gateway:
        async with ws_connect(gateway) as ws:  # six at once
            await send(ws, {"op": "subscribe", "task_ids": ids[:6]})
            assert await close_code(ws) == 4413
        await assert_still_serving(gateway, producer)

        async with ws_connect(gateway) as ws:  # three, then three more
            await subscribe(ws, ids[:3])
            for _ in range(3):
                await recv(ws)
            await send(ws, {"op": "subscribe", "task_ids": ids[3:6]})
            assert await close_code(ws) == 4413
        # The closed socket's subscriptions were released with it.
        for task_id in ids[:3]:
            await wait_numsub(redis_server, prefix, task_id, 0)
        await assert_still_serving(gateway, producer)


async def test_ws_max_subscriptions_counts_distinct_current_subscriptions(
    settings: Settings, producer: Producer
) -> None:
    ids = [(await producer.create()).task_id for _ in range(7)]
    async with gateway_with(settings, ws_max_subscriptions=5) as gateway, \
            ws_connect(gateway) as ws:
        tracker = Tracker()
        # Duplicates count once, and so does subscribing again to what is subscribed.
        await send(ws, {"op": "subscribe", "task_ids": [ids[0]] * 6})
        reply = await recv(ws)
        assert reply["type"] == "subscribed" and set(reply["task_ids"]) == {ids[0]}
        tracker.add(await recv(ws))
        await subscribe(ws, ids[:5])
        for _ in range(4):
            tracker.add(await recv(ws))
        await subscribe(ws, ids[:5])
        assert await frames_before_pong(ws) == []
        assert set(tracker.versions) == set(ids[:5])
        # Unsubscribing frees slots.
        await send(ws, {"op": "unsubscribe", "task_ids": ids[:2]})
        assert await recv(ws) == {"type": "unsubscribed", "task_ids": ids[:2]}
        await subscribe(ws, ids[5:7])
        for _ in range(2):
            tracker.add(await recv(ws))
        # So does a task's terminal state: it releases the task.
        for task_id in ids[2:7]:
            await producer.complete(task_id, image_url="https://cdn.example/done.png")
        await tracker.until_terminal(ws, ids[2:7])
        await subscribe(ws, ids[:2])
        assert {(await recv(ws))["data"]["task_id"] for _ in range(2)} == set(ids[:2])
        assert await frames_before_pong(ws) == []


async def test_an_op_flood_beyond_ws_ops_burst_closes_4429(
    settings: Settings, producer: Producer
) -> None:
    async with gateway_with(settings, ws_ops_burst=10, ws_ops_per_s=1) as gateway:
        async with ws_connect(gateway) as ws:
            # The burst itself is allowed ...
            for _ in range(10):
                await send(ws, {"op": "ping"})
            for _ in range(10):
                assert await recv(ws) == {"type": "pong"}
        async with ws_connect(gateway) as ws:
            # ... a flood is closed.
            try:
                for _ in range(50):
                    await send(ws, {"op": "ping"})
            except ConnectionClosed:
                pass  # the gateway may already have closed
            frames: list[str | bytes] = []
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(BOUND_S):
                    while True:
                        frames.append(await ws.recv())
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
            assert set(frames) <= {'{"type":"pong"}'}
            assert len(frames) <= 11
        await assert_still_serving(gateway, producer)


# -- Origin ---------------------------------------------------------------------------------


async def refused_with(gateway: Gateway, path: str, origin: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(gateway, path, origin=origin):
            pass
    return refused.value.response.status_code


async def assert_accepted(gateway: Gateway, producer: Producer, origin: str | None) -> None:
    task = await producer.create()
    options = {} if origin is None else {"origin": origin}
    async with ws_connect(gateway, **options) as ws:
        await subscribe(ws, [task.task_id])
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}
    async with ws_connect(gateway, f"/tasks/{task.task_id}/ws", **options) as ws:
        assert await recv(ws) == {"type": "task", "data": task.to_dict()}


async def test_by_default_only_the_same_host_or_no_origin_may_connect(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    for origin in ("https://evil.example", "http://127.0.0.1.evil.example",
                   f"http://127.0.0.1:{gateway.port + 1}", "null", f"http://localhost:{gateway.port}"):
        for path in ("/ws", f"/tasks/{task.task_id}/ws"):
            assert await refused_with(gateway, path, origin) == 403
        await assert_still_serving(gateway, producer)
    await assert_accepted(gateway, producer, None)  # not a browser
    await assert_accepted(gateway, producer, f"http://127.0.0.1:{gateway.port}")
    await assert_accepted(gateway, producer, f"http://127.0.0.1:{gateway.port}/")


async def test_listed_origins_are_accepted_and_others_refused_with_403(
    settings: Settings, producer: Producer
) -> None:
    allowed = " https://app.example , https://admin.example/,"
    async with gateway_with(settings, allowed_origins=allowed) as gateway:
        for origin in ("https://app.example", "https://admin.example", "https://app.example/"):
            await assert_accepted(gateway, producer, origin)
        for origin in ("https://evil.example", "http://app.example", "https://app.example:8443",
                       "https://app.example.evil.example", "https://sub.app.example"):
            assert await refused_with(gateway, "/ws", origin) == 403
        await assert_accepted(gateway, producer, None)
        await assert_accepted(gateway, producer, f"http://127.0.0.1:{gateway.port}")


async def test_a_star_in_allowed_origins_accepts_any_origin(
    settings: Settings, producer: Producer
) -> None:
    async with gateway_with(settings, allowed_origins="*") as gateway:
        for origin in ("https://evil.example", "null", "http://anything:1234"):
            await assert_accepted(gateway, producer, origin)


# -- a client that stops reading --------------------------------------------------------------


class RawClient:
    """A WebSocket client on a bare TCP socket: handshake and frames by hand, and it can stop
    reading altogether (a tiny receive buffer makes the gateway's writes back up quickly)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    async def handshake(self, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        async with asyncio.timeout(BOUND_S):
            await self.loop.sock_connect(self.sock, ("127.0.0.1", self.port))
            await self.loop.sock_sendall(self.sock, request.encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):  # byte by byte: read nothing past it
                chunk = await self.loop.sock_recv(self.sock, 1)
                assert chunk, "the gateway closed during the handshake"
                head += chunk
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101 "), head
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        headers = {name.lower(): value.strip() for name, _, value in
                   (line.partition(":") for line in lines[1:] if line)}
        assert headers.get("sec-websocket-accept") == accept, head

    async def send_text(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        if len(payload) < 126:
            head = struct.pack("!BB", 0x81, 0x80 | len(payload))
        else:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        async with asyncio.timeout(BOUND_S):
            await self.loop.sock_sendall(self.sock, head + mask + masked)

    async def _read_exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = await self.loop.sock_recv(self.sock, min(size - len(data), 1 << 20))
            if not chunk:
                return None
            data += chunk
        return data

    async def drain_until_closed(self, bound_s: float) -> tuple[int, int | None]:
        """Read server frames until the connection ends: (terminal states, close code or None).

        A close frame is answered, as the protocol asks, so the gateway may end the TCP
        connection; an end without one (the gateway gave up on the close handshake) is None.
        """
        terminal, code = 0, None
        async with asyncio.timeout(bound_s):
            while (head := await self._read_exactly(2)) is not None:
                opcode, size = head[0] & 0x0F, head[1] & 0x7F
                assert not head[1] & 0x80, "server frames are not masked"
                if size >= 126:
                    extended = await self._read_exactly(2 if size == 126 else 8)
                    if extended is None:
                        break
                    size = int.from_bytes(extended, "big")
                payload = await self._read_exactly(size) if size else b""
                if payload is None:
                    break
                if opcode == 0x1 and b'"status":"completed"' in payload[:80]:
                    terminal += 1
                elif opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    await self.send_close(code or 1000)
        return terminal, code

    async def send_close(self, code: int) -> None:
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(struct.pack("!H", code)))
        with contextlib.suppress(OSError):
            await self.loop.sock_sendall(self.sock, bytes([0x88, 0x82]) + mask + payload)

    def close(self) -> None:
        self.sock.close()


async def wait_for_metric(gateway: Gateway, name: str, done: Any, bound_s: float = 20.0,
                          **labels: str) -> float:
    async with asyncio.timeout(bound_s):
        while not done(value := await metric(gateway, name, **labels)):
            await asyncio.sleep(0.05)
    return value


@asynccontextmanager
async def stalled_client(gateway: Gateway, task_ids: list[int]) -> AsyncIterator[RawClient]:
    """A client subscribed to the tasks that then never reads another byte."""
    client = RawClient(gateway.port)
    try:
        await client.handshake("/ws")
        await client.send_text(orjson.dumps({"op": "subscribe", "task_ids": task_ids}).decode())
        yield client
    finally:
        client.close()


def tasks_to_stall() -> int:
    """Enough 1 MB images to overflow the kernel's send buffer (it may grow to tcp_wmem's max)
    and then asyncio's: only then does a gateway write have to wait for the client."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 << 20
    return max(6, wmem_max // (1 << 20) + 4)


async def complete_with_big_images(producer: Producer, task_ids: list[int]) -> dict[int, Task]:
    """One 1 MB image after the other: far more than the stalled client's buffers hold."""
    image = os.urandom(1 << 20)
    finals = {}
    async with asyncio.timeout(30):
        for task_id in task_ids:
            await producer.progress(task_id, 50)
            finals[task_id] = await producer.complete(task_id, image_base64=image)
    return finals


async def test_a_client_that_stops_reading_is_closed_and_others_still_get_terminal_states(
    settings: Settings, producer: Producer
) -> None:
    ids = [(await producer.create(type="txt2img")).task_id for _ in range(tasks_to_stall())]
    async with gateway_with(settings, send_timeout_s=1.0) as gateway, ws_connect(
        gateway
    ) as full, ws_connect(gateway, "/ws?image_base64=false") as lean:
        async with stalled_client(gateway, ids) as stalled:
            trackers = [Tracker(), Tracker()]
            for ws in (full, lean):
                await subscribe(ws, ids)
            readers = [asyncio.create_task(tracker.until_terminal(ws, ids, bound_s=30))
                       for tracker, ws in zip(trackers, (full, lean), strict=True)]
            finals = await complete_with_big_images(producer, ids)
            async with asyncio.timeout(30):
                await asyncio.gather(*readers)

            await wait_for_metric(gateway, "taskcast_slow_client_disconnects_total",
                                  lambda value: value > 0, transport="ws")
            # Only the two readers are still open connections for the gateway.
            await wait_for_metric(gateway, "taskcast_open_connections",
                                  lambda value: value == 2, transport="ws")
            for task_id in ids:
                assert trackers[0].terminal[task_id] == finals[task_id].to_dict()
                assert trackers[1].terminal[task_id] == finals[task_id].to_dict(
                    include_image_base64=False)
            for ws in (full, lean):
                assert await frames_before_pong(ws) == []
            # When the stalled client reads again it finds the end of the connection (after
            # the frames that were in flight), with 1013 if the close frame got out at all.
            terminal, code = await stalled.drain_until_closed(bound_s=20)
            assert terminal < len(ids)  # it was cut off before the end
            assert code in (1013, None)
        await assert_still_serving(gateway, producer)


# Under taskcast's own WebSocket connection, and under uvicorn's (the plain ASGI path).
@pytest.mark.parametrize("server", [{}, {"http": "h11", "ws": "websockets-sansio"}],
                         ids=["taskcast-websocket", "uvicorn-websocket"])
async def test_a_client_that_never_reads_again_has_its_connection_released(
    settings: Settings, producer: Producer, server: dict[str, Any]
) -> None:
    ids = [(await producer.create()).task_id for _ in range(tasks_to_stall())]
    async with gateway_with(settings, server, send_timeout_s=1.0) as gateway:
        async with stalled_client(gateway, ids):
            await complete_with_big_images(producer, ids)
            await wait_for_metric(gateway, "taskcast_slow_client_disconnects_total",
                                  lambda value: value > 0, transport="ws")
            await wait_for_metric(gateway, "taskcast_open_connections",
                                  lambda value: value == 0, transport="ws")
            # The gateway has given up on the client: its connection should be gone too
            # (send timeout + close timeout + slack), without the client's help.
            async with asyncio.timeout(6.0):
                while gateway.server.server_state.connections:
                    await asyncio.sleep(0.05)
