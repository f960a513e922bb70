"""What verifying an access token costs (bench/README.md, "Issue 11"), three ways:

1. `verify`: tokens.Verifier.verify on fresh HS256 tokens, in a tight loop;
2. `cache hit`: the same token again with remember=True (what a REST poller costs);
3. `in the gateway`: access.Gate.authenticate timed in place while N SSE clients connect, each
   with a token of its own, to a real gateway (uvicorn in this process, a redis-server on a
   free port started here, as the tests do).

    .venv/bin/python bench/token_cost.py [--clients 1500]

The third figure is the one that shows up in the connect benchmark: the same code runs with
colder caches between connections than in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, run_gateway  # noqa: E402

from taskcast import access  # noqa: E402
from taskcast.connection import connect  # noqa: E402
from taskcast.producer import Producer  # noqa: E402
from taskcast.settings import Settings  # noqa: E402
from taskcast.tokens import Verifier, issue  # noqa: E402

SECRET = "taskcast-bench-hs256-secret-not-for-production"


def in_a_loop(count: int) -> tuple[float, float]:
    """µs per verification of fresh tokens, and per cache hit."""
    verifier = Verifier(secret=SECRET)
    tokens = iter([issue(SECRET, [n], 600, claims={"sub": f"loop-{n}"}) for n in range(count)])
    fresh = timeit.timeit(lambda: verifier.verify(next(tokens)), number=count) / count
    token = issue(SECRET, [1], 600)
    verifier.verify(token, remember=True)
    hit = timeit.timeit(lambda: verifier.verify(token, remember=True), number=count) / count
    return fresh * 1e6, hit * 1e6


async def in_the_gateway(clients: int) -> tuple[float, int]:
    """µs per Gate.authenticate while `clients` SSE clients connect, and how many ran."""
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = RedisServer(Path(workdir))
        redis_server.start()
        try:
            redis = connect(redis_server.url, timeout=2.0)
            producer = Producer(redis)
            ids = [(await producer.create()).task_id for _ in range(100)]
            tokens = [issue(SECRET, [ids[n % 100]], 600, claims={"sub": f"client-{n}"})
                      for n in range(clients)]
            spent: list[float] = [0.0, 0.0]
            original = access.Gate.authenticate

            def timed(self: access.Gate, *args: object, **kwargs: object) -> object:
                started = time.perf_counter()
                try:
                    return original(self, *args, **kwargs)  # type: ignore[call-overload]
                finally:
                    spent[0] += time.perf_counter() - started
                    spent[1] += 1

            access.Gate.authenticate = timed  # type: ignore[assignment,method-assign]
            try:
                async with run_gateway(Settings(redis_url=redis_server.url,
                                                jwt_secret=SECRET)) as gateway:
                    streams = []
                    for n in range(clients):
                        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                        writer.write(f"GET /tasks/{ids[n % 100]}/events?token={tokens[n]} "
                                     "HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                        streams.append((reader, writer))
                    for reader, _ in streams:
                        await reader.readuntil(b"data:")
                    for _, writer in streams:
                        writer.close()
            finally:
                access.Gate.authenticate = original  # type: ignore[method-assign]
            await redis.aclose()
        finally:
            redis_server.stop()
    return spent[0] / max(1.0, spent[1]) * 1e6, int(spent[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1500)
    args = parser.parse_args()
    fresh, hit = in_a_loop(20_000)
    print(f"verify, fresh HS256 tokens in a loop: {fresh:.1f} us")
    print(f"verify, cache hit (remember=True):    {hit:.2f} us")
    gateway, count = asyncio.run(in_the_gateway(args.clients))
    print(f"Gate.authenticate in the gateway ({count} SSE connects): {gateway:.1f} us")


if __name__ == "__main__":
    main()
