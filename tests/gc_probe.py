"""How much cyclic garbage finished connections leave behind, measured inside a real gateway.

Run as a process of its own (tests/test_memory.py does): it serves the gateway under uvloop,
as `taskcast serve` does, on the embedded store, and drives a client process (started once, so
that its own bookkeeping is not counted) through rounds of connections. Each round opens
`--clients` connections of one kind, ends them one way, waits until the gateway has released
them, then runs the collector once and counts what it found. The garbage of the rounds is
printed as JSON lines: {"kind", "end", "connections", "collected", "types"}.

Kinds: sse (`/tasks/{id}/events`), ws-task (`/tasks/{id}/ws`), ws-many (`/ws` + subscribe).
Ends: "client" (the client closes its connection), "terminal" (the tasks finish: SSE streams
end, per-task sockets close with 1000, /ws sockets drop the task and the client then closes),
"missing" (the records vanish: SSE streams end with `event: not_found`, per-task sockets close
with 4404, /ws sockets get an error frame and the client then closes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import socket
import sys
from typing import Any

CLIENT = r'''
import asyncio, base64, os, sys
port = int(sys.argv[1])

async def connect(kind, task_id):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if kind == "sse":
        writer.write(b"GET /tasks/%d/events HTTP/1.1\r\nhost: x\r\n\r\n" % task_id)
        await reader.readuntil(b"data:")
        return reader, writer
    path = b"/ws" if kind == "ws-many" else b"/tasks/%d/ws" % task_id
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET %b HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                 b"sec-websocket-key: %b\r\nsec-websocket-version: 13\r\n\r\n" % (path, key))
    await reader.readuntil(b"\r\n\r\n")
    if kind == "ws-many":
        payload = b'{"op":"subscribe","task_ids":[%d]}' % task_id
        mask = os.urandom(4)
        writer.write(bytes([0x81, 0x80 | len(payload)]) + mask
                     + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    await reader.readuntil(b'"type":"task"')
    return reader, writer

async def finish(kind, reader, writer, end):
    if end != "client":
        if kind == "sse":
            await reader.readuntil(b"0\r\n\r\n")  # the end of the body
        elif kind == "ws-task":
            await reader.readuntil(b"\x88")  # the close frame; answer it
            writer.write(bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]))
        else:
            await reader.readuntil(b'"completed"' if end == "terminal" else b'"code":404')
    writer.close()

async def main():
    loop = asyncio.get_running_loop()
    lines = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)
    while line := await lines.readline():
        kind, end, *ids = line.decode().split()
        limit = asyncio.Semaphore(20)  # below the store's connection pool

        async def limited(task_id):
            async with limit:
                return await connect(kind, task_id)

        conns = await asyncio.gather(*(limited(int(t)) for t in ids))
        print("open", flush=True)
        await lines.readline()
        await asyncio.gather(*(finish(kind, r, w, end) for r, w in conns))
        print("done", flush=True)

asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def probe(args: argparse.Namespace) -> None:
    import uvicorn

    from taskcast import server
    from taskcast.app import GatewayApp, create_app
    from taskcast.connection import connect
    from taskcast.keys import TaskKeys
    from taskcast.producer import Producer
    from taskcast.settings import Settings

    url = f"memory://gc-probe-{os.getpid()}"
    settings = Settings(redis_url=url, port=free_port(), log_level="warning",
                        resync_interval_s=0.2)
    app = create_app(settings)
    config = server.uvicorn_config(GatewayApp(app), settings)
    gateway = uvicorn.Server(config)
    serving = asyncio.create_task(gateway.serve())
    while not gateway.started:
        await asyncio.sleep(0.01)
    store = connect(url)
    keys = TaskKeys(settings.prefix)
    producer = Producer(store, prefix=settings.prefix)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(settings.port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    connections = app.state.connections

    async def one_round(kind: str, end: str, count: int) -> dict[str, Any]:
        ids = [(await producer.create()).task_id for _ in range(count)]
        for task_id in ids:
            await producer.progress(task_id, 10)
        client.stdin.write(f"{kind} {end} {' '.join(map(str, ids))}\n".encode())
        await client.stdin.drain()
        assert await client.stdout.readline() == b"open\n"
        if end == "terminal":
            for task_id in ids:
                await producer.complete(task_id, image_url="https://cdn.example/x.png")
        elif end == "missing":
            await store.delete(*(keys.record(task_id) for task_id in ids))
        client.stdin.write(b"\n")
        await client.stdin.drain()
        assert await client.stdout.readline() == b"done\n"
        async with asyncio.timeout(30):
            while len(connections) or gateway.server_state.connections:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        gc.set_debug(gc.DEBUG_SAVEALL)
        collected = gc.collect()
        types = collections.Counter(type(item).__qualname__ for item in gc.garbage)
        if os.environ.get("GC_PROBE_DETAIL"):
            where = collections.Counter()
            for item in gc.garbage:
                if isinstance(item, BaseException):
                    tb = item.__traceback__
                    frames = []
                    while tb is not None:
                        frames.append(f"{tb.tb_frame.f_code.co_name}:{tb.tb_lineno}")
                        tb = tb.tb_next
                    where[type(item).__qualname__ + " " + " > ".join(frames[-4:])] += 1
                elif type(item).__qualname__ in ("coroutine", "Task"):
                    where[repr(item)[:90]] += 1
            for line, times in where.most_common(12):
                print("   ", times, line, file=sys.stderr)
        gc.garbage.clear()
        gc.set_debug(0)
        return {"kind": kind, "end": end, "connections": count, "collected": collected,
                "types": dict(types.most_common(12))}

    try:
        gc.collect()
        gc.disable()  # only what each round leaves behind
        for kind in args.kinds:
            for end in args.ends:
                await one_round(kind, end, 20)  # warm-up: first-use allocations
                gc.collect()
                print(json.dumps(await one_round(kind, end, args.clients)), flush=True)
    finally:
        gc.enable()
        client.stdin.close()
        await client.wait()
        gateway.should_exit = True
        await serving


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=["sse", "ws-task", "ws-many"])
    parser.add_argument("--ends", nargs="+", default=["client", "terminal", "missing"])
    import uvloop

    uvloop.run(probe(parser.parse_args()))


if __name__ == "__main__":
    main()

